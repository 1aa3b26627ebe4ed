"""PAT's schedule and losses in training, through petuning's hook protocol: a plain loop (TrainingHooks),
transformers.Trainer (PetuningCallback, with gradient accumulation) and two-process DDP."""

from __future__ import annotations

import math

import pytest
import torch
from ddp_utils import assert_ranks_identical, run_two_ranks, trainable_state
from peft import get_peft_model
from torch.nn.parallel import DistributedDataParallel

import petuning
from petuning import PatConfig
from petuning.testing import build_tiny_model, cpu_training_args

WIDTH = 48


def tiny_pat(schedule_steps: int, seed: int = 0, **overrides):
    base = build_tiny_model("llama", seed=0)
    kwargs = dict(
        target_width=WIDTH, hsm_rank=8, lora_r=4, lora_dropout=0.0, schedule_steps=schedule_steps, task_type="CAUSAL_LM"
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return get_peft_model(base, PatConfig(**kwargs))


def token_batch(n=4, length=16, seed=1):
    ids = torch.randint(4, 100, (n, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def mask_of(model) -> torch.Tensor:
    return model.base_model.pat_mask["default"]


@pytest.fixture
def reset_accelerate():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


# ------------------------------------------------------------------------------------------------ plain loop
def test_plain_loop_ends_with_a_binary_mask_of_the_target_width():
    total = 60
    model = tiny_pat(total)
    batch = token_batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    hooks = petuning.TrainingHooks(model, optimizer)
    model.train()
    masks, losses, identity = [], [], []
    for _ in range(total):
        loss = model(**batch).loss
        losses.append(loss.item())
        identity.append(hooks.metrics()["pat_identity_loss"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        masks.append(mask_of(model).detach().clone())
    tuner = model.base_model
    assert hooks.step == total and tuner.pat_schedule_step() == total and tuner.pat_mask_phase() == "final"
    assert all(math.isfinite(v) for v in losses), "the loss is finite from step 0 on (the official code logs NaN)"
    freeze = math.ceil(0.8 * total)  # the update at step t < 0.8 T is the last one that moves the mask
    assert not torch.equal(masks[freeze - 1], masks[freeze - 2])
    assert all(torch.equal(m, masks[freeze - 1]) for m in masks[freeze:]), "the mask stops learning at 0.8 T"

    gate = tuner.pat_gate()
    assert set(gate.unique().tolist()) == {0.0, 1.0} and int(gate.sum()) == WIDTH
    assert torch.equal(gate.nonzero().flatten(), tuner.pat_kept_channels())
    # the mask loss drove the soft count (m >= 0, starting at all 64) to the target; the hard mask takes the top d'
    soft_count = int((mask_of(model) >= 0).sum())
    assert abs(soft_count - WIDTH) <= 3, soft_count
    assert identity[-1] < 0.2 * identity[0]
    model.eval()
    with torch.no_grad():
        masked = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        pruned = tuner.petuning_prune_and_unload()
        torch.testing.assert_close(pruned(input_ids=batch["input_ids"]).logits, masked, atol=2e-5, rtol=1e-5)


def test_hooks_leave_a_disabled_or_frozen_adapter_alone():
    model = tiny_pat(10)
    batch = token_batch()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    petuning.TrainingHooks(model, optimizer)
    model.train()
    with model.disable_adapter():
        assert not mask_of(model).requires_grad
        assert model.base_model.petuning_auxiliary_loss() is None
        assert not model(**batch).loss.requires_grad
        optimizer.step()  # the hooks fire, but nothing trains
    assert model.base_model.pat_schedule_step() == 0, "no schedule step while the adapter is disabled"
    assert mask_of(model).requires_grad, "enabling the adapter again makes the mask trainable"


# ---------------------------------------------------------------------------------------------------- Trainer
def test_trainer_with_callback_and_gradient_accumulation(tmp_path, reset_accelerate):
    from transformers import Trainer, TrainerCallback

    total, steps = 6, 8
    model = tiny_pat(total)
    samples = [{k: v[0] for k, v in token_batch(n=1, seed=s).items()} for s in range(steps * 4)]
    records = []

    class Spy(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            records.append((model.base_model.pat_schedule_step(), mask_of(model).detach().clone()))

    args = cpu_training_args(
        tmp_path, steps, per_device_train_batch_size=2, gradient_accumulation_steps=2, weight_decay=0.1
    )
    trainer = Trainer(model=model, args=args, train_dataset=samples, callbacks=[petuning.PetuningCallback(), Spy()])
    trainer.train()

    assert [step for step, _ in records] == list(range(1, steps + 1)), "one schedule step per optimizer step"
    frozen = [mask for step, mask in records if step > math.ceil(0.8 * total)]
    assert frozen and all(torch.equal(m, records[math.ceil(0.8 * total) - 1][1]) for m in frozen)
    assert not torch.equal(records[0][1], records[1][1])
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == steps and all(math.isfinite(entry["loss"]) for entry in logged)
    assert [entry["pat_step"] for entry in logged] == [float(s) for s in range(1, steps + 1)]
    assert "pat_mask_loss" in logged[0] and "pat_mask_loss" not in logged[-1]  # no mask loss once frozen
    gate = model.base_model.pat_gate()
    assert set(gate.unique().tolist()) == {0.0, 1.0} and int(gate.sum()) == WIDTH


# -------------------------------------------------------------------------------------------------------- DDP
DDP_STEPS, DDP_TOTAL = 5, 4  # crosses the freeze (t = 3.2) and the final mask (t = 4)


def _ddp_train(model, module, batch) -> dict[str, torch.Tensor]:
    # SGD, not Adam: Adam's g / sqrt(v) blows float32 summation-order differences of near-zero gradients up to lr
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.5)
    hooks = petuning.TrainingHooks(model, optimizer)
    module.train()
    for _ in range(DDP_STEPS):
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    assert hooks.step == DDP_STEPS and module.base_model.pat_schedule_step() == DDP_STEPS
    return trainable_state(module)


def _ddp_worker(rank: int) -> dict[str, torch.Tensor]:
    module = tiny_pat(DDP_TOTAL)
    shard = {k: v[rank * 2 : rank * 2 + 2] for k, v in token_batch().items()}
    return _ddp_train(DistributedDataParallel(module), module, shard)


@pytest.mark.slow
def test_ddp_matches_single_process(tmp_path):
    rank0, rank1 = run_two_ranks(_ddp_worker, tmp_path)
    assert "base_model.pat_mask.default" in rank0
    assert_ranks_identical(rank0, rank1)
    module = tiny_pat(DDP_TOTAL)
    initial = trainable_state(module)
    single = _ddp_train(module, module, token_batch())
    for name in single:
        assert not torch.equal(single[name], initial[name]), name
        torch.testing.assert_close(rank0[name], single[name], atol=1e-6, rtol=1e-5, msg=name)


def test_training_under_deepspeed_is_refused_with_the_alternative(monkeypatch):
    model = tiny_pat(10)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    petuning.TrainingHooks(model, optimizer)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    model.train()
    with model.disable_adapter():
        optimizer.step()  # nothing of PAT trains: nothing to refuse
    model(**token_batch()).loss.backward()
    with pytest.raises(RuntimeError, match="PAT.*DeepSpeed.*DDP or FSDP"):
        optimizer.step()
    assert model.base_model.pat_schedule_step() == 0, "the refused step did not advance the schedule"


@pytest.mark.parametrize("polarized", [True, False])
def test_a_mask_frozen_before_it_polarized_is_warned_about_once(polarized):
    total = 10
    model = tiny_pat(total, mask_init="zeros")  # the mask is set by hand, not calibrated
    mask = mask_of(model)
    with torch.no_grad():  # +-0.5 (sigma(tau m) ~ 0/1 at 0.8 T) or +-0.01 (gates near 0.5), 48 of 64 kept
        mask.copy_(torch.where(torch.arange(mask.numel()) < WIDTH, 1.0, -1.0) * (0.5 if polarized else 0.01))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    petuning.TrainingHooks(model, optimizer)
    model.train()
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(total + 2):
            model(**token_batch()).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    messages = [str(w.message) for w in caught if "without polarizing" in str(w.message)]
    assert len(messages) == (0 if polarized else 1), messages
    if not polarized:
        assert "step 8" in messages[0] and "schedule_steps" in messages[0]
    gap = model.base_model.petuning_metrics()["pat_gate_gap"]
    assert (gap < 0.01) if polarized else (0.4 < gap < 0.5)


def test_hard_frozen_gate_makes_the_end_of_the_schedule_a_no_op():
    """With frozen_gate='hard' (default) the model at 0.8 T <= t < T already computes what the final one does."""
    model = tiny_pat(10)
    model.eval()
    ids = token_batch()["input_ids"]
    tuner = model.base_model
    with torch.no_grad():
        mask_of(model).copy_(torch.linspace(-0.02, 0.02, mask_of(model).numel()))  # not polarized
        tuner.pat_step["default"].fill_(9)
        frozen = model(input_ids=ids).logits
        tuner.pat_step["default"].fill_(10)
        final = model(input_ids=ids).logits
        torch.testing.assert_close(frozen, final, rtol=0, atol=0)
        soft = tiny_pat(10, frozen_gate="soft")
        soft.base_model.load_state_dict(tuner.state_dict())
        soft.eval()
        soft.base_model.pat_step["default"].fill_(9)
        assert not torch.allclose(soft(input_ids=ids).logits, final, atol=1e-3), "the paper's soft gate differs"
