"""Tiny models for tests and examples, built in code without a network (``petuning.testing``).

:func:`build_tiny_model` builds small, seeded Llama / OPT / Qwen2 / Mistral causal LMs from a config, and
:func:`build_tiny_tokenizer` a character-level tokenizer with a ChatML template, so tests and examples run in
seconds.

This module is shared infrastructure: it imports nothing from the rest of petuning.
"""

from __future__ import annotations

import os

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

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


def cpu_training_args(output_dir, max_steps: int, **overrides):
    """``transformers.TrainingArguments`` for a short, quiet, reproducible CPU run, as tests use them.

    The defaults are: CPU, seed 0, batch 4, lr 1e-2, a log line every step, no reporters, no checkpoints and no
    progress bar. ``overrides`` replace any of them or add other fields.
    """
    from transformers import TrainingArguments

    defaults = dict(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return TrainingArguments(**{**defaults, **overrides})
