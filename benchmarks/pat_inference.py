"""PAT: inference speed of the pruned SmolLM2 against the original (PAT's train step: ``method_speed.py``).

Usage::

    python benchmarks/pat_inference.py            # about 4 minutes on 2 idle cores
    python benchmarks/pat_inference.py --quick    # fewer repeats

Results are printed and written to ``benchmarks/results/pat_inference.json``. Paper anchor: 1.33x faster inference
for Llama-2-7B pruned by 25% (hidden 4096 -> 3072), measured by the authors on GPUs.

Method
------
*Inference.* SmolLM2-135M-Instruct (float32; hidden 576, 30 layers, tied 49152-token embedding) gets a PAT adapter
with ``pruning_ratio=0.25`` (kept width 432) and random HSMs (``init_weights=False``), whose mask is finalized and
which is pruned by ``petuning_prune_and_unload()``: the result is a stock ``LlamaForCausalLM`` with hidden size 432.
The speed of a pruned model does not depend on how well it was trained, so no training is done here. Both models
are in one process; two workloads, each timed with ``time.perf_counter`` under ``torch.inference_mode``:

* ``prefill``: one forward pass over a batch of 4 x 256 token ids with the last position's logits only
  (``logits_to_keep=1``, as ``generate`` prefills) (tokens/s = 1024 / time);
* ``forward_all_logits``: the same pass with logits at all 1024 positions, as training or scoring computes them;
  writing the 1024 x 49152 logits costs both models the same, which dilutes the speed-up;
* ``decode``: greedy ``generate`` of 32 new tokens for one 16-token prompt with the KV cache (tokens/s = 32 / time;
  ``min_new_tokens`` = ``max_new_tokens``, so both models produce exactly 32 tokens).

``prefill_breakdown`` then profiles prefill in both models: the time of the matrix products, of the attention kernel
(unchanged by the pruning: heads and head_dim are kept) and of the rest, and the speed-up the measured matmuls alone
would give.

The two models alternate, original first in even repeats and pruned first in odd ones, after one untimed warm-up
each. For reference the JSON also holds ``linear_weight_ratio``: the weights of all ``nn.Linear`` layers (LM head
included) of the original over the pruned model, i.e. the speed-up if a token's time were its matrix products. Reported: median and minimum time per model and the speed-up (original time / pruned time) of the medians,
of the minima (the least disturbed runs; load only ever adds time), and the median of the per-repeat ratios.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time

import peft
import torch
import transformers
from _common import (  # benchmarks/_common.py; also makes petuning importable from a checkout
    RESULTS_DIR,
    rotated,
    utc_now,
    write_json,
)
from peft import get_peft_model
from torch.profiler import ProfilerActivity, profile

import petuning
from petuning.recipe.smollm2 import load_smollm2

RESULTS = RESULTS_DIR / "pat_inference.json"


def pruned_smollm2() -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    original, _ = load_smollm2()
    adapted, _ = load_smollm2()
    torch.manual_seed(0)
    model = get_peft_model(adapted, petuning.PatConfig(pruning_ratio=0.25, hsm_rank=32, lora_r=0, init_weights=False))
    model.base_model.finalize_pat_mask()
    start = time.perf_counter()
    pruned = model.base_model.petuning_prune_and_unload()
    export_seconds = time.perf_counter() - start
    info = {
        "hidden_size": [original.config.hidden_size, pruned.config.hidden_size],
        # all parameters: the pruned model stays tied like the original (scale-only embedding HSM)
        "parameters": [sum(p.numel() for p in original.parameters()), sum(p.numel() for p in pruned.parameters())],
        # what a token's matrix products touch (every nn.Linear incl. the LM head): the compute a token costs
        "linear_weights": [linear_weights(original), linear_weights(pruned)],
        "prune_and_unload_seconds": round(export_seconds, 2),
    }
    info["linear_weight_ratio"] = info["linear_weights"][0] / info["linear_weights"][1]
    return original.eval(), pruned.eval(), info


def linear_weights(model: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def time_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def inference_benchmark(repeats: int) -> dict:
    original, pruned, info = pruned_smollm2()
    generator = torch.Generator().manual_seed(0)
    prefill_ids = torch.randint(100, 40000, (4, 256), generator=generator)
    prompt = torch.randint(100, 40000, (1, 16), generator=generator)
    new_tokens = 32
    workloads = {
        # what generation's prefill computes: every position's hidden state, the last position's logits only
        "prefill": (lambda m: m(input_ids=prefill_ids, logits_to_keep=1), prefill_ids.numel()),
        # the same forward with logits at every position (training/scoring): 1024 x 49152 float32 logits (201 MB)
        # are written by both models alike
        "forward_all_logits": (lambda m: m(input_ids=prefill_ids), prefill_ids.numel()),
        "decode": (
            lambda m: m.generate(
                prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
            ),
            new_tokens,
        ),
    }
    models = {"original": original, "pruned": pruned}
    results = {"models": info}
    with torch.inference_mode():
        for workload, (run, tokens) in workloads.items():
            times = {name: [] for name in models}
            for model in models.values():
                run(model)  # warm-up
            for repeat in range(repeats):
                for name in rotated(list(models), repeat):  # two models: they alternate
                    times[name].append(time_call(functools.partial(run, models[name])))
            results[workload] = summarize(times, tokens, reference="original", other="pruned")
            print_row(workload, results[workload])
        results["prefill_breakdown"] = prefill_breakdown(models, workloads["prefill"][0])
    return results


OP_GROUPS = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm"), "attention": ("scaled_dot_product",)}


def prefill_breakdown(models: dict, run) -> dict:
    """Where prefill's time goes, from torch's profiler (self CPU time of 3 passes per model): the matrix products,
    which shrink with the hidden size, the attention kernel, which does not (heads and head_dim are kept), and the
    rest. ``ceiling`` is the speed-up if the pruned model's non-matmul time equalled the original's and only the
    matmuls shrank, as measured: what the workload allows."""
    out = {}
    for name, model in models.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                run(model)
        groups = dict.fromkeys((*OP_GROUPS, "other"), 0.0)
        for event in prof.key_averages():
            group = next((g for g, keys in OP_GROUPS.items() if any(k in event.key for k in keys)), "other")
            groups[group] += event.self_cpu_time_total / 3e6
        out[name] = {group: round(seconds, 4) for group, seconds in groups.items()}
    original, pruned = out["original"], out["pruned"]
    out["matmul_speedup"] = original["matmul"] / pruned["matmul"]
    out["attention_share_original"] = original["attention"] / sum(original.values())
    out["ceiling"] = sum(original.values()) / (sum(original.values()) - original["matmul"] + pruned["matmul"])
    print(
        f"prefill breakdown: matmuls x{out['matmul_speedup']:.3f}, attention {out['attention_share_original']:.1%} "
        f"of the original's time; speed-up if only the matmuls shrink: x{out['ceiling']:.3f}"
    )
    return out


def summarize(times: dict[str, list[float]], tokens: int, reference: str, other: str) -> dict:
    out = {
        name: {
            "median_s": statistics.median(ts),
            "min_s": min(ts),
            "tokens_per_s_median": tokens / statistics.median(ts),
            "runs": len(ts),
        }
        for name, ts in times.items()
    }
    per_repeat = [r / o for r, o in zip(times[reference], times[other])]
    out["speedup"] = {
        "ratio_of_medians": statistics.median(times[reference]) / statistics.median(times[other]),
        "ratio_of_minima": min(times[reference]) / min(times[other]),
        "median_per_repeat": statistics.median(per_repeat),
        "range_per_repeat": [min(per_repeat), max(per_repeat)],
    }
    return out


def print_row(label: str, result: dict) -> None:
    s = result["speedup"]
    print(
        f"{label:8s} original {result['original']['tokens_per_s_median']:8.1f} tok/s  pruned "
        f"{result['pruned']['tokens_per_s_median']:8.1f} tok/s  speed-up {s['ratio_of_medians']:.3f} "
        f"(minima {s['ratio_of_minima']:.3f}, per-repeat {s['range_per_repeat'][0]:.3f}-{s['range_per_repeat'][1]:.3f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    repeats = 4 if args.quick else 12
    load_before = os.getloadavg()[0]
    results = {
        "date": utc_now(),
        "command": "python benchmarks/pat_inference.py" + (" --quick" if args.quick else ""),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "paper_anchor": "1.33x inference speed-up, Llama-2-7B pruned by 25% (authors' GPUs)",
        "inference": inference_benchmark(repeats),
    }
    results["load_average_1min"] = [load_before, os.getloadavg()[0]]
    write_json(RESULTS, results)
    print(f"load average {results['load_average_1min']}; written to {RESULTS}")


if __name__ == "__main__":
    main()
