"""GGUF files for llama.cpp (and ollama, LM Studio), written by llama.cpp's own converter.

A merged (or PAT-pruned) transformers folder is handed to ``convert_hf_to_gguf.py`` from llama.cpp, pinned to the
release vendored in the ``llama-cpp-python`` source distribution (:data:`LLAMA_CPP_PYTHON`). We run llama.cpp's
converter rather than writing tensors with the ``gguf`` package ourselves because what makes a GGUF file usable is
not the tensor container but the parts llama.cpp reads with its own rules, which its converter keeps in step with
its runtime: the rotary permutation of the query/key rows, the per-architecture metadata keys (for a pruned model the
head size comes from ``rope.dimension_count``/``attention.key_length``, not hidden size / heads), and above all the
tokenizer, whose pre-tokenizer llama.cpp identifies from a table of known tokenizers. A second copy of those rules
would drift from llama.cpp's; the converter is the reference.

The converter runs in a subprocess with this interpreter (it needs torch, transformers, numpy and sentencepiece,
which petuning's ``gguf`` extra installs) and its own vendored ``gguf-py``. :func:`fetch_converter` (also
``python -m petuning.export.llama_cpp``) downloads the source distribution from PyPI once and keeps only the
converter, about 2 MB, under petuning's cache.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Optional, Union

PathLike = Union[str, os.PathLike]

#: The llama-cpp-python release whose vendored llama.cpp converter petuning runs (and tests against).
LLAMA_CPP_PYTHON = "0.3.36"
#: ``--gguf-type`` choices: the converter's ``--outtype`` values petuning offers.
GGUF_TYPES = ("f16", "bf16", "q8_0")
#: Architectures whose GGUF export is tested here (llama.cpp's converter and transformers' GGUF loader both read
#: them, including a PAT-pruned hidden size).
GGUF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
CONVERTER = "convert_hf_to_gguf.py"
_KEPT = (CONVERTER, "conversion/", "gguf-py/", "LICENSE")


def default_converter_dir() -> Path:
    """Where :func:`fetch_converter` puts the converter: ``<petuning cache>/llama.cpp-<release>``."""
    from petuning.recipe.smollm2 import default_cache_dir

    return default_cache_dir() / f"llama.cpp-{LLAMA_CPP_PYTHON}"


def find_converter(llama_cpp: Optional[PathLike] = None) -> Path:
    """Path of ``convert_hf_to_gguf.py``: in ``llama_cpp`` if given, else ``$LLAMA_CPP_DIR``, else the fetched copy.

    ``llama_cpp`` may be a llama.cpp checkout, an unpacked ``llama-cpp-python`` source distribution (its
    ``vendor/llama.cpp``) or the folder :func:`fetch_converter` writes. Raises ``FileNotFoundError`` naming the fix.
    """
    explicit = llama_cpp if llama_cpp is not None else os.environ.get("LLAMA_CPP_DIR")
    roots = [Path(explicit).expanduser()] if explicit else [default_converter_dir()]
    for root in roots:
        for candidate in (root / CONVERTER, root / "vendor" / "llama.cpp" / CONVERTER):
            if candidate.is_file():
                return candidate
    where = f"{roots[0]} has no {CONVERTER}" if explicit else f"it is not in {roots[0]}"
    raise FileNotFoundError(
        f"GGUF export runs llama.cpp's converter ({CONVERTER}), but {where}. Fetch the pinned copy with "
        f"`python -m petuning.export.llama_cpp` (downloads llama-cpp-python {LLAMA_CPP_PYTHON}'s source from PyPI), "
        "or point --llama-cpp (or $LLAMA_CPP_DIR) at a llama.cpp checkout."
    )


def fetch_converter(dest: Optional[PathLike] = None) -> Path:
    """Download llama-cpp-python's source distribution and keep its llama.cpp converter in ``dest``.

    Idempotent: an existing complete copy is kept. The copy is unpacked to a temporary sibling and renamed into place,
    so an interrupted fetch leaves nothing behind. Returns the converter's path.
    """
    dest = Path(dest) if dest is not None else default_converter_dir()
    if (dest / CONVERTER).is_file():
        return dest / CONVERTER
    if dest.exists():  # not a copy this function wrote (those appear complete or not at all)
        raise FileExistsError(f"{dest} exists but holds no {CONVERTER}; remove it, or pass another destination")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.tmp-", dir=dest.parent) as scratch:
        download = [
            "download",
            "-q",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            scratch,
            f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
        ]
        pip = [sys.executable, "-m", "pip"] if importlib.util.find_spec("pip") else None
        if pip is None:
            raise RuntimeError(
                f"fetching llama.cpp's converter needs pip in this environment ({sys.executable}); install it "
                f"(python -m ensurepip), or unpack llama-cpp-python {LLAMA_CPP_PYTHON}'s sdist yourself and pass "
                "--llama-cpp DIR"
            )
        subprocess.run([*pip, *download], check=True)
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        with tarfile.open(next(Path(scratch).glob("llama_cpp_python-*.tar.gz"))) as archive:
            members = [
                m
                for m in archive.getmembers()
                if m.isfile() and m.name.startswith(prefix) and m.name[len(prefix) :].startswith(_KEPT)
            ]
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.10.12
            archive.extractall(scratch, members=members, **safe)
        os.rename(Path(scratch) / prefix, dest)
    return dest / CONVERTER


def check_convertible(config: dict) -> None:
    """Raise ``ValueError`` unless the transformers ``config`` (config.json's dict) is an architecture GGUF export
    supports."""
    architectures = config.get("architectures") or [config.get("model_type", "unknown")]
    unsupported = [a for a in architectures if a not in GGUF_ARCHITECTURES]
    if unsupported:
        raise ValueError(
            f"GGUF export supports {', '.join(GGUF_ARCHITECTURES)}; this model is {', '.join(unsupported)}. Export "
            "with --format merged instead (a transformers checkpoint), and convert that folder with llama.cpp's "
            f"{CONVERTER} yourself if llama.cpp supports the architecture."
        )


def convert_to_gguf(
    model_dir: PathLike, outfile: PathLike, gguf_type: str = "f16", llama_cpp: Optional[PathLike] = None
) -> Path:
    """Convert the transformers folder ``model_dir`` (weights, config and tokenizer) to the GGUF file ``outfile``.

    ``gguf_type``: "f16", "bf16" or "q8_0" (the converter keeps norms and other 1-D tensors in float32). Raises
    ``ValueError`` for an unsupported architecture or a tokenizer llama.cpp does not know, ``RuntimeError`` with the
    converter's last lines for any other failure.
    """
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type must be one of {GGUF_TYPES}, got {gguf_type!r}.")
    model_dir = Path(model_dir)
    check_convertible(json.loads((model_dir / "config.json").read_text()))
    if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "tokenizer.model").is_file():
        raise ValueError(
            f"{model_dir} has no tokenizer; a GGUF file carries its tokenizer. Save the tokenizer next to the adapter "
            "(tokenizer.save_pretrained(adapter_dir)) or pass a base that has one."
        )
    converter = find_converter(llama_cpp)
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # the converter's own gguf-py, not ours
    process = subprocess.run(
        [sys.executable, str(converter), str(model_dir), "--outfile", str(outfile), "--outtype", gguf_type],
        capture_output=True,
        text=True,
        env=env,
    )
    if process.returncode != 0:
        tail = "\n".join((process.stderr or process.stdout).strip().splitlines()[-6:])
        if "pre-tokenizer was not recognized" in process.stderr:
            raise ValueError(
                "llama.cpp does not recognize this model's tokenizer (its converter identifies BPE pre-tokenizers "
                "from a table of published models), so the GGUF file would tokenize differently from transformers. "
                "Use a tokenizer of a published model that llama.cpp lists, or add it to llama.cpp first."
            )
        raise RuntimeError(f"llama.cpp's {CONVERTER} failed (exit {process.returncode}):\n{tail}")
    return Path(outfile)


def main() -> None:
    dest = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    print(f"llama.cpp's converter (llama-cpp-python {LLAMA_CPP_PYTHON}) is at {fetch_converter(dest)}")


if __name__ == "__main__":
    main()
