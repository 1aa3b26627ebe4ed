"""Method comparison: every petuning method plus peft LoRA / PiSSA, one protocol, PEFT-shaped JSON results.

Tiers:

- ``toy`` (``make bench``): a tiny Llama (0.36 M parameters) trained on task A, then adapted to task B with each
  method (see ``toy.py``). Reports B accuracy, forgetting on A, train time, peak RSS, adapter size, trainable
  parameters and the merge error. A few minutes per method on 2 CPU cores.

Each experiment runs in its own process (so peak RSS is its own) and writes
``benchmarks/results/method_comparison/<tier>/<experiment>.json`` in the shape of PEFT's
``method_comparison`` results (``run_info`` / ``train_info`` / ``meta_info``).

Usage::

    python benchmarks/method_comparison/run.py [--experiments lora-r8 sorsa-r8] [--steps 1500]
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

from methods import EXPERIMENTS  # noqa: E402
from toy import TASK_A, TASK_B, Encoder, evaluate, pretrained_base, sample_batches  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiments", nargs="*", default=sorted(EXPERIMENTS), choices=sorted(EXPERIMENTS))
    parser.add_argument("--steps", type=int, default=1500, help="adaptation steps per method")
    parser.add_argument("--base-steps", type=int, default=2000, help="full training steps of the task-A base")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "toy")
    parser.add_argument("--cache", type=Path, default=HERE.parent / "results" / "tmp")
    parser.add_argument("--worker", metavar="EXPERIMENT", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


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
    """Adapt the cached base to task B with one experiment's config; return the PEFT-shaped result."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    import petuning

    experiment = EXPERIMENTS[args.worker]
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    base_path = pretrained_base(args.cache, args.base_steps, args.seed)
    encoder = Encoder()
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    before_a, before_b = evaluate(model, encoder, TASK_A), evaluate(model, encoder, TASK_B)
    rss_before = _reset_peak_rss()
    config = experiment.make_config(args.steps)
    init_started = time.perf_counter()
    model = get_peft_model(model, config)
    init_time = time.perf_counter() - init_started
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=experiment.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=experiment.lr, total_steps=args.steps)
    metrics, losses = [], []
    model.train()
    train_started = time.perf_counter()
    with petuning.TrainingHooks(model, optimizer, peak_lr=experiment.lr, max_steps=args.steps, **experiment.hooks):
        for step, batch in enumerate(sample_batches(encoder, TASK_B, args.batch_size, args.seed + 1), start=1):
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
            if step % max(1, args.steps // 10) == 0 or step == args.steps:
                metrics.append({"step": step, "train loss": sum(losses[-50:]) / len(losses[-50:]),
                                "train time": time.perf_counter() - train_started})
                model.train()
            if step == args.steps:
                break
    train_time = time.perf_counter() - train_started
    rss_peak = _status_bytes("VmHWM")
    after_a, after_b = evaluate(model, encoder, TASK_A), evaluate(model, encoder, TASK_B)

    pruned = {}
    if hasattr(model.base_model, "petuning_prune_and_unload"):  # methods that shrink the model (PAT)
        smaller = copy.deepcopy(model).base_model.petuning_prune_and_unload()
        pruned = {
            "pruned test accuracy": evaluate(smaller, encoder, TASK_B)["accuracy"],
            "pruned num params": sum(p.numel() for p in smaller.parameters()),
            "pruned hidden size": smaller.config.hidden_size,
        }
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        file_size = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
    probe = encoder.batch(TASK_B, TASK_B.split("test")[:64])["input_ids"]
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
            "experiment_name": f"toy/{experiment.name}",
            "peft_config": json.loads(json.dumps(config.to_dict(), default=str)),
            "error_msg": "",
        },
        "train_info": {
            "status": "success",
            "train_time": train_time,
            "init_time": init_time,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": experiment.lr,
            "train total tokens": int(args.steps * args.batch_size * probe.shape[1]),
            "cpu_rss_peak_delta": rss_peak - rss_before,  # stand-in for accelerator_memory_max on CPU
            "file_size": file_size,
            "num_trainable_params": sum(p.numel() for p in trainable),
            "num_total_params": sum(p.numel() for p in model.parameters()),
            "test accuracy": after_b["accuracy"],
            "test loss": after_b["loss"],
            "forgetting": after_a["loss"] - before_a["loss"],
            "original task accuracy before": before_a["accuracy"],
            "original task accuracy after": after_a["accuracy"],
            "new task accuracy before": before_b["accuracy"],
            "merge max abs logit diff": merge_error,
            **pruned,
            "metrics": metrics,
        },
        "meta_info": meta_info(base_path, args),
    }


def meta_info(base_path: Path, args: argparse.Namespace) -> dict:
    import peft
    import transformers

    import petuning

    return {
        "model": {"name": "tiny-llama (toy tier)", "path": str(base_path), "base_steps": args.base_steps},
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


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        result = run_experiment(args)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.worker}.json").write_text(json.dumps(result, indent=1))
        return
    args.cache.mkdir(parents=True, exist_ok=True)
    print(f"task-A base: {pretrained_base(args.cache, args.base_steps, args.seed)}", flush=True)
    failed = []
    for name in args.experiments:
        command = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps), "--base-steps",
                   str(args.base_steps), "--batch-size", str(args.batch_size), "--seed", str(args.seed),
                   "--out", str(args.out), "--cache", str(args.cache)]
        print(f"[{name}] running ...", flush=True)
        if subprocess.run(command).returncode != 0:
            failed.append(name)
            continue
        info = json.loads((args.out / f"{name}.json").read_text())["train_info"]
        print(f"[{name}] B accuracy {info['test accuracy']:.3f}, forgetting {info['forgetting']:+.3f}, "
              f"{info['train_time']:.0f} s, {info['num_trainable_params']} trainable", flush=True)
    if failed:
        sys.exit(f"experiments failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
