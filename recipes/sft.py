"""Supervised fine-tuning of a causal LM with any petuning method, or peft's LoRA as the reference, on TRL's
SFTTrainer. The same as ``petuning train``:

    python recipes/sft.py recipes/configs/sorsa_smollm2.yaml [--max_steps 20 --learning_rate 1e-4 ...]
    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/sft.py recipes/configs/sorsa_smollm2.yaml
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 recipes/sft.py CONFIG.yaml      # two CPU processes (gloo)

The YAML file is TRL's flat format (``trl sft --config``) plus petuning's ``method`` and ``method_options``; see
``petuning/recipe/args.py`` and docs/recipes.md.
"""

import sys

from petuning.recipe import train_main

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
