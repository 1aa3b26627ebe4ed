"""Sparse-plus-low-rank adapters: train-step time and peak memory against PEFT's LoRA and against a dense-masked
implementation of the same update, and how memory grows with the density δ.

Usage::

    python benchmarks/sparse_low_rank_speed.py             # tiny Llama + SmolLM2-135M, a few minutes on 2 cores
    python benchmarks/sparse_low_rank_speed.py --quick     # tiny Llama only, fewer repeats

Results are printed and written to ``benchmarks/results/sparse_low_rank_speed.json``. The targets: a
step at δ = 1% within 1.25x LoRA's step time, and peak memory clearly below the dense-masked variant.

Method
------
Variants, all at rank ``r`` (default 16, alpha = r) on the attention and MLP linears (q/k/v/o/gate/up/down_proj):

* ``lora``             PEFT's ``LoraConfig(r, lora_alpha=r, lora_dropout=0)``
* ``slr_<δ>``          ``SparseLowRankConfig(r, alpha=r, density=δ)``: the same low-rank part plus δ·out·in sparse
                       values (random support); sparse forward via CSR, value gradients by sampled products (SDDMM)
* ``dense_masked_<δ>`` the same adapter (same parameters, same support) whose sparse part is computed densely, as
                       SLTrain's and SaRA's code does: every forward scatters the values into a dense out x in
                       matrix ``D`` and computes ``x Dᵀ``; autograd then forms the dense (out, in) gradient of D and
                       gathers it at the support

Step time is measured for ``lora``, ``slr_0.01`` and ``dense_masked_0.01``; memory for those and for
``slr`` / ``dense_masked`` at the other densities of ``--densities``.

Models: (a) a Llama built from a config (hidden 512, MLP 1376, 4 layers, 8 heads / 4 KV heads, vocabulary
4096), batch 8 x 128 tokens; (b) SmolLM2-135M-Instruct (``petuning.smollm2.load_smollm2``), batch 4 x 128.
Fixed random token ids serve as inputs and labels.

One train step, timed with ``time.perf_counter``: ``loss = model(input_ids=x, labels=x).loss; loss.backward();
clip_grad_norm_(trainable, 1.0); optimizer.step(); optimizer.zero_grad(set_to_none=True)`` with AdamW.

Noise control: all timed variants live in one process, each with its own copy of the base model. After one
untimed warm-up step each, they run in blocks of ``steps_per_block`` steps, interleaved, the order rotating
every repeat, so slow phases of the shared machine fall on all alike. Reported: the median step time per
variant, the ratio of medians (headline), the range of per-repeat ratios, and the ratio of minima.

Memory: one extra (untimed) step per variant under ``torch.profiler`` with ``profile_memory=True``; the running
sum of the allocator's allocation/free events gives the *transient peak* of tensor memory above the step's
start (activations saved for backward, gradients, temporaries such as dense masked updates). *Static* memory
(weights, adapter tensors, AdamW state, batch) is counted from the tensors themselves, each storage once;
``peak = static + transient``. Not counted: BLAS/oneDNN scratch space and the Python heap.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import types
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
    write_results,
)
from peft import PeftConfig, get_peft_model

import petuning
from petuning.smollm2 import load_smollm2
from petuning.testing import build_tiny_model
from petuning.tuners.sparse_low_rank import SparseLowRankLayer

TARGET_MODULES = LM_TARGETS
LR = 1e-4
TARGET_RATIO = 1.25
TIMED_DENSITY = 0.01
RESULTS = RESULTS_DIR / "sparse_low_rank_speed.json"
MODELS = {
    "tiny_llama": (lambda: build_tiny_model("llama", seed=0, **TINY_LLAMA), 8, 128),
    "smollm2_135m": (lambda: load_smollm2()[0], 4, 128),
}


# ------------------------------------------------------------------------------------------ variants
def dense_masked_output(self: SparseLowRankLayer, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
    """The reference formulation: scatter the values into a dense (out, in) matrix every forward."""
    values = self.sparse_low_rank_values[adapter_name]
    x = x.to(values.dtype)
    dense = torch.zeros(self.out_features * self.in_features, dtype=values.dtype, device=values.device)
    dense = dense.index_put((self.sparse_low_rank_indices[adapter_name].long(),), values)
    out = F.linear(x, dense.view(self.out_features, self.in_features))
    a, b = self.sparse_low_rank_A[adapter_name], self.sparse_low_rank_B[adapter_name]
    return out + F.linear(F.linear(x, a), b) * self.sparse_low_rank_scaling[adapter_name]


def make_variant(name: str, base: torch.nn.Module, rank: int) -> torch.nn.Module:
    if name == "lora":
        config: PeftConfig = lora_config(rank, TARGET_MODULES)
        return get_peft_model(base, config)
    kind, density = name.rsplit("_", 1)
    config = petuning.SparseLowRankConfig(r=rank, alpha=rank, density=float(density), target_modules=TARGET_MODULES)
    model = get_peft_model(base, config)
    if kind == "dense_masked":
        for layer in model.modules():
            if isinstance(layer, SparseLowRankLayer):
                layer.adapter_output = types.MethodType(dense_masked_output, layer)
    return model


class StepRunner:
    def __init__(self, model: torch.nn.Module, batch: torch.Tensor):
        self.model = model.train()
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=LR)
        self.batch = batch

    def step(self) -> float:
        t0 = time.perf_counter()
        loss = self.model(input_ids=self.batch, labels=self.batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def static_bytes(self) -> dict[str, int]:
        seen: set[int] = set()

        def size(tensors) -> int:
            return storage_bytes(tensors, seen)

        named = list(self.model.named_parameters()) + list(self.model.named_buffers())
        adapter = size(t for n, t in named if "lora_" in n or "sparse_low_rank_" in n)
        base = size(t for _, t in named)
        optimizer = size(v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v))
        return {
            "adapter_tensors": adapter,
            "all_model_tensors": base + adapter,
            "optimizer_state": optimizer,
            "total": base + adapter + optimizer + size([self.batch]),
        }

    def memory(self) -> dict[str, float]:
        gc.collect()
        static = self.static_bytes()
        peak, running, _ = profile_allocations(self.step)
        return {
            "static_mib": static["total"] / MIB,
            "adapter_mib": static["adapter_tensors"] / MIB,
            "optimizer_state_mib": static["optimizer_state"] / MIB,
            "transient_peak_mib": peak / MIB,
            "peak_mib": (static["total"] + peak) / MIB,
            "end_minus_start_mib": running / MIB,
        }


# ------------------------------------------------------------------------------------------ benchmark
def bench_model(name: str, rank: int, densities: list[float], repeats: int, steps_per_block: int, budget: float):
    make_base, batch_size, seq = MODELS[name]
    print(f"\n== {name}: batch {batch_size} x {seq}, r={rank}", flush=True)
    batch = torch.randint(
        0, 4096 if name == "tiny_llama" else 49152, (batch_size, seq), generator=torch.Generator().manual_seed(0)
    )
    timed = ["lora", f"slr_{TIMED_DENSITY}", f"dense_masked_{TIMED_DENSITY}"]
    runners = {v: StepRunner(make_variant(v, make_base(), rank), batch) for v in timed}
    trainable = {v: sum(p.numel() for p in r.trainable) for v, r in runners.items()}
    for runner in runners.values():
        runner.step()  # warm-up: kernels, caches, AdamW state
    load_before = os.getloadavg()[0]
    times, block_medians = interleaved_blocks({v: runners[v].step for v in timed}, repeats, steps_per_block, budget)
    load_after = os.getloadavg()[0]

    memory = {v: runners[v].memory() for v in timed}
    del runners
    gc.collect()
    for density in densities:
        for kind in ("slr", "dense_masked"):
            v = f"{kind}_{density}"
            if v in memory:
                continue
            runner = StepRunner(make_variant(v, make_base(), rank), batch)
            runner.step()
            trainable[v] = sum(p.numel() for p in runner.trainable)
            memory[v] = runner.memory()
            del runner
            gc.collect()
            print(f"  memory {v}: peak {memory[v]['peak_mib']:.1f} MiB", flush=True)

    def ratio(v: str) -> dict:
        paired = [s / ref for s, ref in zip(block_medians[v], block_medians["lora"])]
        return {
            "step_time": statistics.median(times[v]) / statistics.median(times["lora"]),
            "step_time_paired_range": [min(paired), max(paired)],
            "step_time_min": min(times[v]) / min(times["lora"]),
        }

    slr, dense = f"slr_{TIMED_DENSITY}", f"dense_masked_{TIMED_DENSITY}"
    return {
        "batch": batch_size,
        "seq": seq,
        "rank": rank,
        "repeats": len(block_medians["lora"]),
        "steps_per_block": steps_per_block,
        "loadavg_1min_before_after": [load_before, load_after],
        "step_s_median": {v: statistics.median(t) for v, t in times.items()},
        "step_s_min": {v: min(t) for v, t in times.items()},
        "trainable_params": trainable,
        "memory": memory,
        "ratios": {
            f"{slr}/lora": ratio(slr),
            f"{dense}/lora": ratio(dense),
            f"{slr}/{dense}": {
                "step_time": statistics.median(times[slr]) / statistics.median(times[dense]),
                "peak_memory": memory[slr]["peak_mib"] / memory[dense]["peak_mib"],
                "transient_memory": memory[slr]["transient_peak_mib"] / memory[dense]["transient_peak_mib"],
            },
        },
    }


def report(name: str, res: dict) -> None:
    print(
        f"\n{name} (batch {res['batch']} x {res['seq']}, r={res['rank']}, {res['repeats']} repeats x "
        f"{res['steps_per_block']} steps, load {res['loadavg_1min_before_after'][0]:.1f} -> "
        f"{res['loadavg_1min_before_after'][1]:.1f})"
    )
    print(f"  {'variant':<20} {'step med':>9} {'trainable':>10} {'static':>9} {'transient':>10} {'peak':>9}")
    for v, mem in res["memory"].items():
        step = res["step_s_median"].get(v)
        step_s = f"{step:>8.3f}s" if step is not None else f"{'-':>9}"
        print(
            f"  {v:<20} {step_s} {res['trainable_params'][v]:>10,} {mem['static_mib']:>7.1f}Mi "
            f"{mem['transient_peak_mib']:>8.1f}Mi {mem['peak_mib']:>7.1f}Mi"
        )
    for key, r in res["ratios"].items():
        if "paired" not in str(r):
            print(
                f"  {key}: step time {r['step_time']:.3f}x, peak memory {r['peak_memory']:.3f}x, "
                f"transient memory {r['transient_memory']:.3f}x"
            )
            continue
        lo, hi = r["step_time_paired_range"]
        verdict = "" if key.startswith("dense") else (" [OK]" if r["step_time"] <= TARGET_RATIO else " [ABOVE TARGET]")
        print(
            f"  {key}: step time {r['step_time']:.3f}x{verdict} (per-repeat {lo:.3f}-{hi:.3f}, "
            f"ratio of minima {r['step_time_min']:.3f}x)"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny Llama only, few repeats")
    parser.add_argument("--no-smollm2", action="store_true")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.001, 0.01, 0.05])
    parser.add_argument("--repeats", type=int, default=None, help="max interleaved repeats (default 6, quick 3)")
    parser.add_argument("--steps-per-block", type=int, default=2)
    parser.add_argument("--budget", type=float, default=None, help="seconds of timed repeats per model (default 90)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads(N) first (default: leave torch's thread count as it is)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 6)
    budget = args.budget or (30 if args.quick else 90)
    models = ["tiny_llama"] if (args.quick or args.no_smollm2) else ["tiny_llama", "smollm2_135m"]
    started = time.perf_counter()
    results = {
        "machine": machine_info(),
        "method": __doc__.split("Method\n------\n")[1].strip(),
        "target_step_time_ratio_at_density_0.01": TARGET_RATIO,
        "command": " ".join(
            ["python", "benchmarks/sparse_low_rank_speed.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "models": {},
    }
    for name in models:
        results["models"][name] = bench_model(name, args.rank, args.densities, repeats, args.steps_per_block, budget)
    print("\n" + "=" * 100)
    for name, res in results["models"].items():
        report(name, res)
    write_results(args.out, results, started)


if __name__ == "__main__":
    main()
