"""Masked tuning's saved format: the zeroed positions, compactly (bitmap or delta-coded, whichever is smaller), by
default, with an exact round trip of masks and outputs through every PEFT / transformers loading path; scores and
scored entries on request or in checkpoints; clear errors for files that do not fit."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from peft import (
    AutoPeftModelForCausalLM,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import petuning
from petuning import MaskTuningConfig
from petuning.testing import build_tiny_model
from petuning.tuners.mask_tuning.encoding import (
    BITMAP,
    DELTAS,
    decode_positions,
    encode_positions,
    pack_bits,
    unpack_bits,
)
from petuning.tuners.mask_tuning.layer import MaskTuningLayer

TARGETS = ["q_proj", "v_proj", "fc1", "fc2"]
MASK_KEY = ".mask_tuning_mask._extra_state"
pytestmark = pytest.mark.filterwarnings("ignore:Masked tuning. optimizer step")  # threshold mode's seeded scores


@pytest.fixture(scope="module")
def opt_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("mask_tuning_saving") / "tiny-opt"
    build_tiny_model("opt", save_dir=path, seed=0)
    return path


def _base(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _tuned(path, steps=4, **config):
    """A trained adapter: budget mode through TrainingHooks (a quarter of the scored entries masked by step 3),
    threshold mode from seeded scores around the threshold (about half of the scored entries masked)."""
    torch.manual_seed(0)
    config.setdefault("mask_mode", "budget")
    if config["mask_mode"] == "budget":
        config = {
            "masked_budget": 0.25 * config.get("mask_share", 0.1),
            "budget_start_step": 0,
            "budget_end_step": 3,
            **config,
        }
    else:
        config = {"init_weights": False, **config}
    model = get_peft_model(_base(path), MaskTuningConfig(target_modules=TARGETS, task_type="CAUSAL_LM", **config))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    ids = torch.randint(4, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    with petuning.TrainingHooks(model, optimizer, max_steps=steps):
        for _ in range(steps):
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


# ------------------------------------------------------------------------------------------- encoding
@pytest.mark.parametrize("length", [1, 7, 8, 9, 64, 1001])
def test_pack_bits_is_numpy_packbits_and_unpacks_exactly(length):
    bits = torch.rand(length, generator=torch.Generator().manual_seed(length)) > 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (length + 7) // 8
    assert np.array_equal(packed.numpy(), np.packbits(bits.numpy()))
    assert torch.equal(unpack_bits(packed, length), bits)


@pytest.mark.parametrize("density", [0.0, 1e-3, 0.02, 0.1, 0.5, 1.0])
def test_positions_round_trip_in_the_smaller_encoding(density):
    numel = 50_021
    positions = (torch.rand(numel, generator=torch.Generator().manual_seed(3)) < density).nonzero().squeeze(1)
    data = encode_positions(positions, numel)
    assert torch.equal(decode_positions(data, numel), positions)
    bitmap_size = 1 + (numel + 7) // 8
    gaps = torch.diff(positions, prepend=torch.tensor([-1])) - 1
    numbers = [positions.numel(), *gaps.tolist()]  # the count, then the gaps
    varint_size = 1 + int(sum(max(1, -(-int(g).bit_length() // 7)) for g in numbers))
    assert data.numel() == min(bitmap_size, varint_size)
    assert int(data[0]) == (DELTAS if varint_size < bitmap_size else BITMAP)
    if int(data[0]) == BITMAP:
        bits = np.zeros(numel, dtype=bool)
        bits[positions.numpy()] = True
        assert np.array_equal(data[1:].numpy(), np.packbits(bits))


def test_large_gaps_and_positions_beyond_int32_round_trip():
    positions = torch.tensor([0, 1, 127, 128, 16_511, 2**31 + 5, 2**40])
    assert torch.equal(decode_positions(encode_positions(positions, 2**41), 2**41), positions)


def test_corrupt_encodings_are_refused_with_the_reason():
    data = encode_positions(torch.tensor([3, 300, 90_000]), 100_000)
    with pytest.raises(ValueError, match="ends inside a number"):
        decode_positions(data[:-1], 100_000)
    with pytest.raises(ValueError, match="announces 3 positions but holds 2"):
        decode_positions(data[:-3], 100_000)  # 90,000 - 301 takes three bytes: a whole number cut off
    with pytest.raises(ValueError, match="outside a weight of 1000 entries"):
        decode_positions(data, 1_000)
    with pytest.raises(ValueError, match="bitmap of 3 bytes cannot describe a weight of 100 entries"):
        decode_positions(torch.tensor([BITMAP, 0, 0, 0], dtype=torch.uint8), 100)
    with pytest.raises(ValueError, match="unknown encoding kind 7"):
        decode_positions(torch.tensor([7, 0], dtype=torch.uint8), 100)
    with pytest.raises(ValueError, match="uint8"):
        decode_positions(torch.tensor([2, 0], dtype=torch.int32), 100)


# --------------------------------------------------------------------------------------- adapter files
@pytest.mark.parametrize("mode", ["budget", "threshold"])
@pytest.mark.parametrize("share", [1.0, 0.3], ids=["full", "selected"])
def test_compact_round_trip_is_exact_on_every_loading_path(opt_path, tmp_path, share, mode):
    model = _tuned(opt_path, mask_share=share, mask_mode=mode)
    expected, masks = _logits(model), _masks(model)
    assert 0 < model.masked_share() < share
    model.save_pretrained(tmp_path)

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all(k.endswith(MASK_KEY) for k in saved), "only the masked positions are saved by default"
    for key, value in saved.items():
        module = key.removeprefix("base_model.model.").removesuffix(MASK_KEY)
        assert value.dtype == torch.uint8
        full = masks[module].reshape(-1)
        assert torch.equal(decode_positions(value, full.numel()), (~full).nonzero().squeeze(1))

    loaders = {
        "from_pretrained": lambda: PeftModel.from_pretrained(_base(opt_path), tmp_path),
        "low_cpu_mem_usage": lambda: PeftModel.from_pretrained(_base(opt_path), tmp_path, low_cpu_mem_usage=True),
        "auto": lambda: AutoPeftModelForCausalLM.from_pretrained(tmp_path),
    }
    for name, load in loaders.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = load()
        assert not [w for w in caught if "missing adapter keys" in str(w.message)], name
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
    if mode == "threshold":
        assert all(bool(((s == 1e-2) | (s == 0.0)).all()) for s in scores), "kept -> mask_init, masked -> 2 tau - init"


def test_a_gradient_chosen_adapter_loads_exactly_from_the_compact_file(opt_path, tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(
        _base(opt_path),
        MaskTuningConfig(
            target_modules=TARGETS, mask_share=0.2, masked_budget=0.1, init_weights=False, task_type="CAUSAL_LM"
        ),
    )
    ids = torch.randint(4, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    model.select_masked_weights([{"input_ids": ids, "labels": ids}])
    layer = next(m for m in model.modules() if isinstance(m, MaskTuningLayer))
    by_magnitude = (
        layer.get_base_layer()
        .weight.abs()
        .reshape(-1)
        .argsort(descending=True)[: layer.mask_tuning_indices["default"].numel()]
    )
    assert not torch.equal(layer.mask_tuning_indices["default"].long(), by_magnitude.sort().values), (
        "gradient chose others"
    )
    for layer in (m for m in model.modules() if isinstance(m, MaskTuningLayer)):
        scores = layer.mask_tuning_scores["default"]
        layer.mask_tuning_off["default"].copy_(scores < scores.median())  # an arbitrary mask on the chosen entries
    expected, masks = _logits(model), _masks(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_base(opt_path), tmp_path)
    assert torch.equal(_logits(loaded), expected)
    got = _masks(loaded)
    assert all(torch.equal(got[k], masks[k]) for k in masks)


@pytest.mark.parametrize("mode", ["budget", "threshold"])
def test_save_scores_keeps_scores_and_scored_entries_for_resuming(opt_path, tmp_path, mode):
    model = _tuned(opt_path, mask_share=0.3, save_scores=True, mask_mode=mode)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {k.rsplit(".", 1)[-1] for k in saved} >= {"mask_tuning_scores", "mask_tuning_indices"}
    loaded = PeftModel.from_pretrained(_base(opt_path), tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        if "mask_tuning" in name:
            assert torch.equal(a, b), name
    assert all(torch.equal(a, b) for a, b in zip(_masks(model).values(), _masks(loaded).values()))


def test_compact_file_is_a_fraction_of_scores_and_indices(opt_path, tmp_path):
    model = _tuned(opt_path, mask_share=0.3)
    compact = sum(v.numel() for v in get_peft_model_state_dict(model).values())
    masked = model.mask_statistics()["masked"]
    layers = sum(isinstance(m, MaskTuningLayer) for m in model.modules())
    assert compact <= 2 * masked + layers, "about one byte per masked entry"
    scores_and_indices = 8 * model.mask_statistics()["scored"]
    assert scores_and_indices / compact > 10


def test_state_dict_functions_round_trip_the_masks(opt_path):
    model = _tuned(opt_path, mask_share=0.5)
    state = get_peft_model_state_dict(model)
    fresh = get_peft_model(
        _base(opt_path), MaskTuningConfig(target_modules=TARGETS, mask_share=0.5, task_type="CAUSAL_LM")
    )
    result = set_peft_model_state_dict(fresh, state)
    assert not [k for k in result.unexpected_keys if "mask_tuning" in k]
    assert torch.equal(_logits(fresh), _logits(model))


def test_corrupt_masks_and_smaller_mask_share_are_refused(opt_path, tmp_path):
    model = _tuned(opt_path, mask_share=0.3)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    saved = load_file(path)
    key = next(k for k in saved if k.endswith(MASK_KEY) and int(saved[k][0]) == DELTAS)
    save_file({**saved, key: saved[key][:-1]}, path)  # the last gap's one byte
    with pytest.raises(ValueError, match="cannot be read .*announces .* positions but holds.*truncated, corrupt"):
        PeftModel.from_pretrained(_base(opt_path), tmp_path)

    save_file(saved, path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "mask_share": 0.01, "masked_budget": 0.01}))
    with pytest.raises(ValueError, match="larger mask_share"):
        PeftModel.from_pretrained(_base(opt_path), tmp_path)
