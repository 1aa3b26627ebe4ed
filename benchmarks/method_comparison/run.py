"""Method comparison: every petuning method plus peft LoRA / PiSSA, one protocol, PEFT-shaped JSON results.

Tiers:

- ``toy`` (``make bench``): a tiny Llama (0.36 M parameters) trained on task A, then adapted to task B with each
  method (see ``toy.py``). Reports B accuracy, forgetting on A, train time, peak RSS, adapter size, trainable
  parameters and the merge error. About a minute per method on 2 CPU cores.
- ``real``: SmolLM2-135M-Instruct adapted to the embedded arithmetic task (see ``real.py``): exact match on held-out
  questions before and after, forgetting as the rise of the loss on general text. About 6 minutes per method at the
  default 100 steps of 16 questions on 2 CPU cores.

Each experiment runs in its own process (so peak RSS is its own) and writes
``benchmarks/results/method_comparison/<tier>/<experiment>.json`` in the shape of PEFT's
``method_comparison`` results (``run_info`` / ``train_info`` / ``meta_info``).

Usage::

    python benchmarks/method_comparison/run.py [--experiments lora-r8 sorsa-r8] [--steps 1500]
    python benchmarks/method_comparison/run.py --tier real [--experiments ...] [--steps 100] [--n-eval 100]
    python benchmarks/method_comparison/run.py --tier real --experiments lora-r8 --lr 1e-3 --seed 1 --validation 100

``--lr`` overrides the experiment's rate, ``--validation N`` holds out the last N training questions and scores
them too, ``--result-name`` names the JSON: what ``sweep.py`` (learning rates chosen on validation) runs.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results" / "method_comparison"
sys.path.insert(0, str(HERE))

from methods import EXPERIMENTS, for_tier  # noqa: E402
from real import RealTier  # noqa: E402
from toy import ToyTier, pretrained_base  # noqa: E402

TIERS = {tier.name: tier for tier in (ToyTier, RealTier)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tier", choices=sorted(TIERS), default="toy")
    parser.add_argument(
        "--experiments",
        nargs="*",
        choices=sorted(EXPERIMENTS),
        help="default: the tier's experiments (ablations run in the real tier only)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        help="adaptation steps per method (default: toy 1500, real 100; an "
        "experiment's real_step_factor multiplies it in the real tier)",
    )
    parser.add_argument("--batch-size", type=int, help="examples per step (default: toy 64, real 16)")
    parser.add_argument("--base-steps", type=int, default=2000, help="toy: full training steps of the task-A base")
    parser.add_argument("--n-eval", type=int, default=100, help="real: held-out questions scored (at most 200)")
    parser.add_argument("--seed", type=int, default=0, help="model initialisation and batch order")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: the experiment's rate for the tier)")
    parser.add_argument(
        "--validation",
        type=int,
        default=0,
        help="real: hold out the last N questions of the training split, score them too (for choosing the lr)",
    )
    parser.add_argument("--result-name", help="stem of the result JSON (default: the experiment's name)")
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/method_comparison/TIER)")
    parser.add_argument("--cache", type=Path, default=HERE.parent / "results" / "tmp")
    parser.add_argument("--worker", metavar="EXPERIMENT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.experiments = args.experiments or for_tier(args.tier)
    args.steps = args.steps or TIERS[args.tier].default_steps
    args.batch_size = args.batch_size or TIERS[args.tier].default_batch_size
    args.out = args.out or RESULTS / args.tier
    if args.validation and args.tier != "real":
        parser.error("--validation holds out questions of the real tier's training split; add --tier real")
    return args


def _reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS counter of this process (Linux ``clear_refs`` 5); return the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_bytes("VmRSS")


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{field} missing from /proc/self/status")


def run_experiment(args: argparse.Namespace) -> dict:
    """Adapt the tier's base model to its new task with one experiment's config; return the PEFT-shaped result."""
    from peft import get_peft_model

    import petuning

    experiment = EXPERIMENTS[args.worker]
    lr = args.lr or (experiment.lr if args.tier == "toy" else experiment.real_lr)
    if args.tier == "real" and experiment.real_step_factor != 1:  # e.g. PAT, allowed more steps (reported)
        args.steps = round(args.steps * experiment.real_step_factor)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    tier = TIERS[args.tier](args)
    model = tier.load_base()
    before_old, before_new = tier.retention(model), tier.new_task(model)
    teacher_rows = tier.teacher_rows(model, args.cache, args.seed) if experiment.teacher_rows else []
    rss_before = _reset_peak_rss()
    config = experiment.make_config()
    init_started = time.perf_counter()
    model = get_peft_model(model, config)
    init_time = time.perf_counter() - init_started
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = parameter_groups(model, lr, experiment.param_lrs)
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[group["lr"] for group in groups], total_steps=args.steps
    )
    metrics, losses, tokens = [], [], 0
    model.train()
    train_started = time.perf_counter()
    with petuning.TrainingHooks(model, optimizer, peak_lr=lr, max_steps=args.steps, **experiment.hooks):
        batches = tier.batches(args.batch_size, args.seed + 1, teacher_rows, experiment.teacher_rows)
        for step, batch in enumerate(batches, start=1):
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
            tokens += int(batch["input_ids"].numel())
            if step % max(1, args.steps // 10) == 0 or step == args.steps:
                metrics.append(
                    {
                        "step": step,
                        "train loss": sum(losses[-50:]) / len(losses[-50:]),
                        "train time": time.perf_counter() - train_started,
                    }
                )
            if step == args.steps:
                break
    train_time = time.perf_counter() - train_started
    rss_peak = _status_bytes("VmHWM")
    after_old, after_new = tier.retention(model), tier.new_task(model)
    validation = tier.validation_task(model) if args.validation else None

    extra = {}  # what only some methods report
    if hasattr(model.base_model, "masked_share"):  # masked tuning: the share of the targeted weights switched off
        extra["masked share"] = model.base_model.masked_share()
    if validation:
        extra |= {"validation accuracy": validation["accuracy"], "validation loss": validation["loss"]}
    if hasattr(model.base_model, "petuning_prune_and_unload"):  # methods that shrink the model (PAT)
        smaller = copy.deepcopy(model).base_model.petuning_prune_and_unload()
        if validation:
            extra["pruned validation accuracy"] = tier.validation_task(smaller)["accuracy"]
        extra |= {
            "pruned test accuracy": tier.new_task(smaller)["accuracy"],
            "pruned num params": sum(p.numel() for p in smaller.parameters()),
            "pruned hidden size": smaller.config.hidden_size,
        }
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        file_size = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
    probe = tier.probe()
    with torch.no_grad():
        adapted = model(input_ids=probe).logits
        try:
            merged = model.merge_and_unload()(input_ids=probe).logits
            merge_error = float((merged - adapted).abs().max())
        except (TypeError, ValueError, NotImplementedError) as error:  # e.g. a method that prunes instead
            merge_error = f"not mergeable: {error}"

    return {
        "run_info": {
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "total_time": time.perf_counter() - started,
            "experiment_name": f"{tier.name}/{experiment.name}",
            "seed": args.seed,
            "split": tier.split_info(),
            "peft_config": json.loads(json.dumps(config.to_dict(), default=str)),
            "error_msg": "",
        },
        "train_info": {
            "status": "success",
            "train_time": train_time,
            "init_time": init_time,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "teacher rows per batch": experiment.teacher_rows,
            "lr": lr,
            "param lrs": experiment.param_lrs,
            "train total tokens": tokens,
            "cpu_rss_peak_delta": rss_peak - rss_before,  # stand-in for accelerator_memory_max on CPU
            "file_size": file_size,
            "num_trainable_params": sum(p.numel() for p in trainable),
            "num_total_params": sum(p.numel() for p in model.parameters()),
            "test accuracy": after_new["accuracy"],
            "test loss": after_new["loss"],
            "forgetting": after_old["loss"] - before_old["loss"],
            "original task accuracy before": before_old["accuracy"],
            "original task accuracy after": after_old["accuracy"],
            "new task accuracy before": before_new["accuracy"],
            "merge max abs logit diff": merge_error,
            **extra,
            "metrics": metrics,
        },
        "meta_info": meta_info(tier.model_info),
    }


def parameter_groups(model: torch.nn.Module, lr: float, param_lrs: dict[str, float]) -> list[dict]:
    """AdamW groups: every trainable parameter at ``lr``, except those whose name contains a key of ``param_lrs``."""
    groups = {lr: []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            own = [value for key, value in param_lrs.items() if key in name]
            groups.setdefault(own[0] if own else lr, []).append(param)
    return [{"params": params, "lr": group_lr} for group_lr, params in groups.items() if params]


def meta_info(model_info: dict) -> dict:
    import peft
    import transformers

    import petuning

    return {
        "model": model_info,
        "package_info": {
            "petuning-version": petuning.__version__,
            "peft-version": peft.__version__,
            "transformers-version": transformers.__version__,
            "torch-version": torch.__version__,
        },
        "system_info": {
            "system": platform.system(),
            "release": platform.release(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "accelerator": "cpu",
        },
    }


def run_in_subprocess(args: argparse.Namespace, name: str, result_name: str | None = None) -> dict | None:
    """Run experiment ``name`` with ``args`` in a fresh process (its own peak RSS); its result, None if it failed."""
    options = {
        "--tier": args.tier,
        "--steps": args.steps,
        "--base-steps": args.base_steps,
        "--batch-size": args.batch_size,
        "--n-eval": args.n_eval,
        "--seed": args.seed,
        "--validation": args.validation,
        "--out": args.out,
        "--cache": args.cache,
        "--lr": args.lr,
        "--result-name": result_name,
    }
    command = [sys.executable, __file__, "--worker", name]
    command += [str(part) for option, value in options.items() if value is not None for part in (option, value)]
    label = result_name or name
    print(f"[{label}] running ...", flush=True)
    if subprocess.run(command).returncode != 0:
        return None
    result = json.loads((args.out / f"{label}.json").read_text())
    info = result["train_info"]
    print(
        f"[{label}] new-task accuracy {info['test accuracy']:.3f}, forgetting {info['forgetting']:+.3f}, "
        f"{info['train_time']:.0f} s, {info['num_trainable_params']} trainable",
        flush=True,
    )
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        result = run_experiment(args)
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"{args.result_name or args.worker}.json"
        partial = path.with_suffix(".json.partial")  # renamed when complete: a resumed sweep never reads half a file
        partial.write_text(json.dumps(result, indent=1))
        partial.replace(path)
        return
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.tier == "toy":
        print(f"task-A base: {pretrained_base(args.cache, args.base_steps, args.seed)}", flush=True)
    failed = [name for name in args.experiments if run_in_subprocess(args, name) is None]
    if failed:
        sys.exit(f"experiments failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
