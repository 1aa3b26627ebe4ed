"""The experiments: one PEFT config per method at comparable trainable-parameter budgets, built from the variant
table ``benchmarks/variants.py`` that ``benchmarks/method_speed.py`` times.

Budget anchor: LoRA r=8 on all linear layers of the toy model (34.8 k trainable parameters). Each method's
rank/density/share is chosen so its trainable-parameter count is of the same order (the JSON records the exact
count). ``make_config()`` builds a fresh config (PAT's schedule spans the run by itself). Learning rates here
are one choice per method and tier; ``sweep.py`` chooses each family's on a validation split instead. Ablations
of one method run in the real tier only (``tiers``), where they were measured; ``tiers=()`` marks the experiments
only the sweep runs.

"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from peft.config import PeftConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the variant table method_speed shares
from variants import method_config


@dataclass(frozen=True)
class Experiment:
    name: str
    make_config: Callable[[], PeftConfig]
    lr: float  # toy tier
    real_lr: float = 2e-4  # real tier (SmolLM2): the demo's rate for every method
    hooks: dict = field(default_factory=dict)  # extra TrainingHooks arguments
    param_lrs: dict = field(default_factory=dict)  # parameter-name substring -> its own peak lr (both tiers)
    tiers: tuple = ("toy", "real")  # the tiers whose default run includes it (ablations: real only; () on request)
    real_step_factor: float = 1.0  # real tier: steps = factor x --steps (PAT may take up to 3x LoRA's; reported)
    teacher_rows: int = 0  # real tier: rows sampled from the original added to each batch (data-free distillation)


ALL = "all-linear"
CAUSAL = "CAUSAL_LM"


def config(method: str, r: int = 8, **options) -> Callable[[], PeftConfig]:
    """``method`` from the shared table (``benchmarks/variants.py``) at rank ``r`` on every linear layer."""
    return lambda: method_config(method, r, ALL, task_type=CAUSAL, **options)


def pat_real(name: str, real_step_factor: float = 1.0, teacher_rows: int = 0, **overrides) -> Experiment:
    """A real-tier-only PAT experiment (25% of the hidden channels pruned, HSM and LoRA rank 8) at lr 1e-3."""
    return Experiment(
        name, config("pat", **overrides), 3e-3, real_lr=1e-3, tiers=("real",), real_step_factor=real_step_factor,
        teacher_rows=teacher_rows,
    )  # fmt: skip


def mask_real(name: str, tiers: tuple = ("real",), real_lr: float = 1e-3, **options) -> Experiment:
    """A masked-tuning experiment at toy lr 1e-3."""
    return Experiment(name, config("mask_tuning", **options), 1e-3, real_lr=real_lr, tiers=tiers)


THRESHOLD10 = dict(mask_share=0.1, mask_mode="threshold")  # the paper's rule on the 10% largest-|w| entries
EXPERIMENTS = {
    e.name: e
    for e in [
        Experiment("lora-r8", config("lora"), 3e-3),
        # the reference PAT is held to (the best LoRA of the real tier)
        Experiment("lora-r8-lr1e-3", config("lora"), 3e-3, real_lr=1e-3, tiers=("real",)),
        Experiment("pissa-r8", config("pissa"), 3e-3),
        Experiment("sorsa-r8", config("sorsa"), 3e-3),
        Experiment("flora-r8", config("flora"), 3e-3),
        # FLoRA's scale, swept with its lr by sweep.py (2 is the default: the authors' LLM scripts)
        Experiment("flora-r8-s1", config("flora", scale=1.0), 3e-3, tiers=()),
        Experiment("flora-r8-s4", config("flora", scale=4.0), 3e-3, tiers=()),
        # budget matched to LoRA r8 (0.93x its trainable parameters), half of it sparse
        Experiment("sparse-low-rank-r4-d1", config("sparse_low_rank", r=4, density=0.01), 3e-3, tiers=()),
        # half the budget low-rank, half as 5% sparse values (2.7x LoRA r8's trainable parameters)
        Experiment("sparse-low-rank-r4-d5", config("sparse_low_rank", r=4, density=0.05), 3e-3),
        mask_real("mask-tuning-share10", tiers=("toy", "real"), real_lr=2e-4, **THRESHOLD10),
        mask_real("mask-tuning-share10-gd", tiers=("toy", "real"), real_lr=2e-4, gradient_dropout=True, **THRESHOLD10),
        # budget mode, 2% of every weight masked by the end of the ramp (collapses)
        mask_real("mask-tuning-budget2", real_lr=2e-4, masked_budget=0.02),
        # the same at lr 1e-3: scores reach the threshold after ~5 steps, not ~25
        mask_real("mask-tuning-budget2-lr1e-3", masked_budget=0.02),
        # 0.25% of every weight masked (2.5% of the scored entries)
        mask_real("mask-tuning-budget025-lr1e-3", masked_budget=0.0025),
        # the defaults: budget mode, 0.1% of every weight masked
        mask_real("mask-tuning-budget01-lr1e-3", tiers=("toy", "real"), masked_budget=0.001),
        # budget matched to LoRA r8 (1.3x): 3% of each weight scored, the default 0.1% masked
        mask_real("mask-tuning-share3", tiers=(), mask_share=0.03),
        # the defaults with gradient dropout (KL on a quarter of each batch)
        mask_real("mask-tuning-budget01-gd-lr1e-3", tiers=("toy", "real"), masked_budget=0.001, gradient_dropout=True),
        # ablation: the paper's threshold rule, same scores, lr and steps
        mask_real("mask-tuning-threshold-lr1e-3", mask_mode="threshold"),
        Experiment("pat-prune25-r8", config("pat"), 3e-3),  # 25% of the hidden channels pruned; calibrated mask
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
