"""Gradient-chosen sparse supports under two-process DDP on CPU (gloo): the ranks see different data, yet sum
their scores and choose the same support, which equals the support of one process that accumulates the two
shards as micro-batches; the trained adapters of both ranks stay identical."""

from __future__ import annotations

import pytest
import torch
from ddp_utils import assert_ranks_identical, run_two_ranks
from peft import get_peft_model
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import petuning

STEPS, WARMUP, LR = 4, 2, 5e-3


def _model() -> nn.Module:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
    config = petuning.SparseLowRankConfig(
        r=2, density=0.1, support="gradient", gradient_warmup_steps=WARMUP, target_modules=["0", "2"]
    )
    return get_peft_model(base, config)


def _shards() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 16, generator=generator), torch.randn(8, 8, generator=generator)
    return [(x[:4], y[:4]), (x[4:], y[4:])]


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in module.state_dict().items() if "sparse_low_rank_" in n}


def _worker(rank: int) -> dict[str, torch.Tensor]:
    module = _model().train()
    model = DistributedDataParallel(module)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=LR)
    x, y = _shards()[rank]
    with petuning.TrainingHooks(model, optimizer):
        for _ in range(STEPS):
            (model(x) - y).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    return _state(module)


@pytest.mark.slow
def test_ranks_choose_one_support_equal_to_single_process(tmp_path):
    rank0, rank1 = run_two_ranks(_worker, tmp_path)
    assert any("indices" in k for k in rank0)
    assert_ranks_identical(rank0, rank1)

    # one process, the two shards as micro-batches of half weight: DDP's averaged update, the ranks' summed scores
    module = _model().train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=LR)
    with petuning.TrainingHooks(module, optimizer):
        for _ in range(STEPS):
            for x, y in _shards():
                ((module(x) - y).pow(2).mean() / 2).backward()
            optimizer.step()
            optimizer.zero_grad()
    single = _state(module)
    for name in single:
        if "indices" in name:
            assert torch.equal(rank0[name], single[name]), name
        else:
            torch.testing.assert_close(rank0[name], single[name], atol=1e-6, rtol=1e-5, msg=name)
