"""``petuning train`` (and ``python recipes/sft.py``): the SFT recipe's command line.

    petuning train CONFIG.yaml [--flag value ...]     train; flags override the file (any SFTConfig / ModelConfig /
                                                      ScriptArguments / PetuningArguments field)
    petuning train --methods                          list the methods and their options
    petuning train --check OUTPUT_DIR                 reload a finished run's adapter and compare its answers
    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/sft.py CONFIG.yaml
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 recipes/sft.py CONFIG.yaml      # two CPU processes (gloo)

The run resumes from the latest checkpoint in ``output_dir`` unless ``--resume_from_checkpoint false``. It saves the
adapter to ``<output_dir>/adapter`` and its metrics to ``<output_dir>/results.json``; with ``reload_check`` it
reloads the adapter in a fresh process and exits non-zero unless the answers are the same.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from petuning.recipe.args import available_methods, method_options, parse_recipe_args
from petuning.recipe.run import check_reload, check_reload_in_subprocess, run_sft


def train_main(argv: Sequence[str]) -> int:
    """Run the command line ``argv`` (without the program name); the process exit status."""
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.WARNING)
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    if argv[0] == "--methods":
        for name, config_cls in available_methods().items():
            print(f"{name} ({config_cls.__name__}): {', '.join(method_options(config_cls))}")
        return 0
    if argv[0] == "--check":
        if len(argv) != 2:
            raise ValueError("usage: petuning train --check OUTPUT_DIR (a finished run's output_dir)")
        return min(check_reload(argv[1]), 1)
    args = parse_recipe_args(argv)
    result = run_sft(args)
    if args.petuning.reload_check and result.trainer.is_world_process_zero():
        return check_reload_in_subprocess(args.training.output_dir)
    return 0
