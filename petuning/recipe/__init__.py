"""Recipes: supervised fine-tuning with any petuning method (or peft LoRA) on TRL's ``SFTTrainer``.

``petuning train`` and ``recipes/sft.py`` are the command line over this package::

    from petuning.recipe import parse_recipe_args, run_sft
    result = run_sft(parse_recipe_args(["recipes/configs/sorsa_smollm2.yaml", "--max_steps", "10"]))
"""

from petuning.recipe.args import (
    PetuningArguments,
    RecipeArguments,
    available_methods,
    build_peft_config,
    method_options,
    parse_recipe_args,
)
from petuning.recipe.cli import train_main
from petuning.recipe.run import SFTResult, check_reload, check_reload_in_subprocess, run_sft

__all__ = [
    "PetuningArguments",
    "RecipeArguments",
    "SFTResult",
    "available_methods",
    "build_peft_config",
    "check_reload",
    "check_reload_in_subprocess",
    "method_options",
    "parse_recipe_args",
    "run_sft",
    "train_main",
]
