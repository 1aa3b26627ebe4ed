"""Reading what an export starts from: safetensors checks (pickle refused), the adapter and its base."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Optional, Union

import torch
from peft import PeftConfig, PeftModel

import petuning.tuners  # noqa: F401  (registers every petuning method with PEFT)

PathLike = Union[str, os.PathLike]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_TASK_AUTO_CLASSES = {
    None: "AutoModelForCausalLM",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_safetensors(path: PathLike) -> None:
    """Raise ``ValueError`` if ``path`` is not a complete safetensors file.

    A safetensors file is an 8-byte little-endian header length, a JSON header giving each tensor's byte range,
    then the data. The file is truncated or corrupt when the header does not parse or the data ends before the last
    byte range ends; both are detected from the header alone, without reading the tensors.
    """
    path = Path(path)
    size = path.stat().st_size
    problem = None
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            problem = f"it has only {size} bytes, fewer than a safetensors header needs"
        else:
            (header_len,) = struct.unpack("<Q", raw)
            if 8 + header_len > size:
                problem = f"its header announces {header_len} bytes but the file has {size} bytes in total"
            else:
                try:
                    header = json.loads(handle.read(header_len))
                    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
                except (ValueError, KeyError, TypeError, IndexError) as error:
                    problem = f"its header is not valid safetensors JSON ({error})"
                else:
                    if 8 + header_len + end > size:
                        problem = (
                            f"its tensors need {8 + header_len + end} bytes but the file has only {size}: "
                            "it is truncated"
                        )
    if problem:
        raise ValueError(
            f"{path} is corrupt: {problem}. Re-save or re-download it (an interrupted copy or download "
            "usually causes this)."
        )


def _refuse_pickle(folder: Path, what: str) -> None:
    """Refuse a folder whose weights exist only as pickle files (loading them would run arbitrary code)."""
    files = [p.name for p in folder.iterdir() if p.is_file()]
    if any(name.endswith(".safetensors") for name in files):
        return
    pickles = [name for name in files if name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ValueError(
            f"The {what} in {folder} is stored as pickle ({', '.join(sorted(pickles))}). petuning reads only "
            "safetensors, because loading a pickle file can execute arbitrary code. Convert it once in a trusted "
            "environment (load it there and call save_pretrained, which writes safetensors) and export from that."
        )


def _check_weights_folder(folder: Path, what: str) -> None:
    _refuse_pickle(folder, what)
    for file in sorted(folder.glob("*.safetensors")):
        check_safetensors(file)


def _base_is_quantized(path: Path) -> Optional[str]:
    config = path / "config.json"
    if not config.is_file():
        return None
    quant = json.loads(config.read_text()).get("quantization_config")
    return (quant or {}).get("quant_method") or ("quantized" if quant else None)


def load_adapter_model(
    adapter_dir: PathLike, base: Optional[PathLike] = None, dtype: Union[str, torch.dtype] = "auto"
) -> PeftModel:
    """Load a saved adapter onto its base model, in eval mode, ready to merge or convert.

    ``base`` overrides the base recorded in ``adapter_config.json`` (a local folder or a Hub id). The base is loaded
    in ``dtype`` ("auto" = the dtype its checkpoint stores), never quantized, from safetensors only, without
    ``trust_remote_code``. Raises ``FileNotFoundError``/``ValueError`` naming the problem and the fix for a missing or
    corrupt adapter, a pickle checkpoint, a quantized checkpoint, or a base whose shapes do not fit the adapter.
    """
    import transformers

    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"Adapter folder {adapter_dir} does not exist. Pass the folder save_pretrained wrote.")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{adapter_dir} has no adapter_config.json, so it is not a saved PEFT adapter. Pass the folder that "
            "model.save_pretrained() (or Trainer.save_model()) wrote."
        )
    _refuse_pickle(adapter_dir, "adapter")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(
            f"{adapter_dir} has adapter_config.json but no {ADAPTER_WEIGHTS}: the save is incomplete."
        )
    check_safetensors(adapter_dir / ADAPTER_WEIGHTS)
    try:
        config = PeftConfig.from_pretrained(adapter_dir)
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{adapter_dir / 'adapter_config.json'} cannot be read as a PEFT config: {error}") from error

    base_ref = str(base) if base is not None else config.base_model_name_or_path
    if not base_ref:
        raise ValueError(f"The adapter config in {adapter_dir} names no base model; pass base= (CLI: --base).")
    base_path = Path(base_ref)
    if base_path.is_dir():
        _check_weights_folder(base_path, "base model")
        method = _base_is_quantized(base_path)
        if method:
            raise ValueError(
                f"The base checkpoint {base_path} is stored quantized ({method}). Merging into quantized weights "
                "rounds the update away and cannot be exact; export from the original 16/32-bit checkpoint: pass it "
                "with base= (CLI: --base)."
            )
    elif base is None and not _HUB_ID.match(base_ref):
        raise FileNotFoundError(
            f"The adapter's base model {base_ref!r} is neither a local folder nor a Hub id. Pass the base with "
            "base= (CLI: --base)."
        )
    auto_class = getattr(transformers, _TASK_AUTO_CLASSES.get(_task_type(config), "AutoModelForCausalLM"))
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) and dtype != "auto" else dtype
    model = auto_class.from_pretrained(base_ref, dtype=torch_dtype, use_safetensors=True, trust_remote_code=False)
    if getattr(model, "hf_quantizer", None) is not None:
        raise ValueError(f"The base {base_ref} loaded quantized; export needs a 16/32-bit base. Pass one with base=.")
    try:
        peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    except (RuntimeError, ValueError) as error:
        raise ValueError(
            f"The adapter in {adapter_dir} does not fit the base model {base_ref}: {_first_line(error)}. "
            f"Use the base it was trained on (adapter_config.json says {config.base_model_name_or_path!r}); "
            "pass it with base= (CLI: --base)."
        ) from error
    return peft_model.eval()


def _task_type(config: PeftConfig) -> Optional[str]:
    task = getattr(config, "task_type", None)
    return getattr(task, "value", task)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
