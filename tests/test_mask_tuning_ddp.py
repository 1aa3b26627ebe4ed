"""Gradient dropout under two-process DDP on CPU (gloo): ranks see different micro-batches, so their KL gradients
differ; the hook averages them across ranks and seeds its draws by step, so both ranks end identical."""

from __future__ import annotations

import pytest
import torch
from ddp_utils import assert_ranks_identical, run_two_ranks, trainable_state
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


def _worker(rank: int, path: str) -> dict:
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
    return {"params": trainable_state(module), "dropped": dropped}


@pytest.mark.slow
def test_gradient_dropout_keeps_ddp_ranks_identical(tmp_path):
    path = tmp_path / "tiny-llama"
    build_tiny_model("llama", save_dir=path, seed=0)
    initial = trainable_state(_model(str(path)))
    rank0, rank1 = run_two_ranks(_worker, tmp_path, str(path))
    assert rank0["dropped"] == rank1["dropped"] and max(rank0["dropped"]) > 0, "gradient dropout acted"
    assert rank0["params"].keys() == initial.keys()
    assert_ranks_identical(rank0["params"], rank1["params"])
    for name, value in rank0["params"].items():
        assert not torch.equal(value, initial[name])
