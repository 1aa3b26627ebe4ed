"""Masked tuning under two-process DDP on CPU (gloo): ranks see different micro-batches, so their KL gradients
differ; the hook averages them across ranks and seeds its draws by step, so both ranks end identical, and the
budget mode chooses the same masks on both (the task gradients are all-reduced before its movement step)."""

from __future__ import annotations

import pytest
import torch
from ddp_utils import assert_ranks_identical, run_two_ranks, trainable_state
from peft import get_peft_model
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM

import petuning
from petuning.testing import build_tiny_model

STEPS = 3


MODES = {
    "threshold": {"mask_mode": "threshold", "mask_share": 1.0},
    "budget": {"mask_share": 0.5, "masked_budget": 0.2},
}


def _model(path: str, mode: str):
    torch.manual_seed(0)
    config = petuning.MaskTuningConfig(
        target_modules=["q_proj", "v_proj"],
        init_weights=False,
        gradient_dropout=True,
        gradient_dropout_lambda=1.0,
        task_type="CAUSAL_LM",
        **MODES[mode],
    )
    return get_peft_model(AutoModelForCausalLM.from_pretrained(path), config)


def _worker(rank: int, path: str, mode: str) -> dict:
    module = _model(path, mode)
    module.train()
    model = DistributedDataParallel(module)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=5e-3)
    hooks = petuning.TrainingHooks(model, optimizer, max_steps=STEPS)
    ids = torch.randint(4, 100, (2, 10), generator=torch.Generator().manual_seed(10 + rank))  # per-rank data
    dropped = []
    for _ in range(STEPS):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        dropped.append(hooks.metrics()["mask_tuning_gradient_dropped_share"])
    masks = {n: m.mask("default") for n, m in module.named_modules() if hasattr(m, "mask_tuning_off")}
    return {"params": trainable_state(module), "dropped": dropped, "masks": masks}


@pytest.mark.slow
@pytest.mark.parametrize("mode", sorted(MODES))
def test_masked_tuning_keeps_ddp_ranks_identical(tmp_path, mode):
    path = tmp_path / "tiny-llama"
    build_tiny_model("llama", save_dir=path, seed=0)
    initial = trainable_state(_model(str(path), mode))
    rank0, rank1 = run_two_ranks(_worker, tmp_path, str(path), mode)
    assert rank0["dropped"] == rank1["dropped"] and max(rank0["dropped"]) > 0, "gradient dropout acted"
    assert rank0["masks"].keys() == rank1["masks"].keys() and rank0["masks"]
    for name, mask in rank0["masks"].items():
        assert torch.equal(mask, rank1["masks"][name]), name
        assert not bool(mask.all()), "every layer masks something"
    assert rank0["params"].keys() == initial.keys()
    assert_ranks_identical(rank0["params"], rank1["params"])
    for name, value in rank0["params"].items():
        assert not torch.equal(value, initial[name])
