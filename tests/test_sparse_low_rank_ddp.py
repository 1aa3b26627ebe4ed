"""Gradient-chosen sparse supports under two-process DDP on CPU (gloo): the ranks see different data, yet sum
their scores and choose the same support, which equals the support of one process that accumulates the two
shards as micro-batches; the trained adapters of both ranks stay identical."""

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


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        assert dist.get_world_size() == 2
        module = _model().train()
        model = DistributedDataParallel(module)
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=LR)
        x, y = _shards()[rank]
        with petuning.TrainingHooks(model, optimizer):
            for _ in range(STEPS):
                (model(x) - y).pow(2).mean().backward()
                optimizer.step()
                optimizer.zero_grad()
        torch.save(_state(module), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ranks_choose_one_support_equal_to_single_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert rank0.keys() == rank1.keys() and any("indices" in k for k in rank0)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"ranks diverged on {name}"

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
