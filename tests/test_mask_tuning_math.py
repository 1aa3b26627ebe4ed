"""Masked tuning layer math against independent dense float64 computations: forward, straight-through gradients,
merge / unmerge / delta weight, and the memory rule (nothing weight-sized saved for backward)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from petuning import MaskTuningConfig
from petuning.tuners.mask_tuning.layer import MaskTuningLayer

TAU = 5e-3
MODES = {  # budget mode from seeded scores starts with its budget (the lowest scores) masked
    "threshold": {"mask_mode": "threshold"},
    "budget": {"mask_mode": "budget", "masked_budget": 0.3},
}


class Net(nn.Module):
    def __init__(self, conv1d: bool = False) -> None:
        super().__init__()
        self.a = Conv1D(7, 5) if conv1d else nn.Linear(5, 7)  # weight (5, 7) for Conv1D, (7, 5) for Linear
        self.b = nn.Linear(7, 3, bias=False)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _config(mode="threshold", **config) -> MaskTuningConfig:
    config = {"mask_share": 1.0, **MODES[mode], **config}  # every entry scored unless a test says otherwise
    return MaskTuningConfig(target_modules=["a", "b"], init_weights=False, **config)


def _model(conv1d=False, dtype=torch.float64, mode="threshold", **config):
    torch.manual_seed(0)
    net = Net(conv1d).to(dtype)
    return get_peft_model(net, _config(mode, **config))


def _layer(model, name="a") -> MaskTuningLayer:
    return dict(model.named_modules())[f"base_model.model.{name}"]


def _mask_of(layer: MaskTuningLayer, adapter: str) -> torch.Tensor:
    """The mask rebuilt independently from the raw state: 1 where m > tau (threshold mode) or where the stored set
    does not hold the entry (budget mode), and 1 where no score exists."""
    weight = layer.get_base_layer().weight
    if adapter in layer.mask_tuning_off:
        kept = ~layer.mask_tuning_off[adapter]
    else:
        kept = layer.mask_tuning_scores[adapter].detach() > TAU
    if adapter not in layer.mask_tuning_indices:
        return kept.to(torch.float64)
    mask = torch.ones(weight.numel(), dtype=torch.float64)
    mask[layer.mask_tuning_indices[adapter].long()] = kept.to(torch.float64)
    return mask.view_as(weight)


def _reference_output(layer: MaskTuningLayer, x: torch.Tensor, adapters: list[str], conv1d: bool):
    """y = x (W ⊙ M)ᵀ + b in float64 with W_eff a leaf, so autograd gives dL/dW_eff independently."""
    base = layer.get_base_layer()
    mask = torch.ones_like(base.weight, dtype=torch.float64)
    for name in adapters:
        mask = mask * _mask_of(layer, name)
    w_eff = (base.weight.detach().double() * mask).requires_grad_(True)
    w = w_eff if conv1d else w_eff.T  # (in, out)
    y = x.double() @ w
    if base.bias is not None:
        y = y + base.bias.detach().double()
    return y, w_eff, mask


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("share", [1.0, 0.4], ids=["full", "selected"])
def test_forward_and_straight_through_gradient_match_dense_float64(conv1d, share, mode):
    model = _model(conv1d, mask_share=share, mode=mode)
    layer = _layer(model)
    x = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    assert 0 < int(_mask_of(layer, "default").eq(0).sum()) < layer.get_base_layer().weight.numel()

    out = layer(x)
    ref, w_eff, _ = _reference_output(layer, x.detach(), ["default"], conv1d)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)

    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    # straight-through: dL/dm = dL/dW_eff ⊙ W, gathered at the scored entries
    expected = (w_eff.grad * layer.get_base_layer().weight.detach()).reshape(-1)
    if share < 1:
        expected = expected[layer.mask_tuning_indices["default"].long()]
    scores = layer.mask_tuning_scores["default"]
    torch.testing.assert_close(scores.grad.reshape(-1), expected, atol=1e-12, rtol=1e-12)
    # input gradient through the masked weight
    w_in_out = w_eff.detach() if conv1d else w_eff.detach().T
    torch.testing.assert_close(x.grad, g @ w_in_out.T, atol=1e-12, rtol=1e-12)
    assert not layer.get_base_layer().weight.requires_grad


@pytest.mark.parametrize("mode", sorted(MODES))
def test_two_active_adapters_multiply_masks_and_each_gradient_sees_the_other_mask(mode):
    model = _model(mask_share=1.0, mode=mode)
    torch.manual_seed(1)
    model.add_adapter("other", _config("threshold", mask_share=0.5))  # one mask of each kind in the budget case
    model.base_model.set_adapter(["default", "other"])
    layer = _layer(model)
    x = torch.randn(6, 5, dtype=torch.float64)
    out = layer(x)
    ref, w_eff, _ = _reference_output(layer, x, ["default", "other"], conv1d=False)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    weight = layer.get_base_layer().weight.detach()
    dm = w_eff.grad * weight  # dL/dM_total ⊙ ... : each adapter's gradient is this times the other adapter's mask
    torch.testing.assert_close(
        layer.mask_tuning_scores["default"].grad, dm * _mask_of(layer, "other"), atol=1e-12, rtol=1e-12
    )
    other = (dm * _mask_of(layer, "default")).reshape(-1)[layer.mask_tuning_indices["other"].long()]
    torch.testing.assert_close(layer.mask_tuning_scores["other"].grad, other, atol=1e-12, rtol=1e-12)


def test_init_is_the_base_model_bit_for_bit():
    torch.manual_seed(0)
    net = Net().float()
    x = torch.randn(3, 5)
    expected = net(x)
    model = get_peft_model(net, MaskTuningConfig(target_modules=["a", "b"]))
    assert torch.equal(model(x), expected)
    assert model.base_model.masked_share() == 0.0


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_merge_is_w_times_mask_and_unmerge_restores_exactly(conv1d, mode):
    model = _model(conv1d, dtype=torch.float32, mask_share=0.5, mode=mode)
    torch.manual_seed(2)
    model.add_adapter("other", _config(mode, mask_share=1.0))
    model.base_model.set_adapter(["default", "other"])
    layer = _layer(model)
    weight = layer.get_base_layer().weight
    original = weight.detach().clone()
    masks = {n: _mask_of(layer, n).float() for n in ("default", "other")}

    delta = layer.get_delta_weight("default")
    assert delta.shape == weight.shape and delta.dtype == weight.dtype
    assert torch.equal(original + delta, original * masks["default"])

    x = torch.randn(4, 5)
    unmerged = model(x)
    model.merge_adapter()
    assert torch.equal(weight, original * masks["default"] * masks["other"])
    torch.testing.assert_close(model(x), unmerged, atol=1e-6, rtol=1e-6)
    model.unmerge_adapter()
    assert torch.equal(weight, original)


def test_safe_merge_refuses_nan_scores_and_leaves_base_untouched():
    model = _model(dtype=torch.float32)
    layer = _layer(model)
    original = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        layer.mask_tuning_scores["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, original)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_nothing_weight_sized_is_saved_for_backward(mode):
    """Autograd keeps x and references to the weight, the scores and the stored set, no masked-weight copy and no
    mask computed in forward."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 48))
    model = get_peft_model(
        net, MaskTuningConfig(target_modules=["0"], init_weights=False, mask_share=1.0, **MODES[mode])
    )
    layer = dict(model.named_modules())["base_model.model.0"]
    weight, scores = layer.get_base_layer().weight, layer.mask_tuning_scores["default"]
    state = {weight.data_ptr(), scores.data_ptr(), *(off.data_ptr() for off in layer.mask_tuning_off.values())}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(torch.randn(3, 64))
    big = [t for t in saved if t.numel() >= weight.numel()]
    assert big and all(t.data_ptr() in state for t in big)


def test_half_precision_base_with_float32_scores():
    model = _model(dtype=torch.bfloat16)
    layer = _layer(model)
    assert layer.mask_tuning_scores["default"].dtype == torch.float32
    x = torch.randn(4, 5, dtype=torch.bfloat16)
    out = layer(x)
    ref, _, _ = _reference_output(layer, x, ["default"], conv1d=False)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref.detach(), atol=3e-2, rtol=3e-2)
    out.float().sum().backward()
    assert layer.mask_tuning_scores["default"].grad.dtype == torch.float32


def test_export_converts_the_delta_weight_to_an_exact_full_rank_lora():
    from petuning.export import adapter_to_lora

    model = _model(dtype=torch.float32)
    with pytest.warns(UserWarning, match="high rank"):  # a scattered mask gives a full-rank update
        conversion = adapter_to_lora(model)
    assert conversion.exact
    layer = _layer(model)
    weight = layer.get_base_layer().weight.detach()
    state = {k.removeprefix("base_model.model."): v for k, v in conversion.state_dict.items()}
    lora = state["a.lora_B.weight"] @ state["a.lora_A.weight"]
    torch.testing.assert_close(lora, weight * _mask_of(layer, "default").float() - weight, atol=1e-6, rtol=1e-5)
