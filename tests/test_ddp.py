"""Training hooks under two-process DDP on CPU (gloo): both ranks end identical, and equal to one process
training on the whole batch, with SORSA's 'official' regularizer active (gradients added after clipping,
without a second backward through the DDP wrapper)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
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
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        assert dist.get_world_size() == 2
        module = _model()
        x, y = _batch()
        shard = slice(rank * 4, rank * 4 + 4)
        params = _train(DistributedDataParallel(module), module, x[shard], y[shard])
        torch.save(params, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    assert rank0.keys() == rank1.keys() and rank0
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"ranks diverged on {name}"

    module = _model()
    initial = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    single = _train(module, module, *_batch())
    for name in single:
        assert not torch.equal(single[name], initial[name])
        torch.testing.assert_close(rank0[name], single[name], atol=1e-6, rtol=1e-5, msg=name)
