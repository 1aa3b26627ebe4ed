"""Hardware-dependent choices (bf16, attention backend) and loading the base model and tokenizer."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from trl import ModelConfig

from petuning import import_noise
from petuning.recipe.smollm2 import smollm2_path

logger = logging.getLogger("petuning.recipe")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2")


def bf16_supported(device: torch.device) -> bool:
    """True on a CUDA device that supports bfloat16 (Ampere and newer)."""
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def dtype_from_name(name: str, what: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"{what}={name!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[name]


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
    requested = requested or "auto"
    if requested not in _ATTENTION:
        raise ValueError(f"attn_implementation={requested!r} is not one of {_ATTENTION}")
    if requested in ("sdpa", "eager"):
        return requested, "requested"
    problem = flash_attention_unusable(device, dtype)
    if requested == "flash_attention_2":
        if problem:
            raise ValueError(f"attn_implementation=flash_attention_2 cannot be used: {problem}. Use 'auto' or 'sdpa'")
        return requested, "requested"
    if problem:
        return "sdpa", f"auto: {problem}"
    return "flash_attention_2", "auto: flash-attn is installed and usable"


def resolve_packing(requested: bool, attention: str) -> bool:
    """Packing (or padding-free rows) only with flash attention: sdpa and eager would let packed examples attend
    to each other."""
    if requested and attention != "flash_attention_2":
        logger.warning(
            "packing / padding-free turned off: packing needs flash_attention_2 and the model uses %s", attention
        )
        return False
    return requested


def model_path(name_or_path: str) -> str:
    """``"smollm2"`` -> the safetensors cache of the embedded model; anything else is returned as is."""
    return str(smollm2_path()) if name_or_path == "smollm2" else name_or_path


def load_tokenizer(args: ModelConfig, chat_template_path: Optional[str] = None) -> PreTrainedTokenizerBase:
    """The base model's tokenizer with a pad token (the EOS token if it has none), and the chat template of
    ``chat_template_path`` when that is a template file (SFTTrainer applies the same one; a model id's template
    is left to SFTTrainer)."""
    tokenizer = AutoTokenizer.from_pretrained(model_path(args.model_name_or_path), revision=args.model_revision)
    if chat_template_path and chat_template_path.endswith((".jinja", ".j2")):
        if not Path(chat_template_path).is_file():
            raise FileNotFoundError(f"chat_template_path: no template file {chat_template_path!r}")
        tokenizer.chat_template = Path(chat_template_path).read_text("utf-8")
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token; the recipe needs one to pad batches")
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("the tokenizer has no pad token; padding with the EOS token %r", tokenizer.eos_token)
    return tokenizer


def quantization_config(args: ModelConfig, bf16: bool, device: torch.device):
    """bitsandbytes 4-bit config of a QLoRA run; it computes in bfloat16 where the device supports it, else in
    float32."""
    from transformers import BitsAndBytesConfig

    for message in import_noise.held_back:  # held back at `import petuning`; it matters now
        logger.warning("bitsandbytes: %s", message)

    compute = torch.bfloat16 if (bf16 or bf16_supported(device)) else torch.float32
    storage = (
        dtype_from_name(args.bnb_4bit_quant_storage, "bnb_4bit_quant_storage")
        if args.bnb_4bit_quant_storage
        else torch.uint8
    )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=args.use_bnb_nested_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=storage,
    )


def load_model(
    args: ModelConfig, bf16: bool, device: torch.device, local_process_index: int = 0
) -> tuple[PreTrainedModel, str]:
    """The base causal LM and the attention implementation it was loaded with.

    4-bit bases are placed on this process's device at load time (bitsandbytes quantizes while loading).
    ``trust_remote_code`` is never turned on.
    """
    dtype = dtype_from_name(args.dtype, "dtype")
    attention, why = resolve_attention(args.attn_implementation, device, dtype)
    logger.info("attention backend: %s (%s)", attention, why)
    kwargs = dict(dtype=dtype, attn_implementation=attention, revision=args.model_revision)
    if args.load_in_4bit:
        kwargs["quantization_config"] = quantization_config(args, bf16, device)
        kwargs["device_map"] = {"": local_process_index if device.type == "cuda" else device.type}
    model = AutoModelForCausalLM.from_pretrained(model_path(args.model_name_or_path), **kwargs)
    model.config.use_cache = False  # training; generation passes use_cache itself
    return model, attention
