"""A model holding a peft LoRA adapter and a FLoRA adapter at once (through transformers' adapter API).

``"lora_"`` is a substring of ``"flora_"``, and PEFT / transformers select tensors by name in places, so each
adapter must save only its own tensors, load back exactly, switch, and delete without touching the other.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import petuning
from petuning.tuners.flora import FloraLayer

LORA_TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def inputs():
    return torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(3))


def _base(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _lora():
    return LoraConfig(r=4, target_modules=LORA_TARGETS, init_lora_weights=False)


def _flora(targets):
    return petuning.FloraConfig(r=[3, 4], target_modules=targets, init_weights=False)


def _single(path, config, name, ids):
    """Output of a fresh base holding only this adapter, with the same random init."""
    torch.manual_seed({"lora": 1, "flora": 2}[name])
    model = _base(path)
    model.add_adapter(config, adapter_name=name)
    return _logits(model, ids)


def _both(path, flora_targets, flora_first: bool):
    model = _base(path)
    order = [("flora", _flora(flora_targets)), ("lora", _lora())]
    for name, config in order if flora_first else order[::-1]:
        torch.manual_seed({"lora": 1, "flora": 2}[name])
        model.add_adapter(config, adapter_name=name)
    return model


@pytest.mark.parametrize(
    "flora_targets, flora_first",
    [
        (["k_proj", "o_proj", "up_proj"], False),
        (["k_proj", "o_proj", "up_proj"], True),
        (LORA_TARGETS + ["up_proj"], True),
    ],
    ids=["disjoint-lora-first", "disjoint-flora-first", "shared-modules-flora-first"],
)
def test_lora_and_flora_save_load_switch_and_delete(tiny_llama_dir, inputs, tmp_path, flora_targets, flora_first):
    base_out = _logits(_base(tiny_llama_dir), inputs)
    expected = {
        "lora": _single(tiny_llama_dir, _lora(), "lora", inputs),
        "flora": _single(tiny_llama_dir, _flora(flora_targets), "flora", inputs),
    }
    assert not torch.allclose(expected["lora"], expected["flora"])

    model = _both(tiny_llama_dir, flora_targets, flora_first)
    for name in ("lora", "flora", "lora"):  # switching back and forth
        model.set_adapter(name)
        torch.testing.assert_close(_logits(model, inputs), expected[name], atol=1e-6, rtol=1e-6)

    for name, own, other in (("lora", ".lora_", "flora_"), ("flora", ".flora_", ".lora_")):
        state = get_peft_model_state_dict(model, adapter_name=name)
        assert state and all(own in k and other not in k and "base_layer" not in k for k in state), sorted(state)
        model.set_adapter(name)
        model.save_pretrained(tmp_path / name)
        saved = load_file(tmp_path / name / "adapter_model.safetensors")
        assert saved.keys() == {f"base_model.model.{k}" for k in state}
        assert all(torch.equal(saved[f"base_model.model.{k}"], v) for k, v in state.items())

    shared = set(flora_targets) & set(LORA_TARGETS)
    load_orders = [("flora", "lora")] if shared else [("flora", "lora"), ("lora", "flora")]  # shared: FLoRA first
    for order in load_orders:
        fresh = _base(tiny_llama_dir)
        for name in order:
            fresh.load_adapter(str(tmp_path / name), adapter_name=name)
        for name in ("flora", "lora"):
            fresh.set_adapter(name)
            torch.testing.assert_close(
                _logits(fresh, inputs), expected[name], atol=1e-6, rtol=1e-6, msg=f"{order} {name}"
            )

    model.delete_adapter("flora")
    assert list(model.peft_config) == ["lora"]
    assert not [k for k in model.state_dict() if "flora" in k]
    model.set_adapter("lora")
    torch.testing.assert_close(_logits(model, inputs), expected["lora"], atol=1e-6, rtol=1e-6)
    model.delete_adapter("lora")
    assert not [k for k in model.state_dict() if "lora" in k]
    torch.testing.assert_close(_logits(model, inputs), base_out, atol=1e-6, rtol=1e-6)


def test_deleting_lora_keeps_flora(tiny_llama_dir, inputs):
    expected = _single(tiny_llama_dir, _flora(LORA_TARGETS), "flora", inputs)
    model = _both(tiny_llama_dir, LORA_TARGETS, flora_first=True)
    model.delete_adapter("lora")
    assert not [k for k in model.state_dict() if ".lora_" in k]
    assert [k for k in model.state_dict() if ".flora_" in k]
    model.set_adapter("flora")
    torch.testing.assert_close(_logits(model, inputs), expected, atol=1e-6, rtol=1e-6)
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert all("lora" not in getattr(m, attr) for m in layers for attr in m.adapter_layer_names + m.other_param_names)


def test_flora_refuses_to_wrap_a_module_that_already_holds_lora(tiny_llama_dir):
    model = _base(tiny_llama_dir)
    model.add_adapter(_lora(), adapter_name="lora")
    message = r"q_proj.*already holds an adapter of another PEFT method.*Add the FLoRA adapter first"
    with pytest.raises(ValueError, match=message):
        model.add_adapter(_flora(["q_proj"]), adapter_name="flora")


def test_second_flora_adapter_reaches_the_flora_layer_inside_a_lora_layer(tiny_llama_dir, inputs):
    model = _both(tiny_llama_dir, LORA_TARGETS, flora_first=True)
    model.add_adapter(_flora(LORA_TARGETS), adapter_name="flora2")
    q_proj = model.model.layers[0].self_attn.q_proj
    inner = q_proj.base_layer
    assert isinstance(inner, FloraLayer) and set(inner.flora_G) == {"flora", "flora2"}
    assert not any(isinstance(m, FloraLayer) for m in inner.base_layer.modules())  # no FLoRA-in-FLoRA nesting
