"""The experiments: one PEFT config per method at comparable trainable-parameter budgets.

Budget anchor: LoRA r=8 on all linear layers of the toy model (34.8 k trainable parameters). Each method's
rank/density/share is chosen so its trainable-parameter count is of the same order (the JSON records the exact
count). ``make_config(steps)`` gets the run's step count (PAT's mask schedule spans the whole run). Learning
rates are one choice per method for this toy, not a sweep. Ablations of one method run in the real tier only
(``tiers``), where they were measured.

"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from peft import LoraConfig
from peft.config import PeftConfig

import petuning


@dataclass(frozen=True)
class Experiment:
    name: str
    make_config: Callable[[int], PeftConfig]
    lr: float  # toy tier
    real_lr: float = 2e-4  # real tier (SmolLM2): the demo's rate for every method
    hooks: dict = field(default_factory=dict)  # extra TrainingHooks arguments
    param_lrs: dict = field(default_factory=dict)  # parameter-name substring -> its own peak lr (both tiers)
    tiers: tuple = ("toy", "real")  # the tiers whose default run includes it (ablations: real only; () on request)
    real_step_factor: float = 1.0  # real tier: steps = factor x --steps (PAT may take up to 3x LoRA's; reported)
    teacher_rows: int = 0  # real tier: rows sampled from the original added to each batch (data-free distillation)


ALL = "all-linear"
CAUSAL = "CAUSAL_LM"


def flora(**overrides) -> Callable[[int], PeftConfig]:
    """FLoRA r 8 on every linear layer (scale 2 unless overridden)."""
    return lambda steps: petuning.FloraConfig(r=8, target_modules=ALL, task_type=CAUSAL, **overrides)


def pat(**overrides) -> Callable[[int], PeftConfig]:
    """PAT at the budget of the comparison: 25% of the hidden channels pruned, HSM rank 8, LoRA r 8 / alpha 16."""
    options = dict(pruning_ratio=0.25, hsm_rank=8, lora_r=8, lora_alpha=16, lora_dropout=0.0, **overrides)
    return lambda steps: petuning.PatConfig(**options, task_type=CAUSAL)


def pat_real(name: str, real_step_factor: float = 1.0, teacher_rows: int = 0, **overrides) -> Experiment:
    """A real-tier-only PAT experiment at lr 1e-3; ``overrides`` go to the config."""
    return Experiment(
        name, pat(**overrides), 3e-3, real_lr=1e-3, tiers=("real",), real_step_factor=real_step_factor,
        teacher_rows=teacher_rows,
    )  # fmt: skip


EXPERIMENTS = {
    e.name: e
    for e in [
        Experiment("lora-r8", lambda steps: LoraConfig(r=8, lora_alpha=16, target_modules=ALL, task_type=CAUSAL), 3e-3),
        Experiment(
            "lora-r8-lr1e-3",  # the reference PAT is held to (the best LoRA of the real tier)
            lambda steps: LoraConfig(r=8, lora_alpha=16, target_modules=ALL, task_type=CAUSAL),
            3e-3,
            real_lr=1e-3,
            tiers=("real",),
        ),
        Experiment(
            "pissa-r8",
            lambda steps: LoraConfig(
                r=8, lora_alpha=8, init_lora_weights="pissa", target_modules=ALL, task_type=CAUSAL
            ),
            3e-3,
        ),
        Experiment("sorsa-r8", lambda steps: petuning.SorsaConfig(r=8, target_modules=ALL, task_type=CAUSAL), 3e-3),
        Experiment("flora-r8", flora(), 3e-3),
        # FLoRA's scale, swept with its lr by sweep.py (2 is the default: the authors' LLM scripts)
        Experiment("flora-r8-s1", flora(scale=1.0), 3e-3, tiers=()),
        Experiment("flora-r8-s4", flora(scale=4.0), 3e-3, tiers=()),
        Experiment(
            "sparse-low-rank-r4-d1",  # budget matched to LoRA r8 (0.93x its trainable parameters), half of it sparse
            lambda steps: petuning.SparseLowRankConfig(
                r=4, alpha=8, density=0.01, target_modules=ALL, task_type=CAUSAL
            ),
            3e-3,
            tiers=(),
        ),
        Experiment(
            "sparse-low-rank-r4-d5",  # half the budget low-rank, half as 5% sparse values
            lambda steps: petuning.SparseLowRankConfig(
                r=4, alpha=8, density=0.05, target_modules=ALL, task_type=CAUSAL
            ),
            3e-3,
        ),
        Experiment(
            "mask-tuning-share10",  # the paper's threshold rule on the 10% largest-|w| entries of each weight
            lambda steps: petuning.MaskTuningConfig(
                mask_share=0.1, mask_mode="threshold", target_modules=ALL, task_type=CAUSAL
            ),
            1e-3,
        ),
        Experiment(
            "mask-tuning-share10-gd",
            lambda steps: petuning.MaskTuningConfig(
                mask_share=0.1, mask_mode="threshold", gradient_dropout=True, target_modules=ALL, task_type=CAUSAL
            ),
            1e-3,
        ),
        Experiment(
            "mask-tuning-budget2",  # budget mode, 2% of every weight masked by the end of the ramp (collapses)
            lambda steps: petuning.MaskTuningConfig(masked_budget=0.02, target_modules=ALL, task_type=CAUSAL),
            1e-3,
            tiers=("real",),
        ),
        Experiment(
            "mask-tuning-budget2-lr1e-3",  # the same at lr 1e-3: scores reach the threshold after ~5 steps, not ~25
            lambda steps: petuning.MaskTuningConfig(masked_budget=0.02, target_modules=ALL, task_type=CAUSAL),
            1e-3,
            real_lr=1e-3,
            tiers=("real",),
        ),
        Experiment(
            "mask-tuning-budget025-lr1e-3",  # 0.25% of every weight masked (2.5% of the scored entries)
            lambda steps: petuning.MaskTuningConfig(masked_budget=0.0025, target_modules=ALL, task_type=CAUSAL),
            1e-3,
            real_lr=1e-3,
            tiers=("real",),
        ),
        Experiment(
            "mask-tuning-budget01-lr1e-3",  # the defaults: budget mode, 0.1% of every weight masked
            lambda steps: petuning.MaskTuningConfig(masked_budget=0.001, target_modules=ALL, task_type=CAUSAL),
            1e-3,
            real_lr=1e-3,
        ),
        Experiment(
            "mask-tuning-share3",  # budget matched to LoRA r8 (1.3x): 3% of each weight scored, the default 0.1% masked
            lambda steps: petuning.MaskTuningConfig(mask_share=0.03, target_modules=ALL, task_type=CAUSAL),
            1e-3,
            tiers=(),
        ),
        Experiment(
            "mask-tuning-budget01-gd-lr1e-3",  # the defaults with gradient dropout (KL on a quarter of each batch)
            lambda steps: petuning.MaskTuningConfig(
                masked_budget=0.001, gradient_dropout=True, target_modules=ALL, task_type=CAUSAL
            ),
            1e-3,
            real_lr=1e-3,
        ),
        Experiment(
            "mask-tuning-threshold-lr1e-3",  # ablation: the paper's threshold rule, same scores, lr and steps
            lambda steps: petuning.MaskTuningConfig(mask_mode="threshold", target_modules=ALL, task_type=CAUSAL),
            1e-3,
            real_lr=1e-3,
            tiers=("real",),
        ),
        Experiment("pat-prune25-r8", pat(), 3e-3),  # 25% of the hidden channels pruned; calibrated mask (defaults)
        pat_real("pat-prune25-r8-lr1e-3"),
        pat_real("pat-prune25-r8-lr1e-3-3x", real_step_factor=3.0),  # 3x the steps (the schedule follows the run)
        # channels ranked by the RMSNorms' outputs instead of the RMS
        pat_real("pat-prune25-r8-lr1e-3-norm-output", mask_init="norm_output"),
        # + self-distillation from the unpruned original on the prompt positions
        pat_real("pat-prune25-r8-lr1e-3-distill", distill_weight=1.0),
        # + distillation on 8 rows per batch of text sampled from the original
        pat_real("pat-prune25-r8-lr1e-3-distill-text", distill_weight=1.0, teacher_rows=8),
        # ablation: the paper's m = 0 and no protected channels
        pat_real("pat-prune25-r8-zero-init-lr1e-3", mask_init="zeros", protect_ratio=None),
    ]
}


def for_tier(tier: str) -> list[str]:
    """The experiments a tier runs by default."""
    return sorted(name for name, experiment in EXPERIMENTS.items() if tier in experiment.tiers)
