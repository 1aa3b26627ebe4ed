"""``adapter_to_lora`` on every other layer type of the conformance matrix (linear, GPT-2 Conv1D, embedding,
Conv1d/2d/3d): the LoRA adapter it writes, loaded into a fresh base by peft, gives the tuned model's outputs; layers
peft's LoRA cannot express (grouped or dilated convolutions, non-zero padding modes) are refused by name."""

from __future__ import annotations

import pytest
import torch
from conformance.cases import CASES
from conformance.models import LANGUAGE_MODELS, build_base, make_inputs, outputs
from export_utils import tuned_model
from peft import get_peft_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from petuning.export import adapter_to_lora

OTHER_CASES = [c for c in CASES if c.model not in LANGUAGE_MODELS]
LAYOUT_CASES = [
    c for c in OTHER_CASES if c.model in ("embedding", "conv1d", "conv2d", "conv2d_1x1", "conv2d_groups", "conv3d")
]


def _lora_expressible(module: nn.Module) -> bool:
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.groups == 1 and all(d == 1 for d in module.dilation) and module.padding_mode == "zeros"
    return True


def _check_conversion(case, model, root) -> str:
    """Convert ``model``; check that peft's LoRA reproduces it, or that the refusal names the reason. Returns
    "converted", "not additive" or "not expressible"."""
    layers = {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, BaseTunerLayer)}
    if not all(m.supports_lora_conversion("default") for m in layers.values()):
        with pytest.raises(ValueError, match="needs an additive adapter"):
            adapter_to_lora(model)
        return "not additive"
    blocked = [n for n, m in layers.items() if not _lora_expressible(m.get_base_layer())]
    if blocked:
        with pytest.raises(ValueError, match=f"{blocked[0]}.*peft's LoRA conv layers do not reproduce"):
            adapter_to_lora(model)
        return "not expressible"
    conversion = adapter_to_lora(model)
    assert conversion.exact
    assert {layer.module for layer in conversion.layers} == set(layers)
    lora = get_peft_model(build_base(case.model, root), conversion.config)
    result = set_peft_model_state_dict(lora, conversion.state_dict)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]
    inputs = make_inputs(case.model)
    with torch.no_grad():
        torch.testing.assert_close(
            outputs(lora.eval(), case.model, inputs), outputs(model, case.model, inputs), atol=2e-5, rtol=1e-5
        )
    return "converted"


@pytest.mark.parametrize("case", OTHER_CASES, ids=[c.id for c in OTHER_CASES])
def test_lora_conversion_reproduces_outputs_or_is_refused(case, tmp_path):
    _check_conversion(case, tuned_model(case, tmp_path), tmp_path)


@pytest.mark.parametrize("case", LAYOUT_CASES, ids=[c.id for c in LAYOUT_CASES])
def test_embedding_and_conv_layouts(case, tmp_path, monkeypatch):
    """The embedding and convolution layouts, exercised through layers that do not opt in to conversion themselves
    (their ``get_delta_weight`` is the exact update, so the opt-in is patched here)."""
    model = tuned_model(case, tmp_path)
    for layer in model.modules():
        if isinstance(layer, BaseTunerLayer):
            monkeypatch.setattr(type(layer), "supports_lora_conversion", lambda self, adapter_name="default": True)
    outcome = _check_conversion(case, model, tmp_path)
    assert outcome == ("not expressible" if case.model in ("conv1d", "conv2d_groups") else "converted")


def test_high_rank_updates_warn_that_lora_is_larger_than_dense(tmp_path):
    case = next(c for c in CASES if c.id == "sparse_low_rank-mlp")
    with pytest.warns(UserWarning, match="hold more numbers than the dense update") as record:
        conversion = adapter_to_lora(tuned_model(case, tmp_path))
    larger = [x.module for x in conversion.layers if x.lora_rank * (x.shape[0] + x.shape[1]) > x.shape[0] * x.shape[1]]
    assert larger and f"The LoRA factors of {len(larger)} layer(s) (e.g. {larger[0]!r})" in str(record[0].message)
    assert conversion.exact
