"""The experiments: one PEFT config per method at comparable trainable-parameter budgets.

Budget anchor: LoRA r=8 on all linear layers of the model. Each method's rank/density is chosen so its
trainable-parameter count is of the same order (the JSON records the exact count). Learning rates are the
methods' own choices for this toy (a short sweep per method would be fairer; see README).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from peft import LoraConfig
from peft.config import PeftConfig

import petuning


@dataclass(frozen=True)
class Experiment:
    name: str
    make_config: Callable[[], PeftConfig]
    lr: float
    hooks: dict = field(default_factory=dict)  # extra TrainingHooks arguments


EXPERIMENTS = {
    e.name: e
    for e in [
        Experiment("lora-r8", lambda: LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"), 3e-3),
        Experiment(
            "pissa-r8",
            lambda: LoraConfig(r=8, lora_alpha=8, init_lora_weights="pissa", target_modules="all-linear", task_type="CAUSAL_LM"),
            3e-3,
        ),
        Experiment("sorsa-r8", lambda: petuning.SorsaConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"), 3e-3),
    ]
}
