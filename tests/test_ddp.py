"""Training hooks under two-process DDP on CPU (gloo): both ranks end identical, and equal to one process
training on the whole batch, with SORSA's 'official' regularizer active (gradients added after clipping,
without a second backward through the DDP wrapper)."""

from __future__ import annotations

import pytest
import torch
from ddp_utils import assert_ranks_identical, run_two_ranks, trainable_state
from peft import get_peft_model
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import petuning

STEPS, LR = 5, 5e-3


def _model() -> nn.Module:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
    return get_peft_model(base, petuning.SorsaConfig(r=4, target_modules=["0", "2"], gamma=1e-2))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 16, generator=generator), torch.randn(8, 8, generator=generator)


def _train(model: nn.Module, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """``model`` is what runs forward (maybe DDP-wrapped); ``module`` the PeftModel inside it."""
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=LR)
    hooks = petuning.TrainingHooks(model, optimizer)
    for _ in range(STEPS):
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad()
    assert hooks.step == STEPS
    return trainable_state(module)


def _worker(rank: int) -> dict[str, torch.Tensor]:
    module = _model()
    x, y = _batch()
    shard = slice(rank * 4, rank * 4 + 4)
    return _train(DistributedDataParallel(module), module, x[shard], y[shard])


@pytest.mark.slow
def test_ddp_matches_single_process(tmp_path):
    rank0, rank1 = run_two_ranks(_worker, tmp_path)
    assert rank0
    assert_ranks_identical(rank0, rank1)

    module = _model()
    initial = trainable_state(module)
    single = _train(module, module, *_batch())
    for name in single:
        assert not torch.equal(single[name], initial[name])
        torch.testing.assert_close(rank0[name], single[name], atol=1e-6, rtol=1e-5, msg=name)
