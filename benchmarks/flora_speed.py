"""FLoRA's training-step time and peak memory relative to PEFT's LoRA at (nearly) equal trainable parameters.

Usage::

    python benchmarks/flora_speed.py                 # tiny Llama, SmolLM2-135M, small conv net (a few minutes)
    python benchmarks/flora_speed.py --quick         # tiny Llama and conv net only, fewer repeats
    python benchmarks/flora_speed.py --no-smollm2 --repeats 6
    python benchmarks/flora_speed.py --only tiny_llama convnet --threads 1   # re-measure some, keep the others

Results are printed and written to ``benchmarks/results/flora_speed.json``. The target is a FLoRA train
step of at most 1.1x LoRA's on linear targets.

Method
------
Workloads (each variant holds its own copy of the same base weights):

* ``tiny_llama``: a Llama built from a config (hidden 512, MLP 1376, 4 layers, 8 heads / 4 KV heads, vocabulary
  4096), batch 8 x 128 random token ids (used as labels too); targets q/k/v/o/gate/up/down_proj.
* ``smollm2_135m``: the embedded SmolLM2-135M-Instruct (``petuning.smollm2.load_smollm2``), batch 4 x 128, the
  same targets.
* ``convnet``: a small CNN on 32 x 32 RGB images (stem 3->32, then 3x3 32->64, 3x3 64->64, 3x3 stride-2 64->128,
  1x1 128->128, global pooling, linear head), batch 32, cross-entropy on random labels; the four convolutions
  after the stem are targeted.

Variants at (nearly) equal trainable parameters:

* ``lora``: PEFT's ``LoraConfig(r, lora_alpha=r, lora_dropout=0)`` (r = 16 for the LMs, 8 for the conv net).
* ``flora``: ``FloraConfig`` with an int rank J (the same J for input and output modes; convolution kernel modes
  keep full rank). For linear layers J = r, so FLoRA has LoRA's parameters plus the J x J core per layer (+1.5 to
  +2 %); for the conv net J is the integer whose total parameter count is closest to LoRA's. The exact counts
  and their ratio are reported.

One train step, timed with ``time.perf_counter``: forward, loss, backward, AdamW step, ``zero_grad``. After
``warmup`` untimed steps each, the variants run in blocks of ``steps_per_block`` steps, interleaved, and the
order alternates every repeat, so slow phases of the shared machine fall on both alike. Reported: median and
minimum step time per variant; per ratio the ratio of medians (headline), the median and range of per-repeat
block ratios, and the ratio of minima (least disturbed steps). The 1-minute load average is recorded before
and after; above the CPU count, other processes competed for the cores and ratios are noisier.

Peak memory: one extra (untimed) step per variant runs under ``torch.profiler`` with ``profile_memory=True``;
the running sum of its allocation/free events gives the *transient peak* of tensor memory during the step
(activations saved for backward, gradients, temporaries). *Static* memory (weights, adapter tensors, AdamW
state, batch) is counted from the tensors themselves, each storage once. ``peak = static + transient``. Memory
allocated outside torch's allocator (BLAS scratch) is not counted.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import (  # benchmarks/_common.py; also makes petuning importable from a checkout
    LM_TARGETS,
    MIB,
    RESULTS_DIR,
    TINY_LLAMA,
    interleaved_blocks,
    lora_config,
    machine_info,
    profile_allocations,
    storage_bytes,
    utc_now,
    write_json,
)
from peft import PeftConfig, get_peft_model
from torch import nn

import petuning
from petuning.smollm2 import load_smollm2
from petuning.testing import build_tiny_model

RESULTS = RESULTS_DIR / "flora_speed.json"
WORKLOADS = ("tiny_llama", "smollm2_135m", "convnet")
CONV_TARGETS = ["conv1", "conv2", "conv3", "conv4"]
LR = 1e-4


class ConvNet(nn.Module):
    """A small CNN for 32 x 32 RGB images with 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.conv1 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(64, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, stride=2, padding=1)
        self.conv4 = nn.Conv2d(128, 128, 1)
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.stem, self.conv1, self.conv2, self.conv3, self.conv4):
            x = F.relu(conv(x))
        return self.head(x.mean(dim=(2, 3)))


# ------------------------------------------------------------------------------------------- setup
@dataclass
class Workload:
    name: str
    description: str
    make_base: Callable[[], nn.Module]
    make_batch: Callable[[nn.Module, torch.Generator], tuple]
    loss: Callable[[nn.Module, tuple], torch.Tensor]
    configs: Callable[[], dict[str, Callable[[], PeftConfig]]]


def _lm_batch(batch: int, seq: int):
    def make(base, generator):
        ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=generator)
        return (ids,)

    return make


def _lm_loss(model, batch):
    return model(input_ids=batch[0], labels=batch[0]).loss


def _lm_configs(rank: int):
    return lambda: {
        "lora": lambda: lora_config(rank, LM_TARGETS),
        "flora": lambda: petuning.FloraConfig(r=rank, scale=1.0, target_modules=LM_TARGETS),
    }


def _conv_configs(rank: int):
    """LoRA at ``rank`` and FLoRA at the int rank whose parameter count is closest to LoRA's."""

    def trainable(config) -> int:
        model = get_peft_model(ConvNet(), config)
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    def configs():
        lora = lambda: lora_config(rank, CONV_TARGETS)  # noqa: E731
        target = trainable(lora())

        def gap(j: int) -> int:
            return abs(trainable(petuning.FloraConfig(r=j, target_modules=CONV_TARGETS)) - target)

        best = min(range(1, 33), key=gap)
        return {"lora": lora, "flora": lambda: petuning.FloraConfig(r=best, scale=1.0, target_modules=CONV_TARGETS)}

    return configs


def workloads(lm_rank: int, conv_rank: int) -> dict[str, Workload]:
    desc = "Llama from config: " + ", ".join(f"{k}={v}" for k, v in TINY_LLAMA.items()) + "; batch 8 x 128 tokens"
    return {
        "tiny_llama": Workload(
            "tiny_llama",
            desc,
            lambda: build_tiny_model("llama", seed=0, **TINY_LLAMA),
            _lm_batch(8, 128),
            _lm_loss,
            _lm_configs(lm_rank),
        ),
        "smollm2_135m": Workload(
            "smollm2_135m",
            "SmolLM2-135M-Instruct (float32); batch 4 x 128 tokens",
            lambda: load_smollm2()[0],
            _lm_batch(4, 128),
            _lm_loss,
            _lm_configs(lm_rank),
        ),
        "convnet": Workload(
            "convnet",
            ConvNet.__doc__ + " Batch 32 x 3 x 32 x 32; targets " + ", ".join(CONV_TARGETS),
            _seeded_convnet,
            lambda base, g: (torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)),
            lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]),
            _conv_configs(conv_rank),
        ),
    }


def _seeded_convnet() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ConvNet().eval()


class Runner:
    """One adapted model with its optimizer and fixed batch; runs, times and profiles train steps."""

    def __init__(self, workload: Workload, config: PeftConfig, batch: tuple):
        self.model = get_peft_model(workload.make_base(), config)
        self.model.train()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=LR)
        self.loss = workload.loss
        self.batch = batch

    def step(self) -> float:
        start = time.perf_counter()
        self.loss(self.model, self.batch).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def static_mib(self) -> float:
        tensors = [t for _, t in self.model.named_parameters()] + [t for _, t in self.model.named_buffers()]
        tensors += [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        tensors += list(self.batch)
        return storage_bytes(tensors, set()) / MIB

    def transient_peak_mib(self) -> float:
        return profile_allocations(self.step)[0] / MIB


def bench(workload: Workload, warmup: int, repeats: int, steps_per_block: int, budget_s: float) -> dict:
    print(f"\n== {workload.name}: {workload.description}", flush=True)
    configs = workload.configs()
    generator = torch.Generator().manual_seed(0)
    batch = None
    runners: dict[str, Runner] = {}
    for name, make_config in configs.items():
        if batch is None:
            batch = workload.make_batch(workload.make_base(), generator)
        runners[name] = Runner(workload, make_config(), batch)
    names = list(runners)
    params = {n: sum(p.numel() for p in r.trainable) for n, r in runners.items()}
    for runner in runners.values():
        for _ in range(warmup):
            runner.step()

    load_before = os.getloadavg()[0]
    # two variants: the rotating order alternates them every repeat
    times, blocks = interleaved_blocks({n: r.step for n, r in runners.items()}, repeats, steps_per_block, budget_s)
    load_after = os.getloadavg()[0]

    variants = {}
    for name in names:
        gc.collect()
        static = runners[name].static_mib()
        transient = runners[name].transient_peak_mib()
        variants[name] = {
            "trainable_params": params[name],
            "config": runners[name].model.peft_config["default"].to_dict(),
            "step_s_median": statistics.median(times[name]),
            "step_s_min": min(times[name]),
            "n_steps": len(times[name]),
            "static_mib": static,
            "transient_peak_mib": transient,
            "peak_mib": static + transient,
        }
    paired = [f / ref for f, ref in zip(blocks["flora"], blocks["lora"])]
    flora, lora = variants["flora"], variants["lora"]
    ratio = {
        "trainable_params": flora["trainable_params"] / lora["trainable_params"],
        "step_time": flora["step_s_median"] / lora["step_s_median"],
        "step_time_min": flora["step_s_min"] / lora["step_s_min"],
        "step_time_paired_median": statistics.median(paired),
        "step_time_paired_range": [min(paired), max(paired)],
        "peak_memory": flora["peak_mib"] / lora["peak_mib"],
        "transient_memory": flora["transient_peak_mib"] / lora["transient_peak_mib"],
    }
    for variant in variants.values():
        variant["config"] = {
            k: v for k, v in variant["config"].items() if k in ("r", "r_kernel", "scale", "lora_alpha")
        }
    del runners
    gc.collect()
    return {
        "description": workload.description,
        "date": utc_now(),
        "torch_threads": torch.get_num_threads(),
        "warmup_steps": warmup,
        "repeats": len(blocks["lora"]),
        "steps_per_block": steps_per_block,
        "loadavg_1min_before_after": [load_before, load_after],
        "variants": variants,
        "flora_over_lora": ratio,
    }


def report(name: str, res: dict) -> None:
    lo, hi = res["flora_over_lora"]["step_time_paired_range"]
    r = res["flora_over_lora"]
    print(
        f"\n{name} ({res['repeats']} repeats x {res['steps_per_block']} steps, load avg "
        f"{res['loadavg_1min_before_after'][0]:.1f} -> {res['loadavg_1min_before_after'][1]:.1f})"
    )
    for v, d in res["variants"].items():
        print(
            f"  {v:<6} params {d['trainable_params']:>9,}  step median {d['step_s_median']:.4f}s  min "
            f"{d['step_s_min']:.4f}s  static {d['static_mib']:.1f} MiB  transient {d['transient_peak_mib']:.1f} MiB"
            f"  peak {d['peak_mib']:.1f} MiB   config {d['config']}"
        )
    print(
        f"  flora/lora: params {r['trainable_params']:.3f}x, step time {r['step_time']:.3f}x (paired median "
        f"{r['step_time_paired_median']:.3f}x, range {lo:.3f}-{hi:.3f}; ratio of minima {r['step_time_min']:.3f}x), "
        f"peak memory {r['peak_memory']:.3f}x, transient {r['transient_memory']:.3f}x"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny Llama and conv net only, fewer repeats")
    parser.add_argument("--no-smollm2", action="store_true", help="skip SmolLM2-135M")
    parser.add_argument("--repeats", type=int, default=None, help="max interleaved repeats (default 6, quick 3)")
    parser.add_argument("--steps-per-block", type=int, default=2, help="timed steps per variant per repeat")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    parser.add_argument("--budget", type=float, default=60, help="seconds of timed repeats per workload")
    parser.add_argument("--lm-rank", type=int, default=16)
    parser.add_argument("--conv-rank", type=int, default=8)
    parser.add_argument(
        "--only",
        nargs="+",
        choices=WORKLOADS,
        default=None,
        help="measure only these workloads and keep the others' results already in --out",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) first")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 6)
    started = time.perf_counter()
    chosen = ["tiny_llama", "convnet"] if (args.quick or args.no_smollm2) else list(WORKLOADS)
    chosen = args.only or chosen
    all_workloads = workloads(args.lm_rank, args.conv_rank)
    command = " ".join(["python", "benchmarks/flora_speed.py", *(argv if argv is not None else sys.argv[1:])])
    results = {"workloads": {}}
    if args.only and args.out.exists():
        results = json.loads(args.out.read_text())
    results.update(
        machine=machine_info(),
        method=__doc__.split("Method\n------\n")[1].strip(),
        target_step_time_ratio_linear=1.1,
    )
    for name in chosen:
        res = bench(all_workloads[name], args.warmup, repeats, args.steps_per_block, args.budget)
        results["workloads"][name] = {"command": command, **res}
    print("\n" + "=" * 100)
    for name, res in results["workloads"].items():
        report(name, res)
    results.pop("wall_time_s", None)
    print(f"total {time.perf_counter() - started:.0f}s")
    write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
