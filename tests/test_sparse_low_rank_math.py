"""Sparse-plus-low-rank layer math, checked against an independent dense float64 computation.

The reference side never calls the layer's own helpers: it rebuilds the update with numpy from the saved tensors,

    ΔW = (alpha / r) B A + scatter(values at flat indices i * in + j)          (out, in)
    y  = x (W0 + ΔW)ᵀ + b

and takes gradients of that dense formula with torch autograd in float64.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from torch import nn
from toy_models import MLP, Conv1DNet
from transformers.pytorch_utils import Conv1D

from petuning import SparseLowRankConfig
from petuning.tuners.sparse_low_rank import SparseLinear, SparseLowRankLayer
from petuning.tuners.sparse_low_rank import support as support_module
from petuning.tuners.sparse_low_rank.support import SparseStructure

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import profile_allocations

ADAPTER = "default"


def layers(model) -> dict[str, SparseLowRankLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLowRankLayer)}


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


def reference_delta(layer: SparseLowRankLayer, name: str = ADAPTER) -> np.ndarray:
    """(alpha/r) B A + scatter(values), (out, in), float64, from the raw tensors."""
    out_f, in_f = layer.out_features, layer.in_features
    delta = np.zeros(out_f * in_f)
    delta[np64(layer.sparse_low_rank_indices[name]).astype(np.int64)] = np64(layer.sparse_low_rank_values[name])
    delta = delta.reshape(out_f, in_f)
    if layer.sparse_low_rank_r[name]:
        b, a = np64(layer.sparse_low_rank_B[name]), np64(layer.sparse_low_rank_A[name])
        delta += layer.sparse_low_rank_scaling[name] * b @ a
    return delta


def weight_out_in(layer: SparseLowRankLayer) -> np.ndarray:
    w = np64(layer.get_base_layer().weight)
    return w.T if isinstance(layer.get_base_layer(), Conv1D) else w


def wrap(model, **kwargs):
    kwargs.setdefault("target_modules", ["lin1", "lin2"])
    kwargs.setdefault("r", 3)
    kwargs.setdefault("alpha", 6.0)
    kwargs.setdefault("density", 0.2)
    kwargs.setdefault("init_weights", False)
    return get_peft_model(model, SparseLowRankConfig(**kwargs))


# ------------------------------------------------------------------------------------- construction
@pytest.mark.parametrize("shape", [(10, 12), (8, 10), (9, 14), (1, 7)])
@pytest.mark.parametrize("density", [0.013, 0.2, 0.5, 0.97])
def test_number_of_values_is_round_density_times_size(shape, density):
    out_f, in_f = shape
    nnz = round(density * out_f * in_f)
    if nnz == 0:
        pytest.skip("an empty support is refused (see the error tests)")
    config = SparseLowRankConfig(r=1, density=density, target_modules=["0"])
    model = get_peft_model(nn.Sequential(nn.Linear(in_f, out_f)), config)
    (layer,) = layers(model).values()
    assert layer.sparse_low_rank_values[ADAPTER].numel() == nnz
    indices = layer.sparse_low_rank_indices[ADAPTER]
    assert indices.dtype == torch.int32 and indices.numel() == nnz
    flat = indices.long()
    assert bool((flat[1:] > flat[:-1]).all()) and int(flat[0]) >= 0 and int(flat[-1]) < out_f * in_f
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == nnz + 1 * (in_f + out_f)


def test_init_is_identity_and_zero_valued():
    model = wrap(MLP(torch.float64), init_weights=True)
    for layer in layers(model).values():
        assert not layer.sparse_low_rank_values[ADAPTER].any() and not layer.sparse_low_rank_B[ADAPTER].any()
        assert np.array_equal(reference_delta(layer), np.zeros((layer.out_features, layer.in_features)))


# --------------------------------------------------------------------------------- update and forward
@pytest.mark.parametrize("r", [0, 3])
@pytest.mark.parametrize("net", ["mlp", "conv1d"])
def test_update_and_forward_match_dense_float64(r, net):
    torch.manual_seed(3)
    if net == "mlp":
        model = wrap(MLP(torch.float64), r=r)
        x = torch.randn(4, 5, 12, dtype=torch.float64)
    else:
        model = wrap(Conv1DNet(torch.float64), r=r, target_modules=["proj"])
        x = torch.randn(4, 5, 14, dtype=torch.float64)
    for layer in layers(model).values():
        delta = reference_delta(layer)
        got = np64(layer.get_delta_weight(ADAPTER))
        want = delta.T if layer.fan_in_fan_out else delta  # get_delta_weight uses the base weight's layout
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-14)

    if net == "conv1d":
        (layer,) = layers(model).values()
        bias = np64(layer.get_base_layer().bias)
        want = np64(x) @ (weight_out_in(layer) + reference_delta(layer)).T + bias
        np.testing.assert_allclose(np64(model(x)), want, rtol=1e-12, atol=1e-12)
    else:
        lin1, lin2 = layers(model)["base_model.model.lin1"], layers(model)["base_model.model.lin2"]
        h = np.tanh(np64(x) @ (weight_out_in(lin1) + reference_delta(lin1)).T + np64(lin1.get_base_layer().bias))
        want = h @ (weight_out_in(lin2) + reference_delta(lin2)).T + np64(lin2.get_base_layer().bias)
        np.testing.assert_allclose(np64(model(x)), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("net", ["mlp", "conv1d"])
def test_gradients_match_dense_masked_float64(net):
    """Gradients of A, B, the sparse values and the input equal those of the dense formula, where the values are
    scattered into a dense matrix (so their gradient is the dense gradient read at the support)."""
    torch.manual_seed(4)
    model = (
        wrap(MLP(torch.float64), r=2) if net == "mlp" else wrap(Conv1DNet(torch.float64), r=2, target_modules=["proj"])
    )
    (layer, *_) = layers(model).values()
    in_f, out_f = layer.in_features, layer.out_features
    x = torch.randn(7, in_f, dtype=torch.float64, requires_grad=True)
    target = torch.randn(7, out_f, dtype=torch.float64)
    (layer(x) - target).pow(2).sum().backward()

    a = layer.sparse_low_rank_A[ADAPTER].detach().clone().requires_grad_()
    b = layer.sparse_low_rank_B[ADAPTER].detach().clone().requires_grad_()
    v = layer.sparse_low_rank_values[ADAPTER].detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    idx = layer.sparse_low_rank_indices[ADAPTER].long()
    w0 = torch.from_numpy(weight_out_in(layer))
    dense_s = torch.zeros(out_f * in_f, dtype=torch.float64).index_put((idx,), v).view(out_f, in_f)
    w = w0 + layer.sparse_low_rank_scaling[ADAPTER] * b @ a + dense_s
    y = x_ref @ w.T + layer.get_base_layer().bias.detach()
    (y - target).pow(2).sum().backward()

    for got, want in [
        (layer.sparse_low_rank_A[ADAPTER].grad, a.grad),
        (layer.sparse_low_rank_B[ADAPTER].grad, b.grad),
        (layer.sparse_low_rank_values[ADAPTER].grad, v.grad),
        (x.grad, x_ref.grad),
    ]:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_sparse_linear_passes_gradcheck():
    torch.manual_seed(5)
    out_f, in_f, nnz = 6, 5, 11
    idx = torch.randperm(out_f * in_f)[:nnz].sort().values.to(torch.int32)
    structure = SparseStructure(idx, out_f, in_f)
    x = torch.randn(4, in_f, dtype=torch.float64, requires_grad=True)
    values = torch.randn(nnz, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_, v_: SparseLinear.apply(x_, v_, structure), (x, values))


def test_value_gradient_is_sampled_product_in_token_chunks(monkeypatch):
    """The values' gradient is Σ_t grad_out[t, i] x[t, j] at the support, the same when tokens are chunked."""
    torch.manual_seed(6)
    out_f, in_f, n, nnz = 9, 13, 50, 30
    idx = torch.randperm(out_f * in_f)[:nnz].sort().values.to(torch.int32)
    structure = SparseStructure(idx, out_f, in_f)
    g, x = torch.randn(n, out_f, dtype=torch.float64), torch.randn(n, in_f, dtype=torch.float64)
    rows, cols = (idx.long() // in_f).numpy(), (idx.long() % in_f).numpy()
    want = np.einsum("tk,tk->k", np64(g)[:, rows], np64(x)[:, cols])
    np.testing.assert_allclose(np64(structure.sampled_product(g.T, x)), want, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(support_module, "TOKEN_CHUNK", 7)
    np.testing.assert_allclose(np64(structure.sampled_product(g.T, x)), want, rtol=1e-12, atol=1e-12)


def test_train_step_never_allocates_a_dense_update():
    """On a 1024 x 1024 layer with few tokens, a forward + backward through the adapter allocates far less than one
    out x in matrix, whereas the dense-masked formulation of the same update needs several."""
    torch.manual_seed(7)
    n, size = 4, 1024
    model = get_peft_model(
        nn.Sequential(nn.Linear(size, size, bias=False)), SparseLowRankConfig(r=0, density=0.01, target_modules=["0"])
    )
    model.train()
    (layer,) = layers(model).values()
    x = torch.randn(n, size)
    dense_bytes = size * size * 4

    def sparse_step():
        model(x).sum().backward()

    values = layer.sparse_low_rank_values[ADAPTER]
    idx = layer.sparse_low_rank_indices[ADAPTER].long()

    def dense_masked_step():
        delta = torch.zeros(size * size).index_put((idx,), values).view(size, size)
        torch.nn.functional.linear(x, layer.get_base_layer().weight + delta).sum().backward()

    sparse_step()  # builds and caches the support's index structure (O(nnz) memory, once)
    sparse_peak, dense_peak = profile_allocations(sparse_step)[0], profile_allocations(dense_masked_step)[0]
    assert values.grad is not None and values.grad.abs().sum() > 0
    assert sparse_peak < dense_bytes / 8, (sparse_peak, dense_bytes)
    assert dense_peak >= 2 * dense_bytes, (dense_peak, dense_bytes)


# -------------------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("net", ["mlp", "conv1d"])
def test_merge_and_unmerge_are_exact_float64(net):
    torch.manual_seed(8)
    model = wrap(MLP(torch.float64)) if net == "mlp" else wrap(Conv1DNet(torch.float64), target_modules=["proj"])
    before = {n: weight_out_in(layer).copy() for n, layer in layers(model).items()}
    deltas = {n: reference_delta(layer) for n, layer in layers(model).items()}
    model.merge_adapter()
    for n, layer in layers(model).items():
        np.testing.assert_allclose(weight_out_in(layer), before[n] + deltas[n], rtol=0, atol=1e-15)
    model.unmerge_adapter()
    for n, layer in layers(model).items():
        np.testing.assert_allclose(weight_out_in(layer), before[n], rtol=0, atol=1e-15)


def test_saved_file_holds_int32_support_and_values(tmp_path):
    model = wrap(MLP(torch.float32), support="magnitude")
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    for name, layer in layers(model).items():
        key = name + ".sparse_low_rank_indices"
        assert saved[key].dtype == torch.int32
        assert torch.equal(saved[key], layer.sparse_low_rank_indices[ADAPTER])
        assert torch.equal(saved[key.replace("indices", "values")], layer.sparse_low_rank_values[ADAPTER])
