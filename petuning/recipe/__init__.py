"""Recipes: supervised fine-tuning with any petuning method (or peft LoRA) on TRL's ``SFTTrainer``, and the demo
they run on: the embedded SmolLM2 (``petuning.recipe.smollm2``) and the embedded arithmetic task
(``petuning.recipe.task``).

``petuning train`` and ``recipes/sft.py`` are the command line over this package::

    from petuning.recipe import parse_recipe_args, run_sft
    result = run_sft(parse_recipe_args(["recipes/configs/sorsa_smollm2.yaml", "--max_steps", "10"]))

The names below load on first use, so ``petuning.recipe.smollm2`` and ``petuning.recipe.task`` import without TRL.
"""

from importlib import import_module

_EXPORTS = {
    "PetuningArguments": "args",
    "RecipeArguments": "args",
    "available_methods": "args",
    "build_peft_config": "args",
    "method_options": "args",
    "parse_recipe_args": "args",
    "train_main": "cli",
    "SFTResult": "run",
    "check_reload": "run",
    "check_reload_in_subprocess": "run",
    "run_sft": "run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'petuning.recipe' has no attribute {name!r}")
    return getattr(import_module(f"petuning.recipe.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
