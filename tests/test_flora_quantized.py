"""FLoRA on a bitsandbytes 4-bit linear base (CPU), through peft's generic quantization backend."""

from __future__ import annotations

import pytest
import torch
from bnb_utils import quantized_model
from peft import get_peft_model

from petuning import FloraConfig


def _quantized_model():
    # in_features = 64 = one NF4 block per row: with shorter rows, bitsandbytes 0.50's CPU 4-bit round trip
    # dequantizes some block maxima with another block's absmax (seen on a (16, 32) weight), unrelated to FLoRA
    return quantized_model(64)


def test_4bit_base_forward_backward_equals_dequantized_formula():
    bnb, model = _quantized_model()
    x = torch.randn(5, 64)
    expected = model(x).detach()
    peft_model = get_peft_model(model, FloraConfig(r=[4, 3], target_modules=["proj"]))
    layer = peft_model.base_model.model.proj
    assert isinstance(layer.get_base_layer(), bnb.nn.Linear4bit) and layer.quantization_backend is not None
    assert torch.equal(peft_model(x), expected)  # zero core: the base model exactly

    peft_model(x).square().sum().backward()
    with_grad = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    prefix = "base_model.model.proj."
    assert with_grad == {prefix + "flora_G.default", prefix + "flora_U.default.0", prefix + "flora_U.default.1"}

    with torch.no_grad():
        layer.flora_G["default"].normal_()
        weight = layer.get_base_weight().double()  # dequantized (out, in)
        g, (u_in, u_out) = layer.flora_G["default"].double(), [u.double() for u in layer.flora_U["default"]]
        delta = layer.flora_scale["default"] * torch.einsum("ab,ia,ob->oi", g, u_in, u_out)
        hidden = torch.relu(x.double() @ (weight + delta).T + model.proj.bias.double())
        head = peft_model.base_model.model.head
        reference = hidden @ head.weight.double().T + head.bias.double()
        torch.testing.assert_close(peft_model(x).double(), reference, rtol=1e-4, atol=1e-4)


def test_4bit_merge_warns_that_it_is_lossy_and_requantizes_w_plus_delta():
    bnb, model = _quantized_model()
    peft_model = get_peft_model(model, FloraConfig(r=4, target_modules=["proj"], init_weights=False))
    layer = peft_model.base_model.model.proj
    x = torch.randn(5, 64)
    unmerged = peft_model(x).detach()
    with torch.no_grad():
        base_weight = layer.get_base_weight().clone()
        target = base_weight + layer.get_delta_weight("default")
    with pytest.warns(UserWarning, match="Merging FLoRA into a quantized .* re-quantizes the weight"):
        peft_model.merge_adapter()
    # the merged weight is exactly NF4(W + ΔW), W being the dequantized base
    weight = layer.get_base_layer().weight
    packed, state = bnb.functional.quantize_4bit(
        target.contiguous(),
        blocksize=weight.blocksize,
        compress_statistics=weight.compress_statistics,
        quant_type="nf4",
    )
    assert torch.equal(layer.get_base_weight(), bnb.functional.dequantize_4bit(packed, state))
    assert not torch.equal(peft_model(x), unmerged)  # lossy, as the warning says
    assert (layer.get_base_weight() - target).norm() < 0.5 * (base_weight - target).norm()  # but the update landed
