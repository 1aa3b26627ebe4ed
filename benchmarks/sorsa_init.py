"""SORSA's SVD at Llama-2-7B scale: the default randomized SVD timed on 7B-shaped matrices, extrapolated to
the model's 224 targeted matrices, against the official code's 6.4 h anchor.

Usage::

    python benchmarks/sorsa_init.py                  # 4096 x 4096 and 11008 x 4096, CPU (about a minute)
    python benchmarks/sorsa_init.py --device cuda    # the same on a GPU
    python benchmarks/sorsa_init.py --full           # also time one full SVD of a 4096 x 4096 matrix
    python benchmarks/sorsa_init.py --smollm2        # also SmolLM2's 210 real targets: time and worst fit

Results are printed and written to ``benchmarks/results/sorsa_init.json``.

Method
------
Llama-2-7B has 32 blocks of q/k/v/o (4096 x 4096), gate/up (11008 x 4096) and down (4096 x 11008). One matrix
of each shape is drawn with i.i.d. normal entries (a flat spectrum, like LLM weights, so the Krylov steps
do their full work; the iteration count is fixed anyway) and factorized with
``petuning.linalg.top_singular_triplets`` at ``SorsaConfig``'s defaults (r = 16, randomized, the defaults'
Krylov steps and oversampling), ``repeats`` times; the median is taken. The transposed down shape costs the
same as gate/up (the algorithm is symmetric in its matmuls). Extrapolation: 32 x (4 t_4096 + 3 t_11008).

The 6.4 h anchor is issue 18's: the official SORSA code runs a full ``torch.linalg.svd`` per layer, 81 s for one
4096 x 4096 matrix on this 2-core machine, about 6.4 h for Llama-2-7B's 224 matrices. ``--full`` re-times one
full SVD of 4096 x 4096 here.

``--smollm2`` factorizes all 210 targeted SmolLM2 matrices with the default and with the full SVD, and reports
the total time of each and the worst relative excess of ||W - U S Vh||_F over the exact optimum (the bar of
``tests/test_sorsa_svd_real.py`` is 1e-4). SmolLM2's whole-model init time (``get_peft_model``) against LoRA's is
measured by ``benchmarks/method_speed.py``.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch
from _common import machine_info
from variants import LM_TARGETS

from petuning import SorsaConfig
from petuning.linalg import top_singular_triplets

SHAPES = {"attention_4096x4096": (4096, 4096), "mlp_11008x4096": (11008, 4096)}
PER_MODEL = {"attention_4096x4096": 4 * 32, "mlp_11008x4096": 3 * 32}
OFFICIAL_ANCHOR_H = 6.4


def timed(fn, device: str) -> tuple[float, object]:
    """(wall seconds, result) of ``fn()``, synchronized on a GPU."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def smollm2_targets(rank: int, device: str) -> dict:
    """Both SVD methods over SmolLM2's 210 targets: seconds in all, and the worst fit excess of each."""
    from petuning.recipe.smollm2 import load_smollm2

    model, _ = load_smollm2()
    weights = [m.weight.detach().to(device) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in LM_TARGETS]
    config = SorsaConfig(r=rank)
    optima = [torch.linalg.svdvals(w.double())[rank:].square().sum().sqrt() for w in weights]
    out = {"matrices": len(weights), "rank": rank}
    for method in (config.svd_method, "full"):
        top_singular_triplets(weights[0], rank, method, config.svd_niter, config.svd_oversampling)  # warm-up
        seconds, worst = 0.0, 0.0
        for weight, optimum in zip(weights, optima):
            run = functools.partial(
                top_singular_triplets, weight, rank, method, config.svd_niter, config.svd_oversampling
            )
            took, factors = timed(run, device)
            seconds += took
            u, s, vh = (t.double() for t in factors)
            worst = max(worst, abs(float((weight.double() - (u * s) @ vh).norm() / optimum - 1)))
        out[method] = {"seconds": seconds, "worst_fit_excess": worst}
        print(f"SmolLM2, {len(weights)} matrices at r = {rank}: {method} {seconds:.2f} s, worst fit excess {worst:.1e}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--full", action="store_true", help="also time one full SVD of 4096 x 4096")
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2's 210 targets: time and worst fit")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sorsa_init.json"))
    args = parser.parse_args()

    config = SorsaConfig(r=args.rank)
    generator = torch.Generator().manual_seed(0)
    seconds = {}
    for name, shape in SHAPES.items():
        weight = torch.randn(*shape, generator=generator).to(args.device)
        run = functools.partial(
            top_singular_triplets, weight, args.rank, config.svd_method, config.svd_niter, config.svd_oversampling
        )
        run()  # warm-up (allocations, GPU kernels)
        seconds[name] = statistics.median(timed(run, args.device)[0] for _ in range(args.repeats))
        print(
            f"{name}: {seconds[name]:.2f} s per matrix ({config.svd_method}, niter {config.svd_niter}, "
            f"oversampling {config.svd_oversampling})"
        )
    total_s = sum(seconds[name] * count for name, count in PER_MODEL.items())
    result = {
        "machine": machine_info(),
        "device": args.device,
        "command": "python benchmarks/sorsa_init.py"
        + (f" --device {args.device}" if args.device != "cpu" else "")
        + (" --full" if args.full else "")
        + (" --smollm2" if args.smollm2 else ""),
        "svd": {
            "method": config.svd_method,
            "niter": config.svd_niter,
            "oversampling": config.svd_oversampling,
            "rank": args.rank,
        },
        "seconds_per_matrix": seconds,
        "llama2_7b_224_matrices_s": total_s,
        "official_anchor_h": OFFICIAL_ANCHOR_H,
        "speedup_vs_anchor": OFFICIAL_ANCHOR_H * 3600 / total_s,
    }
    if args.full:
        weight = torch.randn(4096, 4096, generator=generator).to(args.device)
        result["full_svd_4096x4096_s"] = timed(lambda: top_singular_triplets(weight, args.rank, "full"), args.device)[0]
        print(f"full SVD 4096x4096: {result['full_svd_4096x4096_s']:.1f} s")
    if args.smollm2:
        result["smollm2"] = smollm2_targets(args.rank, args.device)
    print(
        f"Llama-2-7B (224 matrices): {total_s / 60:.1f} min, {result['speedup_vs_anchor']:.0f}x faster than the "
        f"official code's {OFFICIAL_ANCHOR_H} h"
    )
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
