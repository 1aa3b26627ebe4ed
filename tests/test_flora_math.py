"""FLoRA layers against an independent float64 Tucker reconstruction written with ``torch.einsum``.

For every supported layer kind (Linear, GPT-2 Conv1D, Embedding, Conv1d/2d/3d with stride, padding modes,
dilation, 1x1, grouped and depthwise kernels): the dense update equals s · G ×₁ U_in ×₂ U_out …; the layer's
(factored) forward equals a copy of the base layer whose weight holds W + ΔW; every mode-n unfolding of ΔW has
rank at most (and generically exactly) the configured rank; merge / unmerge are exact.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.pytorch_utils import Conv1D

from petuning.tuners.flora import Conv, Embedding, Linear

NAME = "default"

# einsum of the Tucker product in the base weight's layout: core modes a b c d e, factor rows i (in) o (out) k h w t
REFERENCE = {
    "linear": "ab,ia,ob->oi",
    "conv1d_gpt2": "ab,ia,ob->io",
    "embedding": "ab,ia,ob->io",
    1: "abc,ia,ob,kc->oik",
    2: "abcd,ia,ob,hc,wd->oihw",
    3: "abcde,ia,ob,tc,hd,we->oithw",
}

CONVS = {
    "conv1d_stride_circular": (lambda: nn.Conv1d(6, 10, 5, stride=2, padding=2, padding_mode="circular"), (2, 6, 13)),
    "conv2d_3x3": (lambda: nn.Conv2d(5, 12, 3, padding=1), (2, 5, 7, 7)),
    "conv2d_stride_dilation_reflect": (
        lambda: nn.Conv2d(6, 9, (3, 2), stride=(2, 1), dilation=(2, 1), padding=(2, 1), padding_mode="reflect"),
        (2, 6, 9, 8),
    ),
    "conv2d_same_replicate": (lambda: nn.Conv2d(4, 7, 3, padding="same", padding_mode="replicate"), (2, 4, 6, 5)),
    "conv2d_1x1": (lambda: nn.Conv2d(8, 6, 1), (2, 8, 4, 4)),
    "conv2d_grouped": (lambda: nn.Conv2d(6, 9, 3, groups=3, padding=1), (2, 6, 5, 5)),
    "conv2d_depthwise": (lambda: nn.Conv2d(8, 8, 3, groups=8, padding=1, bias=False), (2, 8, 5, 5)),
    "conv2d_depthwise_multiplier": (lambda: nn.Conv2d(4, 8, 3, groups=4, stride=2), (2, 4, 7, 7)),
    "conv3d": (lambda: nn.Conv3d(3, 6, (2, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)), (2, 3, 4, 6, 6)),
}


def _ranks_for(sizes: list[int]) -> list[int]:
    """Ranks below every mode size where possible, so rank deficiency is visible."""
    return [max(1, min(size - 1, 3)) for size in sizes]


def _make_layer(kind: str, seed: int = 0):
    """(flora layer with a random core, input) in float64; ``kind`` is a CONVS key or linear / conv1d_gpt2 / embedding."""
    torch.manual_seed(seed)
    if kind == "linear":
        base, x = nn.Linear(16, 12), torch.randn(3, 5, 16)
    elif kind == "conv1d_gpt2":
        base, x = Conv1D(12, 16), torch.randn(3, 5, 16)
    elif kind == "embedding":
        base, x = nn.Embedding(40, 10, padding_idx=0), torch.randint(0, 40, (3, 6))
    else:
        make, shape = CONVS[kind]
        base, x = make(), torch.randn(*shape)
    base = base.double()
    x = x.double() if x.is_floating_point() else x
    cls = {"linear": Linear, "conv1d_gpt2": Linear, "embedding": Embedding}.get(kind, Conv)
    extra = {"fan_in_fan_out": True} if kind == "conv1d_gpt2" else {}
    probe = cls(copy.deepcopy(base), NAME, r=1, scale=1.0, dropout=0.0, init_weights=True, **extra)
    ranks = _ranks_for([size for _, size in probe.modes()])
    layer = cls(base, NAME, r=ranks, scale=1.7, dropout=0.0, init_weights=False, **extra)
    return layer, x


def _reference_delta(layer, kind: str) -> torch.Tensor:
    core = layer.flora_G[NAME].detach()
    factors = [u.detach() for u in layer.flora_U[NAME]]
    key = kind if kind in REFERENCE else core.dim() - 2
    return layer.flora_scale[NAME] * torch.einsum(REFERENCE[key], core, *factors)


def _dense_reference_layer(layer, delta: torch.Tensor) -> nn.Module:
    """A copy of the base layer with weight W + ΔW: torch's own layer computes the reference output, with every
    stride / padding / padding_mode / dilation / groups setting."""
    ref = copy.deepcopy(layer.get_base_layer())
    with torch.no_grad():
        ref.weight += delta
    return ref


ALL_KINDS = ["linear", "conv1d_gpt2", "embedding", *CONVS]


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_delta_weight_equals_einsum_tucker_product(kind):
    layer, _ = _make_layer(kind)
    delta = layer.get_delta_weight(NAME)
    assert delta.dtype == torch.float64 and delta.shape == layer.get_base_layer().weight.shape
    torch.testing.assert_close(delta, _reference_delta(layer, kind), rtol=1e-12, atol=1e-13)
    assert delta.abs().max() > 1e-3  # the random core gives a visible update


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_forward_equals_base_layer_with_updated_weight(kind):
    layer, x = _make_layer(kind)
    reference = _dense_reference_layer(layer, _reference_delta(layer, kind))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(x), rtol=1e-10, atol=1e-11)
        assert not torch.allclose(layer(x), layer.get_base_layer()(x))


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_mode_unfoldings_have_the_configured_ranks(kind):
    layer, _ = _make_layer(kind)
    delta = layer.get_delta_weight(NAME)
    ranks = layer.flora_r[NAME]
    # weight dimension of each mode [in, out, *kernel]: (out, in) for Linear, (in, out) for Conv1D/Embedding,
    # (out, in/groups, *kernel) for convolutions
    dims = {"linear": [1, 0], "conv1d_gpt2": [0, 1], "embedding": [0, 1]}.get(kind, [1, 0, *range(2, delta.dim())])
    for mode, (dim, rank) in enumerate(zip(dims, ranks)):
        unfolding = delta.movedim(dim, 0).reshape(delta.shape[dim], -1)
        assert torch.linalg.matrix_rank(unfolding).item() == min(rank, *unfolding.shape), f"mode {mode}"


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_merge_and_unmerge_are_exact(kind):
    layer, x = _make_layer(kind)
    weight = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge(safe_merge=True)
        torch.testing.assert_close(
            layer.get_base_layer().weight, weight + _reference_delta(layer, kind), rtol=0, atol=1e-13
        )
        torch.testing.assert_close(layer(x), unmerged, rtol=1e-10, atol=1e-11)
        layer.unmerge()
    torch.testing.assert_close(layer.get_base_layer().weight, weight, rtol=0, atol=1e-13)


@pytest.mark.parametrize("kind", ["conv1d_stride_circular", "conv2d_3x3", "conv2d_stride_dilation_reflect", "conv3d"])
def test_factored_and_dense_convolution_paths_agree(kind, monkeypatch):
    layer, x = _make_layer(kind)
    assert layer.uses_factored_path(NAME)  # these shapes take the 1x1 -> core -> 1x1 chain
    with torch.no_grad():
        factored = layer(x)
        monkeypatch.setattr(layer, "uses_factored_path", lambda name: False)
        torch.testing.assert_close(layer(x), factored, rtol=1e-10, atol=1e-11)


def test_grouped_convolutions_take_the_dense_kernel_path():
    for kind in ("conv2d_grouped", "conv2d_depthwise", "conv2d_depthwise_multiplier"):
        layer, _ = _make_layer(kind)
        assert not layer.uses_factored_path(NAME)
        base = layer.get_base_layer()
        assert layer.modes()[0][1] == base.in_channels // base.groups  # input mode = in/groups, as in the weight


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("kind", ["linear", "conv1d_gpt2", "embedding"])
def test_forward_and_backward_never_build_the_dense_update(kind):
    torch.manual_seed(0)
    if kind == "embedding":
        base, x = nn.Embedding(500, 40), torch.randint(0, 500, (2, 3))
        layer = Embedding(base, NAME, r=4, scale=2.0, dropout=0.0, init_weights=False)
    else:
        base = nn.Linear(96, 80) if kind == "linear" else Conv1D(80, 96)
        x = torch.randn(2, 3, 96, requires_grad=True)
        layer = Linear(base, NAME, r=4, scale=2.0, dropout=0.1, init_weights=False, fan_in_fan_out=kind != "linear")
    with _LargestTensor() as probe:
        out = layer.adapter_output(x, NAME)
        out.sum().backward()
    # nothing larger than a factor (or its gradient) or the activations, all far below the out x in update
    bound = max([p.numel() for n, p in layer.named_parameters() if "flora_" in n] + [x.numel(), out.numel()])
    assert probe.largest <= bound < layer.get_base_layer().weight.numel() / 4


def test_convolution_never_builds_anything_larger_than_the_weight_or_activations():
    for kind in CONVS:
        layer, x = _make_layer(kind)
        base = layer.get_base_layer()
        bound = max(base.weight.numel(), x.numel(), base(x).numel())
        with _LargestTensor() as probe:
            layer.adapter_output(x.requires_grad_(), NAME).sum().backward()
        assert probe.largest <= bound, kind


def test_init_is_zero_core_and_kaiming_factors():
    torch.manual_seed(0)
    layer = Linear(nn.Linear(4000, 3000), NAME, r=16, scale=2.0, dropout=0.0, init_weights=True)
    assert torch.count_nonzero(layer.flora_G[NAME]) == 0
    for factor in layer.flora_U[NAME]:
        # Kaiming-normal(a=√3) with fan_in = rank: std = sqrt(2 / (1 + 3)) / sqrt(16) = 1 / sqrt(32)
        assert factor.mean().abs() < 0.01
        assert abs(factor.std().item() * math.sqrt(32) - 1) < 0.03


def test_only_the_core_gets_a_gradient_on_the_first_step():
    torch.manual_seed(0)
    layer = Conv(nn.Conv2d(4, 6, 3), NAME, r=[2, 3, 2, 2], scale=2.0, dropout=0.0, init_weights=True)
    x = torch.randn(2, 4, 5, 5)
    base_out = layer.get_base_layer()(x)
    out = layer(x)
    assert torch.equal(out, base_out)
    out.pow(2).sum().backward()
    assert layer.flora_G[NAME].grad.abs().max() > 0
    assert all(torch.count_nonzero(u.grad) == 0 for u in layer.flora_U[NAME])


def test_multiple_active_adapters_add_up():
    layer, x = _make_layer("conv2d_3x3")
    layer.update_layer("second", r=[2, 2, 3, 3], scale=0.5, dropout=0.0, init_weights=False)
    layer.set_adapter([NAME, "second"])
    delta = layer.get_delta_weight(NAME) + layer.get_delta_weight("second")
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _dense_reference_layer(layer, delta)(x), rtol=1e-10, atol=1e-11)


class _ScaledEmbedding(nn.Embedding):
    """Like Gemma's scaled word embeddings: the looked-up rows are multiplied by ``embed_scale``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("embed_scale", torch.tensor(3.0, dtype=torch.float64), persistent=False)

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale


def test_scaled_embedding_scales_the_update_so_merging_is_exact():
    torch.manual_seed(0)
    layer = Embedding(_ScaledEmbedding(30, 8).double(), NAME, r=[4, 3], scale=1.0, dropout=0.0, init_weights=False)
    ids = torch.randint(0, 30, (2, 5))
    with torch.no_grad():
        unmerged = layer(ids)
        expected = (layer.get_base_layer().weight + _reference_delta(layer, "embedding"))[ids] * 3.0
        torch.testing.assert_close(unmerged, expected, rtol=1e-12, atol=1e-12)
        layer.merge()
        torch.testing.assert_close(layer(ids), unmerged, rtol=1e-12, atol=1e-12)


def test_embed_tokens_of_a_language_model_merges_into_the_same_logits():
    from peft import get_peft_model

    from petuning import FloraConfig
    from petuning.testing import build_tiny_model

    base = build_tiny_model("llama", seed=0, dtype=torch.float64)
    ids = torch.randint(4, 100, (2, 7))
    model = get_peft_model(base, FloraConfig(r=[8, 4], target_modules=["embed_tokens", "q_proj"], init_weights=False))
    embed = model.base_model.model.model.embed_tokens
    assert isinstance(embed, Embedding) and embed.flora_G[NAME].dtype == torch.float64
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        with model.disable_adapter():
            assert not torch.allclose(model(input_ids=ids).logits, unmerged)
        merged = model.merge_and_unload()(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-10, atol=1e-10)
