"""Supervised fine-tuning of a causal LM with any petuning method, or peft's LoRA as the reference.

    python recipes/sft.py recipes/configs/sorsa_smollm2.yaml [section.key=value ...] [--section.key value ...]
    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/sft.py recipes/configs/sorsa_smollm2.yaml
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 recipes/sft.py CONFIG.yaml      # two CPU processes (gloo)
    python recipes/sft.py --check OUTPUT_DIR      # reload a finished run's adapter and compare its answers
    python recipes/sft.py --methods               # list the methods and their options

The config's sections (method, model, peft, data, train, eval) are described in ``petuning/recipe/config.py``;
``train`` takes any ``transformers.TrainingArguments`` field. The run resumes from the latest checkpoint in
``train.output_dir`` unless ``train.resume_from_checkpoint=false``. It saves the adapter to
``<output_dir>/adapter`` and its metrics to ``<output_dir>/results.json``; with ``eval.reload_check`` it reloads
the adapter in a fresh process and exits non-zero unless the answers are the same.
"""

from __future__ import annotations

import logging
import sys

from petuning.recipe import available_methods, check_reload, check_reload_in_subprocess, load_config, run_sft
from petuning.recipe.config import method_options


def main(argv: list[str]) -> int:
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.WARNING)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    if argv[0] == "--methods":
        for name, config_cls in available_methods().items():
            print(f"{name} ({config_cls.__name__}): {', '.join(method_options(config_cls))}")
        return 0
    if argv[0] == "--check":
        return min(check_reload(argv[1]), 1)
    path, overrides = (argv[0], argv[1:]) if not argv[0].startswith("-") and "=" not in argv[0] else (None, argv)
    cfg = load_config(path, overrides)
    result = run_sft(cfg)
    if cfg.eval.reload_check and result.trainer.is_world_process_zero():
        return check_reload_in_subprocess(cfg.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
