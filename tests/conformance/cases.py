"""The method cases the conformance suite runs. Each petuning method adds its cases here.

A case is one method on one model kind. ``make_config(init_weights)`` builds a fresh config; with
``init_weights=True`` the adapter must start as an exact identity, with ``False`` it must not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from peft.config import PeftConfig

from petuning import FloraConfig, MaskTuningConfig, SorsaConfig


@dataclass(frozen=True)
class MethodCase:
    method: str
    model: str
    make_config: Callable[[bool], PeftConfig]
    prefix: str
    supports_injection: bool = True
    """False for methods with state on the tuner (PEFT's ``uses_shared_state``): ``inject_adapter_in_model`` and
    transformers' ``load_adapter`` must then refuse them with a clear error instead."""
    training_buffers: tuple = ()
    """Adapter buffers that training updates (masked tuning's budget-mode masked sets, PAT's step counter); every
    other buffer must stay as it was."""
    variant: str = ""
    """Names a second case of the same method and model (a setting with code paths of its own)."""

    @property
    def id(self) -> str:
        return "-".join(filter(None, (self.method, self.variant, self.model)))


def _sorsa(targets, task_type=None, **extra):
    def make(init_weights: bool) -> PeftConfig:
        return SorsaConfig(r=4, target_modules=targets, init_weights=init_weights, task_type=task_type, **extra)

    return make


def _flora(targets, task_type=None, **extra):
    def make(init_weights: bool) -> PeftConfig:
        return FloraConfig(target_modules=targets, init_weights=init_weights, task_type=task_type, **{"r": 2, **extra})

    return make


def _mask_tuning(targets, task_type=None, **extra):
    # save_scores=True: the suite compares adapter tensors after a state-dict round trip, and the compact file (the
    # default) keeps the masked positions, not the scores; tests/test_mask_tuning_saving.py covers it. Budget mode
    # with 5% of each weight: its init_weights=False start masks that much (the 0.1% default masks nothing on
    # these small layers).
    def make(init_weights: bool) -> PeftConfig:
        config = {"save_scores": True, "masked_budget": 0.05, **extra}
        if config.get("mask_mode") == "threshold":
            config.pop("masked_budget")
        return MaskTuningConfig(target_modules=targets, init_weights=init_weights, task_type=task_type, **config)

    return make


CASES = [
    MethodCase("sorsa", "mlp", _sorsa(["lin0", "lin1", "lin2"]), "sorsa_"),
    MethodCase("sorsa", "conv1d_gpt2", _sorsa(["c_fc", "c_proj"]), "sorsa_"),
    MethodCase("sorsa", "llama", _sorsa("all-linear", "CAUSAL_LM"), "sorsa_"),
    MethodCase("sorsa", "opt", _sorsa(["q_proj", "v_proj", "fc1", "fc2"], "CAUSAL_LM", alpha=8.0), "sorsa_"),
    MethodCase("flora", "mlp", _flora(["lin0", "lin1", "lin2"], scale=1.5), "flora_"),
    MethodCase("flora", "conv1d_gpt2", _flora(["c_fc", "c_proj"]), "flora_"),
    MethodCase("flora", "embedding", _flora(["emb", "lin"], r=3), "flora_"),
    MethodCase("flora", "conv1d", _flora(["conv0", "conv1"], r_kernel=2), "flora_"),
    MethodCase("flora", "conv2d", _flora(["conv"], r=[2, 3, 2, 3]), "flora_"),
    MethodCase("flora", "conv2d_1x1", _flora(["conv0", "conv1"], r=4), "flora_"),
    MethodCase(
        "flora", "conv2d_groups", _flora(["grouped", "depthwise"], rank_pattern={"depthwise": [1, 4, 2, 3]}), "flora_"
    ),
    MethodCase("flora", "conv3d", _flora(["conv"], r_kernel=2), "flora_"),
    MethodCase("flora", "llama", _flora("all-linear", "CAUSAL_LM", r=4), "flora_"),
    MethodCase("flora", "opt", _flora(["q_proj", "v_proj", "fc1", "fc2"], "CAUSAL_LM", r=4, scale=1.0), "flora_"),
    MethodCase(
        "mask_tuning",
        "mlp",
        _mask_tuning(["lin0", "lin1", "lin2"]),
        "mask_tuning_",
        training_buffers=("mask_tuning_off",),
    ),
    MethodCase(
        "mask_tuning",
        "conv1d_gpt2",
        _mask_tuning(["c_fc", "c_proj"], mask_share=0.3),
        "mask_tuning_",
        training_buffers=("mask_tuning_off",),
    ),
    MethodCase(
        "mask_tuning",
        "llama",
        _mask_tuning("all-linear", "CAUSAL_LM", mask_share=0.25),
        "mask_tuning_",
        training_buffers=("mask_tuning_off",),
    ),
    MethodCase(
        "mask_tuning",
        "opt",
        _mask_tuning(["q_proj", "v_proj", "fc1", "fc2"], "CAUSAL_LM", gradient_dropout=True, mask_mode="threshold"),
        "mask_tuning_",
    ),
]


from petuning import SparseLowRankConfig  # noqa: E402


def _sparse_low_rank(targets, task_type=None, **extra):
    def make(init_weights: bool) -> PeftConfig:
        kwargs = {"r": 4, "density": 0.1, **extra}
        return SparseLowRankConfig(target_modules=targets, init_weights=init_weights, task_type=task_type, **kwargs)

    return make


CASES += [
    MethodCase(
        "sparse_low_rank", "mlp", _sparse_low_rank(["lin0", "lin1", "lin2"], support="random"), "sparse_low_rank_"
    ),
    MethodCase(
        "sparse_low_rank",
        "conv1d_gpt2",
        _sparse_low_rank(["c_fc", "c_proj"], support="magnitude", r=2),
        "sparse_low_rank_",
    ),
    MethodCase(
        "sparse_low_rank", "llama", _sparse_low_rank("all-linear", "CAUSAL_LM", density=0.05), "sparse_low_rank_"
    ),
    MethodCase(
        "sparse_low_rank",
        "opt",
        _sparse_low_rank(["q_proj", "v_proj", "fc1", "fc2"], "CAUSAL_LM", support="magnitude", alpha=16.0),
        "sparse_low_rank_",
    ),
]


from petuning import PatConfig  # noqa: E402


def _pat(**extra):
    def make(init_weights: bool) -> PeftConfig:
        kwargs = {"target_width": 48, "hsm_rank": 8, "lora_r": 4, "lora_dropout": 0.0, "schedule_steps": 20, **extra}
        return PatConfig(init_weights=init_weights, task_type="CAUSAL_LM", **kwargs)

    return make


# PAT keeps its shared mask on the tuner, so it cannot live in a model without one.
CASES += [
    MethodCase("pat", "llama", _pat(), "pat_", supports_injection=False, training_buffers=("pat_step",)),
    # the self-distillation term runs a second (teacher) forward inside the training forward
    MethodCase(
        "pat",
        "llama",
        _pat(distill_weight=1.0),
        "pat_",
        supports_injection=False,
        training_buffers=("pat_step",),
        variant="distill",
    ),
]
