"""SORSA's default SVD on real SmolLM2 weights: as good as the exact top-r factorization.

Random test matrices have decaying or gapped spectra; LLM weights do not (SmolLM2's sigma_16 / sigma_17 is 1.000
to 1.04), which is where a randomized SVD with too few Krylov steps falls short. The bar, at r = 16 and at the
default r = 8: the top-r part of the default (randomized) SVD reconstructs each weight within 1e-4 (relative) of
the optimum ||W - W_r||_F given by the full SVD, and its factors are orthonormal within 1e-4.
"""

from __future__ import annotations

import pytest
import torch

from petuning import SorsaConfig
from petuning.linalg import top_singular_triplets
from petuning.recipe.smollm2 import load_smollm2

LAYERS = [
    (0, "self_attn.q_proj"),
    (5, "self_attn.k_proj"),
    (10, "mlp.up_proj"),
    (20, "mlp.down_proj"),
    (29, "self_attn.o_proj"),
]


@pytest.fixture(scope="module")
def smollm2():
    model, _ = load_smollm2()
    return model


@pytest.mark.slow
@pytest.mark.parametrize("R", [8, 16])
@pytest.mark.parametrize("index,path", LAYERS)
def test_default_svd_matches_full_svd_on_smollm2_layers(smollm2, index, path, R):
    weight = smollm2.model.layers[index].get_submodule(path).weight.detach()
    config = SorsaConfig(r=R)
    u, s, vh = top_singular_triplets(weight, R, config.svd_method, config.svd_niter, config.svd_oversampling)
    assert config.svd_method == "randomized"

    w64 = weight.double()
    singular = torch.linalg.svdvals(w64)
    optimum = singular[R:].square().sum().sqrt()
    error = (w64 - (u.double() * s.double()) @ vh.double()).norm()
    assert (error / optimum - 1).abs() < 1e-4, float(error / optimum - 1)
    eye = torch.eye(R, dtype=torch.float64)
    assert (u.double().T @ u.double() - eye).abs().max() < 1e-4
    assert (vh.double() @ vh.double().T - eye).abs().max() < 1e-4
    assert torch.all(s[:-1] >= s[1:])  # descending, as the full SVD
    torch.testing.assert_close(s.double(), singular[:R], rtol=5e-3, atol=0)


@pytest.mark.slow
def test_default_svd_fits_every_smollm2_target_within_1e_4(smollm2):
    """All 210 targeted matrices (7 per block), not only the sampled ones: the worst fit is within the bar."""
    worst = {}
    for name, module in smollm2.named_modules():
        if name.rsplit(".", 1)[-1] not in {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}:
            continue
        weight = module.weight.detach()
        u, s, vh = top_singular_triplets(weight, 16)
        w64 = weight.double()
        optimum = torch.linalg.svdvals(w64)[16:].square().sum().sqrt()
        worst[name] = float((w64 - (u.double() * s.double()) @ vh.double()).norm() / optimum - 1)
    assert len(worst) == 210
    name = max(worst, key=lambda key: abs(worst[key]))
    assert abs(worst[name]) < 1e-4, (name, worst[name])
