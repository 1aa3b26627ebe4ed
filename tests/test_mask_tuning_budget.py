"""Masked tuning's budget mode: the cubic schedule of k_t, the per-step bound on newly masked entries, the budget
never exceeded, the run length taken from the driver, exact resume under Trainer, and the refusal to train
without a driver."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

import petuning
from petuning import MaskTuningConfig
from petuning.tuners.mask_tuning.layer import MaskTuningLayer
from petuning.tuners.mask_tuning.model import advance_budget

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _model(path, **config):
    """A budget-mode adapter whose scores become eligible after one Adam step at lr 1e-3 (margin 1e-4)."""
    torch.manual_seed(0)
    config = {
        "target_modules": TARGETS,
        "mask_share": 0.2,
        "masked_budget": 0.1,
        "threshold": 0.0099,
        "task_type": "CAUSAL_LM",
        **config,
    }
    return get_peft_model(AutoModelForCausalLM.from_pretrained(path), MaskTuningConfig(**config))


def _batch(step):
    ids = torch.randint(4, 100, (4, 12), generator=torch.Generator().manual_seed(step))
    return {"input_ids": ids, "labels": ids}


def _layers(model):
    return [m for m in model.modules() if isinstance(m, MaskTuningLayer)]


# -------------------------------------------------------------------------------------------- schedule
def test_budget_share_is_the_cubic_ramp_between_start_and_end():
    config = MaskTuningConfig(target_modules=["a"], masked_budget=0.04, budget_start_step=10, budget_end_step=50)
    assert config.budget_share(0, None) == config.budget_share(10, None) == 0.0
    for step in (11, 20, 30, 49):
        progress = (step - 10) / 40
        assert config.budget_share(step, None) == pytest.approx(0.04 * (1 - (1 - progress) ** 3), rel=1e-12)
    assert config.budget_share(50, None) == config.budget_share(500, None) == pytest.approx(0.04)
    shares = [config.budget_share(t, None) for t in range(60)]
    assert shares == sorted(shares), "k_t never decreases"


def test_auto_ramp_follows_max_steps_and_refuses_an_unknown_length():
    config = MaskTuningConfig(target_modules=["a"])
    assert config.budget_steps(100) == (5, 70)
    assert config.budget_steps(1000) == (50, 700)
    assert MaskTuningConfig(target_modules=["a"], budget_end_step=40).budget_steps(100) == (5, 40)
    with pytest.raises(ValueError, match="does not know it: pass max_steps to petuning.TrainingHooks"):
        config.budget_share(3, None)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"masked_budget": 0.2, "mask_share": 0.1}, r"masked_budget must be in \(0, mask_share = 0.1\]"),
        ({"masked_budget": 0.0}, "masked_budget must be in"),
        ({"budget_start_step": 20, "budget_end_step": 10}, "must be after budget_start_step"),
        ({"budget_start_step": -1}, "step count >= 0"),
        ({"budget_swap_share": 1.5}, "budget_swap_share must be in"),
        ({"mask_mode": "topk"}, "mask_mode must be 'budget' or 'threshold'"),
    ],
)
def test_bad_budget_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaskTuningConfig(target_modules=["a"], **kwargs)


def test_l2_term_defaults_to_the_paper_in_threshold_mode_only():
    assert MaskTuningConfig(target_modules=["a"]).l2_weight == 0.0
    assert MaskTuningConfig(target_modules=["a"], mask_mode="threshold").l2_weight == 1e-4


# ------------------------------------------------------------------------------------- advance_budget
def test_advance_budget_grows_to_the_lowest_scores_and_bounds_swaps():
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(1000, generator=generator)
    off = torch.zeros(1000, dtype=torch.bool)
    assert advance_budget(off, scores, 100, 0.05) == 100
    assert torch.equal(
        off.nonzero().squeeze(1).sort().values, torch.topk(scores, 100, largest=False).indices.sort().values
    )

    moved = scores.clone()
    moved[off] += 2.0  # every masked entry is now the highest-scored: all of them want out
    before = off.clone()
    newly = advance_budget(off, moved, 120, 0.05)
    cap = math.ceil(0.05 * 120)
    assert int(off.sum()) == 120
    assert newly == 20 + cap and int((before & ~off).sum()) == cap, "20 for the ramp, the capped swaps"
    assert advance_budget(off, moved, 120, 0.0) == 0 and int(off.sum()) == 120, "swap_share 0 freezes the set"
    assert advance_budget(off, moved, 50, 0.05) <= math.ceil(0.05 * 50) and int(off.sum()) == 50, "a lower target"


def test_only_eligible_entries_are_masked_and_reversals_unmask():
    scores = torch.linspace(0, 1, 100)
    off = torch.zeros(100, dtype=torch.bool)
    eligible = scores <= 0.1  # 11 entries have the evidence
    assert advance_budget(off, scores, 30, 0.05, eligible) == int(eligible.sum()) == 10
    assert torch.equal(off, eligible), "fewer eligible than the target: all of them, nothing else"
    eligible[:5] = False  # five scores climbed back above the threshold
    advance_budget(off, scores, 30, 0.05, eligible)
    assert torch.equal(off, eligible)


# ---------------------------------------------------------------------------------------- plain loop
def test_every_step_masks_exactly_k_t_and_flips_no_more_than_the_schedule_allows(tiny_llama_dir):
    steps = 12
    model = _model(tiny_llama_dir, budget_start_step=2, budget_end_step=8)
    config = model.peft_config["default"]
    layers = _layers(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    previous = [layer.mask_tuning_off["default"].clone() for layer in layers]
    with petuning.TrainingHooks(model, optimizer, max_steps=steps) as hooks:
        for step in range(steps):
            model(**_batch(step)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            share, last = config.budget_share(step + 1, steps), config.budget_share(step, steps)
            newly_total = 0
            for layer, before in zip(layers, previous):
                numel = layer.get_base_layer().weight.numel()
                off = layer.mask_tuning_off["default"]
                k_t, k_prev = round(share * numel), round(last * numel)
                eligible = int((layer.mask_tuning_scores["default"] <= config.threshold).sum())
                assert int(off.sum()) <= k_t, f"step {step + 1}: the budget is never exceeded"
                assert int(off.sum()) == min(
                    k_t, eligible, int(before.sum()) + math.ceil(config.largest_step_share(steps) * numel)
                ), f"step {step + 1}: k_t, as fast as allowed"
                assert bool((layer.mask_tuning_scores["default"][off] <= config.threshold).all())
                newly, reversed_ = int((off & ~before).sum()), int((before & ~off).sum())
                assert newly <= (k_t - k_prev) + math.ceil(config.budget_swap_share * k_t) + reversed_
                growth = math.ceil(config.largest_step_share(steps) * numel)
                assert int(off.sum()) - int(before.sum()) <= growth, "no step grows the set faster than the ramp can"
                newly_total += newly
                before.copy_(off)
            assert hooks.metrics()["mask_tuning_newly_masked"] == newly_total
    budget = sum(round(0.1 * layer.get_base_layer().weight.numel()) for layer in layers)
    assert 0.9 * budget < model.mask_statistics()["masked"] <= budget, (
        "the budget reached, where eligible entries allow"
    )


def test_training_without_a_driver_is_refused_once_the_optimizer_has_stepped(tiny_llama_dir):
    model = _model(tiny_llama_dir)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    model(**_batch(0)).loss.backward()  # a forward in training mode alone is fine
    optimizer.step()
    with pytest.raises(RuntimeError, match="without petuning's training driver.*PetuningCallback.*TrainingHooks"):
        model(**_batch(1))


def test_a_driver_without_the_run_length_is_refused_at_the_first_step(tiny_llama_dir):
    model = _model(tiny_llama_dir)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    with petuning.TrainingHooks(model, optimizer):
        model(**_batch(0)).loss.backward()
        with pytest.raises(ValueError, match="pass max_steps"):
            optimizer.step()


# -------------------------------------------------------------------------------------------- Trainer
def _trainer(model, out, max_steps, **args):
    from transformers import Trainer, TrainingArguments

    rows = [{k: v[0].tolist() for k, v in _batch(seed).items()} for seed in range(64)]
    arguments = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=max_steps,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="steps",
        save_steps=4,
        seed=0,
        **args,
    )
    return Trainer(model=model, args=arguments, train_dataset=rows, callbacks=[petuning.PetuningCallback()])


def _state(model):
    return {
        name: t.detach().clone()
        for name, t in model.state_dict().items()
        if "mask_tuning" in name and not name.endswith("_extra_state")
    } | {f"{i}.off": layer.mask_tuning_off["default"].clone() for i, layer in enumerate(_layers(model))}


def test_trainer_takes_max_steps_and_resumes_exactly(tiny_llama_dir, tmp_path):
    full = _model(tiny_llama_dir)
    trainer = _trainer(full, tmp_path / "full", 8)
    trainer.train()
    shares = [entry["mask_tuning_masked_share"] for entry in trainer.state.log_history if "loss" in entry]
    config = full.peft_config["default"]
    assert config.budget_steps(8) == (0, 6)
    assert 0.09 < shares[-1] <= 0.1 and shares[0] < shares[2] < shares[-1]
    assert 0.9 * config.budget_share(3, 8) < shares[2] <= config.budget_share(3, 8), "auto ramp over max_steps"
    expected = _state(full)

    resumed = _model(tiny_llama_dir)
    _trainer(resumed, tmp_path / "full", 8).train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    got = _state(resumed)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
