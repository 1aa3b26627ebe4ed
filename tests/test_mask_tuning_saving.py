"""Masked tuning's saved format: bit-packed masks by default (exact round trip of the masks and outputs through
every PEFT / transformers loading path), float scores on request, and clear errors for files that do not fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from petuning import MaskTuningConfig
from petuning.models import build_tiny_model
from petuning.tuners.mask_tuning.layer import MaskTuningLayer, pack_bits, unpack_bits

TARGETS = ["q_proj", "v_proj", "fc1", "fc2"]


@pytest.fixture(scope="module")
def opt_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("mask_tuning_saving") / "tiny-opt"
    build_tiny_model("opt", save_dir=path, seed=0)
    return path


def _base(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _tuned(path, **config):
    torch.manual_seed(0)
    model = get_peft_model(
        _base(path), MaskTuningConfig(target_modules=TARGETS, init_weights=False, task_type="CAUSAL_LM", **config)
    )
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    ids = torch.randint(4, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def _logits(model):
    ids = torch.randint(4, 100, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _masks(model, adapter="default"):
    return {
        name.split("base_model.model.")[-1]: layer.mask(adapter)
        for name, layer in model.named_modules()
        if isinstance(layer, MaskTuningLayer) and adapter in layer.mask_tuning_scores
    }


@pytest.mark.parametrize("length", [1, 7, 8, 9, 64, 1001])
def test_pack_bits_is_numpy_packbits_and_unpacks_exactly(length):
    bits = torch.rand(length, generator=torch.Generator().manual_seed(length)) > 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (length + 7) // 8
    assert np.array_equal(packed.numpy(), np.packbits(bits.numpy()))
    assert torch.equal(unpack_bits(packed, length), bits)


@pytest.mark.parametrize("share", [1.0, 0.3], ids=["full", "selected"])
def test_bit_packed_round_trip_is_exact_on_every_loading_path(opt_path, tmp_path, share):
    model = _tuned(opt_path, mask_share=share)
    expected, masks = _logits(model), _masks(model)
    assert 0 < model.masked_share() < 1
    model.save_pretrained(tmp_path)

    saved = load_file(tmp_path / "adapter_model.safetensors")
    packed = {k: v for k, v in saved.items() if k.endswith(".mask_tuning_mask._extra_state")}
    assert packed and not any("mask_tuning_scores" in k for k in saved), "scores are not saved by default"
    for key, value in packed.items():
        module = key.removeprefix("base_model.model.").removesuffix(".mask_tuning_mask._extra_state")
        assert value.dtype == torch.uint8
        assert value.numel() == (model.get_submodule(f"base_model.model.{module}").mask_tuning_scores["default"].numel() + 7) // 8
        full = masks[module].reshape(-1)
        if share < 1:
            idx = saved[key.replace("mask_tuning_mask._extra_state", "mask_tuning_indices")]
            assert idx.dtype == torch.int32
            full = full[idx.long()]
        assert torch.equal(unpack_bits(value, full.numel()), full)

    loaders = {
        "from_pretrained": lambda: PeftModel.from_pretrained(_base(opt_path), tmp_path),
        "low_cpu_mem_usage": lambda: PeftModel.from_pretrained(_base(opt_path), tmp_path, low_cpu_mem_usage=True),
        "auto": lambda: AutoPeftModelForCausalLM.from_pretrained(tmp_path),
    }
    for name, load in loaders.items():
        loaded = load()
        assert torch.equal(_logits(loaded), expected), name
        got = _masks(loaded)
        assert got.keys() == masks.keys() and all(torch.equal(got[k], masks[k]) for k in masks), name
        assert loaded.masked_share() == model.masked_share()

    plain = _base(opt_path)
    plain.load_adapter(str(tmp_path), adapter_name="tuned")
    assert torch.equal(_logits(plain), expected)

    resumed = PeftModel.from_pretrained(_base(opt_path), tmp_path, is_trainable=True)
    scores = [m.mask_tuning_scores["default"] for m in resumed.modules() if isinstance(m, MaskTuningLayer)]
    assert all(s.requires_grad for s in scores)
    assert all(bool(((s == 1e-2) | (s == 0.0)).all()) for s in scores), "kept -> mask_init, masked -> 2 tau - init"


def test_save_scores_keeps_the_float_scores_for_resuming(opt_path, tmp_path):
    model = _tuned(opt_path, save_scores=True)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any(k.endswith("mask_tuning_mask._extra_state") for k in saved)
    loaded = PeftModel.from_pretrained(_base(opt_path), tmp_path)
    for (name, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters()):
        if "mask_tuning_scores" in name:
            assert torch.equal(a, b), name


def test_packed_file_is_32_times_smaller_than_scores(opt_path, tmp_path):
    model = _tuned(opt_path)
    n_scores = sum(p.numel() for n, p in model.named_parameters() if "mask_tuning_scores" in n)
    packed = get_peft_model_state_dict(model)
    assert sum(v.numel() * v.element_size() for v in packed.values()) == sum(
        (m.mask_tuning_scores["default"].numel() + 7) // 8 for m in model.modules() if isinstance(m, MaskTuningLayer)
    )
    assert n_scores * 4 / sum(v.numel() for v in packed.values()) > 31


def test_state_dict_functions_round_trip_the_masks(opt_path):
    model = _tuned(opt_path, mask_share=0.5)
    state = get_peft_model_state_dict(model)
    fresh = get_peft_model(_base(opt_path), MaskTuningConfig(target_modules=TARGETS, mask_share=0.5, task_type="CAUSAL_LM"))
    result = set_peft_model_state_dict(fresh, state)
    assert not [k for k in result.unexpected_keys if "mask_tuning" in k]
    assert torch.equal(_logits(fresh), _logits(model))


def test_truncated_masks_and_other_mask_share_are_refused(opt_path, tmp_path):
    model = _tuned(opt_path, mask_share=0.5)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    saved = load_file(path)
    key = next(k for k in saved if k.endswith(".mask_tuning_mask._extra_state"))
    save_file({**saved, key: saved[key][:-1]}, path)
    with pytest.raises(ValueError, match="mask bytes .* expected"):
        PeftModel.from_pretrained(_base(opt_path), tmp_path)

    save_file(saved, path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "mask_share": 0.25}))
    with pytest.raises(ValueError, match="another mask_share"):
        PeftModel.from_pretrained(_base(opt_path), tmp_path)
