"""Checks that need a CUDA device (skipped without one; ``benchmarks/gpu_check.sh`` runs them on a GPU machine).

- the sparse-plus-low-rank CUDA path (int32 CSR indices, one token block, ``sampled_addmm``) against the dense
  float64 formula, forward and every gradient;
- SORSA's randomized SVD on the GPU against the full SVD on the CPU;
- bitsandbytes 4-bit bases on CUDA under SORSA and sparse-plus-low-rank: the adapter starts as the base model and
  its gradients reach the adapter tensors.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

from petuning import SorsaConfig, SparseLowRankConfig
from petuning.linalg import top_singular_triplets
from petuning.tuners.sparse_low_rank import SparseLowRankLayer

pytestmark = pytest.mark.gpu
ADAPTER = "default"


def test_sparse_low_rank_cuda_matches_dense_float64():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(96, 80, dtype=torch.float64)).cuda()
    model = get_peft_model(base, SparseLowRankConfig(r=4, density=0.05, target_modules=["0"], init_weights=False))
    (layer,) = [m for m in model.modules() if isinstance(m, SparseLowRankLayer)]
    structure = layer.sparse_structure(ADAPTER)
    assert structure.crow.dtype == torch.int32 and structure.crow.is_cuda
    x = torch.randn(3, 50, 96, dtype=torch.float64, device="cuda", requires_grad=True)
    model(x).square().sum().backward()

    values = layer.sparse_low_rank_values[ADAPTER].detach().clone().requires_grad_()
    a = layer.sparse_low_rank_A[ADAPTER].detach().clone().requires_grad_()
    b = layer.sparse_low_rank_B[ADAPTER].detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    idx = layer.sparse_low_rank_indices[ADAPTER].long()
    dense = torch.zeros(80 * 96, dtype=torch.float64, device="cuda").index_put((idx,), values).view(80, 96)
    weight = layer.get_base_layer().weight.detach() + layer.sparse_low_rank_scaling[ADAPTER] * b @ a + dense
    (x_ref @ weight.T + layer.get_base_layer().bias.detach()).square().sum().backward()
    for got, want in [
        (layer.sparse_low_rank_values[ADAPTER].grad, values.grad),
        (x.grad, x_ref.grad),
        (layer.sparse_low_rank_A[ADAPTER].grad, a.grad),
        (layer.sparse_low_rank_B[ADAPTER].grad, b.grad),
    ]:
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_randomized_svd_on_gpu_matches_full_svd():
    torch.manual_seed(1)
    u0, _ = torch.linalg.qr(torch.randn(512, 512, dtype=torch.float64))
    v0, _ = torch.linalg.qr(torch.randn(384, 384, dtype=torch.float64))
    spectrum = torch.logspace(0, -2, 384, dtype=torch.float64)
    weight = (u0[:, :384] * spectrum) @ v0.T
    config = SorsaConfig(r=16)
    u, s, vh = top_singular_triplets(
        weight.float().cuda(), 16, config.svd_method, config.svd_niter, config.svd_oversampling
    )
    assert u.is_cuda
    uf, sf, vhf = top_singular_triplets(weight, 16, "full")
    torch.testing.assert_close(s.double().cpu(), sf, rtol=1e-4, atol=0)
    torch.testing.assert_close(
        (u.double().cpu() * s.double().cpu()) @ vh.double().cpu(), (uf * sf) @ vhf, rtol=0, atol=1e-4
    )


@pytest.mark.parametrize(
    "config", [SorsaConfig(r=4, target_modules=["0"]), SparseLowRankConfig(r=4, density=0.02, target_modules=["0"])]
)
def test_bitsandbytes_4bit_base_on_cuda(config):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(2)
    linear = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    linear.load_state_dict(nn.Linear(128, 64, bias=False).state_dict())
    base = nn.Sequential(linear).cuda()
    x = torch.randn(8, 128, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        before = base(x).float()
    model = get_peft_model(base, config)
    with torch.no_grad():
        after = model(x).float()
    torch.testing.assert_close(after, before, rtol=2e-2, atol=2e-2)  # SORSA's W_res is re-quantized: bf16 level
    model(x).float().square().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
