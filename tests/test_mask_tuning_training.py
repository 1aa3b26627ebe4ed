"""Masked tuning's training terms (L2, gradient dropout), gradient-based weight selection, the reported masked
share, and clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn

import petuning
from petuning import MaskTuningConfig
from petuning.tuners.mask_tuning import gradient_dropout
from petuning.tuners.mask_tuning import model as mask_tuning_model
from petuning.tuners.mask_tuning.layer import MaskTuningLayer

TARGETS = ["q_proj", "v_proj", "up_proj"]
PAPER = {"mask_mode": "threshold", "mask_share": 1.0}  # the paper's rule on every entry


def _paper(**config) -> MaskTuningConfig:
    """A threshold-mode config scoring every entry (these tests check R-AMT's own terms on plain loops)."""
    return MaskTuningConfig(**{**PAPER, **config})


def _base(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)


def _batch(seed=1):
    ids = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _scores(model) -> list[torch.Tensor]:
    return [m.mask_tuning_scores["default"] for m in model.modules() if isinstance(m, MaskTuningLayer)]


# ------------------------------------------------------------------------------------- gradient dropout
def test_gradient_dropout_rule_matches_a_hand_computed_example():
    g_task = torch.tensor([0.3, -0.2, 0.5, -0.4, 0.0, 0.8])
    g_kl = torch.tensor([0.1, -0.5, -0.5, 0.1, 0.7, -0.2])
    uniform = torch.tensor([0.9, 0.9, 0.4, 0.9, 0.3, 0.7])
    # agree, agree, conflict P=0.5 U=0.4 keep, conflict P=0.8 U=0.9 drop, zero task grad, conflict P=0.8 U=0.7 keep
    new, kept = gradient_dropout(g_task, g_kl, 0.3, uniform)
    torch.testing.assert_close(new, torch.tensor([0.3, -0.2, 0.5, -0.28, 0.0, 0.8]))
    assert kept.tolist() == [True, True, True, False, True, True]
    new, _ = gradient_dropout(g_task, g_kl, 1.0, uniform)
    assert new[3] == 0 and torch.equal(new[[0, 1, 2, 5]], g_task[[0, 1, 2, 5]])


def _reference_gradients(model, batch, l2_weight, kl_rows=None):
    """Independent float64 computation, in eval mode (no training hooks fire): the task gradient (CE + the L2
    term) and the gradient of KL(p_base || p_tuned) averaged over the label positions of the first ``kl_rows``
    examples (all by default), the base being the same model with adapters disabled."""
    model.eval()
    params = _scores(model)
    out = model(**batch)
    task = out.loss + l2_weight * sum(p.norm() for p in params)
    g_task = torch.autograd.grad(task, params)
    ids = batch["input_ids"][:kl_rows]
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(input_ids=ids).logits
    log_q, log_p = F.log_softmax(base_logits, -1), F.log_softmax(model(input_ids=ids).logits, -1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)[:, :-1].mean()  # the label positions: the last predicts nothing
    g_kl = torch.autograd.grad(kl, params)
    model.train()
    return g_task, g_kl


@pytest.mark.parametrize("batch_share", [1.0, 0.5], ids=["whole-batch", "first-row"])
def test_gradient_dropout_step_applies_the_rule_to_task_and_kl_gradients(tiny_llama_dir, batch_share):
    lam, l2 = 0.6, 1e-3
    torch.manual_seed(0)
    config = _paper(
        target_modules=TARGETS,
        init_weights=False,
        gradient_dropout=True,
        gradient_dropout_lambda=lam,
        gradient_dropout_batch_share=batch_share,
        l2_weight=l2,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(_base(tiny_llama_dir), config)
    batch = _batch()
    g_task, g_kl = _reference_gradients(model, batch, l2, kl_rows=None if batch_share == 1 else 1)

    model.train()
    optimizer = torch.optim.SGD(_scores(model), lr=0.0)
    hooks = petuning.TrainingHooks(model, optimizer)
    model(**batch).loss.backward()
    optimizer.step()

    agree = conflict = kept_conflict = 0
    expected_kept = 0.0
    for param, gt, gk in zip(_scores(model), g_task, g_kl):
        g = param.grad
        same = (gt * gk) >= 0
        torch.testing.assert_close(g[same], gt[same], atol=1e-12, rtol=1e-6)  # the model's loss is float32
        kept = torch.isclose(g, gt, atol=0, rtol=1e-6)
        dropped = torch.isclose(g, (1 - lam) * gt, atol=0, rtol=1e-6)
        assert bool((kept | dropped)[~same].all()), "a conflicting gradient is neither kept nor scaled by 1 - lambda"
        agree += int(same.sum())
        conflict += int((~same).sum())
        kept_conflict += int((kept & ~dropped & ~same).sum())
        expected_kept += float((gt.abs() / (gt.abs() + gk.abs()))[~same].sum())
    assert agree > 0 and conflict > 500
    # kept conflicting gradients ~ Binomial with the rule's probabilities: within 5 standard deviations
    assert abs(kept_conflict - expected_kept) < 5 * (conflict / 4) ** 0.5
    assert hooks.metrics()["mask_tuning_gradient_dropped_share"] == pytest.approx(
        (conflict - kept_conflict) / (agree + conflict)
    )


def test_gradient_dropout_off_leaves_gradients_alone_and_runs_no_reference(tiny_llama_dir, monkeypatch):
    torch.manual_seed(0)
    model = get_peft_model(
        _base(tiny_llama_dir), _paper(target_modules=TARGETS, init_weights=False, l2_weight=0.0, task_type="CAUSAL_LM")
    )
    calls = []
    monkeypatch.setattr(mask_tuning_model, "eval_logits", lambda *a, **k: calls.append(1))
    g_task, _ = _reference_gradients(model, _batch(), 0.0)
    optimizer = torch.optim.SGD(_scores(model), lr=0.0)
    petuning.TrainingHooks(model, optimizer)
    model(**_batch()).loss.backward()
    optimizer.step()
    assert not calls
    for param, gt in zip(_scores(model), g_task):
        torch.testing.assert_close(param.grad, gt, atol=1e-12, rtol=1e-6)


def test_gradient_dropout_under_trainer_with_accumulation_logs_its_metrics(tiny_llama_dir, tmp_path):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = get_peft_model(
        _base(tiny_llama_dir).float(),
        # init_weights=False: some masks start off, so the KL gradient is not 0 (at the all-ones start it is)
        _paper(target_modules=TARGETS, init_weights=False, gradient_dropout=True, task_type="CAUSAL_LM"),
    )
    rows = [{k: v[0].tolist() for k, v in _batch(seed).items()} for seed in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=2,
        learning_rate=5e-3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[petuning.PetuningCallback()])
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    assert all(0 < entry["mask_tuning_gradient_dropped_share"] < 0.5 for entry in logs)
    assert all(0.3 < entry["mask_tuning_masked_share"] < 0.7 for entry in logs)
    assert not any(layer.mask_tuning_kl_grad for layer in model.modules() if isinstance(layer, MaskTuningLayer))


# ---------------------------------------------------------------------------------- L2 and masked share
def test_l2_term_is_added_in_training_and_its_gradient_reaches_the_scores(tiny_llama_dir):
    l2 = 0.05
    torch.manual_seed(0)
    model = get_peft_model(
        _base(tiny_llama_dir), _paper(target_modules=TARGETS, init_weights=False, l2_weight=l2, task_type="CAUSAL_LM")
    )
    params, batch = _scores(model), _batch()
    model.eval()
    plain = model(**batch).loss
    g_plain = torch.autograd.grad(plain, params)
    model.train()
    loss = model(**batch).loss
    l2_term = l2 * sum(p.norm() for p in params).detach()
    torch.testing.assert_close(loss - plain, l2_term.to(loss.dtype), atol=1e-6, rtol=1e-6)  # float32 loss
    for p, g, g0 in zip(params, torch.autograd.grad(loss, params), g_plain):
        torch.testing.assert_close(g - g0, l2 * p.detach() / p.detach().norm(), atol=1e-12, rtol=1e-9)


def test_masked_share_is_reported_and_counts_masked_entries(tiny_llama_dir):
    torch.manual_seed(0)
    model = get_peft_model(
        _base(tiny_llama_dir), _paper(target_modules=TARGETS, init_weights=False, mask_share=0.5, task_type="CAUSAL_LM")
    )
    layers = [m for m in model.modules() if isinstance(m, MaskTuningLayer)]
    total = sum(m.get_base_layer().weight.numel() for m in layers)
    masked = sum(int((m.mask_tuning_scores["default"] <= 5e-3).sum()) for m in layers)
    stats = model.mask_statistics()
    assert stats == {
        "total": total,
        "scored": sum(m.mask_tuning_scores["default"].numel() for m in layers),
        "masked": masked,
    }
    assert stats["scored"] == pytest.approx(total / 2, abs=len(layers))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    metrics = petuning.TrainingHooks(model, optimizer).metrics()
    assert metrics == {"mask_tuning_masked_share": masked / total}
    assert 0.1 < masked / total < 0.4  # about half of the scored half


# ---------------------------------------------------------------------------------------- selection
def test_gradient_selection_picks_the_entries_with_largest_first_order_effect(tiny_llama_dir):
    batches = [_batch(1), _batch(2)]
    # independent: |(sum of dL/dW over the batches) ⊙ W| on the plain base model
    base = _base(tiny_llama_dir).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    weights = {n: mod.weight for n, mod in base.named_modules() if n.split(".")[-1] in TARGETS}
    for w in weights.values():
        w.requires_grad_(True)
    for batch in batches:
        base(**batch).loss.backward()
    importance = {n: (w.grad * w.detach()).abs().reshape(-1) for n, w in weights.items()}

    model = get_peft_model(
        _base(tiny_llama_dir), MaskTuningConfig(target_modules=TARGETS, mask_share=0.1, task_type="CAUSAL_LM")
    )
    model.train()
    chosen = model.select_masked_weights(batches)
    assert model.training, "the model's mode is restored"
    assert len(chosen) == len(weights)
    for name, layer in model.named_modules():
        if not isinstance(layer, MaskTuningLayer):
            continue
        key = name.removeprefix("base_model.model.")
        k = layer.mask_tuning_indices["default"].numel()
        assert k == chosen[key] == round(0.1 * importance[key].numel())
        expected = torch.topk(importance[key], k).indices.sort().values
        assert torch.equal(layer.mask_tuning_indices["default"].long(), expected)
        assert torch.all(layer.mask_tuning_scores["default"] == 1e-2)
    with torch.no_grad():
        torch.testing.assert_close(model(**batches[0]).logits, base(**batches[0]).logits, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("share", [0.0, -0.1, 1.5])
def test_mask_share_outside_zero_one_is_refused(share):
    with pytest.raises(ValueError, match=r"mask_share must be in \(0, 1\]"):
        MaskTuningConfig(target_modules=["a"], mask_share=share)
    with pytest.raises(TypeError, match="mask_share"):
        MaskTuningConfig(target_modules=["a"], mask_share=True)


def test_bad_threshold_and_lambda_are_refused():
    with pytest.raises(ValueError, match="mask_init .* must be larger than threshold"):
        MaskTuningConfig(target_modules=["a"], mask_init=1e-3, threshold=5e-3)
    with pytest.raises(ValueError, match="gradient_dropout_lambda"):
        MaskTuningConfig(target_modules=["a"], gradient_dropout_lambda=1.5)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.norm = nn.LayerNorm(6)
        self.conv = nn.Conv1d(6, 6, 1)
        self.lin = nn.Linear(6, 3)

    def forward(self, ids):
        h = self.norm(self.emb(ids))
        return self.lin(self.conv(h.transpose(1, 2)).transpose(1, 2))


@pytest.mark.parametrize("target,kind", [("emb", "Embedding"), ("norm", "LayerNorm"), ("conv", "Conv1d")])
def test_targets_that_are_not_linear_weights_are_refused_by_name(target, kind):
    with pytest.raises(TypeError, match=rf"cannot target '{target}' of type {kind}.*linear layer"):
        get_peft_model(Mixed(), MaskTuningConfig(target_modules=[target, "lin"]))


def test_gradient_dropout_without_logits_and_selection_without_share_are_refused():
    model = get_peft_model(Mixed(), MaskTuningConfig(target_modules=["lin"], mask_share=1.0, gradient_dropout=True))
    model.train()
    with pytest.raises(TypeError, match="gradient dropout .* no `logits`"):
        model(torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="nothing to select"):
        model.select_masked_weights([torch.tensor([[1, 2]])], loss_fn=lambda m, b: m(b).sum())


def test_gradient_dropout_under_reentrant_checkpointing_is_refused_with_the_fix(tiny_llama_dir):
    """The whole-batch KL gradient differentiates the training forward, which reentrant checkpointing hides (the
    sub-batch one runs its own forward in eval mode, where transformers does not checkpoint)."""
    base = _base(tiny_llama_dir)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model = get_peft_model(
        base,
        _paper(
            target_modules=TARGETS,
            init_weights=False,
            gradient_dropout=True,
            gradient_dropout_batch_share=1.0,
            task_type="CAUSAL_LM",
        ),
    )
    model.train()
    with pytest.raises(RuntimeError, match="use_reentrant': False"):
        model(**_batch())


@pytest.mark.parametrize("gradient_dropout", [True, False])
def test_gradient_dropout_is_refused_under_deepspeed_and_plain_masked_tuning_is_not(
    tiny_llama_dir, monkeypatch, gradient_dropout
):
    model = get_peft_model(
        _base(tiny_llama_dir),
        _paper(target_modules=TARGETS, gradient_dropout=gradient_dropout, task_type="CAUSAL_LM"),
    )
    optimizer = torch.optim.SGD(_scores(model), lr=0.1)
    petuning.TrainingHooks(model, optimizer)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    model.train()
    if gradient_dropout:
        with pytest.raises(RuntimeError, match="gradient dropout.*DeepSpeed.*gradient_dropout=False"):
            model(**_batch())
        return
    model(**_batch()).loss.backward()
    optimizer.step()
    assert all(param.grad is not None for param in _scores(model))


@pytest.mark.parametrize("lr,warns", [(1e-4, False), (1e-2, True)])
def test_a_step_that_masks_many_weights_at_once_is_warned_about_once(tiny_llama_dir, lr, warns):
    """Adam moves every score by ~lr per step: with lr above the 5e-3 margin, one step masks about half the scores."""
    import warnings

    model = get_peft_model(_base(tiny_llama_dir), _paper(target_modules=TARGETS, task_type="CAUSAL_LM"))
    optimizer = torch.optim.Adam(_scores(model), lr=lr)
    petuning.TrainingHooks(model, optimizer)
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            model(**_batch(seed=step)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    messages = [str(w.message) for w in caught if "at once" in str(w.message)]
    assert len(messages) == (1 if warns else 0), messages
    share = model.base_model.masked_share()
    assert (share > 0.1) if warns else share == 0.0
    if warns:
        assert "optimizer step 1 " in messages[0] and "smaller learning rate" in messages[0]
