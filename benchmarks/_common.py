"""What the benchmark scripts share: the tiny Llama shape, machine information, the interleaved timing loop, the
allocator-event memory profile, tensor-storage counting and JSON output (the method configs: ``variants.py``).

The scripts run as ``python benchmarks/<name>.py``, which puts ``benchmarks/`` on ``sys.path``, so they import
this module as ``_common``. Importing it also makes ``petuning`` importable from a checkout without
``pip install -e .``.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

try:
    import petuning
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import petuning

import peft
import transformers
from torch.profiler import ProfilerActivity, profile

MIB = 2**20
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# The "tiny Llama" workload: big enough for matrix products to dominate a step, small enough for a shared CPU.
TINY_LLAMA = dict(
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    vocab_size=4096,
    max_position_embeddings=512,
)


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def machine_info() -> dict:
    """Date, CPU, thread count and library versions, recorded with every result."""
    return {
        "date": utc_now(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "petuning": petuning.__version__,
    }


def rotated(names: list[str], shift: int) -> list[str]:
    """``names`` rotated left by ``shift``: repeat ``k`` runs the variants in order ``rotated(names, k)``."""
    shift %= len(names)
    return names[shift:] + names[:shift]


def interleaved_blocks(
    steps: dict[str, Callable[[], float]],
    repeats: int,
    steps_per_block: int,
    budget_s: float | None = None,
    after_block: Callable[[str], None] | None = None,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Times ``steps`` (name -> one timed step returning seconds) in blocks of ``steps_per_block`` steps,
    interleaved, the order rotating every repeat, so slow phases of a shared machine fall on all alike.

    Up to ``repeats`` repeats run; once ``budget_s`` seconds are spent no new repeat starts (at least 2 always
    run). ``after_block(name)`` runs after each variant's block (untimed here). Returns every step's seconds and
    each repeat's block median, per name.
    """
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    block_medians: dict[str, list[float]] = {n: [] for n in names}
    deadline = None if budget_s is None else time.perf_counter() + budget_s
    for rep in range(repeats):
        if deadline is not None and rep >= 2 and time.perf_counter() > deadline:
            print(f"  time budget of {budget_s:.0f}s spent: stopping after {rep} repeats", flush=True)
            break
        for name in rotated(names, rep):
            gc.collect()
            block = [steps[name]() for _ in range(steps_per_block)]
            times[name] += block
            block_medians[name].append(statistics.median(block))
            if after_block is not None:
                after_block(name)
        summary = "  ".join(f"{n} {block_medians[n][-1]:.3f}s" for n in names)
        print(f"  repeat {rep + 1}/{repeats}: {summary}", flush=True)
    return times, block_medians


def storage_bytes(tensors: Iterable[torch.Tensor | None], seen: set[int]) -> int:
    """Bytes of the storages behind ``tensors``, each storage counted once across calls sharing ``seen``
    (views and tied weights are not double counted). ``None`` and meta tensors count nothing."""
    total = 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def profile_allocations(step: Callable[[], object]) -> tuple[int, int, int]:
    """Runs ``step`` under ``torch.profiler`` with ``profile_memory=True`` and replays every allocation and free
    of torch's CPU allocator in time order.

    Returns ``(transient_peak, end_delta, n_events)`` in bytes: the maximum of the running sum above what was
    live when the step began, the sum at its end, and the number of allocator events.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # The raw (kineto) event list holds every allocation/free; prof.events() folds most of them into ops.
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak, running, len(events)


def write_json(path: Path, results: dict) -> None:
    """Writes ``results`` to ``path`` (indented, trailing newline) through a temporary file, so an interrupted
    run never leaves a truncated JSON behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)


def write_results(path: Path, results: dict, started: float) -> None:
    """Records the wall time since ``started`` (a ``time.perf_counter()`` value) as ``wall_time_s``, writes
    ``results`` to ``path`` and says so."""
    results["wall_time_s"] = time.perf_counter() - started
    write_json(path, results)
    print(f"\nwrote {path} (total {results['wall_time_s']:.0f}s)")
