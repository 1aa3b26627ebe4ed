"""PAT's optional self-distillation term (``PatConfig(distill_weight=...)``): KL from the unpruned original, run as
the same model with PAT bypassed, on the positions the task loss does not score."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

import petuning
from petuning import PatConfig
from petuning.testing import build_tiny_model
from petuning.training import collect_metrics
from petuning.tuners.pat.layer import PatLayer

WIDTH = 48


def student(distill_weight: float, **overrides):
    kwargs = dict(
        target_width=WIDTH,
        hsm_rank=8,
        lora_r=4,
        lora_dropout=0.0,
        schedule_steps=20,
        mask_loss_weight=0.0,
        identity_loss_weight=0.0,
        init_weights=False,
        distill_weight=distill_weight,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(0)
    return get_peft_model(build_tiny_model("llama", seed=0, dtype=torch.float64), PatConfig(**{**kwargs, **overrides}))


def prompt_batch():
    """Two sequences of 10: the last 3 tokens of each are the scored completion, the second is right-padded by 2."""
    ids = torch.randint(4, 100, (2, 10), generator=torch.Generator().manual_seed(3))
    attention = torch.ones_like(ids)
    attention[1, 8:] = 0
    labels = torch.full_like(ids, -100)
    labels[0, 7:] = ids[0, 7:]
    labels[1, 5:8] = ids[1, 5:8]
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def direct_loss(model, batch, weight: float) -> torch.Tensor:
    """Task cross-entropy + weight * mean KL(teacher || model) over kept, unscored positions, with the teacher an
    independent copy of the base model (no PAT at all), in float64."""
    teacher = build_tiny_model("llama", seed=0, dtype=torch.float64).eval()
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shifted = batch["labels"][:, 1:]
    task = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100)
    scored = torch.cat([shifted.ne(-100), torch.zeros_like(shifted[:, :1], dtype=torch.bool)], dim=1)
    positions = batch["attention_mask"].bool() & ~scored
    assert (
        int(positions.sum()) == 10 - 3 + 10 - 2 - 3
    )  # prompt positions only (a completion's last token predicts nothing scored)
    log_p, log_q = teacher_logits[positions].log_softmax(-1), logits[positions].log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    return task + weight * kl, kl


def test_distillation_term_matches_a_direct_computation_and_leaves_the_adapter_as_it_was():
    model = student(distill_weight=2.0)
    model.train()
    batch = prompt_batch()
    expected, kl = direct_loss(model, batch, 2.0)
    assert float(kl.detach()) > 1e-3, "random HSMs and a half-open gate make the student differ from its teacher"
    loss = model(**batch).loss
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)  # transformers' loss is float32
    metrics = collect_metrics(model)
    assert abs(metrics["pat_distill_loss"] - 2.0 * float(kl.detach())) < 1e-8
    layers = [m for m in model.modules() if isinstance(m, PatLayer)]
    assert layers and not any(layer.disable_adapters for layer in layers)
    assert model.base_model.pat_mask["default"].requires_grad
    loss.backward()  # the term's gradient reaches the adapter, and nothing of the teacher's forward is in the graph
    assert model.base_model.pat_mask["default"].grad.abs().sum() > 0
    copy.deepcopy(model)  # the tuner keeps no graph once the loss took the term (the benchmark deep-copies models)


def test_no_distillation_term_without_the_weight_or_outside_training():
    model, off = student(distill_weight=1.0), student(distill_weight=0.0)
    batch = prompt_batch()
    model.train(), off.train()
    torch.testing.assert_close(off(**batch).loss.double(), direct_loss(off, batch, 0.0)[0], rtol=1e-6, atol=1e-6)
    assert "pat_distill_loss" not in collect_metrics(off)
    model.eval()
    torch.testing.assert_close(model(**batch).loss.double(), direct_loss(model, batch, 0.0)[0], rtol=1e-6, atol=1e-6)


def test_distillation_pulls_the_pruned_model_towards_the_original():
    """Trained to the end of the schedule (hard, pruned gate) on the same batches, the distilled model's prompt
    positions are closer to the original's distribution than the one trained on the task loss alone."""
    batch = prompt_batch()
    gaps = {}
    for weight in (0.0, 10.0):
        model = student(distill_weight=weight, init_weights=True, schedule_steps=12)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        with petuning.TrainingHooks(model, optimizer, max_steps=12):
            for _ in range(12):
                model(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        assert model.base_model.pat_mask_phase() == "final"
        model.eval()
        with torch.no_grad():
            gaps[weight] = float(direct_loss(model, batch, 1.0)[1])
    assert gaps[10.0] < 0.5 * gaps[0.0], gaps


def test_a_negative_weight_is_refused_by_name():
    with pytest.raises(ValueError, match="distill_weight must be >= 0"):
        PatConfig(target_width=WIDTH, distill_weight=-1.0)
