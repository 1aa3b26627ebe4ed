"""Supervised fine-tuning of a causal LM with any petuning method (or peft LoRA), on TRL's ``SFTTrainer``.

``run_sft(args)`` does what ``petuning train`` / ``recipes/sft.py`` does: load the data and the base model, optionally
score the base model, hand both to ``SFTTrainer`` with the method's ``peft_config`` and
:class:`petuning.PetuningCallback` (the training-hook protocol, attached ahead of the reporting callbacks), save the
adapter, evaluate, and write ``results.json``. TRL does the data formats, chat templates, completion-only loss,
packing and padding; this module keeps what TRL lacks: method lookup, the SVD-init cache, the attention-backend
choice, the exact-match evaluation and the reload check. It runs unchanged under one process, ``torchrun`` /
``accelerate launch`` DDP, FSDP and DeepSpeed: distributed state comes from the launcher through ``SFTConfig``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
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
from peft import PeftModel, prepare_model_for_kbit_training
from transformers import TrainerCallback, set_seed
from transformers.trainer_utils import get_last_checkpoint
from trl import ModelConfig, SFTTrainer

from petuning.recipe.args import RecipeArguments, build_peft_config
from petuning.recipe.data import check_layout, load_splits, prompts_and_references, split
from petuning.recipe.setup import load_model, load_tokenizer, resolve_packing
from petuning.recipe.task import generate_from_ids
from petuning.training import attach_to_trainer

logger = logging.getLogger("petuning.recipe")

ADAPTER_DIR = "adapter"
RESULTS_FILE = "results.json"
ANSWERS_FILE = "answers.json"
CONFIG_FILE = "recipe.yaml"


@dataclass
class SFTResult:
    """What :func:`run_sft` leaves behind: the trained ``PeftModel`` (unwrapped), the trainer and the metrics
    written to ``results.json``."""

    model: PeftModel
    trainer: SFTTrainer
    metrics: dict[str, Any]


@dataclass
class HeldOut:
    """The held-out split (for ``eval_loss``) and its prompts and references (for the task metric)."""

    dataset: Any
    prompts: list[list[int]]
    references: list[str]


def held_out_split(args: RecipeArguments, splits, tokenizer) -> Optional[HeldOut]:
    """``dataset_test_split`` of the dataset, cut to ``eval_max_samples``; None when there is none and nothing
    needs one."""
    script, options = args.script, args.petuning
    if script.dataset_test_split not in splits:
        if options.eval_metric or args.training.eval_strategy != "no":
            raise ValueError(
                f"the evaluation needs a held-out split, and dataset {script.dataset_name!r} has only "
                f"{sorted(splits)}; set dataset_test_split to one of them"
            )
        return None
    dataset = splits[script.dataset_test_split]
    if options.eval_max_samples is not None:
        dataset = dataset.select(range(min(options.eval_max_samples, len(dataset))))
    name = f"{script.dataset_name!r} ({script.dataset_test_split})"
    layout = check_layout(dataset, name, args.training.dataset_text_field)
    prompts, references = [], []
    if options.eval_metric:
        prompts, references = prompts_and_references(dataset, layout, tokenizer)
    return HeldOut(dataset, prompts, references)


# --------------------------------------------------------------------------- evaluation


def generate_sharded(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> list[str]:
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
            model, tokenizer, [prompts[i] for i in indices], max_new_tokens, batch_size, **extra
        )
    by_index = dict(gather_object(list(zip(indices, answers))))
    return [by_index[i] for i in range(len(prompts))]


def exact_match(answers: list[str], references: list[str]) -> float:
    return sum(a == r for a, r in zip(answers, references)) / max(len(references), 1)


def _score(title: str, model, tokenizer, held_out: HeldOut, args: RecipeArguments) -> tuple[float, list[str]]:
    options = args.petuning
    answers = generate_sharded(model, tokenizer, held_out.prompts, options.eval_max_new_tokens, options.eval_batch_size)
    score = exact_match(answers, held_out.references)
    logger.info("%s: exact match %.1f%% on %d held-out examples", title, 100 * score, len(answers))
    for prompt, answer, reference in list(zip(held_out.prompts, answers, held_out.references))[:3]:
        tail = " ".join(tokenizer.decode(prompt, skip_special_tokens=True).split())[-48:]
        logger.info("    ...%s  ->  %r  (expected %r)", tail, answer, reference)
    return score, answers


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


def build_model(args: RecipeArguments):
    """The base model (possibly 4-bit, then prepared by peft's ``prepare_model_for_kbit_training``, which TRL no
    longer calls) and its attention implementation, before the adapter is attached."""
    training = args.training
    if training.gradient_checkpointing and training.gradient_checkpointing_kwargs is None:
        training.gradient_checkpointing_kwargs = {"use_reentrant": False}  # what DDP and the tuners' hooks need
    state = PartialState()
    model, attention = load_model(args.model, training.bf16, training.device, state.local_process_index)
    if args.model.load_in_4bit:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=training.gradient_checkpointing,
            gradient_checkpointing_kwargs=training.gradient_checkpointing_kwargs,
        )
    return model, attention


def peft_config_for(args: RecipeArguments, output_dir: Path):
    """The method's config. Methods with an SVD cache (``svd_cache_dir``) cache under ``output_dir/svd_cache``
    unless the options say otherwise, so a resumed run does not redo the SVD."""
    config = build_peft_config(args.petuning.method, args.petuning.method_options)
    if hasattr(config, "svd_cache_dir") and config.svd_cache_dir is None:
        config.svd_cache_dir = str(output_dir / "svd_cache")
    return config


# --------------------------------------------------------------------------- checkpoints


def resolve_resume(value, output_dir: Path) -> Optional[str]:
    """``resume_from_checkpoint``: unset (default) resumes from the latest checkpoint in the output directory if
    there is one; ``true`` requires one; a path names one; ``false`` starts fresh."""
    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    text = str(value).lower() if value is not None else None
    if text in ("false", "no"):
        if last:
            logger.warning("starting fresh although %s holds checkpoints (resume_from_checkpoint=false)", output_dir)
        return None
    if text is None:
        return last
    if text in ("true", "latest"):
        if last is None:
            raise FileNotFoundError(f"resume_from_checkpoint=true but {output_dir} holds no checkpoint-* directory")
        return last
    if not Path(str(value)).is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint: no checkpoint directory {str(value)!r}")
    return str(value)


# --------------------------------------------------------------------------- the run


def run_sft(args: RecipeArguments, callbacks: tuple[TrainerCallback, ...] = ()) -> SFTResult:
    """Fine-tune as ``args`` says; see the module docstring. ``callbacks`` are added to the trainer."""
    training, options, script = args.training, args.petuning, args.script
    state = PartialState()  # SFTConfig set up the distributed state already (DeepSpeed needs that first)
    logger.setLevel(logging.INFO if state.is_main_process else logging.WARNING)
    output_dir = Path(training.output_dir)
    checkpoint = resolve_resume(training.resume_from_checkpoint, output_dir)
    logger.info(
        "method %s on %s; %d process(es), device %s, bf16 %s",
        options.method,
        args.model.model_name_or_path,
        state.num_processes,
        training.device,
        training.bf16,
    )

    set_seed(training.seed)
    tokenizer = load_tokenizer(args.model, training.chat_template_path)
    splits = load_splits(script.dataset_name, script.dataset_config)
    train = split(splits, "dataset_train_split", script.dataset_train_split, script.dataset_name)
    if options.max_train_samples is not None:
        train = train.select(range(min(options.max_train_samples, len(train))))
    check_layout(train, f"{script.dataset_name!r} ({script.dataset_train_split})", training.dataset_text_field)
    held_out = held_out_split(args, splits, tokenizer)
    logger.info("%d training and %d held-out examples", len(train), len(held_out.dataset) if held_out else 0)
    if state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / CONFIG_FILE).write_text(yaml.safe_dump(args.to_dict(), sort_keys=False))

    model, attention = build_model(args)
    training.packing = resolve_packing(training.packing, attention)
    training.padding_free = resolve_packing(training.padding_free, attention)
    metrics: dict[str, Any] = {
        "method": options.method,
        "model": args.model.model_name_or_path,
        "world_size": state.num_processes,
        "attention": attention,
        "bf16": training.bf16,
        "packing": training.packing,
    }
    if options.eval_metric and options.eval_before_training:
        metrics["exact_match_before"], _ = _score("base model", model, tokenizer, held_out, args)

    set_seed(training.seed)  # the adapter's initialization does not depend on what ran before
    trainer = SFTTrainer(
        model=model,
        args=training,
        train_dataset=train,
        eval_dataset=held_out.dataset if held_out else None,
        processing_class=tokenizer,
        peft_config=peft_config_for(args, output_dir),
        callbacks=list(callbacks),
    )
    attach_to_trainer(trainer)  # ahead of report_to integrations, so they log the methods' metrics too
    trainable, total = trainer.model.get_nb_trainable_parameters()
    metrics.update(trainable_parameters=trainable, total_parameters=total)
    logger.info("%s", trainable_summary(trainer.model))
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=checkpoint)
    metrics.update(
        resumed_from=checkpoint,
        global_step=trainer.state.global_step,
        train_loss=output.training_loss,
        train_seconds=round(time.perf_counter() - start, 1),
        loss_history=[e["loss"] for e in trainer.state.log_history if "loss" in e],
    )
    adapter_dir = output_dir / ADAPTER_DIR
    trainer.save_model(str(adapter_dir))
    logger.info("adapter saved to %s", adapter_dir)

    model = trainer.model
    if held_out:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
    if options.eval_metric:
        metrics["exact_match"], answers = _score(f"after {options.method}", model, tokenizer, held_out, args)
        if state.is_main_process:
            record = {
                "batch_size": options.eval_batch_size,
                "max_new_tokens": options.eval_max_new_tokens,
                "bf16": training.bf16,
                "model": dataclasses.asdict(args.model),
                "chat_template_path": training.chat_template_path,
                "prompts": held_out.prompts,
                "answers": answers,
                "adapter_dtypes": _trained_dtypes(model),
            }
            (output_dir / ANSWERS_FILE).write_text(json.dumps(record))
    if state.is_main_process:
        (output_dir / RESULTS_FILE).write_text(json.dumps(metrics, indent=1))
    state.wait_for_everyone()
    return SFTResult(model=model, trainer=trainer, metrics=metrics)


# --------------------------------------------------------------------------- reload check


def _trained_dtypes(model: torch.nn.Module) -> dict[str, str]:
    """The trainable parameters that are not float32, by name, with their dtype (``"bfloat16"``).

    TRL casts a quantized model's trainable adapter parameters to bfloat16 (QLoRA's recipe), while
    ``PeftModel.from_pretrained`` loads them as float32. The reload check casts them back, so that it compares the
    reloaded adapter with the trained one in the same precision.
    """
    return {
        name: str(param.dtype).removeprefix("torch.")
        for name, param in model.named_parameters()
        if param.requires_grad and param.dtype != torch.float32
    }


def check_reload(output_dir: str | Path) -> int:
    """Reload the saved adapter on a freshly loaded base (this process) and compare its greedy answers with the
    ones the trained model gave. Returns the number of differing answers (0 = pass) after printing them."""
    output_dir = Path(output_dir)
    record = json.loads((output_dir / ANSWERS_FILE).read_text())
    model_args = ModelConfig(**record["model"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base, _ = load_model(model_args, record["bf16"], device)
    tokenizer = load_tokenizer(model_args, record["chat_template_path"])
    model = PeftModel.from_pretrained(base, output_dir / ADAPTER_DIR).to(device)
    trained_dtypes = record.get("adapter_dtypes", {})  # compute in the dtypes the trained model computed in
    for name, param in model.named_parameters():
        if name in trained_dtypes:
            param.data = param.data.to(getattr(torch, trained_dtypes[name]))
    answers = generate_from_ids(
        model, tokenizer, record["prompts"], record["max_new_tokens"], record["batch_size"], use_cache=True
    )
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
