"""Two-process DDP on CPU for tests: spawn both ranks over gloo, collect what each rank returns, compare them."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WORLD_SIZE = 2


def run_two_ranks(worker: Callable[..., dict], out_dir: Path, *args) -> tuple[dict, dict]:
    """Runs ``worker(rank, *args)`` in two processes joined in a gloo process group (one torch thread each) and
    returns the two ranks' results. ``worker`` must be a module-level function (it is pickled by name) returning
    something ``torch.save`` can store; the results travel through ``out_dir``."""
    port = _free_port()
    mp.spawn(_rank_main, args=(worker, args, port, str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return torch.load(Path(out_dir) / "rank0.pt"), torch.load(Path(out_dir) / "rank1.pt")


def _rank_main(rank: int, worker: Callable[..., dict], args: tuple, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks share the cores
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        assert dist.get_world_size() == WORLD_SIZE
        torch.save(worker(rank, *args), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_ranks_identical(rank0: dict[str, torch.Tensor], rank1: dict[str, torch.Tensor]) -> None:
    """Both ranks hold the same names and bit-identical tensors."""
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"ranks diverged on {name}"


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the parameters that require gradients, by name."""
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
