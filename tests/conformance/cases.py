"""The method cases the conformance suite runs. Each petuning method adds its cases here.

A case is one method on one model kind. ``make_config(init_weights)`` builds a fresh config; with
``init_weights=True`` the adapter must start as an exact identity, with ``False`` it must not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from peft.config import PeftConfig

from petuning import SorsaConfig


@dataclass(frozen=True)
class MethodCase:
    method: str
    model: str
    make_config: Callable[[bool], PeftConfig]
    prefix: str

    @property
    def id(self) -> str:
        return f"{self.method}-{self.model}"


def _sorsa(targets, task_type=None, **extra):
    def make(init_weights: bool) -> PeftConfig:
        return SorsaConfig(r=4, target_modules=targets, init_weights=init_weights, task_type=task_type, **extra)

    return make


CASES = [
    MethodCase("sorsa", "mlp", _sorsa(["lin0", "lin1", "lin2"]), "sorsa_"),
    MethodCase("sorsa", "conv1d_gpt2", _sorsa(["c_fc", "c_proj"]), "sorsa_"),
    MethodCase("sorsa", "llama", _sorsa("all-linear", "CAUSAL_LM"), "sorsa_"),
    MethodCase("sorsa", "opt", _sorsa(["q_proj", "v_proj", "fc1", "fc2"], "CAUSAL_LM", alpha=8.0), "sorsa_"),
]
