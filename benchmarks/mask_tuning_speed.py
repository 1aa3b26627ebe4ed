"""Masked tuning's training-step time, peak memory and adapter file size, relative to PEFT's LoRA.

Usage::

    python benchmarks/mask_tuning_speed.py            # tiny Llama + SmolLM2-135M
    python benchmarks/mask_tuning_speed.py --quick    # tiny Llama only

Results are printed and written to ``benchmarks/results/mask_tuning_speed.json``.

Variants, all on every linear layer of the attention and MLP blocks (q/k/v/o/gate/up/down_proj):

* ``lora``           PEFT ``LoraConfig(r=16, lora_alpha=16, lora_dropout=0)``, the reference
* ``mask``           ``MaskTuningConfig()``: the defaults (budget mode, scores on the 10% largest-|W| entries)
* ``mask_gd``        the same with ``gradient_dropout=True`` (KL gradient on the first quarter of each batch)
* ``mask_full``      ``MaskTuningConfig(mask_share=1.0)``: a score for every entry (the paper's setting)
* ``mask_full_gd``   the same with the paper's whole-batch gradient dropout (``gradient_dropout_batch_share=1``)

Models: (a) a Llama built from a config (hidden 512, MLP 1376, 4 layers, 8 heads / 4 KV heads, vocabulary
4096), batch 8 x 128 tokens; (b) the embedded SmolLM2-135M-Instruct (``petuning.smollm2.load_smollm2``),
batch 4 x 128 tokens. The batch is fixed random token ids, used as labels too.

One train step, timed from the forward to the end of ``zero_grad``: forward + backward, ``clip_grad_norm_``,
AdamW step with ``petuning.TrainingHooks`` attached (budget schedule over ``MAX_STEPS`` steps, so the timed
steps include masking; gradient dropout runs in its hooks). The variants run interleaved in blocks with a
rotating order, so load on the shared machine falls on all of them alike; reported: median and minimum step
time, their ratios to LoRA. Peak memory: one extra step per variant under
``torch.profiler(profile_memory=True)``; *transient peak* is the maximum of the running sum of allocator events
during the step (activations, gradients, temporaries), *static* is counted from the live tensors (model,
adapter, AdamW state, batch; each storage once); ``peak = static + transient``. Adapter file size: the
``adapter_model.safetensors`` written by ``save_pretrained`` after the timed steps (masks still short of their
budget, so see the real tier's results for trained files), and with ``save_scores=True``.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import peft
import torch
import transformers
from _common import (  # benchmarks/_common.py; also makes petuning importable from a checkout
    MIB,
    RESULTS_DIR,
    TINY_LLAMA,
    interleaved_blocks,
    lora_config,
    profile_allocations,
    storage_bytes,
    utc_now,
    write_json,
)
from peft import PeftConfig, get_peft_model

import petuning
from petuning.smollm2 import load_smollm2
from petuning.testing import build_tiny_model
from petuning.training import set_training_run

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 16
LR = 1e-3  # the recipe's: scores reach the threshold after ~5 steps, so the timed steps mask
MAX_STEPS = 12  # the budget ramp's run length: masks grow during the timed steps
RESULTS = RESULTS_DIR / "mask_tuning_speed.json"


def variants() -> dict[str, Callable[[], PeftConfig]]:
    mask = dict(target_modules=TARGETS, task_type="CAUSAL_LM")
    return {
        "lora": lambda: lora_config(RANK, TARGETS, task_type="CAUSAL_LM"),
        "mask": lambda: petuning.MaskTuningConfig(**mask),
        "mask_gd": lambda: petuning.MaskTuningConfig(gradient_dropout=True, **mask),
        "mask_full": lambda: petuning.MaskTuningConfig(mask_share=1.0, **mask),
        "mask_full_gd": lambda: petuning.MaskTuningConfig(
            mask_share=1.0, gradient_dropout=True, gradient_dropout_batch_share=1.0, **mask
        ),
    }


class Runner:
    def __init__(self, base: torch.nn.Module, config: PeftConfig, batch: torch.Tensor):
        self.model = get_peft_model(base, config)
        self.model.train()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=LR, weight_decay=0.0)
        self.hooks = petuning.TrainingHooks(self.model, self.optimizer, peak_lr=LR, max_steps=MAX_STEPS)
        self.batch = batch

    def step(self) -> float:
        t0 = time.perf_counter()
        self.model(input_ids=self.batch, labels=self.batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def static_mib(self) -> float:
        tensors = list(self.model.parameters()) + list(self.model.buffers()) + [self.batch]
        tensors += [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        return storage_bytes(tensors, set()) / MIB

    def memory(self) -> dict[str, float]:
        static = self.static_mib()
        peak = profile_allocations(self.step)[0]
        return {"static_mib": static, "transient_peak_mib": peak / MIB, "peak_mib": static + peak / MIB}

    def adapter_bytes(self, **config_overrides) -> int:
        """Size of the final adapter file: saved outside the training run (a checkpoint written during it also
        carries the scores, like ``save_scores=True``)."""
        for key, value in config_overrides.items():
            setattr(self.model.peft_config["default"], key, value)
        set_training_run(self.model, False)
        try:
            with tempfile.TemporaryDirectory() as directory:
                self.model.save_pretrained(directory)
                return os.path.getsize(Path(directory) / "adapter_model.safetensors")
        finally:
            set_training_run(self.model, True)


def bench(
    name: str,
    make_base: Callable[[], torch.nn.Module],
    batch_size: int,
    seq: int,
    warmup: int,
    repeats: int,
    block: int,
) -> dict:
    print(f"\n== {name}: batch {batch_size} x {seq} tokens", flush=True)
    runners: dict[str, Runner] = {}
    batch = None
    for variant, make_config in variants().items():
        base = make_base()
        if batch is None:
            batch = torch.randint(
                0, base.config.vocab_size, (batch_size, seq), generator=torch.Generator().manual_seed(0)
            )
        runners[variant] = Runner(base, make_config(), batch)
    names = list(runners)
    for variant in names:
        for _ in range(warmup):
            runners[variant].step()
    load_before = os.getloadavg()[0]
    times, _ = interleaved_blocks({n: runners[n].step for n in names}, repeats, block)
    load_after = os.getloadavg()[0]
    result = {
        "batch": batch_size,
        "seq": seq,
        "warmup": warmup,
        "repeats": repeats,
        "steps_per_block": block,
        "load_avg_1min_before_after": [load_before, load_after],
        "variants": {},
        "ratios_to_lora": {},
    }
    for variant, runner in runners.items():
        gc.collect()
        result["variants"][variant] = {
            "step_s_median": statistics.median(times[variant]),
            "step_s_min": min(times[variant]),
            "n_steps": len(times[variant]),
            "trainable_params": sum(p.numel() for p in runner.trainable),
            "memory": runner.memory(),
            "adapter_file_bytes": runner.adapter_bytes(),
        }
        if variant != "lora":
            result["variants"][variant]["masked_share_after_steps"] = runner.model.masked_share()
            result["variants"][variant]["adapter_file_bytes_with_scores"] = runner.adapter_bytes(save_scores=True)
    lora = result["variants"]["lora"]
    for variant in names[1:]:
        v = result["variants"][variant]
        result["ratios_to_lora"][variant] = {
            "step_time_median": v["step_s_median"] / lora["step_s_median"],
            "step_time_min": v["step_s_min"] / lora["step_s_min"],
            "peak_memory": v["memory"]["peak_mib"] / lora["memory"]["peak_mib"],
            "transient_memory": v["memory"]["transient_peak_mib"] / lora["memory"]["transient_peak_mib"],
            "adapter_file_size": v["adapter_file_bytes"] / lora["adapter_file_bytes"],
            "trainable_params": v["trainable_params"] / lora["trainable_params"],
        }
    for variant in names:
        v = result["variants"][variant]
        ratio = result["ratios_to_lora"].get(variant, {})
        print(
            f"  {variant:12s} step {v['step_s_median']:.3f}s (min {v['step_s_min']:.3f}s)"
            f"  peak {v['memory']['peak_mib']:.0f} MiB  file {v['adapter_file_bytes'] / 1024:.0f} KiB"
            + (
                f"  | x LoRA: time {ratio['step_time_median']:.2f} (min {ratio['step_time_min']:.2f}),"
                f" memory {ratio['peak_memory']:.2f}, file {ratio['adapter_file_size']:.2f}"
                if ratio
                else ""
            ),
            flush=True,
        )
    del runners
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny Llama only")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps-per-block", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    results = {
        "benchmark": "mask_tuning_speed",
        "date": utc_now(),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "versions": {"torch": torch.__version__, "peft": peft.__version__, "transformers": transformers.__version__},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "target_modules": TARGETS,
        "lora_rank": RANK,
        "models": {},
    }
    results["models"]["tiny_llama"] = bench(
        "tiny_llama",
        lambda: build_tiny_model("llama", seed=0, **TINY_LLAMA),
        8,
        128,
        args.warmup,
        args.repeats,
        args.steps_per_block,
    )
    if not args.quick:
        results["models"]["smollm2_135m"] = bench(
            "smollm2_135m", lambda: load_smollm2()[0], 4, 128, args.warmup, args.repeats, args.steps_per_block
        )
    write_json(args.out, results)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
