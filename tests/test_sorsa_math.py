"""SORSA layer math, checked against an independent dense float64 computation.

The reference side never calls ``petuning.linalg``: singular value decompositions come from numpy, products
are formed densely in float64, and the regularizer is re-implemented here from its formula

    L_reg = mean over layers of ( ||A Aᵀ - I||_F , ||Bᵀ B - I||_F )        (squared for ortho_norm="fro2")
    y     = W x + b + s (B diag(S) A - B0 diag(S0) A0) x
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from bnb_utils import quantized_model
from peft import get_peft_model
from torch import nn
from toy_models import MLP, Conv1DNet
from transformers.pytorch_utils import Conv1D

from petuning import SorsaConfig, linalg
from petuning.tuners.sorsa.layer import SorsaLayer

ADAPTER = "default"


# ------------------------------------------------------------------------------------------------ helpers
def wrap(model: nn.Module, **kwargs):
    kwargs.setdefault("target_modules", ["lin1", "lin2"])
    kwargs.setdefault("r", 3)
    return get_peft_model(model, SorsaConfig(**kwargs))


def sorsa_layers(peft_model) -> dict[str, SorsaLayer]:
    return {name: m for name, m in peft_model.named_modules() if isinstance(m, SorsaLayer)}


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


def weight_out_in(layer: SorsaLayer) -> np.ndarray:
    """The base weight as a float64 (out, in) array, read directly from the base module."""
    w = np64(layer.get_base_layer().weight)
    return w.T if isinstance(layer.get_base_layer(), Conv1D) else w


def factors(layer: SorsaLayer, name: str = ADAPTER) -> dict[str, np.ndarray]:
    return {key: np64(getattr(layer, f"sorsa_{key}")[name]) for key in ("A", "S", "B", "A0", "S0", "B0")}


def dense_delta(layer: SorsaLayer, name: str = ADAPTER) -> np.ndarray:
    """s (B diag(S) A - B0 diag(S0) A0) in (out, in) layout, float64."""
    f = factors(layer, name)
    s = layer.sorsa_scaling[name]
    return s * (f["B"] @ np.diag(f["S"]) @ f["A"] - f["B0"] @ np.diag(f["S0"]) @ f["A0"])


def reference_output(layer: SorsaLayer, x: torch.Tensor, w: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return np64(x) @ (w + dense_delta(layer)).T + bias


def perturb(peft_model, seed: int = 1, size: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in sorsa_layers(peft_model).values():
            for p in (layer.sorsa_A[ADAPTER], layer.sorsa_S[ADAPTER], layer.sorsa_B[ADAPTER]):
                p.add_(size * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def numpy_top_r(w: np.ndarray, r: int):
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    return u[:, :r], s[:r], vh[:r]


def reference_regularizer(rows_and_cols: list[torch.Tensor], squared: bool) -> torch.Tensor:
    """Own float64 implementation: mats alternate A (r, in), B (out, r)."""
    terms = []
    for i, m in enumerate(rows_and_cols):
        m = m.to(torch.float64)
        gram = m @ m.T if i % 2 == 0 else m.T @ m
        diff = gram - torch.eye(gram.shape[0], dtype=torch.float64)
        sq = (diff * diff).sum()
        terms.append(sq if squared else torch.sqrt(sq))
    return sum(terms) / len(terms)


# ------------------------------------------------------------------------------------------------- init
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("alpha", [None, 12.0])
def test_init_factors_are_top_r_svd(dtype, alpha):
    r = 3
    model = wrap(MLP(dtype), r=r, alpha=alpha)
    scale = 1.0 if alpha is None else alpha / r
    layers = sorsa_layers(model)
    assert set(layers) == {"base_model.model.lin1", "base_model.model.lin2"}
    for layer in layers.values():
        assert layer.sorsa_scaling[ADAPTER] == scale
        f = factors(layer)
        w = weight_out_in(layer)
        u, s, vh = numpy_top_r(w, r)
        # the SVD is taken in float32, so fp32-level tolerances even for a float64 base
        tol = dict(rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(scale * f["S0"], s, **tol)
        np.testing.assert_allclose(np.abs(f["B0"]), np.abs(u), **tol)
        np.testing.assert_allclose(np.abs(f["A0"]), np.abs(vh), **tol)
        # sign-free comparison, triplet by triplet, and the whole principal part
        for k in range(r):
            np.testing.assert_allclose(np.outer(f["B0"][:, k], f["A0"][k]), np.outer(u[:, k], vh[k]), **tol)
        top_r = u @ np.diag(s) @ vh
        np.testing.assert_allclose(scale * f["B0"] @ np.diag(f["S0"]) @ f["A0"], top_r, **tol)
        # orthonormal, descending
        np.testing.assert_allclose(f["A0"] @ f["A0"].T, np.eye(r), atol=1e-5)
        np.testing.assert_allclose(f["B0"].T @ f["B0"], np.eye(r), atol=1e-5)
        assert np.all(np.diff(f["S0"]) < 0)
        # documented sign convention: largest-|entry| of each column of B0 is positive
        cols = np.arange(r)
        assert np.all(f["B0"][np.abs(f["B0"]).argmax(axis=0), cols] > 0)
        # trainable factors start equal to the frozen copy
        for key in ("A", "S", "B"):
            np.testing.assert_array_equal(f[key], f[key + "0"])
        # factor dtype: float64 on a float64 base, else float32
        expected = torch.float64 if dtype == torch.float64 else torch.float32
        assert layer.sorsa_A[ADAPTER].dtype == expected and layer.sorsa_B0[ADAPTER].dtype == expected


def test_alpha_scale_is_not_one_and_residual_is_exact():
    """s*B0 diag(S0) A0 is the top-r part for s != 1 too; with s=1 it would be off by a factor 4."""
    r = 2
    model = wrap(MLP(torch.float64), r=r, alpha=8.0)
    layer = sorsa_layers(model)["base_model.model.lin1"]
    assert layer.sorsa_scaling[ADAPTER] == 4.0
    f = factors(layer)
    _u, s, _vh = numpy_top_r(weight_out_in(layer), r)
    np.testing.assert_allclose(f["S0"], s / 4.0, rtol=1e-5)
    tail = weight_out_in(layer) - 4.0 * f["B0"] @ np.diag(f["S0"]) @ f["A0"]
    # the residual holds exactly the singular values r.. of W
    np.testing.assert_allclose(
        np.linalg.svd(tail, compute_uv=False)[: 10 - r],
        np.linalg.svd(weight_out_in(layer), compute_uv=False)[r:],
        rtol=1e-5,
        atol=1e-5,
    )


# ------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_equals_base_at_init_bit_for_bit(dtype):
    base = MLP(dtype)
    x = torch.randn(5, 12, dtype=dtype)
    expected = base(x).detach().clone()
    model = wrap(base)
    out = model(x)
    assert torch.equal(out, expected)
    with model.disable_adapter():
        assert torch.equal(model(x), expected)


def test_output_differs_with_init_weights_false():
    base = MLP(torch.float64)
    x = torch.randn(5, 12, dtype=torch.float64)
    expected = base(x).detach().clone()
    model = wrap(base, init_weights=False)
    diff = (model(x) - expected).abs().max().item()
    assert diff > 1e-3
    for layer in sorsa_layers(model).values():
        assert not torch.equal(layer.sorsa_A[ADAPTER], layer.sorsa_A0[ADAPTER])
        assert not torch.equal(layer.sorsa_S[ADAPTER], layer.sorsa_S0[ADAPTER])
        assert not torch.equal(layer.sorsa_B[ADAPTER], layer.sorsa_B0[ADAPTER])


@pytest.mark.parametrize("alpha", [None, 6.0])
def test_forward_after_perturbation_matches_dense_linear(alpha):
    model = wrap(MLP(torch.float64), alpha=alpha)
    perturb(model)
    x = torch.randn(7, 12, dtype=torch.float64)
    layers = sorsa_layers(model)
    l1, l2 = layers["base_model.model.lin1"], layers["base_model.model.lin2"]
    h = reference_output(l1, x, weight_out_in(l1), np64(l1.get_base_layer().bias))
    np.testing.assert_allclose(np64(l1(x)), h, rtol=1e-12, atol=1e-12)
    y = np.tanh(h) @ (weight_out_in(l2) + dense_delta(l2)).T + np64(l2.get_base_layer().bias)
    out = np64(model(x))
    np.testing.assert_allclose(out, y, rtol=1e-11, atol=1e-12)
    # and the perturbation really changed something
    with model.disable_adapter():
        assert np.abs(np64(model(x)) - y).max() > 1e-3


def test_forward_after_perturbation_matches_dense_conv1d():
    base = Conv1DNet(torch.float64)
    w_in_out = np64(base.proj.weight)
    model = get_peft_model(base, SorsaConfig(r=4, target_modules=["proj"], alpha=2.0))
    layer = sorsa_layers(model)["base_model.model.proj"]
    assert layer.fan_in_fan_out
    f = factors(layer)
    assert f["A"].shape == (4, 14) and f["B"].shape == (9, 4)
    u, s, vh = numpy_top_r(w_in_out.T, 4)
    np.testing.assert_allclose(0.5 * f["B0"] @ np.diag(f["S0"]) @ f["A0"], u @ np.diag(s) @ vh, atol=1e-5)
    perturb(model)
    x = torch.randn(2, 3, 14, dtype=torch.float64)
    y = reference_output(layer, x, w_in_out.T, np64(base.proj.bias))
    np.testing.assert_allclose(np64(model(x)), y, rtol=1e-12, atol=1e-12)
    # merge into the (in, out) weight is laid out correctly
    model.merge_adapter()
    np.testing.assert_allclose(np64(layer.get_base_layer().weight), (w_in_out.T + dense_delta(layer)).T, atol=1e-13)
    np.testing.assert_allclose(np64(model(x)), y, rtol=1e-11, atol=1e-12)


# --------------------------------------------------------------------------------------------- merge
def test_merge_is_exact_and_unmerge_restores():
    model = wrap(MLP(torch.float64), alpha=5.0)
    perturb(model)
    x = torch.randn(4, 12, dtype=torch.float64)
    unmerged_out = np64(model(x))
    layers = sorsa_layers(model)
    originals = {n: weight_out_in(lay).copy() for n, lay in layers.items()}
    deltas = {n: dense_delta(lay) for n, lay in layers.items()}
    model.merge_adapter()
    for n, layer in layers.items():
        assert layer.merged
        np.testing.assert_allclose(weight_out_in(layer), originals[n] + deltas[n], rtol=0, atol=1e-14)
        assert np.abs(deltas[n]).max() > 1e-2
    np.testing.assert_allclose(np64(model(x)), unmerged_out, rtol=1e-12, atol=1e-12)
    model.unmerge_adapter()
    for n, layer in layers.items():
        assert not layer.merged
        np.testing.assert_allclose(weight_out_in(layer), originals[n], rtol=0, atol=1e-14)


def test_merge_unmerge_fp32_roundoff():
    model = wrap(MLP(torch.float32))
    perturb(model)
    layer = sorsa_layers(model)["base_model.model.lin1"]
    before = layer.get_base_layer().weight.detach().clone()
    layer.merge()
    np.testing.assert_allclose(weight_out_in(layer), np64(before) + dense_delta(layer), atol=1e-6)
    layer.unmerge()
    torch.testing.assert_close(layer.get_base_layer().weight, before, rtol=0, atol=1e-6)


def test_safe_merge_detects_nan_and_leaves_base_untouched():
    model = wrap(MLP(torch.float64))
    perturb(model)
    layer = sorsa_layers(model)["base_model.model.lin1"]
    weights = {n: lay.get_base_layer().weight.detach().clone() for n, lay in sorsa_layers(model).items()}
    with torch.no_grad():
        layer.sorsa_S[ADAPTER][1] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected"):
        layer.merge(safe_merge=True)
    assert not layer.merged
    assert torch.equal(layer.get_base_layer().weight, weights["base_model.model.lin1"])
    # the model-level entry point too
    with pytest.raises(ValueError, match="NaNs detected"):
        model.merge_and_unload(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, weights["base_model.model.lin1"])


# -------------------------------------------------------------------------------------- randomized SVD
def _decaying_linear(out=40, inp=30, seed=0) -> nn.Linear:
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((out, out)))
    v, _ = np.linalg.qr(rng.standard_normal((inp, inp)))
    k = min(out, inp)
    s = 3.0 * 0.7 ** np.arange(k)
    w = u[:, :k] @ np.diag(s) @ v[:, :k].T
    lin = nn.Linear(inp, out)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w))
    return lin


class One(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin1 = lin

    def forward(self, x):
        return self.lin1(x)


def test_randomized_svd_same_subspace_as_full():
    r = 5
    lin = _decaying_linear()
    w = np64(lin.weight)
    u, _, vh = numpy_top_r(w, r)
    proj_u, proj_v = u @ u.T, vh.T @ vh
    layers = {}
    for method in ("full", "randomized"):
        model = get_peft_model(One(copy.deepcopy(lin)), SorsaConfig(r=r, target_modules=["lin1"], svd_method=method))
        layers[method] = sorsa_layers(model)["base_model.model.lin1"]
    for method, layer in layers.items():
        f = factors(layer)
        np.testing.assert_allclose(f["B0"] @ f["B0"].T, proj_u, atol=1e-5, err_msg=method)
        np.testing.assert_allclose(f["A0"].T @ f["A0"], proj_v, atol=1e-5, err_msg=method)
    fr, ff = factors(layers["randomized"]), factors(layers["full"])
    np.testing.assert_allclose(fr["S0"], ff["S0"], rtol=1e-5)
    # canonical signs make the factors themselves agree
    np.testing.assert_allclose(fr["B0"], ff["B0"], atol=1e-4)
    np.testing.assert_allclose(fr["A0"], ff["A0"], atol=1e-4)


@pytest.mark.parametrize("shape", [(200, 120), (120, 200)])
def test_block_krylov_svd_matches_numpy_in_float64(shape):
    """The Krylov path itself (3 blocks of 16 in a 120-dim side), tall and wide: the top-r triplets of a decaying
    spectrum over a flat tail agree with numpy's SVD to float64 precision."""
    rng = np.random.default_rng(7)
    m, n = shape
    k = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    s = np.concatenate([4.0 * 0.6 ** np.arange(8), np.full(k - 8, 0.05)])
    w = torch.from_numpy(u @ np.diag(s) @ v.T)
    r = 4
    assert k > (2 + 1) * linalg.BLOCK_MULTIPLE  # the Krylov space does not cover the small side: no fallback
    uk, sk, vhk = linalg.top_singular_triplets(w, r, "randomized", niter=2, oversampling=0)
    uf, sf, vhf = numpy_top_r(w.numpy(), r)
    assert uk.dtype == torch.float64 and uk.shape == (m, r) and vhk.shape == (r, n)
    np.testing.assert_allclose(sk.numpy(), sf, rtol=1e-10)
    signs = np.sign(np.sum(uk.numpy() * uf, axis=0))  # numpy's sign convention is not the canonical one
    np.testing.assert_allclose(uk.numpy(), uf * signs, atol=1e-8)
    np.testing.assert_allclose(vhk.numpy(), vhf * signs[:, None], atol=1e-8)


def test_randomized_svd_takes_the_exact_svd_when_the_krylov_space_covers_the_matrix(monkeypatch):
    w = torch.from_numpy(np.random.default_rng(1).standard_normal((50, 40)))
    # (niter + 1) * 16 = 48 >= 40: the Krylov space would be the whole space, so the exact SVD is taken
    monkeypatch.setattr(linalg, "_block_krylov_svd", lambda *args: pytest.fail("the Krylov path ran"))
    u, s, vh = linalg.top_singular_triplets(w, 6, "randomized", niter=2)
    uf, sf, vhf = numpy_top_r(w.numpy(), 6)
    np.testing.assert_allclose(((u * s) @ vh).numpy(), (uf * sf) @ vhf, atol=1e-10)


@pytest.mark.parametrize("method", ["full", "randomized"])
def test_svd_init_is_deterministic_and_keeps_global_rng(method):
    lin = _decaying_linear(seed=3)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    cfg = dict(r=4, target_modules=["lin1"], svd_method=method, svd_niter=2)
    m1 = get_peft_model(One(copy.deepcopy(lin)), SorsaConfig(**cfg))
    assert torch.equal(torch.get_rng_state(), state)
    m2 = get_peft_model(One(copy.deepcopy(lin)), SorsaConfig(**cfg))
    l1, l2 = sorsa_layers(m1)["base_model.model.lin1"], sorsa_layers(m2)["base_model.model.lin1"]
    for key in ("sorsa_A0", "sorsa_S0", "sorsa_B0", "sorsa_A", "sorsa_S", "sorsa_B"):
        assert torch.equal(getattr(l1, key)[ADAPTER], getattr(l2, key)[ADAPTER]), key
    assert torch.equal(torch.get_rng_state(), state)


# -------------------------------------------------------------------------------------------- regularizer
@pytest.mark.parametrize("norm", ["fro", "fro2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_regularizer_value_and_gradient(norm, dtype):
    model = wrap(MLP(dtype), ortho_norm=norm, init_weights=False)
    perturb(model, size=0.1)
    tuner = model.base_model
    mats = tuner.sorsa_factors(ADAPTER)
    layers = list(sorsa_layers(model).values())
    assert len(mats) == 2 * len(layers) == 4
    # independent numpy value
    terms = []
    for layer in layers:
        f = factors(layer)
        r = f["A"].shape[0]
        terms += [np.linalg.norm(f["A"] @ f["A"].T - np.eye(r)), np.linalg.norm(f["B"].T @ f["B"] - np.eye(r))]
    terms = np.square(terms) if norm == "fro2" else np.array(terms)
    expected = terms.mean()
    assert expected > 1e-2  # far from orthonormal, so the check has teeth
    value = tuner.orthonormal_regularizer()
    assert value.dtype == dtype
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(value.item(), expected, rtol=rtol)
    # gradient vs autograd through an own float64 implementation
    grads = torch.autograd.grad(value, mats)
    leaves = [m.detach().to(torch.float64).clone().requires_grad_(True) for m in mats]
    ref_grads = torch.autograd.grad(reference_regularizer(leaves, squared=norm == "fro2"), leaves)
    for g, rg in zip(grads, ref_grads):
        assert g.shape == rg.shape
        torch.testing.assert_close(g.to(torch.float64), rg, rtol=rtol, atol=1e-12 if dtype == torch.float64 else 1e-6)
        assert rg.abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_regularizer_is_zero_at_init(dtype):
    model = wrap(MLP(dtype))
    assert 0 <= model.base_model.orthonormal_regularizer().item() < 1e-5


def test_regularizer_in_fp32_under_bf16_autocast():
    model = wrap(MLP(torch.float32), init_weights=False)
    tuner = model.base_model
    plain = tuner.orthonormal_regularizer()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = tuner.orthonormal_regularizer()
        # sanity: under this autocast a naive Gram matrix is computed in bf16 and so gives another value
        a = tuner.sorsa_factors(ADAPTER)[0]
        naive = torch.linalg.matrix_norm(a @ a.T - torch.eye(a.shape[0]))
    assert auto.dtype == torch.float32
    assert torch.equal(auto, plain)
    exact = torch.linalg.matrix_norm(a @ a.T - torch.eye(a.shape[0]))
    assert not torch.equal(naive.float(), exact)


# ------------------------------------------------------------------------------------------------ bf16
def test_bf16_base_svd_in_fp32_and_exact_init():
    base = MLP(torch.float32).to(torch.bfloat16)
    x = torch.randn(6, 12).to(torch.bfloat16)
    expected = base(x).detach().clone()
    weights = {n: np64(getattr(base, n).weight) for n in ("lin1", "lin2")}
    model = wrap(base, r=3)
    for name, layer in sorsa_layers(model).items():
        assert layer.get_base_layer().weight.dtype == torch.bfloat16
        for key in ("sorsa_A", "sorsa_S", "sorsa_B"):
            assert getattr(layer, key)[ADAPTER].dtype == torch.float32
            assert getattr(layer, key + "0")[ADAPTER].dtype == torch.float32
        f = factors(layer)
        u, s, vh = numpy_top_r(weights[name.split(".")[-1]], 3)
        np.testing.assert_allclose(f["S0"], s, rtol=1e-5)
        np.testing.assert_allclose(f["B0"] @ np.diag(f["S0"]) @ f["A0"], u @ np.diag(s) @ vh, atol=1e-5)
        np.testing.assert_allclose(f["A0"] @ f["A0"].T, np.eye(3), atol=1e-5)
    out = model(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)


# ---------------------------------------------------------------------------------------------- errors
def test_strict_rank_names_layer_and_limit():
    with pytest.raises(ValueError) as err:
        wrap(MLP(), r=9, strict_rank=True)  # lin2 is 10 -> 8: at most 8 singular values (lin1 allows 10)
    message = str(err.value)
    assert "'lin2'" in message and "larger than 8" in message and "rank 9" in message


def test_rank_pattern_too_large_is_capped_with_a_warning_naming_the_layer():
    with pytest.warns(UserWarning, match=r"lin1 \(rank 11 -> 10: a 10x12 weight has 10 singular values\)"):
        model = wrap(MLP(), r=2, rank_pattern={"lin1": 11})
    assert model.base_model.model.lin1.sorsa_r["default"] == 10
    with pytest.raises(ValueError, match="lin1"):
        wrap(MLP(), r=2, rank_pattern={"lin1": 11}, strict_rank=True)


class WithConvAndEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv2d(3, 4, 3)
        self.lin1 = nn.Linear(8, 8)


@pytest.mark.parametrize("target, type_name", [("conv", "Conv2d"), ("emb", "Embedding")])
def test_unsupported_layer_type(target, type_name):
    with pytest.raises(TypeError) as err:
        get_peft_model(WithConvAndEmbedding(), SorsaConfig(r=2, target_modules=[target]))
    message = str(err.value)
    assert target in message and type_name in message
    assert "Linear" in message and "Conv1D" in message


def test_no_module_matched_raises_peft_error():
    with pytest.raises(ValueError, match="not found in the base model"):
        wrap(MLP(), target_modules=["does_not_exist"])


def test_integer_base_weight_rejected():
    model = MLP()
    model.lin1.weight = nn.Parameter(torch.randint(-5, 5, (10, 12), dtype=torch.int32), requires_grad=False)
    with pytest.raises(TypeError, match="floating-point") as err:
        wrap(model, target_modules=["lin1"])
    assert "lin1" in str(err.value)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(r=0), "r"),
        (dict(r=-2), "r"),
        (dict(ortho_mode="x"), "ortho_mode"),
        (dict(ortho_norm="l1"), "ortho_norm"),
        (dict(svd_method="qr"), "svd_method"),
        (dict(gamma=-1e-4), "gamma"),
        (dict(alpha=0.0), "alpha"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_invalid_config_values(kwargs, word):
    with pytest.raises(ValueError, match=word):
        SorsaConfig(target_modules=["lin1"], **kwargs)


def test_nonfinite_base_weight_rejected():
    model = MLP()
    with torch.no_grad():
        model.lin1.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        wrap(model)


# ---------------------------------------------------------------------------------------------- 4-bit
def _bnb_model():
    return quantized_model(32)


def test_bnb_4bit_svd_of_dequantized_weight():
    bnb, model = _bnb_model()
    weight = model.proj.weight
    dequant = np64(bnb.functional.dequantize_4bit(weight.data, weight.quant_state))
    assert dequant.shape == (16, 32)
    x = torch.randn(5, 32)
    expected = model(x).detach().clone()
    peft_model = get_peft_model(model, SorsaConfig(r=4, target_modules=["proj"]))
    layer = sorsa_layers(peft_model)["base_model.model.proj"]
    assert isinstance(layer.get_base_layer(), bnb.nn.Linear4bit)
    f = factors(layer)
    u, s, vh = numpy_top_r(dequant, 4)
    np.testing.assert_allclose(f["S0"], s, rtol=1e-5)
    np.testing.assert_allclose(f["B0"] @ np.diag(f["S0"]) @ f["A0"], u @ np.diag(s) @ vh, atol=1e-5)
    assert layer.sorsa_A[ADAPTER].dtype == torch.float32
    # output at init equals the base output
    out = peft_model(x)
    assert torch.equal(out, expected)
    # grads only on sorsa params
    out.square().sum().backward()
    with_grad = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert with_grad == {
        "base_model.model.proj.sorsa_A.default",
        "base_model.model.proj.sorsa_S.default",
        "base_model.model.proj.sorsa_B.default",
    }
    assert all(peft_model.get_parameter(n).grad.abs().sum() > 0 for n in with_grad)
    # perturbed forward = dequantized W x + b + delta
    perturb(peft_model)
    y = np.maximum(reference_output(layer, x, dequant, np64(model.proj.bias)), 0)
    head = peft_model.base_model.model.head
    y = y @ np64(head.weight).T + np64(head.bias)
    np.testing.assert_allclose(np64(peft_model(x)), y, rtol=1e-4, atol=1e-4)


def test_bnb_4bit_merge_warns_that_it_is_lossy():
    _, model = _bnb_model()
    peft_model = get_peft_model(model, SorsaConfig(r=4, target_modules=["proj"]))
    perturb(peft_model)
    x = torch.randn(5, 32)
    unmerged = peft_model(x).detach()
    with peft_model.disable_adapter():
        base = peft_model(x).detach()
    with pytest.warns(UserWarning, match="re-quantizes the weight"):
        peft_model.merge_adapter()
    merged = peft_model(x).detach()
    assert torch.isfinite(merged).all() and not torch.equal(merged, unmerged)  # lossy, as the warning says
    # but the update did land: the merged model is far closer to the adapter model than the base is
    assert (merged - unmerged).norm() < 0.5 * (base - unmerged).norm()
