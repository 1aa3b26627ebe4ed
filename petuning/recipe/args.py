"""The recipe's command line: TRL's ``TrlParser`` over TRL's own argument classes plus :class:`PetuningArguments`.

    petuning train CONFIG.yaml [--learning_rate 1e-4 --max_steps 20 ...]      (= python recipes/sft.py ...)

The YAML file is flat, as for ``trl sft --config``: any field of ``ScriptArguments`` (``dataset_name``, splits),
``SFTConfig`` (the ``TrainingArguments`` plus TRL's SFT options), ``ModelConfig`` (``model_name_or_path``, ``dtype``,
``attn_implementation``, 4-bit) or :class:`PetuningArguments` (the method and what TRL lacks). Command-line flags
override the file. ``method_options`` is a mapping in the file; on the command line it is JSON that updates the file's
mapping key by key (``--method_options '{"r": 8}'``).

Two defaults differ from TRL's, because TRL's assume a GPU: ``bf16`` follows the hardware (TRL's default, on unless
fp16 is, where the GPU supports bfloat16; else off) and ``dtype`` follows ``bf16`` (bfloat16 weights under bf16
training, else float32; ``auto`` means the same), unless the file or the command line sets them. Options the recipe
cannot honour are refused rather than ignored: TRL's LoRA flags (``use_peft``, ``lora_*``: use ``method`` and
``method_options``), ``load_in_8bit`` and streaming datasets. (The two method features that need the model's full
logits, which SFTTrainer's fused LM head does not compute, PAT's ``distill_weight`` and masked tuning's
``gradient_dropout``, are refused by the methods themselves, at the first training step.)
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from peft import LoraConfig, PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser

import petuning  # noqa: F401  (registers every petuning method with peft)
from petuning.recipe.setup import bf16_supported

#: PeftConfig fields the recipe sets itself.
RECIPE_OWNED_PEFT_FIELDS = {
    "peft_version",
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "auto_mapping",
}
METRICS = ("exact_match",)
_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


@dataclass
class PetuningArguments:
    """The method, and the parts of a fine-tuning run that TRL does not have."""

    method: str = field(
        default="lora",
        metadata={
            "help": "'lora' (peft's LoRA, the reference) or any petuning method: sorsa, flora, sparse_low_rank, "
            "pat, mask_tuning (`petuning train --methods` lists them with their options)."
        },
    )
    method_options: Optional[str] = field(
        default=None,
        metadata={
            "help": "Fields of the method's config class (SorsaConfig, LoraConfig, ...): a mapping in the YAML "
            "file; JSON on the command line, which updates the file's mapping."
        },
    )
    eval_metric: Optional[str] = field(
        default=None,
        metadata={
            "help": "None or 'exact_match': the stripped greedy answer equals the reference completion, on the "
            "held-out split (dataset_test_split)."
        },
    )
    eval_max_samples: Optional[int] = field(
        default=None, metadata={"help": "Score at most this many held-out records."}
    )
    eval_max_new_tokens: int = field(default=32, metadata={"help": "Generation length for the metric."})
    eval_batch_size: int = field(default=32, metadata={"help": "Prompts per generation batch (per process)."})
    eval_before_training: bool = field(default=False, metadata={"help": "Also score the base model before training."})
    reload_check: bool = field(
        default=False,
        metadata={
            "help": "After saving, reload the adapter on a fresh base in a new process and require the same "
            "answers (needs eval_metric)."
        },
    )
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Train on at most this many records."})


@dataclass
class RecipeArguments:
    """Everything one run reads, as the parser returns it."""

    script: ScriptArguments
    training: SFTConfig
    model: ModelConfig
    petuning: PetuningArguments

    def to_dict(self) -> dict[str, Any]:
        """Every argument as one flat mapping of plain values, in the recipe's own format: ``recipe.yaml``, which
        ``petuning train`` reads back."""
        known = {a.dest for a in make_parser()._actions}
        values = {
            **self.training.to_dict(),
            **dataclasses.asdict(self.script),
            **dataclasses.asdict(self.model),
            **dataclasses.asdict(self.petuning),
        }
        return {
            k: v
            for k, v in values.items()
            if k in known and isinstance(v, (str, int, float, bool, list, dict, type(None)))
        }


# --------------------------------------------------------------------------- methods


def available_methods() -> dict[str, type[PeftConfig]]:
    """Method name -> config class: ``"lora"`` (peft's LoRA) and every method petuning registered with peft.

    A petuning method's name is its ``PeftType`` value in lower case (``SorsaConfig`` -> ``"sorsa"``), so methods
    added to petuning appear here without any change to the recipes.
    """
    methods: dict[str, type[PeftConfig]] = {"lora": LoraConfig}
    for peft_type, config_cls in PEFT_TYPE_TO_CONFIG_MAPPING.items():
        if config_cls.__module__.split(".")[0] == "petuning":
            methods[str(getattr(peft_type, "value", peft_type)).lower()] = config_cls
    return dict(sorted(methods.items()))


def method_options(config_cls: type[PeftConfig]) -> list[str]:
    """The fields ``method_options`` may set for a config class."""
    return [f.name for f in dataclasses.fields(config_cls) if f.init and f.name not in RECIPE_OWNED_PEFT_FIELDS]


def build_peft_config(method: str, options: Optional[dict[str, Any]]) -> PeftConfig:
    """The method's config (``task_type="CAUSAL_LM"``) from ``method_options``, every key checked."""
    methods = available_methods()
    if method not in methods:
        close = difflib.get_close_matches(str(method), methods, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown method {method!r}{hint}; available methods: {', '.join(methods)}")
    config_cls = methods[method]
    allowed = method_options(config_cls)
    options = dict(options or {})
    for key in options:
        if key in allowed:
            continue
        owners = [name for name, cls in methods.items() if key in method_options(cls)]
        where = f"it is an option of: {', '.join(owners)}" if owners else "no method has it"
        if key in RECIPE_OWNED_PEFT_FIELDS:
            where = "the recipe sets it itself"
        raise ValueError(
            f"method_options.{key} does not apply to method {method!r} ({config_cls.__name__} has no such option; "
            f"{where}). Options of {method!r}: {', '.join(allowed)}"
        )
    return config_cls(task_type="CAUSAL_LM", **options)


# --------------------------------------------------------------------------- parsing


def make_parser() -> TrlParser:
    return TrlParser((ScriptArguments, SFTConfig, ModelConfig, PetuningArguments))


#: ModelConfig / ScriptArguments fields the recipe does not act on, with their defaults and what to use instead.
_REFUSED = {
    "use_peft": (False, "set method: lora and method_options"),
    "use_dora": (False, "set method: lora and method_options: {use_dora: true}"),
    "use_rslora": (False, "set method: lora and method_options: {use_rslora: true}"),
    "load_in_8bit": (False, "use load_in_4bit"),
    "dataset_streaming": (False, "load the dataset into memory or save_to_disk"),
}


def _refuse_unused(model: ModelConfig, script: ScriptArguments) -> None:
    for name, (default, instead) in _REFUSED.items():
        source = model if hasattr(model, name) else script
        if getattr(source, name, default) != default:
            raise ValueError(f"{name} is not used by petuning's recipe; {instead}")
    defaults = ModelConfig()
    for f in dataclasses.fields(ModelConfig):
        if f.name.startswith("lora_") and getattr(model, f.name) != getattr(defaults, f.name):
            raise ValueError(
                f"{f.name} is TRL's LoRA flag, which petuning's recipe does not read; set method: lora "
                f"and method_options: {{{f.name[len('lora_') :]}: ...}} instead"
            )


def parse_recipe_args(argv: Optional[Sequence[str]] = None) -> RecipeArguments:
    """Parse ``[CONFIG.yaml] [--flag value ...]`` (or ``--config CONFIG.yaml``); check the method and its options,
    the dataset and the metric before any model is loaded."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--config", *argv]
    parser = make_parser()
    file_config: dict[str, Any] = {}
    if "--config" in argv:
        if argv.index("--config") == len(argv) - 1:
            raise ValueError("--config needs a file: petuning train CONFIG.yaml [--flag value ...]")
        path = Path(argv[argv.index("--config") + 1])
        if not path.is_file():
            raise FileNotFoundError(f"recipe config {str(path)!r} does not exist")
        file_config = yaml.safe_load(path.read_text("utf-8")) or {}
        if not isinstance(file_config, dict):
            raise ValueError(f"{path}: a recipe config is a YAML mapping of argument names to values")
        _check_keys(file_config, path, parser)
    cuda = torch.cuda.is_available()  # without it: no bf16, no pinned memory, and gloo for several CPU processes
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    parser.set_defaults_with_config(
        bf16=None if bf16_supported(torch.device("cuda")) else False,
        dtype=None,
        dataloader_pin_memory=cuda,
        ddp_backend="gloo" if several and not cuda else None,
    )
    try:
        script, training, model, options = parser.parse_args_and_config(argv)
    except SystemExit as exit_:  # argparse's own message (or --help) is already printed
        if exit_.code in (0, None):
            raise
        raise ValueError(f"could not parse the recipe's arguments {argv} (see the message above)") from exit_
    if model.dtype in (None, "auto"):
        model.dtype = "bfloat16" if training.bf16 else "float32"
    options.method_options = _method_options(file_config.get("method_options"), options.method_options)
    build_peft_config(options.method, options.method_options)  # now, not after loading a model
    _refuse_unused(model, script)
    template = training.chat_template_path
    if template and not template.endswith((".jinja", ".j2")) and (options.eval_metric or options.reload_check):
        raise ValueError(
            f"chat_template_path={template!r} makes SFTTrainer clone a model's template (adding tokens and resizing "
            "the embeddings), which the exact-match prompts and the reload check would not see; give a .jinja file"
        )
    if options.eval_metric not in (None, *METRICS):
        raise ValueError(f"eval_metric={options.eval_metric!r} is not one of {METRICS} (or null)")
    if options.reload_check and options.eval_metric is None:
        raise ValueError("reload_check compares generated answers, so it needs eval_metric")
    if script.dataset_name is None:
        raise ValueError("dataset_name is missing: give 'embedded', a local data file or folder, or a Hub dataset id")
    return RecipeArguments(script, training, model, options)


def _check_keys(file_config: dict[str, Any], path: Path, parser: TrlParser) -> None:
    known = {a.dest for a in parser._actions} | {"env"}
    for key in file_config:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown key {key!r} in {path}{hint}")


def _method_options(from_file: Any, parsed: Any) -> dict[str, Any]:
    """The file's ``method_options`` mapping, updated by the command line's JSON when ``parsed`` is a string."""
    # yaml.safe_load (YAML 1.1, as TrlParser reads the file) leaves 1e-3 without a dot a string; argparse converts
    # the top-level values, not this mapping's
    options = {
        k: float(v) if isinstance(v, str) and _EXPONENT.fullmatch(v) else v for k, v in (from_file or {}).items()
    }
    if isinstance(parsed, str):
        try:
            update = json.loads(parsed)
        except json.JSONDecodeError as error:
            raise ValueError(f"--method_options must be a JSON object like '{{\"r\": 8}}': {error}") from None
        if not isinstance(update, dict):
            raise ValueError("--method_options must be a JSON object like '{\"r\": 8}'")
        options.update(update)
    return options  # a mapping in ``parsed`` is the file's own, as TrlParser read it
