"""Folders that appear complete or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from petuning.export.load import PathLike


@contextlib.contextmanager
def atomic_folder(out: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``out``; on success rename it to ``out``, on error delete it.

    ``out`` therefore appears complete or not at all. An existing ``out`` is refused unless ``overwrite``; then it is
    replaced only after the new folder is complete.
    """
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists. Choose another --out or pass --overwrite to replace it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / out.name)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
