"""Generic PEFT behaviour every petuning method must have (DESIGN contract 3), over all cases in cases.py."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from peft import (
    AutoPeftModelForCausalLM,
    PeftConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from .cases import CASES, MethodCase
from .models import LANGUAGE_MODELS, build_base, make_inputs, outputs, train_steps, training_loss

CASE_IDS = [c.id for c in CASES]
LM_CASES = [c for c in CASES if c.model in LANGUAGE_MODELS]


@pytest.fixture(scope="session")
def model_root(tmp_path_factory):
    return tmp_path_factory.mktemp("bases")


def _base(case: MethodCase, root, dtype=torch.float32):
    return build_base(case.model, root, dtype)


def _peft(case: MethodCase, root, init_weights: bool = True, dtype=torch.float32):
    torch.manual_seed(0)  # init_weights=False draws from the global RNG
    return get_peft_model(_base(case, root, dtype), case.make_config(init_weights))


def _train(model, case: MethodCase, inputs, steps: int = 3, lr: float = 1e-2):
    train_steps(model, case.model, inputs, steps, lr)


def _tuned(case: MethodCase, root):
    """An adapter that is not an identity: random start plus a few optimizer steps."""
    model = _peft(case, root, init_weights=False)
    _train(model, case, make_inputs(case.model))
    return model


def _out(model, case, inputs):
    with torch.no_grad():
        return outputs(model, case.model, inputs)


def _assert_same_state(model, reference, prefix: str) -> None:
    """Adapter tensors of ``model`` equal those of ``reference`` (keys compared without wrapper prefixes)."""

    def adapter_state(m):
        return {k.removeprefix("base_model.model."): v for k, v in m.state_dict().items() if prefix in k}

    got, want = adapter_state(model), adapter_state(reference)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def _tuner_layers(model):
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
class TestConformance:
    def test_init_is_identity_and_init_false_is_not(self, case, model_root):
        inputs = make_inputs(case.model)
        expected = _out(_base(case, model_root), case, inputs)
        assert torch.equal(_out(_peft(case, model_root), case, inputs), expected)
        assert not torch.allclose(_out(_peft(case, model_root, init_weights=False), case, inputs), expected)

    def test_only_adapter_parameters_train(self, case, model_root):
        model = _peft(case, model_root, init_weights=False)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(case.prefix in n for n in trainable)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        buffers_before = {n: b.clone() for n, b in model.named_buffers()}
        _train(model, case, make_inputs(case.model))
        for name, param in model.named_parameters():
            changed = not torch.equal(param, before[name])
            assert changed == (name in trainable), name
        for name, buffer in model.named_buffers():
            if not any(kind in name for kind in case.training_buffers):
                assert torch.equal(buffer, buffers_before[name]), f"frozen buffer {name} changed"

    def test_save_and_load_round_trip(self, case, model_root, tmp_path):
        model = _tuned(case, model_root)
        inputs = make_inputs(case.model)
        expected = _out(model, case, inputs)
        model.save_pretrained(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "README.md",
            "adapter_config.json",
            "adapter_model.safetensors",
        ]
        saved = load_file(tmp_path / "adapter_model.safetensors")
        assert saved and all(case.prefix in k for k in saved), "only adapter tensors belong in the file"
        assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == case.method.upper()
        assert torch.equal(_out(model, case, inputs), expected)  # saving changes nothing

        loaded = PeftModel.from_pretrained(_base(case, model_root), tmp_path)
        assert torch.equal(_out(loaded, case, inputs), expected)
        assert not any(p.requires_grad for p in loaded.parameters()), "a loaded adapter is frozen by default"

        trainable = PeftModel.from_pretrained(_base(case, model_root), tmp_path, is_trainable=True)
        assert any(p.requires_grad for p in trainable.parameters())

        lean = PeftModel.from_pretrained(_base(case, model_root), tmp_path, low_cpu_mem_usage=True)
        assert not any(p.device.type == "meta" for p in lean.parameters())
        _assert_same_state(lean, loaded, case.prefix)
        # low_cpu_mem_usage assigns the file's tensors as they are; they may sit at unaligned addresses, which
        # picks other BLAS kernels: equal values, round-off level output differences.
        torch.testing.assert_close(_out(lean, case, inputs), expected, atol=1e-6, rtol=1e-6)

        written = PeftConfig.from_pretrained(tmp_path).to_dict()
        original = model.peft_config["default"].to_dict()
        for key in ("inference_mode", "auto_mapping"):  # set by save_pretrained
            written.pop(key), original.pop(key)
        assert written == original

    def test_inject_adapter_and_state_dict_functions(self, case, model_root):
        model = _tuned(case, model_root)
        inputs = make_inputs(case.model)
        state = get_peft_model_state_dict(model)
        if not case.supports_injection:
            with pytest.raises(ValueError, match="shared state"):
                inject_adapter_in_model(case.make_config(True), _base(case, model_root))
            return
        for low_cpu_mem_usage in (False, True):
            bare = inject_adapter_in_model(
                case.make_config(True), _base(case, model_root), low_cpu_mem_usage=low_cpu_mem_usage
            )
            result = set_peft_model_state_dict(bare, state, low_cpu_mem_usage=low_cpu_mem_usage)
            assert not [k for k in result.unexpected_keys if case.prefix in k]
            _assert_same_state(bare, model, case.prefix)
            torch.testing.assert_close(_out(bare, case, inputs), _out(model, case, inputs), atol=1e-6, rtol=1e-6)

    def test_merge_unmerge_and_merge_and_unload(self, case, model_root):
        model = _tuned(case, model_root)
        inputs = make_inputs(case.model)
        base_out = _out(_base(case, model_root), case, inputs)
        unmerged = _out(model, case, inputs)
        assert not torch.allclose(unmerged, base_out, atol=1e-4)
        tol = {"atol": 1e-4, "rtol": 1e-4}

        model.merge_adapter()
        assert all(layer.merged for layer in _tuner_layers(model))
        torch.testing.assert_close(_out(model, case, inputs), unmerged, **tol)
        with pytest.warns(UserWarning, match="already merged"):
            model.merge_adapter()
        model.unmerge_adapter()
        torch.testing.assert_close(_out(model, case, inputs), unmerged, **tol)

        merged = model.merge_and_unload(safe_merge=True)
        assert not _tuner_layers(merged) and not hasattr(merged, "peft_config")
        assert type(merged) is type(_base(case, model_root))
        torch.testing.assert_close(_out(merged, case, inputs), unmerged, **tol)

    def test_safe_merge_detects_nan_and_leaves_base_untouched(self, case, model_root):
        model = _tuned(case, model_root)
        base_state = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if case.prefix not in k}
        name, param = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
        with torch.no_grad():
            param[(0,) * param.ndim] = float("nan")
        with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
            model.merge_adapter(safe_merge=True)
        after = model.get_base_model().state_dict()
        assert all(torch.equal(after[k], v) for k, v in base_state.items()), f"{name}: base changed by failed merge"

    def test_disable_adapter_and_unload_give_base_back(self, case, model_root):
        model = _tuned(case, model_root)
        inputs = make_inputs(case.model)
        base_out = _out(_base(case, model_root), case, inputs)
        tuned_out = _out(model, case, inputs)
        with model.disable_adapter():
            assert torch.equal(_out(model, case, inputs), base_out)
        assert torch.equal(_out(model, case, inputs), tuned_out)
        model.merge_adapter()
        with model.disable_adapter():  # disabling a merged adapter unmerges it first
            torch.testing.assert_close(_out(model, case, inputs), base_out, atol=1e-5, rtol=1e-5)
        n_base = sum(p.numel() for p in _base(case, model_root).parameters())
        unloaded = model.unload()
        assert not _tuner_layers(unloaded)
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in unloaded.modules()), "hooks left behind"
        assert sum(p.numel() for p in unloaded.parameters()) == n_base
        torch.testing.assert_close(_out(unloaded, case, inputs), base_out, atol=1e-5, rtol=1e-5)

    def test_unload_without_merge_is_exact(self, case, model_root):
        model = _tuned(case, model_root)
        inputs = make_inputs(case.model)
        base_out = _out(_base(case, model_root), case, inputs)
        assert torch.equal(_out(model.unload(), case, inputs), base_out)

    def test_add_set_and_delete_adapters(self, case, model_root):
        model = _tuned(case, model_root)
        inputs = make_inputs(case.model)
        first = _out(model, case, inputs)
        model.add_adapter("other", case.make_config(False))
        assert not any(p.requires_grad for n, p in model.named_parameters() if ".other" in n), "inactive adapter trains"
        model.set_adapter("other")
        second = _out(model, case, inputs)
        assert not torch.allclose(first, second)
        assert all(p.requires_grad for n, p in model.named_parameters() if f"{case.prefix}" in n and ".other" in n)
        model.set_adapter("default")
        assert torch.equal(_out(model, case, inputs), first)

        model.delete_adapter("other")
        assert list(model.peft_config) == ["default"]
        assert not [k for k in model.state_dict() if ".other" in k]
        for layer in _tuner_layers(model):
            for attr in layer.adapter_layer_names + layer.other_param_names:
                assert "other" not in getattr(layer, attr), attr
        assert torch.equal(_out(model, case, inputs), first)

    def test_half_precision_bases_with_fp32_adapters(self, case, model_root):
        inputs = make_inputs(case.model)
        for dtype in (torch.bfloat16, torch.float16):
            model = _peft(case, model_root, init_weights=False, dtype=dtype)
            adapter = [p for n, p in model.named_parameters() if p.requires_grad]
            assert adapter and all(p.dtype == torch.float32 for p in adapter)
            half_inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
            model.train()
            loss = training_loss(model, case.model, half_inputs)
            assert torch.isfinite(loss)
            loss.backward()
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in adapter)
            model.eval()
            assert _out(model, case, half_inputs).dtype == dtype

    def test_config_round_trips(self, case, tmp_path):
        config = case.make_config(True)
        config.save_pretrained(tmp_path)
        again = PeftConfig.from_pretrained(tmp_path)
        assert type(again) is type(config) and again.to_dict() == config.to_dict()
        assert pickle.loads(pickle.dumps(config)).to_dict() == config.to_dict()
        assert copy.deepcopy(config).to_dict() == config.to_dict()
        json.dumps(config.to_dict(), default=list)  # everything is JSON-serializable


@pytest.mark.parametrize("case", LM_CASES, ids=[c.id for c in LM_CASES])
class TestLanguageModelConformance:
    def test_auto_peft_model_and_transformers_load_adapter(self, case, model_root, tmp_path):
        model = _tuned(case, model_root)
        inputs = make_inputs(case.model)
        expected = _out(model, case, inputs)
        model.save_pretrained(tmp_path)

        auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path)
        assert torch.equal(_out(auto, case, inputs), expected)

        plain = AutoModelForCausalLM.from_pretrained(model_root / f"tiny-{case.model}")
        if not case.supports_injection:
            with pytest.raises(ValueError, match="shared state"):
                plain.load_adapter(str(tmp_path), adapter_name="tuned")
            return
        plain.load_adapter(str(tmp_path), adapter_name="tuned")
        torch.testing.assert_close(_out(plain, case, inputs), expected, atol=1e-6, rtol=1e-6)
        plain.delete_adapter("tuned")
        assert not _tuner_layers(plain) or not any(
            "tuned" in getattr(layer, attr) for layer in _tuner_layers(plain) for attr in layer.adapter_layer_names
        )
        assert torch.equal(_out(plain, case, inputs), _out(_base(case, model_root), case, inputs))

    def test_gradient_checkpointing_gives_same_gradients(self, case, model_root):
        inputs = make_inputs(case.model)
        grads = []
        for checkpointing in (False, True):
            base = _base(case, model_root)
            if checkpointing:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            torch.manual_seed(0)
            model = get_peft_model(base, case.make_config(False))
            model.train()
            training_loss(model, case.model, inputs).backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        assert grads[0].keys() == grads[1].keys() and grads[0]
        for name in grads[0]:
            torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)
