"""petuning's training hooks under TRL's SFTTrainer, whose loss comes from a fused LM head's per-token
log-probabilities rather than ``outputs.loss``: auxiliary losses reach the optimized loss with the right share
(also under gradient accumulation), and the terms that need full logits refuse clearly instead of doing nothing."""

from __future__ import annotations

import pytest
import torch

import petuning
import petuning.training
from petuning.testing import build_tiny_model, build_tiny_tokenizer

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
TOK = build_tiny_tokenizer()


def trainer_for(tmp_path, config, accumulation=1):
    from petuning.recipe.data import load_splits

    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to="none",
        max_steps=2,
        logging_steps=1,
        gradient_checkpointing=False,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=accumulation,
        disable_tqdm=True,
        learning_rate=0.0,
    )
    torch.manual_seed(0)
    trainer = trl.SFTTrainer(
        model=build_tiny_model("llama"),
        args=args,
        processing_class=TOK,
        train_dataset=load_splits("embedded")["train"].select(range(8)),
        peft_config=config,
    )
    petuning.attach_to_trainer(trainer)
    return trainer


def logged_losses(trainer) -> list[float]:
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_auxiliary_losses_reach_sfttrainers_loss(tmp_path, monkeypatch, accumulation):
    config = dict(target_width=48, hsm_rank=4, lora_r=2)
    plain = logged_losses(trainer_for(tmp_path / "a", petuning.PatConfig(**config), accumulation))
    real = petuning.training.auxiliary_loss

    def with_a_constant(model):  # PAT's own terms plus 100 per optimizer step, if the share is right
        term = real(model)
        return None if term is None else term + 100.0

    monkeypatch.setattr(petuning.training, "auxiliary_loss", with_a_constant)
    shifted = logged_losses(trainer_for(tmp_path / "b", petuning.PatConfig(**config), accumulation))
    assert len(plain) == len(shifted) == 2
    for a, b in zip(plain, shifted):  # lr 0: the same model at every step, so only the term differs
        assert b - a == pytest.approx(100.0, rel=1e-4)


@pytest.mark.parametrize(
    "config, feature",
    [
        (petuning.PatConfig(target_width=48, hsm_rank=4, lora_r=2, distill_weight=1.0), "PAT's self-distillation"),
        (
            petuning.MaskTuningConfig(target_modules=["q_proj"], gradient_dropout=True),
            "Masked tuning's gradient dropout",
        ),
    ],
)
def test_terms_that_need_logits_refuse_under_the_fused_head(tmp_path, config, feature):
    with pytest.raises(TypeError, match=rf"{feature}.*has no `logits`.*fused LM head"):
        trainer_for(tmp_path, config).train()
