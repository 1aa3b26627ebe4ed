"""Hardware-dependent choices (bf16, attention backend) and loading the base model and tokenizer."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from petuning import import_noise
from petuning.models import CHATML_TEMPLATE, smollm2_path
from petuning.recipe.config import ModelArgs

logger = logging.getLogger("petuning.recipe")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2")


def bf16_supported(device: torch.device) -> bool:
    """True on a CUDA device that supports bfloat16 (Ampere and newer)."""
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_bf16(requested, device: torch.device) -> bool:
    """``train.bf16``: ``"auto"`` (the default) means bfloat16 mixed precision where the device supports it."""
    if requested in (None, "auto"):
        return bf16_supported(device)
    if not isinstance(requested, bool):
        raise ValueError(f"train.bf16 must be true, false or 'auto', got {requested!r}")
    if requested and device.type == "cuda" and not bf16_supported(device):
        raise ValueError("train.bf16=true but this GPU does not support bfloat16; use train.bf16=auto or train.fp16=true")
    return requested


def dtype_from_name(name: str, what: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"{what}={name!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def resolve_dtype(name: str, bf16: bool) -> torch.dtype:
    """``model.dtype``: ``"auto"`` means bfloat16 weights under bf16 training, else float32."""
    if name == "auto":
        return torch.bfloat16 if bf16 else torch.float32
    return dtype_from_name(name, "model.dtype")


def flash_attention_unusable(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why ``flash_attention_2`` cannot run here, or None if it can."""
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed"
    if device.type != "cuda":
        return f"flash-attn needs a CUDA device, the run uses {device.type}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn needs float16 or bfloat16 weights, the model is {dtype}"
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        return "transformers reports flash-attn 2 as unusable (version or GPU)"
    return None


def resolve_attention(requested: str, device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """The attention implementation to load the model with, and why (logged by the recipe).

    ``"auto"`` picks ``flash_attention_2`` only when it is importable and usable on ``device`` with
    ``dtype``, else ``sdpa``. An explicit ``flash_attention_2`` that cannot run is an error (transformers
    would raise, or fetch a kernel from the Hub).
    """
    if requested not in _ATTENTION:
        raise ValueError(f"model.attn_implementation={requested!r} is not one of {_ATTENTION}")
    if requested in ("sdpa", "eager"):
        return requested, "requested"
    problem = flash_attention_unusable(device, dtype)
    if requested == "flash_attention_2":
        if problem:
            raise ValueError(f"model.attn_implementation=flash_attention_2 cannot be used: {problem}. Use 'auto' or 'sdpa'")
        return requested, "requested"
    if problem:
        return "sdpa", f"auto: {problem}"
    return "flash_attention_2", "auto: flash-attn is installed and usable"


def resolve_packing(requested: bool, attention: str) -> bool:
    """Packing (padding-free rows) only with flash attention: sdpa and eager would let packed examples attend
    to each other."""
    if requested and attention != "flash_attention_2":
        logger.warning("data.packing turned off: packing needs flash_attention_2 and the model uses %s", attention)
        return False
    return requested


def model_path(name_or_path: str) -> str:
    """``"smollm2"`` -> the safetensors cache of the embedded model; anything else is returned as is."""
    return str(smollm2_path()) if name_or_path == "smollm2" else name_or_path


def load_tokenizer(args: ModelArgs) -> PreTrainedTokenizerBase:
    """The base model's tokenizer, with the configured chat template and a pad token."""
    tokenizer = AutoTokenizer.from_pretrained(model_path(args.name_or_path), revision=args.revision)
    if args.chat_template == "chatml":
        missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in tokenizer.get_vocab()]
        if missing:
            raise ValueError(
                f"model.chat_template=chatml needs the tokens {missing}, which this tokenizer does not have; "
                f"give a template file that uses the tokenizer's own special tokens"
            )
        tokenizer.chat_template = CHATML_TEMPLATE
    elif args.chat_template is not None:
        path = Path(args.chat_template)
        if not path.is_file():
            raise FileNotFoundError(f"model.chat_template: no template file {str(path)!r} (or use 'chatml')")
        tokenizer.chat_template = path.read_text("utf-8")
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token; the recipe needs one to pad batches")
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("the tokenizer has no pad token; padding with the EOS token %r", tokenizer.eos_token)
    return tokenizer


def quantization_config(args: ModelArgs, bf16: bool, device: torch.device):
    """bitsandbytes 4-bit config of a QLoRA run (nf4, double quantization by default)."""
    from transformers import BitsAndBytesConfig

    for message in import_noise.held_back:  # held back at `import petuning`; it matters now
        logger.warning("bitsandbytes: %s", message)

    if args.bnb_4bit_compute_dtype == "auto":
        compute = torch.bfloat16 if (bf16 or bf16_supported(device)) else torch.float32
    else:
        compute = dtype_from_name(args.bnb_4bit_compute_dtype, "model.bnb_4bit_compute_dtype")
    storage = dtype_from_name(args.bnb_4bit_quant_storage, "model.bnb_4bit_quant_storage") if args.bnb_4bit_quant_storage else torch.uint8
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=args.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=storage,
    )


def load_model(
    args: ModelArgs, bf16: bool, device: torch.device, local_process_index: int = 0
) -> tuple[PreTrainedModel, str]:
    """The base causal LM and the attention implementation it was loaded with.

    4-bit bases are placed on this process's device at load time (bitsandbytes quantizes while loading).
    ``trust_remote_code`` is never turned on.
    """
    dtype = resolve_dtype(args.dtype, bf16)
    attention, why = resolve_attention(args.attn_implementation, device, dtype)
    logger.info("attention backend: %s (%s)", attention, why)
    kwargs = dict(dtype=dtype, attn_implementation=attention, revision=args.revision)
    if args.load_in_4bit:
        kwargs["quantization_config"] = quantization_config(args, bf16, device)
        kwargs["device_map"] = {"": local_process_index if device.type == "cuda" else device.type}
    model = AutoModelForCausalLM.from_pretrained(model_path(args.name_or_path), **kwargs)
    model.config.use_cache = False  # training; generation passes use_cache itself
    return model, attention
