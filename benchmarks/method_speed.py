"""Every petuning method's train-step time, forward-only time, peak memory, merge time and initialization
time, relative to PEFT's LoRA at equal rank, measured in the same run.

Usage::

    python benchmarks/method_speed.py            # tiny Llama + SmolLM2-135M, about 15 minutes on 2 idle cores
    python benchmarks/method_speed.py --quick    # tiny Llama only, fewer repeats
    python benchmarks/method_speed.py --variants lora sorsa flora --no-smollm2

On a busy machine the timed repeats stop at a per-model time budget (``--budget``), but warm-up, the profiled
memory step and the init timing still take longer.

Results are printed as tables and written to ``benchmarks/results/method_speed.json``.

Method
------
Variants, all at the same rank ``r`` (default 16) on the same target modules (every linear layer of the
attention and MLP blocks: q/k/v/o/gate/up/down_proj):

* ``lora``             PEFT's ``LoraConfig(r, lora_alpha=r, lora_dropout=0)``, the reference
* ``sorsa``            ``SorsaConfig(r, gamma=4e-4, ortho_mode="official")``: the paper's regularizer, whose
                       gradient is added after clipping, before the optimizer step
* ``sorsa_gamma0``     ``SorsaConfig(r, gamma=0)``: the same adapter without the regularizer
* ``flora``            ``FloraConfig(r=r)``: r x r Tucker core between U_in (in, r) and U_out (out, r)
* ``sparse_low_rank``  ``SparseLowRankConfig(r=r, density=0.01)``: LoRA part plus 1% sparse values (random support)
* ``mask_tuning``      ``MaskTuningConfig(mask_share=1.0, mask_mode="threshold")``: the paper's binary mask over
                       every targeted weight (scores for all entries); the defaults: ``mask_tuning_speed.py``
* ``mask_tuning_gd``   the same with gradient dropout (one extra forward and backward for the KL gradient)
* ``pat``              ``PatConfig(pruning_ratio=0.25, hsm_rank=r, lora_r=r)``: HSMs on the residual stream plus
                       the paper's LoRA, mask schedule running

Models: (a) a Llama built from a config (hidden 512, MLP 1376, 4 layers, 8 heads / 4 KV heads, vocabulary
4096), batch 8 x 128 tokens; (b) the embedded SmolLM2-135M-Instruct (``petuning.smollm2.load_smollm2``),
batch 4 x 128 tokens. The batch is fixed random token ids, used as labels too.

One train step, timed with ``time.perf_counter`` from the forward to the end of ``zero_grad``::

    loss = model(input_ids=x, labels=x).loss; loss.backward()
    clip_grad_norm_(trainable, 1.0); optimizer.step()      # AdamW; petuning.TrainingHooks run inside step()
    optimizer.zero_grad(set_to_none=True)

``petuning.TrainingHooks`` is attached for every variant (for LoRA it finds no provider and costs only its
module walk). Each step is also split into phases (forward, backward, clip, petuning hooks, AdamW), the hooks
phase measured by optimizer step pre-hooks registered just before and just after TrainingHooks' own.

Noise control: every variant lives in the same process with its own copy of the base model. After
``warmup`` untimed steps each, the variants run in blocks of ``steps_per_block`` steps, interleaved, and the
order rotates every repeat (lora, sorsa, sorsa_gamma0; then sorsa, sorsa_gamma0, lora; ...), so slow phases
of a shared machine fall on all variants alike. Up to ``repeats`` repeats run; a per-model time budget may
stop them early (at least 2 always run), which keeps ``--quick`` and the full run bounded on a busy machine.
Reported per variant: the median and the minimum step time over all timed steps. Reported per ratio: the
ratio of medians (the headline), the median and range of the per-repeat ratios (the two variants' block
medians within one repeat, measured seconds apart), and the ratio of minima (the least disturbed steps;
the better estimate when the machine is busy, since load only ever adds time). torch's thread count is left
as it is; the 1-minute load average is recorded before and after: above the CPU count, other processes
compete for the cores and with 2 OpenMP threads every small op can stall, so absolute times swell and the
ratios should be read with their ranges.

Peak memory: CPU has no caching-allocator statistics and RSS is blurred by glibc's allocator (freed memory is
kept or returned at its discretion) and by everything else in the process. Instead one extra step per variant
runs under ``torch.profiler`` with ``profile_memory=True``, which records every allocation and free of
tensor memory made through torch's CPU allocator, with a timestamp. The running sum of those events gives the
tensor memory allocated during the step above what was live when it began; its maximum is the step's
*transient peak* (activations saved for backward, gradients, temporaries; gradients are freed by
``zero_grad`` so the sum returns to ~0, which the script checks and reports). What was live at the start (*static*:
model weights, adapter parameters and frozen buffers, AdamW state, the batch) is counted exactly from the
tensors themselves, each storage once. ``peak = static + transient``. Not counted: memory that libraries
allocate outside torch's allocator (oneDNN/BLAS scratch space), the Python heap. The profiled step is not
timed.

Forward-only: after each block of train steps, the same number of ``torch.no_grad()`` forwards in eval mode
(the adapter unmerged), timed the same way.

Merge time: ``merge_and_unload()`` of each variant's trained model, once, after the timed steps.

Initialization time: ``get_peft_model(fresh_base, config)`` for every variant (SORSA with ``svd_method="full"``
and ``"randomized"``), each on a freshly built/loaded base (loading is not timed), interleaved over
``init_repeats`` repeats; medians are reported.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from _common import (  # benchmarks/_common.py; also makes petuning importable from a checkout
    LM_TARGETS,
    MIB,
    RESULTS_DIR,
    TINY_LLAMA,
    interleaved_blocks,
    lora_config,
    machine_info,
    profile_allocations,
    rotated,
    storage_bytes,
    write_results,
)
from peft import PeftConfig, get_peft_model

import petuning
from petuning.smollm2 import load_smollm2
from petuning.testing import build_tiny_model

TARGET_MODULES = LM_TARGETS
GAMMA = 4e-4  # SORSA paper's regularizer strength
LR = 1e-4
MAX_STEPS = 1000  # schedule length given to the training hooks (PAT's mask schedule)
RESULTS = RESULTS_DIR / "method_speed.json"
STEP_TIME_TARGETS = {"sorsa": 1.1, "flora": 1.1, "sparse_low_rank": 1.25}  # the step-time targets vs LoRA
ADAPTER_PREFIXES = ("lora_", "sorsa_", "flora_", "sparse_low_rank_", "mask_tuning_", "pat_")


# ------------------------------------------------------------------------------------------- setup
@dataclass
class ModelSpec:
    name: str
    make_base: Callable[[], torch.nn.Module]
    batch: int
    seq: int
    description: str


def tiny_llama_spec() -> ModelSpec:
    desc = "Llama from config: " + ", ".join(f"{k}={v}" for k, v in TINY_LLAMA.items())
    return ModelSpec("tiny_llama", lambda: build_tiny_model("llama", seed=0, **TINY_LLAMA), 8, 128, desc)


def smollm2_spec() -> ModelSpec:
    return ModelSpec("smollm2_135m", lambda: load_smollm2()[0], 4, 128, "SmolLM2-135M-Instruct (float32)")


def peft_configs(rank: int) -> dict[str, Callable[[], PeftConfig]]:
    """The trained variants; factories because PEFT configs are mutated by get_peft_model."""
    t = TARGET_MODULES
    return {
        "lora": lambda: lora_config(rank, t),
        "sorsa": lambda: petuning.SorsaConfig(r=rank, target_modules=t, gamma=GAMMA),
        "sorsa_gamma0": lambda: petuning.SorsaConfig(r=rank, target_modules=t, gamma=0.0),
        "flora": lambda: petuning.FloraConfig(r=rank, target_modules=t),
        "sparse_low_rank": lambda: petuning.SparseLowRankConfig(r=rank, density=0.01, target_modules=t),
        # the paper's setting, as committed in results/method_speed.json (the defaults: mask_tuning_speed.py)
        "mask_tuning": lambda: petuning.MaskTuningConfig(target_modules=t, mask_share=1.0, mask_mode="threshold"),
        "mask_tuning_gd": lambda: petuning.MaskTuningConfig(
            target_modules=t,
            mask_share=1.0,
            mask_mode="threshold",
            gradient_dropout=True,
            gradient_dropout_batch_share=1.0,
        ),
        "pat": lambda: petuning.PatConfig(pruning_ratio=0.25, hsm_rank=rank, lora_r=rank, schedule_steps=MAX_STEPS),
    }


def init_configs(rank: int) -> dict[str, Callable[[], PeftConfig]]:
    """Variants of the init-time measurement: every method once, SORSA with both SVD methods."""
    configs = {n: f for n, f in peft_configs(rank).items() if n not in ("sorsa", "sorsa_gamma0", "mask_tuning_gd")}
    configs["sorsa_svd_full"] = lambda: petuning.SorsaConfig(r=rank, target_modules=TARGET_MODULES, svd_method="full")
    configs["sorsa_svd_randomized"] = lambda: petuning.SorsaConfig(
        r=rank, target_modules=TARGET_MODULES, svd_method="randomized"
    )
    return configs


class StepRunner:
    """One adapted model with its optimizer, hooks and fixed batch; runs and times train steps."""

    PHASES = ("forward", "backward", "clip", "hooks", "adamw")

    def __init__(self, base: torch.nn.Module, config: PeftConfig, batch: torch.Tensor):
        self.model = get_peft_model(base, config)
        self.model.train()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=LR)
        # Timestamps around TrainingHooks' pre-hook: pre-hooks run in registration order.
        self._marks: dict[str, float] = {}
        self.optimizer.register_step_pre_hook(lambda *_: self._mark("hooks_start"))
        self.hooks = petuning.TrainingHooks(self.model, self.optimizer, peak_lr=LR, max_steps=MAX_STEPS)
        self.optimizer.register_step_pre_hook(lambda *_: self._mark("hooks_end"))
        self.batch = batch

    def _mark(self, key: str) -> None:
        self._marks[key] = time.perf_counter()

    def step(self) -> dict[str, float]:
        """One full train step; returns its total and per-phase seconds."""
        t0 = time.perf_counter()
        loss = self.model(input_ids=self.batch, labels=self.batch).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        t3 = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        hooks = self._marks["hooks_end"] - self._marks["hooks_start"]
        return {
            "total": t4 - t0,
            "forward": t1 - t0,
            "backward": t2 - t1,
            "clip": t3 - t2,
            "hooks": hooks,
            "adamw": (t4 - t3) - hooks,
        }

    def forward_only(self) -> float:
        """Seconds of one eval-mode forward without gradients (adapter unmerged)."""
        self.model.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            self.model(input_ids=self.batch)
        seconds = time.perf_counter() - t0
        self.model.train()
        return seconds

    def merge_seconds(self) -> float:
        """Seconds of ``merge_and_unload()`` (destroys the runner's adapter; call last)."""
        t0 = time.perf_counter()
        self.model.merge_and_unload()
        return time.perf_counter() - t0

    # ------------------------------------------------------------------------------------ memory
    def static_bytes(self) -> dict[str, int]:
        """Bytes of tensors live between steps, each storage counted once."""
        seen: set[int] = set()

        def size(tensors) -> int:
            return storage_bytes(tensors, seen)

        prefixes = ADAPTER_PREFIXES
        named = list(self.model.named_parameters()) + list(self.model.named_buffers())
        adapter = size(t for n, t in named if any(p in n for p in prefixes))
        base = size(t for _, t in named)
        opt_state = size(v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v))
        grads = size(p.grad for p in self.trainable)
        batch = size([self.batch])
        return {
            "base_model": base,
            "adapter_tensors": adapter,
            "optimizer_state": opt_state,
            "grads_between_steps": grads,
            "batch": batch,
            "total": base + adapter + opt_state + grads + batch,
        }

    def profile_step_memory(self) -> dict[str, float]:
        """Transient peak of torch CPU-allocator memory during one step (bytes above the step's start)."""
        static = self.static_bytes()
        peak, running, n_events = profile_allocations(self.step)
        if abs(running) > MIB:  # a step should free what it allocated (zero_grad drops the gradients)
            print(f"  WARNING: tensor memory changed by {running / MIB:.1f} MiB over the profiled step", flush=True)
        return {
            "static_mib": static["total"] / MIB,
            "static_breakdown_mib": {k: v / MIB for k, v in static.items() if k != "total"},
            "transient_peak_mib": peak / MIB,
            "end_of_step_delta_mib": running / MIB,
            "peak_mib": (static["total"] + peak) / MIB,
            "n_alloc_events": n_events,
        }


# ------------------------------------------------------------------------------------- measurement
def median(xs: list[float]) -> float:
    return statistics.median(xs)


def bench_training(
    spec: ModelSpec, rank: int, warmup: int, repeats: int, steps_per_block: int, budget_s: float, variants: list[str]
) -> dict:
    print(f"\n== {spec.name}: {spec.description}; batch {spec.batch} x {spec.seq} tokens, r={rank}", flush=True)
    generator = torch.Generator().manual_seed(0)
    configs = {n: f for n, f in peft_configs(rank).items() if n in variants}
    runners: dict[str, StepRunner] = {}
    init_seconds: dict[str, float] = {}
    batch = None
    for name, make_config in configs.items():
        base = spec.make_base()
        if batch is None:  # one fixed batch for every variant
            batch = torch.randint(0, base.config.vocab_size, (spec.batch, spec.seq), generator=generator)
        t = time.perf_counter()
        runners[name] = StepRunner(base, make_config(), batch)
        init_seconds[name] = time.perf_counter() - t
    n_trainable = {n: sum(p.numel() for p in r.trainable) for n, r in runners.items()}

    names = list(runners)
    for name in names:
        for _ in range(warmup):
            runners[name].step()

    steps: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    forwards: dict[str, list[float]] = {n: [] for n in names}

    def timed_step(name: str) -> float:
        steps[name].append(runners[name].step())  # keep the phases; the loop gets the total
        return steps[name][-1]["total"]

    def forwards_after_block(name: str) -> None:
        forwards[name] += [runners[name].forward_only() for _ in range(steps_per_block)]

    load_before = os.getloadavg()[0]
    _, block_medians = interleaved_blocks(
        {n: (lambda n=n: timed_step(n)) for n in names}, repeats, steps_per_block, budget_s, forwards_after_block
    )
    load_after = os.getloadavg()[0]

    memory = {}
    for name in names:
        gc.collect()
        memory[name] = runners[name].profile_step_memory()
    merge = {name: runners[name].merge_seconds() for name in names}

    variants = {}
    for name in names:
        totals = [s["total"] for s in steps[name]]
        variants[name] = {
            "step_s_median": median(totals),
            "step_s_min": min(totals),
            "step_s_max": max(totals),
            "n_steps": len(totals),
            "phases_s_median": {p: median([s[p] for s in steps[name]]) for p in StepRunner.PHASES},
            "forward_only_s_median": median(forwards[name]),
            "merge_and_unload_s": merge[name],
            "get_peft_model_s": init_seconds[name],
            "trainable_params": n_trainable[name],
            "memory": memory[name],
        }
    ratios = {}
    for name in names:
        if name == "lora":
            continue
        paired = [s / ref for s, ref in zip(block_medians[name], block_medians["lora"])]
        ratios[f"{name}/lora"] = {
            "step_time": variants[name]["step_s_median"] / variants["lora"]["step_s_median"],
            "step_time_min": variants[name]["step_s_min"] / variants["lora"]["step_s_min"],
            "step_time_paired_median": median(paired),
            "step_time_paired_range": [min(paired), max(paired)],
            "forward_only_time": variants[name]["forward_only_s_median"] / variants["lora"]["forward_only_s_median"],
            "merge_time": variants[name]["merge_and_unload_s"] / variants["lora"]["merge_and_unload_s"],
            "peak_memory": memory[name]["peak_mib"] / memory["lora"]["peak_mib"],
            "transient_memory": memory[name]["transient_peak_mib"] / memory["lora"]["transient_peak_mib"],
        }
    runners.clear()
    gc.collect()
    return {
        "model": spec.description,
        "batch": spec.batch,
        "seq": spec.seq,
        "rank": rank,
        "target_modules": TARGET_MODULES,
        "warmup_steps": warmup,
        "repeats": len(block_medians["lora"]),
        "steps_per_block": steps_per_block,
        "time_budget_s": budget_s,
        "loadavg_1min_before_after": [load_before, load_after],
        "variants": variants,
        "ratios": ratios,
    }


def bench_init(spec: ModelSpec, rank: int, repeats: int, variants: list[str]) -> dict:
    """Median wall time of get_peft_model on a fresh base: LoRA vs SORSA full / randomized SVD."""
    print(f"\n== init time on {spec.name} (get_peft_model, {repeats} interleaved repeats)", flush=True)
    configs = {
        n: f
        for n, f in init_configs(rank).items()
        if n.removesuffix("_svd_full").removesuffix("_svd_randomized") in variants
    }
    times: dict[str, list[float]] = {n: [] for n in configs}
    names = list(configs)
    for rep in range(repeats):
        for name in rotated(names, rep):
            base = spec.make_base()
            gc.collect()
            t = time.perf_counter()
            model = get_peft_model(base, configs[name]())
            times[name].append(time.perf_counter() - t)
            del model, base
        print("  repeat {}/{}: {}".format(rep + 1, repeats, "  ".join(f"{n} {times[n][-1]:.2f}s" for n in names)))
    result = {n: {"s_median": median(t), "s_all": t} for n, t in times.items()}
    lora = result["lora"]["s_median"]
    return {
        "model": spec.description,
        "rank": rank,
        "variants": result,
        "ratios": {f"{n}/lora": result[n]["s_median"] / lora for n in names if n != "lora"},
    }


# -------------------------------------------------------------------------------------------- report
def print_training_table(name: str, res: dict) -> None:
    print(
        f"\n{name}  (batch {res['batch']} x {res['seq']}, r={res['rank']}, "
        f"{res['repeats']} repeats x {res['steps_per_block']} steps, load avg "
        f"{res['loadavg_1min_before_after'][0]:.1f} -> {res['loadavg_1min_before_after'][1]:.1f})"
    )
    header = (
        f"  {'variant':<16} {'step med':>9} {'[min,max]':>16} {'fwd':>7} {'bwd':>7} {'clip':>6} {'hooks':>7}"
        f" {'adamw':>6} {'static':>9} {'transient':>10} {'peak':>9}"
    )
    print(header)
    for v, d in res["variants"].items():
        ph, mem = d["phases_s_median"], d["memory"]
        print(
            f"  {v:<16} {d['step_s_median']:>8.3f}s [{d['step_s_min']:>6.3f},{d['step_s_max']:>6.3f}] "
            f"{ph['forward']:>7.3f} {ph['backward']:>7.3f} {ph['clip']:>6.4f} {ph['hooks']:>7.4f} {ph['adamw']:>6.4f}"
            f" {mem['static_mib']:>7.1f}Mi {mem['transient_peak_mib']:>8.1f}Mi {mem['peak_mib']:>7.1f}Mi"
        )
    for key, r in res["ratios"].items():
        lo, hi = r["step_time_paired_range"]
        target = STEP_TIME_TARGETS.get(key.split("/")[0])
        verdict = (
            "" if target is None else (" [OK" if r["step_time"] <= target else " [ABOVE TARGET") + f" vs {target}x]"
        )
        print(
            f"  {key:<22} step time {r['step_time']:.3f}x{verdict} (paired median "
            f"{r['step_time_paired_median']:.3f}x, range {lo:.3f}-{hi:.3f}; ratio of minima "
            f"{r['step_time_min']:.3f}x); forward-only {r['forward_only_time']:.3f}x; merge {r['merge_time']:.2f}x; peak memory {r['peak_memory']:.3f}x, transient {r['transient_memory']:.3f}x"
        )


def print_init_table(name: str, res: dict) -> None:
    print(f"\n{name} init (get_peft_model), median seconds")
    for v, d in res["variants"].items():
        ratio = res["ratios"].get(f"{v}/lora")
        extra = f"  ({ratio:.1f}x lora)" if ratio else ""
        print(f"  {v:<22} {d['s_median']:>7.3f}s{extra}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny Llama only, few repeats (< 2 minutes)")
    parser.add_argument("--no-smollm2", action="store_true", help="skip SmolLM2-135M")
    parser.add_argument("--repeats", type=int, default=None, help="max interleaved repeats (default 8, quick 4)")
    parser.add_argument(
        "--steps-per-block", type=int, default=None, help="timed steps per variant per repeat (default 2, quick 1)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per variant (default 2, quick 1)")
    parser.add_argument("--init-repeats", type=int, default=3, help="repeats of the init-time measurement")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds per model for the timed repeats (default: 40 quick, 120 tiny Llama, 240 SmolLM2)",
    )
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(peft_configs(1)),
        choices=list(peft_configs(1)),
        help="variants to run (lora, the reference, is always included)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads(N) first (default: leave torch's thread count as it is)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.variants = ["lora"] + [v for v in args.variants if v != "lora"]
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (4 if args.quick else 8)
    steps_per_block = args.steps_per_block or (1 if args.quick else 2)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    started = time.perf_counter()

    specs = [tiny_llama_spec()]
    if not (args.quick or args.no_smollm2):
        specs.append(smollm2_spec())

    results = {
        "machine": machine_info(),
        "method": __doc__.split("Method\n------\n")[1].strip(),
        "target_step_time_ratios": STEP_TIME_TARGETS,
        "training": {},
        "init": {},
    }
    print("machine:", json.dumps(results["machine"]))
    for spec in specs:
        budget = args.budget or (40 if args.quick else {"tiny_llama": 120}.get(spec.name, 240))
        results["training"][spec.name] = bench_training(
            spec, args.rank, warmup, repeats, steps_per_block, budget, args.variants
        )
    if not args.quick:
        init_spec = specs[-1]  # SmolLM2 unless --no-smollm2
        results["init"][init_spec.name] = bench_init(init_spec, args.rank, args.init_repeats, args.variants)

    print("\n" + "=" * 100)
    print("Train step = forward + backward + clip + AdamW step incl. petuning.TrainingHooks; seconds are medians.")
    print("Memory: static = tensors live between steps (counted exactly); transient = peak of torch CPU-allocator")
    print("allocations during one profiled step above its start; peak = static + transient.")
    loads = [x for r in results["training"].values() for x in r["loadavg_1min_before_after"]]
    if max(loads) > os.cpu_count():
        print(
            f"NOTE: load average reached {max(loads):.1f} on {os.cpu_count()} CPUs: other processes competed for "
            "the cores; absolute times are inflated and ratios noisy (see ranges and ratio of minima)."
        )
    for name, res in results["training"].items():
        print_training_table(name, res)
    for name, res in results["init"].items():
        print_init_table(name, res)
    write_results(args.out, results, started)


if __name__ == "__main__":
    main()
