"""peft's own generic test matrix, run on every petuning method at its defaults (DESIGN contract 3).

The custom-model tests of peft (``test_custom_models.py``: MLPs, Conv1D, embeddings, convolutions) and its decoder
tests (``test_decoder_models.py``) call each method's configs the way they call LoRA's. The decoder tests use tiny
local stand-ins for peft's Hub models (same architectures, same names), since the suite runs offline.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from peft import LoraConfig
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPTJConfig,
)

from petuning import FloraConfig, MaskTuningConfig, PatConfig, SorsaConfig, SparseLowRankConfig
from petuning.testing import build_tiny_tokenizer, tiny_llama_config, tiny_opt_config, tiny_qwen2_config

from . import harness
from .harness import PeftTest, case_tests, load_peft_tests, run_or_explain_skip
from .skips import ALLOWED_SKIPS, NOT_APPLICABLE, PACKED_ONLY

custom, decoder = load_peft_tests()
harness.CONV1D_CONFIGS = (SorsaConfig, FloraConfig, SparseLowRankConfig, MaskTuningConfig)

LINEAR_AND_CONV1D = [
    ("MLP", {"target_modules": "lin0"}),
    ("MLP", {"target_modules": ["lin1"]}),
    ("MLP", {"target_modules": ["lin0", "lin1"]}),
    ("MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("EmbConv1D", {"target_modules": ["conv1d"]}),
]
FLORA_LAYERS = LINEAR_AND_CONV1D + [
    ("EmbConv1D", {"target_modules": ["emb"]}),
    ("EmbConv1D", {"target_modules": ["emb", "conv1d"]}),
    ("Conv1d", {"target_modules": ["conv1d"]}),
    ("Conv2d", {"target_modules": ["conv2d"]}),
    ("Conv2d", {"target_modules": ["conv2d", "lin0"]}),
    ("Conv2dGroups", {"target_modules": ["conv2d"]}),
    ("Conv2dGroups2", {"target_modules": ["conv2d"]}),
    ("Conv3d", {"target_modules": ["conv3d"]}),
    ("Conv3d", {"target_modules": ["conv3d", "lin0"]}),
]
# Masked tuning runs peft's matrix with the paper's threshold rule on every entry: peft's loops step a bare optimizer,
# and the default budget mode refuses to train without petuning's driver (its masks change only in the driver's
# after-step hook; tests/test_mask_tuning_budget.py covers it, and the Trainer/TRL/DDP/engine tests run it).
PAPER_RULE = {"mask_mode": "threshold", "mask_share": 1.0}
CUSTOM_CASES = {  # method config -> the models and targets of peft's LoRA cases whose layer types it supports
    SorsaConfig: LINEAR_AND_CONV1D,
    FloraConfig: FLORA_LAYERS,
    SparseLowRankConfig: LINEAR_AND_CONV1D,
    MaskTuningConfig: [(model_id, {**kwargs, **PAPER_RULE}) for model_id, kwargs in LINEAR_AND_CONV1D],
}
# Masked tuning also with its float scores saved: the round-trip tests that compare raw parameters, which the default
# bit-packed file cannot pass (see skips.NOT_APPLICABLE), run on this variant.
SAVED_SCORES = {"save_scores": True}

# peft's decoder models, built locally from configs under the names peft uses (peft's tests branch on them).
DECODER_MODELS = {
    "tiny-random-OPTForCausalLM": lambda: tiny_opt_config(),
    "tiny-random-GPT2LMHeadModel": lambda: GPT2Config(
        vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    ),
    "tiny-random-GPTJForCausalLM": lambda: GPTJConfig(
        vocab_size=128,
        n_embd=32,
        n_layer=2,
        n_head=4,
        rotary_dim=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    ),
    "tiny-random-LlamaForCausalLM": lambda: tiny_llama_config(),
    "tiny-dummy-qwen2": lambda: tiny_qwen2_config(),
    "tiny-random-Gemma3ForCausalLM": lambda: Gemma3TextConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        sliding_window=16,
    ),
}
PAT_MODELS = ("tiny-random-LlamaForCausalLM", "tiny-dummy-qwen2")  # PAT prunes Llama-family decoders only
DECODER_CONFIGS = [SorsaConfig, FloraConfig, SparseLowRankConfig, MaskTuningConfig, PatConfig]


def _custom_items():
    for name, grid in case_tests(custom.TestPeftCustomModel, {"test_name", "model_id", "config_cls", "config_kwargs"}):
        for config_cls, cases in CUSTOM_CASES.items():
            if config_cls is MaskTuningConfig:
                cases = cases + [(model_id, {**kwargs, **SAVED_SCORES}) for model_id, kwargs in cases[:1] + cases[-1:]]
            for model_id, kwargs in cases:
                label = f"{config_cls.__name__} {model_id} {kwargs['target_modules']}"
                for extra in grid:
                    args = (label, model_id, config_cls, kwargs)
                    test = PeftTest(custom.TestPeftCustomModel, name, args, model_id, extra["values"], extra["marks"])
                    yield pytest.param(test, id=f"{name}-{config_cls.__name__}-{model_id}-{kwargs}-{extra['values']}")


def _decoder_items():
    for name, grid in case_tests(decoder.TestDecoderModels, {"model_id", "config_cls", "config_kwargs"}):
        for config_cls in DECODER_CONFIGS:
            variants = [PAPER_RULE, {**PAPER_RULE, **SAVED_SCORES}] if config_cls is MaskTuningConfig else [{}]
            for model_id, variant in itertools.product(DECODER_MODELS, variants):
                if config_cls is PatConfig and model_id not in PAT_MODELS:
                    continue
                for extra in grid:
                    args = (model_id, config_cls, {"task_type": "CAUSAL_LM", **variant})
                    test = PeftTest(decoder.TestDecoderModels, name, args, model_id, extra["values"], extra["marks"])
                    yield pytest.param(test, id=f"{name}-{config_cls.__name__}-{model_id}-{variant}-{extra['values']}")


@pytest.fixture(scope="module")
def decoder_root(tmp_path_factory):
    """The decoder stand-ins, each saved with petuning's tiny test tokenizer (peft's Trainer test tokenizes text)."""
    root = tmp_path_factory.mktemp("peft-decoders")
    tokenizer = build_tiny_tokenizer()
    for name, make_config in DECODER_MODELS.items():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(make_config()).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


@pytest.fixture(autouse=True)
def _local_quotes(monkeypatch):
    """peft's Trainer test downloads a dataset of quotes from the Hub; this suite is offline, so it gets a few local
    quotes in the same layout."""
    datasets = pytest.importorskip("datasets")
    quotes = [f"Quote number {i}: a short sentence to learn from." for i in range(16)]
    data = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"quote": quotes})})
    monkeypatch.setattr(decoder, "load_dataset_english_quotes", lambda: data)


def _skips(config_cls: type, kwargs: dict) -> tuple[dict, dict]:
    not_applicable = NOT_APPLICABLE.get(config_cls, {})
    if kwargs.get("save_scores"):
        not_applicable = {k: v for k, v in not_applicable.items() if k.split("[")[0].split("@")[0] not in PACKED_ONLY}
    return ALLOWED_SKIPS.get(config_cls, {}), not_applicable


def _with_lora(test: PeftTest, args: tuple) -> PeftTest:
    return PeftTest(test.tester, test.name, args, test.model_id, test.extra, test.marks)


@pytest.mark.parametrize("test", list(_custom_items()))
def test_peft_custom_models(test: PeftTest, tmp_path):
    _label, model_id, config_cls, kwargs = test.args
    lora = _with_lora(test, (f"LoRA {model_id}", model_id, LoraConfig, kwargs))
    run_or_explain_skip(test, lambda: lora, *_skips(config_cls, kwargs), tmp_path)


@pytest.mark.parametrize("test", list(_decoder_items()))
def test_peft_decoder_models(test: PeftTest, decoder_root, tmp_path):
    model_id, config_cls, kwargs = test.args
    local = _with_lora(test, (str(decoder_root / model_id), config_cls, kwargs))
    lora = _with_lora(test, (str(decoder_root / model_id), LoraConfig, kwargs))
    run_or_explain_skip(local, lambda: lora, *_skips(config_cls, kwargs), tmp_path)
