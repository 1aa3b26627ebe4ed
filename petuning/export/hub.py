"""Pushing an exported folder to the Hugging Face Hub, the token kept out of every message."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from petuning.export.load import PathLike, _first_line


class PushError(RuntimeError):
    """A Hub upload failed. The local folder is untouched; pushing it again is safe."""


def check_repo_id(repo_id: str) -> None:
    """Raise ``ValueError`` unless ``repo_id`` is a valid Hub repo id ("name" or "namespace/name")."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(
            f"{repo_id!r} is not a valid Hub repo id: {_first_line(error)} Use 'namespace/name'."
        ) from None


def _resolve_token(token: Optional[str]) -> str:
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise PermissionError(
            "No Hugging Face credentials found for the push. Set the HF_TOKEN environment variable or run "
            "`hf auth login`, then retry."
        )
    return token


def push_folder(folder: PathLike, repo_id: str, *, private: bool = False, token: Optional[str] = None) -> str:
    """Upload an exported folder to the Hub model repo ``repo_id`` (created if missing) in one commit.

    Uses ``HfApi.create_repo`` + ``upload_folder`` (not ``push_to_hub``, which under transformers 5 replaces the
    card). The token comes from ``token``, ``HF_TOKEN`` or the stored login, and never appears in messages.
    Raises :class:`PushError` if the upload fails; the local folder is left as it was, so retrying is safe.
    Returns the commit URL.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    if not (folder / "README.md").is_file():
        raise FileNotFoundError(f"{folder} is not a petuning export (no README.md). Export it first.")
    check_repo_id(repo_id)
    token = _resolve_token(token)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            commit_message=f"Upload {folder.name} exported by petuning",
        )
    except (HfHubHTTPError, OSError, ValueError, RuntimeError) as error:
        message = _describe_chain(error).replace(token, "***")
        raise PushError(
            f"Upload of {folder} to {repo_id} failed: {message}\nThe local export in {folder} is complete "
            f"and unchanged, and the Hub repo received no partial commit. Retry with: petuning push {folder} {repo_id}"
        ) from None
    return str(commit.commit_url)


def _describe_chain(error: BaseException) -> str:
    """The first line of an error and of each error that caused it ("uploading x failed: 507 Server Error ...")."""
    lines, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        line = _first_line(error)
        if line not in lines:
            lines.append(line)
        error = error.__cause__ or error.__context__
    return " <- ".join(lines)
