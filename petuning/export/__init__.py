"""Export a petuning adapter as a plain transformers checkpoint, a standard peft LoRA adapter or a native adapter,
with a model card petuning writes itself, and push it to the Hugging Face Hub.

Four formats (``export_adapter(..., format=...)``, CLI ``petuning export --format``):

* ``"merged"`` (default): the base named in the adapter config (or ``base=``) is loaded unquantized, in the dtype
  its checkpoint stores; the adapter is applied and merged through PEFT's generic ``merge_and_unload`` (each tuner
  merges its own layers; this module has no per-method code); the result is cast to the requested dtype and written
  as sharded safetensors with the tokenizer and generation config. It loads with
  ``AutoModelForCausalLM.from_pretrained`` in a process that never imports petuning. ``prune=True`` asks the tuner
  for ``petuning_prune_and_unload()`` instead (PAT: a smaller model).
* ``"lora"``: every additive petuning layer reports its dense update ΔW (``get_delta_weight``); ΔW is factored by
  SVD into a standard peft LoRA adapter. Exact when ``rank(ΔW) <= rank``; otherwise the truncation's relative
  Frobenius error is reported per layer and overall (:class:`LoraConversion`). Loads with peft alone.
* ``"adapter"``: the native adapter files with a card (loading them needs ``import petuning``).
* ``"gguf"``: the merged (or, with ``prune=True``, pruned) model as one GGUF file for llama.cpp, written by
  llama.cpp's own converter (:mod:`petuning.export.llama_cpp` says why), in f16, bf16 or q8_0. Llama-family models.

Rules kept everywhere: the output folder is written to a temporary sibling and renamed into place, so it appears
complete or not at all, and an existing folder is replaced only with ``overwrite=True``; only safetensors files are
read (pickle checkpoints are refused, since unpickling runs code); the Hub token is passed to ``huggingface_hub``
and nowhere else, and is scrubbed from error messages.

One module per job: :mod:`~petuning.export.load` (safetensors checks, the adapter and its base),
:mod:`~petuning.export.merge` (merge or prune), :mod:`~petuning.export.lora` (LoRA conversion),
:mod:`~petuning.export.llama_cpp` (GGUF), :mod:`~petuning.export.card` (the model card),
:mod:`~petuning.export.atomic` (atomic folders) and :mod:`~petuning.export.hub` (the push); this module runs
them in order (:func:`export_adapter`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import save_file

import petuning.tuners  # noqa: F401  (registers every petuning method with PEFT)
from petuning.export.atomic import atomic_folder
from petuning.export.card import hub_base_id, training_summary, write_model_card
from petuning.export.hub import PushError, _resolve_token, check_repo_id, push_folder
from petuning.export.load import ADAPTER_WEIGHTS, DTYPES, PathLike, check_safetensors, load_adapter_model
from petuning.export.lora import LayerConversion, LoraConversion, adapter_to_lora
from petuning.export.merge import check_not_quantized, merge, method_name

__all__ = [
    "DTYPES",
    "FORMATS",
    "ExportResult",
    "LayerConversion",
    "LoraConversion",
    "PushError",
    "adapter_to_lora",
    "atomic_folder",
    "check_not_quantized",
    "check_repo_id",
    "check_safetensors",
    "export_adapter",
    "hub_base_id",
    "load_adapter_model",
    "merge",
    "method_name",
    "push_folder",
    "training_summary",
    "write_model_card",
]

FORMATS = ("merged", "lora", "adapter", "gguf")


def _save_tokenizer(folder: Path, sources: list[str]) -> Optional[str]:
    """Copy the tokenizer from the first of ``sources`` that has one; return that source (None if none has)."""
    from transformers import AutoTokenizer

    for source in sources:
        if Path(source).is_dir() and not any(
            (Path(source) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
        ):
            continue
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        except (OSError, ValueError):
            continue
        tokenizer.save_pretrained(folder)
        return source
    warnings.warn(
        f"No tokenizer found in {sources}; the export has none. Save one next to the adapter to include it.",
        stacklevel=2,
    )
    return None


@dataclass
class ExportResult:
    folder: Path
    format: str
    files: list[str]
    conversion: Optional[LoraConversion] = None
    tokenizer_source: Optional[str] = None
    url: Optional[str] = None


def export_adapter(
    adapter_dir: PathLike,
    out: PathLike,
    *,
    format: str = "merged",
    base: Optional[PathLike] = None,
    base_model_id: Optional[str] = None,
    dtype: Union[str, torch.dtype] = "auto",
    max_shard_size: Union[int, str] = "5GB",
    prune: bool = False,
    lora_rank: Optional[int] = None,
    gguf_type: str = "f16",
    llama_cpp: Optional[PathLike] = None,
    summary: Optional[dict] = None,
    overwrite: bool = False,
    push_to_hub: Optional[str] = None,
    private: bool = False,
    token: Optional[str] = None,
) -> ExportResult:
    """Export the adapter saved in ``adapter_dir`` to the folder ``out`` (see the module docstring for formats).

    ``base``: base model folder or Hub id (default: the one in ``adapter_config.json``); ``base_model_id``: the Hub id
    written to the card when the base is a local folder; ``dtype``: "auto" (the base checkpoint's), "float32",
    "bfloat16", "float16" or a torch dtype; ``max_shard_size``: per safetensors shard (merged); ``gguf_type``: "f16",
    "bf16" or "q8_0" (gguf); ``llama_cpp``: a llama.cpp checkout to take the converter from (gguf; default: the copy
    ``python -m petuning.export.llama_cpp`` fetches); ``summary``: training summary for the card (default:
    :func:`training_summary`); ``push_to_hub``: a repo id to upload the folder to (see :func:`push_folder`).
    """
    # Imported here, not at the top: `python -m petuning.export.llama_cpp` (the converter's fetch) imports this
    # package first, and runpy warns when the module it is about to run is already loaded.
    from petuning.export.llama_cpp import GGUF_TYPES, check_convertible, convert_to_gguf, find_converter

    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}.")
    if prune and format not in ("merged", "gguf"):
        raise ValueError("--prune produces a merged model; it cannot be combined with --format lora/adapter.")
    if lora_rank is not None and format != "lora":
        raise ValueError("--lora-rank only applies to --format lora.")
    if format == "gguf" and dtype != "auto":
        raise ValueError("--dtype does not apply to --format gguf; choose the file's precision with --gguf-type.")
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"--gguf-type must be one of {GGUF_TYPES}, got {gguf_type!r}.")
    if format == "gguf":
        find_converter(llama_cpp)  # fail before any work when the converter is missing
    if isinstance(dtype, str) and dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}.")
    if push_to_hub:
        check_repo_id(push_to_hub)
        token = _resolve_token(token)
    out, adapter_dir = Path(out).absolute(), Path(adapter_dir).absolute()
    for protected in (adapter_dir, Path(base).absolute() if base else None):
        if protected is not None and (out == protected or out in protected.parents):
            raise ValueError(f"--out {out} would overwrite the input {protected}; choose another folder.")

    if format == "adapter" and dtype != "auto":
        raise ValueError("--dtype does not apply to --format adapter (the adapter's files are copied as they are).")
    # Merge in the checkpoint's own dtype and cast afterwards, so each merged weight is rounded once; convert from
    # float32, so that the SVD sees ΔW at full precision.
    peft_model = load_adapter_model(adapter_dir, base, "float32" if format == "lora" else "auto")
    config = peft_model.peft_config[peft_model.active_adapter]
    base_ref = str(base) if base is not None else config.base_model_name_or_path
    base_id = hub_base_id(base_ref, base_model_id)
    if summary is None:
        summary = training_summary(adapter_dir)
    conversion = None
    gguf_file = None
    if format == "gguf":
        check_convertible(peft_model.get_base_model().config.to_dict())
    with atomic_folder(out, overwrite) as tmp:
        if format == "gguf":
            gguf_file = f"{out.name}-{gguf_type}.gguf"
            with tempfile.TemporaryDirectory(prefix=f".{out.name}.hf-", dir=out.parent) as hf_dir:
                merge(peft_model, prune=prune).save_pretrained(hf_dir)
                tokenizer_source = _save_tokenizer(Path(hf_dir), [str(adapter_dir), base_ref])
                if tokenizer_source is None:
                    raise ValueError(
                        f"GGUF export needs a tokenizer (the file carries it), and neither {adapter_dir} nor the base "
                        f"{base_ref} has one; save it next to the adapter (tokenizer.save_pretrained(adapter_dir))"
                    )
                convert_to_gguf(hf_dir, tmp / gguf_file, gguf_type, llama_cpp)
            kind = "pruned-gguf" if prune else "gguf"
        elif format == "merged":
            model = merge(peft_model, prune=prune)
            if isinstance(dtype, torch.dtype) or dtype != "auto":
                model = model.to(DTYPES.get(dtype, dtype))
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
            kind = "pruned" if prune else "merged"
        elif format == "lora":
            conversion = adapter_to_lora(peft_model, lora_rank)
            if base_id:
                conversion.config.base_model_name_or_path = base_id
            conversion.config.save_pretrained(tmp)
            out_dtype = torch.float32 if dtype == "auto" else DTYPES.get(dtype, dtype)
            save_file({k: v.to(out_dtype) for k, v in conversion.state_dict.items()}, tmp / ADAPTER_WEIGHTS)
            kind = "lora"
        else:
            shutil.copy2(adapter_dir / ADAPTER_WEIGHTS, tmp / ADAPTER_WEIGHTS)
            adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
            if base_id:  # a Hub id instead of a local path, so that AutoPeftModel works after download
                adapter_config["base_model_name_or_path"] = base_id
            (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
            kind = "adapter"
        if format != "gguf":  # a GGUF file carries its tokenizer; the other formats get its files next to the weights
            tokenizer_source = _save_tokenizer(tmp, [str(adapter_dir), base_ref])
        write_model_card(
            tmp,
            config=config,
            kind=kind,
            base_model=base_id,
            summary=summary,
            conversion=conversion,
            gguf_file=gguf_file,
        )
    result = ExportResult(out, format, sorted(p.name for p in out.iterdir()), conversion, tokenizer_source)
    if push_to_hub:
        result.url = push_folder(out, push_to_hub, private=private, token=token)
    return result
