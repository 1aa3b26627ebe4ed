"""Recipes: supervised fine-tuning with any petuning method (or peft LoRA) on transformers + accelerate.

``recipes/sft.py`` is a thin command line over this package::

    from petuning.recipe import load_config, run_sft
    result = run_sft(load_config("recipes/configs/sorsa_smollm2.yaml", ["train.max_steps=10"]))
"""

from petuning.recipe.config import (
    DataArgs,
    EvalArgs,
    ModelArgs,
    RecipeConfig,
    available_methods,
    build_peft_config,
    load_config,
)
from petuning.recipe.run import SFTResult, check_reload, check_reload_in_subprocess, prepare_splits, run_sft

__all__ = [
    "DataArgs",
    "EvalArgs",
    "ModelArgs",
    "RecipeConfig",
    "SFTResult",
    "available_methods",
    "build_peft_config",
    "check_reload",
    "check_reload_in_subprocess",
    "load_config",
    "prepare_splits",
    "run_sft",
]
