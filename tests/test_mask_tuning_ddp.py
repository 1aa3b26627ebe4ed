"""Gradient dropout under two-process DDP on CPU (gloo): ranks see different micro-batches, so their KL gradients
differ; the hook averages them across ranks and seeds its draws by step, so both ranks end identical."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import get_peft_model
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM

import petuning
from petuning.models import build_tiny_model

STEPS = 3


def _model(path: str):
    torch.manual_seed(0)
    config = petuning.MaskTuningConfig(
        target_modules=["q_proj", "v_proj"], init_weights=False, gradient_dropout=True, gradient_dropout_lambda=1.0,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(AutoModelForCausalLM.from_pretrained(path), config)


def _worker(rank: int, port: int, path: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        assert dist.get_world_size() == 2
        module = _model(path)
        module.train()
        model = DistributedDataParallel(module)
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=5e-3)
        hooks = petuning.TrainingHooks(model, optimizer)
        ids = torch.randint(4, 100, (2, 10), generator=torch.Generator().manual_seed(10 + rank))  # per-rank data
        dropped = []
        for _ in range(STEPS):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            dropped.append(hooks.metrics()["mask_tuning_gradient_dropped_share"])
        params = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
        torch.save({"params": params, "dropped": dropped}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_gradient_dropout_keeps_ddp_ranks_identical(tmp_path):
    path = tmp_path / "tiny-llama"
    build_tiny_model("llama", save_dir=path, seed=0)
    initial = {n: p.detach().clone() for n, p in _model(str(path)).named_parameters() if p.requires_grad}
    mp.spawn(_worker, args=(_free_port(), str(path), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0["dropped"] == rank1["dropped"] and max(rank0["dropped"]) > 0, "gradient dropout acted"
    assert rank0["params"].keys() == initial.keys()
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), f"ranks diverged on {name}"
        assert not torch.equal(value, initial[name])
