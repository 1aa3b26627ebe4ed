"""Supervised fine-tuning of a causal LM with any petuning method (or peft LoRA), on ``transformers.Trainer``.

``run_sft(config)`` does what ``recipes/sft.py`` does: load the data and the base model, optionally score the
base model, attach the method's adapter, train with :class:`petuning.PetuningCallback` (the training-hook
protocol), save the adapter, evaluate, and write ``results.json``. It runs unchanged under one process,
``torchrun`` / ``accelerate launch`` DDP, FSDP and DeepSpeed: distributed state comes from the launcher through
``TrainingArguments``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from accelerate import PartialState
from accelerate.utils import gather_object
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import DataCollatorWithFlattening, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from petuning.data import SFTCollator, SFTFormat, generate_from_ids, load_records, prompt_and_reference, tokenize_record
from petuning.recipe.config import RecipeConfig, build_peft_config, config_from_dict
from petuning.recipe.setup import load_model, load_tokenizer, resolve_bf16, resolve_packing
from petuning.training import attach_to_trainer

logger = logging.getLogger("petuning.recipe")

ADAPTER_DIR = "adapter"
RESULTS_FILE = "results.json"
ANSWERS_FILE = "answers.json"
CONFIG_FILE = "recipe.yaml"
METRICS = ("exact_match",)


@dataclass
class SFTResult:
    """What :func:`run_sft` leaves behind: the trained ``PeftModel`` (unwrapped), the trainer and the metrics
    written to ``results.json``."""

    model: PeftModel
    trainer: Trainer
    metrics: dict[str, Any]


@dataclass
class Splits:
    """Tokenized training and held-out examples, and the held-out prompts/references for the task metric."""

    train: list[dict]
    eval: list[dict]
    prompts: list[list[int]]
    references: list[str]


# --------------------------------------------------------------------------- data


def _records(cfg: RecipeConfig, seed: int) -> tuple[list[dict], list[dict]]:
    data = cfg.data
    train = load_records(data.dataset, data.train_split, data.subset)
    if data.eval_dataset is not None:
        held_out = load_records(data.eval_dataset, data.eval_split, data.subset)
    elif data.eval_split is not None:
        held_out = load_records(data.dataset, data.eval_split, data.subset)
    elif data.eval_size:
        n = int(data.eval_size) if data.eval_size >= 1 else math.ceil(data.eval_size * len(train))
        if not 0 < n < len(train):
            raise ValueError(f"data.eval_size={data.eval_size} leaves no training or no held-out records ({len(train)} in all)")
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        held_out = [train[i] for i in sorted(order[:n])]
        train = [train[i] for i in sorted(order[n:])]
    else:
        held_out = []
    if data.max_train_samples is not None:
        train = train[: data.max_train_samples]
    if cfg.eval.max_samples is not None:
        held_out = held_out[: cfg.eval.max_samples]
    return train, held_out


def _tokenize(records: list[dict], tokenizer, fmt: SFTFormat, cfg: RecipeConfig, name: str) -> list[dict]:
    completion_only = cfg.data.completion_only_loss
    if completion_only is None:
        completion_only = fmt.kind != "text"
    elif completion_only and fmt.kind == "text":
        raise ValueError("data.completion_only_loss=true does not apply to 'text' data, which has no completion")
    features = []
    for index, record in enumerate(records):
        try:
            features.append(tokenize_record(record, tokenizer, fmt, cfg.data.max_length, completion_only))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{name} record {index}: {error}") from error
    kept = [f for f in features if any(label != -100 for label in f["labels"][1:])]
    if len(kept) < len(features):
        logger.warning("%s: %d of %d examples have no completion token within data.max_length=%d and are skipped",
                       name, len(features) - len(kept), len(features), cfg.data.max_length)
    if records and not kept:
        raise ValueError(f"{name}: no example keeps a completion token within data.max_length={cfg.data.max_length}")
    return kept


def prepare_splits(cfg: RecipeConfig, tokenizer, seed: int) -> Splits:
    """Load, check and tokenize the training and held-out records."""
    train, held_out = _records(cfg, seed)
    base_format = SFTFormat(
        kind=cfg.data.format,
        messages_field=cfg.data.messages_field,
        prompt_field=cfg.data.prompt_field,
        completion_field=cfg.data.completion_field,
        text_field=cfg.data.text_field,
        prompt_template=cfg.data.prompt_template,
    )
    train_name = f"{cfg.data.dataset!r}"
    fmt = base_format.resolve(train, train_name)
    train_features = _tokenize(train, tokenizer, fmt, cfg, f"training data {train_name}")
    eval_features, prompts, references = [], [], []
    if held_out:
        eval_name = f"{(cfg.data.eval_dataset or cfg.data.dataset)!r} (held out)"
        eval_format = base_format.resolve(held_out, eval_name)
        eval_features = _tokenize(held_out, tokenizer, eval_format, cfg, f"eval data {eval_name}")
        if cfg.eval.metric is not None:
            pairs = [prompt_and_reference(r, tokenizer, eval_format) for r in held_out]
            prompts, references = [p for p, _ in pairs], [r.strip() for _, r in pairs]
    if cfg.eval.metric is not None:
        if cfg.eval.metric not in METRICS:
            raise ValueError(f"eval.metric={cfg.eval.metric!r} is not one of {METRICS} (or null)")
        if not prompts:
            raise ValueError("eval.metric needs held-out records: set data.eval_split, data.eval_dataset or data.eval_size")
    if cfg.eval.reload_check and cfg.eval.metric is None:
        raise ValueError("eval.reload_check compares generated answers, so it needs eval.metric")
    return Splits(train_features, eval_features, prompts, references)


# --------------------------------------------------------------------------- evaluation


def generate_sharded(model, tokenizer, prompts: list[list[int]], cfg: RecipeConfig) -> list[str]:
    """Greedy answers to ``prompts``, split evenly across processes and gathered on every process.

    Every process runs the same number of ``generate`` calls with ``synced_gpus`` when there are several,
    so sharded models (FSDP, ZeRO-3) keep their collectives in step.
    """
    state = PartialState()
    extra = {"use_cache": True}
    if state.num_processes > 1:
        extra["synced_gpus"] = True
    with state.split_between_processes(list(range(len(prompts))), apply_padding=True) as indices:
        answers = generate_from_ids(
            model, tokenizer, [prompts[i] for i in indices], cfg.eval.max_new_tokens, cfg.eval.batch_size, **extra
        )
    by_index = dict(gather_object(list(zip(indices, answers))))
    return [by_index[i] for i in range(len(prompts))]


def exact_match(answers: list[str], references: list[str]) -> float:
    return sum(a == r for a, r in zip(answers, references)) / max(len(references), 1)


def _report(title: str, score: float, answers: list[str], splits: Splits, tokenizer, n: int = 3) -> None:
    logger.info("%s: exact match %.1f%% on %d held-out examples", title, 100 * score, len(answers))
    for prompt, answer, reference in list(zip(splits.prompts, answers, splits.references))[:n]:
        tail = " ".join(tokenizer.decode(prompt, skip_special_tokens=True).split())[-48:]
        logger.info("    ...%s  ->  %r  (expected %r)", tail, answer, reference)


# --------------------------------------------------------------------------- model


def trainable_summary(model: torch.nn.Module) -> str:
    """Trainable and total parameter counts, and the trainable tensors grouped by kind (``sorsa_A``, ...)."""
    trainable, total = model.get_nb_trainable_parameters()
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name, param in model.named_parameters():
        if param.requires_grad:  # "...q_proj.lora_A.default.weight" -> "lora_A": the part before the adapter name
            parts = name.split(".")
            at = next((i for i in range(len(parts) - 1, 0, -1) if parts[i] in model.peft_config), None)
            kind = parts[at - 1] if at else parts[-1]
            groups[kind][0] += 1
            groups[kind][1] += param.numel()
    lines = [f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)"]
    lines += [f"    {kind}: {count} tensors, {numel:,} parameters" for kind, (count, numel) in sorted(groups.items())]
    return "\n".join(lines)


def build_model(cfg: RecipeConfig, args: TrainingArguments, bf16: bool):
    """The base model (possibly 4-bit) and its attention implementation, before the adapter is attached."""
    state = PartialState()
    model, attention = load_model(cfg.model, bf16, args.device, state.local_process_index)
    checkpointing = getattr(args, "activation_checkpointing", args.gradient_checkpointing)
    kwargs = getattr(args, "activation_checkpointing_kwargs", args.gradient_checkpointing_kwargs)
    if cfg.model.load_in_4bit:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs=kwargs
        )
    elif checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.enable_input_require_grads()
    return model, attention


def attach_adapter(model, cfg: RecipeConfig, output_dir: Path) -> PeftModel:
    """Wrap ``model`` with the method's adapter. Methods with an SVD cache (``svd_cache_dir``) cache under
    ``output_dir/svd_cache`` unless the config says otherwise, so a resumed run does not redo the SVD."""
    config = build_peft_config(cfg.method, cfg.peft)
    if hasattr(config, "svd_cache_dir") and config.svd_cache_dir is None:
        config.svd_cache_dir = str(output_dir / "svd_cache")
    return get_peft_model(model, config)


# --------------------------------------------------------------------------- checkpoints


def resolve_resume(value, output_dir: Path) -> Optional[str]:
    """``train.resume_from_checkpoint``: ``"auto"`` (default) resumes from the latest checkpoint in the output
    directory if there is one; ``true`` requires one; a path names one; ``false`` starts fresh."""
    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if value in (None, False):
        if last:
            logger.warning("starting fresh although %s holds checkpoints (train.resume_from_checkpoint=false)", output_dir)
        return None
    if value == "auto":
        return last
    if value is True or value == "latest":
        if last is None:
            raise FileNotFoundError(f"train.resume_from_checkpoint=true but {output_dir} holds no checkpoint-* directory")
        return last
    path = Path(str(value))
    if not path.is_dir():
        raise FileNotFoundError(f"train.resume_from_checkpoint: no checkpoint directory {str(path)!r}")
    return str(path)


# --------------------------------------------------------------------------- the run


_TRAINING_ARGUMENT_FIELDS = {f.name for f in dataclasses.fields(TrainingArguments)}
_RENAMED_TRAIN_KEYS = {"gradient_checkpointing": "activation_checkpointing",
                       "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs"}


def training_arguments(cfg: RecipeConfig) -> tuple[TrainingArguments, bool, Any]:
    """``TrainingArguments`` from the ``train`` section (with the recipe's defaults), the resolved bf16 flag
    and the raw ``resume_from_checkpoint`` value."""
    kwargs = dict(cfg.train)
    bf16 = kwargs.pop("bf16", "auto")
    resume = kwargs.pop("resume_from_checkpoint", "auto")
    kwargs.setdefault("report_to", "none")
    kwargs.setdefault("remove_unused_columns", False)
    kwargs.setdefault("label_names", ["labels"])
    kwargs.setdefault("dataloader_pin_memory", torch.cuda.is_available())
    for old, new in _RENAMED_TRAIN_KEYS.items():  # transformers 5 renamed these; accept the names users know
        if old in kwargs and new in _TRAINING_ARGUMENT_FIELDS:
            kwargs.setdefault(new, kwargs.pop(old))
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in _TRAINING_ARGUMENT_FIELDS else "gradient_checkpointing"
    if kwargs.get(checkpointing):
        kwargs.setdefault(f"{checkpointing}_kwargs", {"use_reentrant": False})
    use_cpu = (bool(kwargs.get("use_cpu")) or not torch.cuda.is_available()
               or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"))
    device = torch.device("cpu" if use_cpu else "cuda")
    kwargs["bf16"] = resolve_bf16(bf16, device)
    return TrainingArguments(**kwargs), kwargs["bf16"], resume


def run_sft(cfg: RecipeConfig, callbacks: tuple[TrainerCallback, ...] = ()) -> SFTResult:
    """Fine-tune as ``cfg`` says; see the module docstring. ``callbacks`` are added to the trainer."""
    args, bf16, resume = training_arguments(cfg)  # sets up the distributed state first (DeepSpeed needs that)
    state = PartialState()
    logger.setLevel(logging.INFO if state.is_main_process else logging.WARNING)
    output_dir = Path(args.output_dir)
    checkpoint = resolve_resume(resume, output_dir)
    logger.info("method %s on %s; %d process(es), device %s, bf16 %s", cfg.method, cfg.model.name_or_path,
                state.num_processes, args.device, bf16)

    set_seed(args.seed)
    tokenizer = load_tokenizer(cfg.model)
    splits = prepare_splits(cfg, tokenizer, args.seed)
    logger.info("%d training and %d held-out examples", len(splits.train), len(splits.eval))
    if state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    model, attention = build_model(cfg, args, bf16)
    packing = resolve_packing(cfg.data.packing, attention)
    metrics: dict[str, Any] = {"method": cfg.method, "model": cfg.model.name_or_path, "world_size": state.num_processes,
                               "attention": attention, "bf16": bf16, "packing": packing}
    if cfg.eval.metric and cfg.eval.before_training:
        answers = generate_sharded(model, tokenizer, splits.prompts, cfg)
        metrics["exact_match_before"] = exact_match(answers, splits.references)
        _report("base model", metrics["exact_match_before"], answers, splits, tokenizer)

    set_seed(args.seed)  # the adapter's initialization does not depend on what ran before
    model = attach_adapter(model, cfg, output_dir)
    trainable, total = model.get_nb_trainable_parameters()
    metrics.update(trainable_parameters=trainable, total_parameters=total)
    logger.info("%s", trainable_summary(model))

    collator = (DataCollatorWithFlattening(return_position_ids=True, separator_id=-100) if packing
                else SFTCollator(tokenizer.pad_token_id))
    trainer = Trainer(model=model, args=args, train_dataset=splits.train, eval_dataset=splits.eval or None,
                      data_collator=collator, processing_class=tokenizer, callbacks=list(callbacks))
    attach_to_trainer(trainer)  # ahead of report_to integrations, so they log the methods' metrics too
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=checkpoint)
    metrics.update(resumed_from=checkpoint, global_step=trainer.state.global_step, train_loss=output.training_loss,
                   train_seconds=round(time.perf_counter() - start, 1),
                   loss_history=[e["loss"] for e in trainer.state.log_history if "loss" in e])
    adapter_dir = output_dir / ADAPTER_DIR
    trainer.save_model(str(adapter_dir))
    logger.info("adapter saved to %s", adapter_dir)

    model = trainer.model
    if splits.eval:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
    if cfg.eval.metric:
        answers = generate_sharded(model, tokenizer, splits.prompts, cfg)
        metrics["exact_match"] = exact_match(answers, splits.references)
        _report(f"after {cfg.method}", metrics["exact_match"], answers, splits, tokenizer)
        if state.is_main_process:
            record = {"batch_size": cfg.eval.batch_size, "max_new_tokens": cfg.eval.max_new_tokens,
                      "bf16": bf16, "prompts": splits.prompts, "answers": answers}
            (output_dir / ANSWERS_FILE).write_text(json.dumps(record))
    if state.is_main_process:
        (output_dir / RESULTS_FILE).write_text(json.dumps(metrics, indent=1))
    state.wait_for_everyone()
    return SFTResult(model=model, trainer=trainer, metrics=metrics)


# --------------------------------------------------------------------------- reload check


def check_reload(output_dir: str | Path) -> int:
    """Reload the saved adapter on a freshly loaded base (this process) and compare its greedy answers with the
    ones the trained model gave. Returns the number of differing answers (0 = pass) after printing them."""
    output_dir = Path(output_dir)
    cfg = config_from_dict(yaml.safe_load((output_dir / CONFIG_FILE).read_text()), str(output_dir / CONFIG_FILE))
    record = json.loads((output_dir / ANSWERS_FILE).read_text())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base, _ = load_model(cfg.model, record["bf16"], device)
    tokenizer = load_tokenizer(cfg.model)
    model = PeftModel.from_pretrained(base, output_dir / ADAPTER_DIR).to(device)
    answers = generate_from_ids(model, tokenizer, record["prompts"], record["max_new_tokens"], record["batch_size"],
                                use_cache=True)
    mismatches = [(i, old, new) for i, (old, new) in enumerate(zip(record["answers"], answers)) if old != new]
    for i, old, new in mismatches[:5]:
        print(f"    example {i}: trained model said {old!r}, reloaded adapter says {new!r}")
    if mismatches:
        print(f"FAILED: the reloaded adapter changed {len(mismatches)} of {len(answers)} answers")
    else:
        print(f"OK: the adapter reloaded in a fresh process gives the same {len(answers)} answers")
    return len(mismatches)


def check_reload_in_subprocess(output_dir: str | Path) -> int:
    """:func:`check_reload` in a fresh Python process (nothing of the training run in memory); its exit code."""
    code = "import sys; from petuning.recipe import check_reload; sys.exit(min(check_reload(sys.argv[1]), 1))"
    return subprocess.run([sys.executable, "-c", code, str(output_dir)]).returncode
