"""The speed harness: every method's train-step time, forward-only time, peak memory, adapter file size, merge time
and initialization time, relative to PEFT's LoRA at equal rank, measured in the same run.

Usage::

    python benchmarks/method_speed.py            # tiny Llama + SmolLM2-135M + the conv net, about 25 min on 2 cores
    python benchmarks/method_speed.py --quick    # tiny Llama only, fewer repeats
    python benchmarks/method_speed.py --variants lora sorsa flora --no-smollm2 --no-convnet
    python benchmarks/method_speed.py --table    # the markdown tables of docs/benchmarks.md, from the JSON
    python benchmarks/method_speed.py --profile-ops sparse_low_rank   # where its step's extra time goes, by operator

Results are printed and written to ``benchmarks/results/method_speed.json``; docs/benchmarks.md and the method pages
quote them. PAT's pruned-model inference has its own script (``pat_inference.py``), as has SORSA's SVD at 7B scale
(``sorsa_init.py``).

Method
------
Variants, configs from ``benchmarks/variants.py`` (the table ``method_comparison`` trains too), all at the same rank
``r`` (default 16) on every linear layer of the attention and MLP blocks (q/k/v/o/gate/up/down_proj):

* ``lora``                PEFT's ``LoraConfig(r, lora_alpha=2r, lora_dropout=0)``, the reference
* ``sorsa``               ``SorsaConfig(r, gamma=4e-4, ortho_mode="official")``: the paper's regularizer, whose
                          gradient is added after clipping, before the optimizer step
* ``sorsa_gamma0``        ``SorsaConfig(r, gamma=0)``: the same adapter without the regularizer
* ``flora``               ``FloraConfig(r)``: r x r Tucker core between U_in (in, r) and U_out (out, r)
* ``sparse_low_rank``     ``SparseLowRankConfig(r, alpha=2r, density=0.01)``: LoRA part plus 1% sparse values (random support)
* ``sparse_low_rank_dense_masked``  the same adapter (same parameters and support) whose sparse part is computed
                          densely, as SLTrain's and SaRA's code does: every forward scatters the values into a dense
                          out x in matrix and multiplies by it, so autograd forms the dense gradient too
* ``mask_tuning``         ``MaskTuningConfig()``: the defaults (budget mode, scores on the 10% largest-|W| entries)
* ``mask_tuning_gd``      the same with gradient dropout (KL gradient on the first quarter of each batch)
* ``mask_tuning_full``    the paper's setting: a score for every entry, ``mask_mode="threshold"``
* ``mask_tuning_full_gd`` the same with the paper's whole-batch gradient dropout
* ``pat``                 ``PatConfig(pruning_ratio=0.25, hsm_rank=r, lora_r=r)``: HSMs on the residual stream plus
                          the paper's LoRA, mask schedule running

``petuning.TrainingHooks`` is attached for every variant (for LoRA it finds no provider and costs only its module
walk), with a run of 1000 steps (PAT's schedule), 12 for masked tuning (its budget ramp's length). In the few timed
steps no score reaches the threshold, so nothing is masked yet (``masked_share_after_steps`` in the JSON); the step
does the same work either way (the masked-weight copy and the backward's ``Gᵀx``).

Workloads: (a) ``tiny_llama``, a Llama built from a config (hidden 512, MLP 1376, 4 layers, 8 heads / 4 KV heads,
vocabulary 4096), batch 8 x 128 tokens; (b) ``smollm2_135m``, the embedded SmolLM2-135M-Instruct, batch 4 x 128
tokens (fixed random token ids, used as labels too); (c) ``convnet``, a small CNN on 32 x 32 RGB images (stem
3->32, then 3x3 32->64, 3x3 64->64, 3x3 stride-2 64->128, 1x1 128->128, global pooling, linear head), batch 32,
cross-entropy on random labels, its four convolutions after the stem targeted: LoRA at r 8 against FLoRA at the
integer rank whose trainable count is closest (convolution kernel modes at full rank).

One train step, timed with ``time.perf_counter`` from the forward to the end of ``zero_grad``::

    loss = model(input_ids=x, labels=x).loss; loss.backward()
    clip_grad_norm_(trainable, 1.0); optimizer.step()      # AdamW; petuning.TrainingHooks run inside step()
    optimizer.zero_grad(set_to_none=True)

Each step is also split into phases (forward, backward, clip, petuning hooks, AdamW), the hooks phase measured by
optimizer step pre-hooks registered just before and just after TrainingHooks' own.

Noise control: every variant lives in the same process with its own copy of the base model. After ``warmup``
untimed steps each, the variants run in blocks of ``steps_per_block`` steps, interleaved, and the order rotates
every repeat, so slow phases of a shared machine fall on all variants alike. Up to ``repeats`` repeats run; a
per-workload time budget may stop them early (at least 2 always run). Reported per variant: the median and the
minimum step time. Reported per ratio: the ratio of medians (the headline), the median and range of the
per-repeat ratios (the two variants' block medians within one repeat, measured seconds apart), and the ratio of
minima (the least disturbed steps; load only ever adds time). The 1-minute load average is recorded before and
after: above the CPU count, other processes competed for the cores and ratios should be read with their ranges.

Peak memory: one extra, untimed step per variant runs under ``torch.profiler`` with ``profile_memory=True``, which
records every allocation and free of torch's CPU allocator. The running sum of those events gives the tensor
memory allocated during the step above what was live when it began; its maximum is the step's *transient peak*
(activations saved for backward, gradients, temporaries; ``zero_grad`` frees the gradients, so the sum returns to
~0, which is checked). What was live at the start (*static*: model weights, adapter tensors, AdamW state, the
batch) is counted from the tensors themselves, each storage once. ``peak = static + transient``. Not counted:
BLAS/oneDNN scratch space, the Python heap. On CUDA (``--device cuda --dtype bfloat16``, as ``gpu_check.sh`` runs it)
the transient peak comes from the caching allocator's statistics instead, and every timestamp follows a
``torch.cuda.synchronize``. ``--densities`` adds a memory-only sweep: one profiled step of
``sparse_low_rank`` and of its dense-masked twin at each density.

Forward-only: after each block of train steps, the same number of ``torch.no_grad()`` forwards in eval mode (the
adapter unmerged), timed the same way. Adapter file: the ``adapter_model.safetensors`` that ``save_pretrained``
writes after the timed steps, outside the training run (masked tuning: its masks, and with ``save_scores=True``
its scores too). Merge time: ``merge_and_unload()``, once, at the end. Initialization time: ``get_peft_model`` on a
fresh base for every method once (SORSA with ``svd_method="full"`` and ``"randomized"``), loading not timed,
interleaved over ``init_repeats`` repeats; medians.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import (  # benchmarks/_common.py; also makes petuning importable from a checkout
    MIB,
    RESULTS_DIR,
    TINY_LLAMA,
    interleaved_blocks,
    machine_info,
    profile_allocations,
    rotated,
    storage_bytes,
    write_json,
    write_results,
)
from peft import PeftConfig, get_peft_model
from torch import nn
from variants import LM_TARGETS, method_config

import petuning
from petuning.recipe.smollm2 import load_smollm2
from petuning.testing import build_tiny_model
from petuning.training import set_training_run
from petuning.tuners.sparse_low_rank import SparseLowRankLayer

GAMMA = 4e-4  # SORSA paper's regularizer strength
LR = 1e-4
MAX_STEPS = 1000  # run length given to the training hooks (PAT's mask schedule)
MASK_RAMP_STEPS = 12  # masked tuning's budget ramp length (no score crosses the threshold in the timed steps)
RESULTS = RESULTS_DIR / "method_speed.json"
PROFILE_RESULTS = RESULTS_DIR / "method_speed_profile.json"
STEP_TIME_TARGETS = {"sorsa": 1.1, "flora": 1.1, "sparse_low_rank": 1.2}  # train-step targets against LoRA
ADAPTER_PREFIXES = ("lora_", "sorsa_", "flora_", "sparse_low_rank_", "mask_tuning_", "pat_")


# ------------------------------------------------------------------------------------------ variants
@dataclass(frozen=True)
class Variant:
    """A method of ``variants.METHODS`` with option overrides, the hooks' run length, and the dense-masked patch."""

    method: str
    options: dict = field(default_factory=dict)
    max_steps: int = MAX_STEPS
    dense_masked: bool = False


_FULL_MASK = {"mask_share": 1.0, "mask_mode": "threshold"}
VARIANTS = {
    "lora": Variant("lora"),
    "sorsa": Variant("sorsa", {"gamma": GAMMA, "ortho_mode": "official"}),
    "sorsa_gamma0": Variant("sorsa", {"gamma": 0.0}),
    "flora": Variant("flora"),
    "sparse_low_rank": Variant("sparse_low_rank"),
    "sparse_low_rank_dense_masked": Variant("sparse_low_rank", dense_masked=True),
    "mask_tuning": Variant("mask_tuning", max_steps=MASK_RAMP_STEPS),
    "mask_tuning_gd": Variant("mask_tuning", {"gradient_dropout": True}, MASK_RAMP_STEPS),
    "mask_tuning_full": Variant("mask_tuning", _FULL_MASK, MASK_RAMP_STEPS),
    "mask_tuning_full_gd": Variant(
        "mask_tuning", {**_FULL_MASK, "gradient_dropout": True, "gradient_dropout_batch_share": 1.0}, MASK_RAMP_STEPS
    ),
    "pat": Variant("pat"),
}
# get_peft_model timing: every method once, SORSA with both SVD methods
INIT_VARIANTS = {
    "lora": Variant("lora"),
    "sorsa_svd_full": Variant("sorsa", {"svd_method": "full"}),
    "sorsa_svd_randomized": Variant("sorsa", {"svd_method": "randomized"}),
    **{name: VARIANTS[name] for name in ("flora", "sparse_low_rank", "mask_tuning", "pat")},
}


def dense_masked_output(self: SparseLowRankLayer, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
    """SLTrain's and SaRA's formulation of the same adapter: scatter the values into a dense (out, in) matrix."""
    values = self.sparse_low_rank_values[adapter_name]
    x = x.to(values.dtype)
    dense = torch.zeros(self.out_features * self.in_features, dtype=values.dtype, device=values.device)
    dense = dense.index_put((self.sparse_low_rank_indices[adapter_name].long(),), values)
    out = F.linear(x, dense.view(self.out_features, self.in_features))
    a, b = self.sparse_low_rank_A[adapter_name], self.sparse_low_rank_B[adapter_name]
    return out + F.linear(F.linear(x, a), b) * self.sparse_low_rank_scaling[adapter_name]


def build_variant(variant: Variant, base: nn.Module, config: PeftConfig) -> nn.Module:
    model = get_peft_model(base, config)
    if variant.dense_masked:
        for layer in model.modules():
            if isinstance(layer, SparseLowRankLayer):
                layer.adapter_output = types.MethodType(dense_masked_output, layer)
    return model


# ----------------------------------------------------------------------------------------- workloads
class ConvNet(nn.Module):
    """A small CNN for 32 x 32 RGB images with 10 classes."""

    TARGETS = ("conv1", "conv2", "conv3", "conv4")

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.conv1 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(64, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, stride=2, padding=1)
        self.conv4 = nn.Conv2d(128, 128, 1)
        self.head = nn.Linear(128, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        for conv in (self.stem, self.conv1, self.conv2, self.conv3, self.conv4):
            images = F.relu(conv(images))
        return self.head(images.mean(dim=(2, 3)))


def seeded_convnet() -> ConvNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ConvNet().eval()


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass
class Workload:
    """A base model, a fixed batch, and how a step computes its loss and a forward its output."""

    name: str
    description: str
    make_base: Callable[[], nn.Module]
    make_batch: Callable[[nn.Module, torch.Generator], dict]
    loss: Callable[[nn.Module, dict], torch.Tensor]
    forward: Callable[[nn.Module, dict], object]
    variants: tuple[str, ...] | None = None  # None: every variant asked for
    ranks: dict[str, int] = field(default_factory=dict)  # per-variant rank overrides (set by ``prepare``)
    targets: list[str] = field(default_factory=lambda: list(LM_TARGETS))
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    _batch: dict | None = field(default=None, repr=False)

    def base(self) -> nn.Module:
        """A fresh copy of the base model on the workload's device, in its dtype."""
        return self.make_base().to(device=self.device, dtype=self.dtype)

    def fixed_batch(self) -> dict:
        """The batch every variant trains on (seed 0), on the workload's device; images in the workload's dtype."""
        if self._batch is None:  # built once: the LM batches read the vocabulary size off a base
            batch = self.make_batch(self.make_base(), torch.Generator().manual_seed(0))
            self._batch = {
                k: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype) for k, v in batch.items()
            }
        return self._batch

    def sync(self) -> None:
        """Wait for the device, so that a perf_counter reading covers the work queued before it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def config(self, name: str, rank: int, **options) -> PeftConfig:
        variant = VARIANTS.get(name) or INIT_VARIANTS[name]
        return method_config(variant.method, self.ranks.get(name, rank), self.targets, **variant.options, **options)

    def prepare(self, rank: int) -> None:
        """The conv net: FLoRA at the integer rank whose trainable count is closest to LoRA's at ``rank``."""
        if self.name != "convnet":
            return
        target = trainable_count(get_peft_model(ConvNet(), method_config("lora", rank, self.targets)))

        def gap(j: int) -> int:
            return abs(trainable_count(get_peft_model(ConvNet(), method_config("flora", j, self.targets))) - target)

        self.ranks["flora"] = min(range(1, 33), key=gap)


def _lm_batch(batch: int, seq: int) -> Callable[[nn.Module, torch.Generator], dict]:
    def make(base: nn.Module, generator: torch.Generator) -> dict:
        return {"input_ids": torch.randint(0, base.config.vocab_size, (batch, seq), generator=generator)}

    return make


def lm_workload(name: str, description: str, make_base, batch: int, seq: int) -> Workload:
    return Workload(
        name,
        f"{description}; batch {batch} x {seq} tokens",
        make_base,
        _lm_batch(batch, seq),
        loss=lambda model, b: model(input_ids=b["input_ids"], labels=b["input_ids"]).loss,
        forward=lambda model, b: model(input_ids=b["input_ids"]),
    )


def workloads() -> dict[str, Workload]:
    tiny = "Llama from config: " + ", ".join(f"{k}={v}" for k, v in TINY_LLAMA.items())
    return {
        "tiny_llama": lm_workload("tiny_llama", tiny, lambda: build_tiny_model("llama", seed=0, **TINY_LLAMA), 8, 128),
        "smollm2_135m": lm_workload(
            "smollm2_135m", "SmolLM2-135M-Instruct (float32)", lambda: load_smollm2()[0], 4, 128
        ),
        "convnet": Workload(
            "convnet",
            ConvNet.__doc__ + " Batch 32 x 3 x 32 x 32; targets " + ", ".join(ConvNet.TARGETS),
            seeded_convnet,
            lambda base, g: {
                "images": torch.randn(32, 3, 32, 32, generator=g),
                "labels": torch.randint(0, 10, (32,), generator=g),
            },
            loss=lambda model, b: F.cross_entropy(model(b["images"]), b["labels"]),
            forward=lambda model, b: model(b["images"]),
            variants=("lora", "flora"),
            targets=list(ConvNet.TARGETS),
        ),
    }


# -------------------------------------------------------------------------------------------- runner
class StepRunner:
    """One adapted model with its optimizer, hooks and fixed batch; runs and times train steps."""

    PHASES = ("forward", "backward", "clip", "hooks", "adamw")

    def __init__(self, workload: Workload, variant: Variant, config: PeftConfig, batch: dict):
        self.workload, self.batch = workload, batch
        self.model = build_variant(variant, workload.base(), config)
        self.model.train()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=LR)
        # Timestamps around TrainingHooks' pre-hook: pre-hooks run in registration order.
        self._marks: dict[str, float] = {}
        self.optimizer.register_step_pre_hook(lambda *_: self._mark("hooks_start"))
        self.hooks = petuning.TrainingHooks(self.model, self.optimizer, peak_lr=LR, max_steps=variant.max_steps)
        self.optimizer.register_step_pre_hook(lambda *_: self._mark("hooks_end"))

    def _mark(self, key: str) -> None:
        self.workload.sync()
        self._marks[key] = time.perf_counter()

    def step(self) -> dict[str, float]:
        """One full train step; returns its total and per-phase seconds."""
        sync = self.workload.sync
        sync()
        t0 = time.perf_counter()
        loss = self.workload.loss(self.model, self.batch)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        sync()
        t3 = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync()
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
        self.workload.sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            self.workload.forward(self.model, self.batch)
        self.workload.sync()
        seconds = time.perf_counter() - t0
        self.model.train()
        return seconds

    def merge_seconds(self) -> float:
        """Seconds of ``merge_and_unload()`` (destroys the runner's adapter; call last)."""
        self.workload.sync()
        t0 = time.perf_counter()
        self.model.merge_and_unload()
        self.workload.sync()
        return time.perf_counter() - t0

    def adapter_file(self) -> dict[str, float]:
        """Size of ``adapter_model.safetensors`` saved outside the training run (masked tuning: also with scores)."""
        config = self.model.peft_config["default"]
        sizes = {"adapter_file_bytes": self._saved_bytes()}
        if isinstance(config, petuning.MaskTuningConfig):
            config.save_scores = True
            sizes["adapter_file_bytes_with_scores"] = self._saved_bytes()
            config.save_scores = False
            sizes["masked_share_after_steps"] = self.model.masked_share()
        return sizes

    def _saved_bytes(self) -> int:
        set_training_run(self.model, False)  # a checkpoint during the run carries what resuming needs
        try:
            with tempfile.TemporaryDirectory() as directory:
                self.model.save_pretrained(directory)
                return (Path(directory) / "adapter_model.safetensors").stat().st_size
        finally:
            set_training_run(self.model, True)

    # ------------------------------------------------------------------------------------ memory
    def static_bytes(self) -> dict[str, int]:
        """Bytes of tensors live between steps, each storage counted once."""
        seen: set[int] = set()

        def size(tensors) -> int:
            return storage_bytes(tensors, seen)

        named = list(self.model.named_parameters()) + list(self.model.named_buffers())
        adapter = size(t for n, t in named if any(p in n for p in ADAPTER_PREFIXES))
        base = size(t for _, t in named)
        opt_state = size(v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v))
        grads = size(p.grad for p in self.trainable)
        batch = size(self.batch.values())
        return {
            "base_model": base,
            "adapter_tensors": adapter,
            "optimizer_state": opt_state,
            "grads_between_steps": grads,
            "batch": batch,
            "total": base + adapter + opt_state + grads + batch,
        }

    def profile_step_memory(self) -> dict[str, float]:
        """Transient peak of tensor memory during one step above the step's start (CPU: allocator events, CUDA: its
        statistics), with the static tensors."""
        gc.collect()
        static = self.static_bytes()
        if self.workload.device.type == "cuda":  # the caching allocator's own statistics
            torch.cuda.reset_peak_memory_stats(self.workload.device)
            start = torch.cuda.memory_allocated(self.workload.device)
            self.step()
            peak = torch.cuda.max_memory_allocated(self.workload.device) - start
            running, n_events = torch.cuda.memory_allocated(self.workload.device) - start, None
        else:
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
    workload: Workload, rank: int, warmup: int, repeats: int, steps_per_block: int, budget_s: float, names: list[str]
) -> dict:
    names = [n for n in names if workload.variants is None or n in workload.variants]
    workload.prepare(rank)
    print(f"\n== {workload.name}: {workload.description}; r={rank}", flush=True)
    batch = workload.fixed_batch()
    runners: dict[str, StepRunner] = {}
    init_seconds: dict[str, float] = {}
    for name in names:
        t = time.perf_counter()
        runners[name] = StepRunner(workload, VARIANTS[name], workload.config(name, rank), batch)
        init_seconds[name] = time.perf_counter() - t  # includes building the base: see bench_init for get_peft_model
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

    results = {}
    for name in names:
        runner = runners[name]
        totals = [s["total"] for s in steps[name]]
        results[name] = {
            "trainable_params": trainable_count(runner.model),
            "rank": workload.ranks.get(name, rank),
            "step_s_median": median(totals),
            "step_s_min": min(totals),
            "step_s_max": max(totals),
            "n_steps": len(totals),
            "phases_s_median": {p: median([s[p] for s in steps[name]]) for p in StepRunner.PHASES},
            "forward_only_s_median": median(forwards[name]),
            "build_s": init_seconds[name],
            "memory": runner.profile_step_memory(),
            **runner.adapter_file(),
        }
        results[name]["merge_and_unload_s"] = runner.merge_seconds()
    runners.clear()
    gc.collect()
    return {
        "model": workload.description,
        "rank": rank,
        "target_modules": workload.targets,
        "warmup_steps": warmup,
        "repeats": len(block_medians[names[0]]),
        "steps_per_block": steps_per_block,
        "time_budget_s": budget_s,
        "loadavg_1min_before_after": [load_before, load_after],
        "variants": results,
        "ratios": ratios(results, block_medians),
    }


def ratios(results: dict[str, dict], block_medians: dict[str, list[float]]) -> dict[str, dict]:
    """Every variant against LoRA, and sparse-plus-low-rank against its dense-masked twin."""
    pairs = [(name, "lora") for name in results if name != "lora"]
    if {"sparse_low_rank", "sparse_low_rank_dense_masked"} <= set(results):
        pairs.append(("sparse_low_rank", "sparse_low_rank_dense_masked"))
    out = {}
    for name, reference in pairs:
        a, b = results[name], results[reference]
        paired = [s / r for s, r in zip(block_medians[name], block_medians[reference])]
        out[f"{name}/{reference}"] = {
            "trainable_params": a["trainable_params"] / b["trainable_params"],
            "step_time": a["step_s_median"] / b["step_s_median"],
            "step_time_min": a["step_s_min"] / b["step_s_min"],
            "step_time_paired_median": median(paired),
            "step_time_paired_range": [min(paired), max(paired)],
            "forward_only_time": a["forward_only_s_median"] / b["forward_only_s_median"],
            "merge_time": a["merge_and_unload_s"] / b["merge_and_unload_s"],
            "peak_memory": a["memory"]["peak_mib"] / b["memory"]["peak_mib"],
            "transient_memory": a["memory"]["transient_peak_mib"] / b["memory"]["transient_peak_mib"],
            "adapter_file_size": a["adapter_file_bytes"] / b["adapter_file_bytes"],
        }
    return out


def bench_density_memory(workload: Workload, rank: int, densities: list[float]) -> dict:
    """Peak memory of one step of sparse-plus-low-rank and its dense-masked twin at each density."""
    batch = workload.fixed_batch()
    out = {}
    for density in densities:
        for name in ("sparse_low_rank", "sparse_low_rank_dense_masked"):
            runner = StepRunner(workload, VARIANTS[name], workload.config(name, rank, density=density), batch)
            runner.step()  # AdamW state exists from here on, as in training
            out[f"{name}@{density:g}"] = {
                "trainable_params": trainable_count(runner.model),
                "memory": runner.profile_step_memory(),
            }
            print(
                f"  memory {name} at density {density:g}: peak {out[f'{name}@{density:g}']['memory']['peak_mib']:.0f} MiB"
            )
            del runner
            gc.collect()
    return out


def bench_init(workload: Workload, rank: int, repeats: int, names: list[str]) -> dict:
    """Median wall time of get_peft_model on a fresh base: every method, SORSA with full and randomized SVD."""
    print(f"\n== init time on {workload.name} (get_peft_model, {repeats} interleaved repeats)", flush=True)
    methods = {VARIANTS[n].method for n in names}
    init_names = [n for n, variant in INIT_VARIANTS.items() if variant.method in methods]
    times: dict[str, list[float]] = {n: [] for n in init_names}
    for rep in range(repeats):
        for name in rotated(init_names, rep):
            base = workload.base()
            config = workload.config(name, rank)
            gc.collect()
            workload.sync()
            t = time.perf_counter()
            model = get_peft_model(base, config)
            workload.sync()
            times[name].append(time.perf_counter() - t)
            del model, base
        print("  repeat {}/{}: {}".format(rep + 1, repeats, "  ".join(f"{n} {times[n][-1]:.2f}s" for n in init_names)))
    result = {n: {"s_median": median(t), "s_all": t} for n, t in times.items()}
    lora = result["lora"]["s_median"]
    return {
        "model": workload.description,
        "rank": rank,
        "variants": result,
        "ratios": {f"{n}/lora": result[n]["s_median"] / lora for n in init_names if n != "lora"},
    }


# -------------------------------------------------------------------------------------------- report
def print_training_table(name: str, res: dict) -> None:
    print(
        f"\n{name}  (r={res['rank']}, {res['repeats']} repeats x {res['steps_per_block']} steps, load avg "
        f"{res['loadavg_1min_before_after'][0]:.1f} -> {res['loadavg_1min_before_after'][1]:.1f})"
    )
    print(
        f"  {'variant':<30} {'step med':>9} {'[min,max]':>16} {'fwd':>7} {'bwd':>7} {'clip':>6} {'hooks':>7}"
        f" {'adamw':>6} {'static':>9} {'transient':>10} {'peak':>9} {'file':>9}"
    )
    for v, d in res["variants"].items():
        ph, mem = d["phases_s_median"], d["memory"]
        print(
            f"  {v:<30} {d['step_s_median']:>8.3f}s [{d['step_s_min']:>6.3f},{d['step_s_max']:>6.3f}] "
            f"{ph['forward']:>7.3f} {ph['backward']:>7.3f} {ph['clip']:>6.4f} {ph['hooks']:>7.4f} {ph['adamw']:>6.4f}"
            f" {mem['static_mib']:>7.1f}Mi {mem['transient_peak_mib']:>8.1f}Mi {mem['peak_mib']:>7.1f}Mi"
            f" {d['adapter_file_bytes'] / 1024:>7.0f}Ki"
        )
    for key, r in res["ratios"].items():
        lo, hi = r["step_time_paired_range"]
        target = STEP_TIME_TARGETS.get(key.split("/")[0]) if key.endswith("/lora") else None
        paired = r["step_time_paired_median"]
        verdict = "" if target is None else (" [OK" if paired <= target else " [ABOVE TARGET") + f" {target}x]"
        print(
            f"  {key:<46} step {paired:.3f}x{verdict} (paired {lo:.3f}-{hi:.3f}, minima "
            f"{r['step_time_min']:.3f}x); forward {r['forward_only_time']:.3f}x; peak memory {r['peak_memory']:.3f}x"
        )


def profile_ops(workload: Workload, rank: int, variant: str, warmup: int, steps: int) -> dict:
    """Self CPU seconds per train step by operator (torch.profiler), for ``variant`` and for LoRA on ``workload``,
    and the operators that account for most of the difference, largest first."""
    from torch.profiler import ProfilerActivity, profile

    per_op = {}
    for name in ("lora", variant):
        runner = StepRunner(workload, VARIANTS[name], workload.config(name, rank), workload.fixed_batch())
        for _ in range(warmup):
            runner.step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                runner.step()
        per_op[name] = {e.key: e.self_cpu_time_total / 1e6 / steps for e in prof.key_averages()}
        del runner
        gc.collect()
    ref, new = per_op["lora"], per_op[variant]
    deltas = {op: new.get(op, 0.0) - ref.get(op, 0.0) for op in set(ref) | set(new)}
    top = sorted(deltas, key=lambda op: -abs(deltas[op]))[:15]
    return {
        "workload": workload.description,
        "steps": steps,
        "step_self_cpu_s": {"lora": sum(ref.values()), variant: sum(new.values())},
        "top_differences_s": {
            op: {"lora": ref.get(op, 0.0), variant: new.get(op, 0.0), "delta": deltas[op]} for op in top
        },
    }


def _file_size(n_bytes: int) -> str:
    """``n_bytes`` in MiB, or in KiB below half a MiB (a masked-tuning file can be a few KiB)."""
    return f"{n_bytes / 2**20:.1f} MiB" if n_bytes >= 2**19 else f"{n_bytes / 2**10:.1f} KiB"


def markdown_tables(results: dict) -> str:
    """The tables of docs/benchmarks.md: per workload, every variant's ratios to LoRA; then init times."""
    lines = []
    for name, res in results["training"].items():
        load = max(res["loadavg_1min_before_after"])
        lines += [
            f"{name} ({res['model']}, r = {res['rank']}, load average up to {load:.1f}):",
            "",
            "| variant | trainable | train step / LoRA (paired range) | forward-only / LoRA | peak tensor memory / LoRA "
            "| adapter file | merge_and_unload |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for variant, d in res["variants"].items():
            file = _file_size(d["adapter_file_bytes"])
            if "adapter_file_bytes_with_scores" in d:
                file += f" ({_file_size(d['adapter_file_bytes_with_scores'])} with scores)"
            if variant == "lora":
                cells = [f"{d['step_s_median']:.3f} s", f"{d['forward_only_s_median']:.3f} s",
                         f"{d['memory']['peak_mib']:.0f} MiB"]  # fmt: skip
            else:
                r = res["ratios"][f"{variant}/lora"]
                lo, hi = r["step_time_paired_range"]
                cells = [f"{r['step_time_paired_median']:.2f}× ({lo:.2f}–{hi:.2f})", f"{r['forward_only_time']:.2f}×",
                         f"{r['peak_memory']:.2f}×"]  # fmt: skip
            lines.append(
                f"| {variant} | {d['trainable_params']:,} | {' | '.join(cells)} | {file} | {d['merge_and_unload_s']:.2f} s |"
            )
        lines.append("")
    for name, res in results.get("density_memory", {}).items():
        lines += [f"Peak tensor memory of one step against the density, {name}:", ""]
        lines += ["| variant | trainable | peak | transient |", "| --- | --- | --- | --- |"]
        for key, d in res.items():
            mem = d["memory"]
            lines.append(
                f"| {key} | {d['trainable_params']:,} | {mem['peak_mib']:.0f} MiB | {mem['transient_peak_mib']:.0f} MiB |"
            )
        lines.append("")
    for name, res in results["init"].items():
        times = ", ".join(f"{v} {d['s_median']:.2f} s" for v, d in res["variants"].items())
        lines.append(f"`get_peft_model` on {name}: {times}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny Llama only, few repeats (a few minutes)")
    parser.add_argument("--no-tiny-llama", action="store_true", help="skip the tiny Llama")
    parser.add_argument("--no-smollm2", action="store_true", help="skip SmolLM2-135M")
    parser.add_argument("--no-convnet", action="store_true", help="skip the conv net (FLoRA's convolutions)")
    parser.add_argument("--repeats", type=int, default=None, help="max interleaved repeats (default 8, quick 4)")
    parser.add_argument(
        "--steps-per-block", type=int, default=None, help="timed steps per variant per repeat (default 2, quick 1)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per variant (default 2, quick 1)")
    parser.add_argument("--init-repeats", type=int, default=3, help="repeats of the init-time measurement (0: skip)")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds per workload for the timed repeats (default: 40 quick, 120 tiny Llama, 240 SmolLM2, 30 conv)",
    )
    parser.add_argument("--rank", type=int, default=16, help="rank of the language models (the conv net: 8)")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        help="variants to run (lora, the reference, is always included)",
    )
    parser.add_argument(
        "--densities",
        type=float,
        nargs="*",
        default=None,
        help="memory-only sweep of sparse_low_rank and its dense-masked twin (default 0.001 0.05; quick: none)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads(N) first (default: leave torch's as it is)"
    )
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda[:N] (memory then from CUDA's allocator statistics)"
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the base models' dtype")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--table", action="store_true", help="print the markdown tables of --out and stop")
    parser.add_argument(
        "--profile-ops",
        metavar="VARIANT",
        choices=[v for v in VARIANTS if v != "lora"],
        help=f"only profile one train step of VARIANT against LoRA by operator (SmolLM2 unless --no-smollm2); "
        f"writes {PROFILE_RESULTS.name}",
    )
    args = parser.parse_args(argv)
    if args.table:
        print(markdown_tables(json.loads(args.out.read_text())))
        return
    command = " ".join(["python", "benchmarks/method_speed.py", *(sys.argv[1:] if argv is None else argv)])
    if args.profile_ops:
        workload = workloads()["tiny_llama" if args.no_smollm2 else "smollm2_135m"]
        workload.device, workload.dtype = torch.device(args.device), getattr(torch, args.dtype)
        result = profile_ops(workload, args.rank, args.profile_ops, warmup=2, steps=args.steps_per_block or 2)
        result["command"], result["machine"] = command, machine_info()
        totals = result["step_self_cpu_s"]
        print(f"self CPU per step: lora {totals['lora']:.3f} s, {args.profile_ops} {totals[args.profile_ops]:.3f} s")
        for op, d in result["top_differences_s"].items():
            print(
                f"  {op:<44} lora {d['lora']:7.3f} s  {args.profile_ops} {d[args.profile_ops]:7.3f} s  {d['delta']:+.3f} s"
            )
        write_json(PROFILE_RESULTS, result)
        return
    args.variants = ["lora"] + [v for v in args.variants if v != "lora"]
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (4 if args.quick else 8)
    steps_per_block = args.steps_per_block or (1 if args.quick else 2)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    densities = args.densities if args.densities is not None else ([] if args.quick else [0.001, 0.05])
    started = time.perf_counter()

    available = workloads()
    for workload in available.values():
        workload.device, workload.dtype = torch.device(args.device), getattr(torch, args.dtype)
    chosen = [] if args.no_tiny_llama and not args.quick else ["tiny_llama"]
    if not (args.quick or args.no_smollm2):
        chosen.append("smollm2_135m")
    if not (args.quick or args.no_convnet) and "flora" in args.variants:
        chosen.append("convnet")
    results = {
        "command": command,
        "machine": machine_info(),
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(torch.device(args.device)),
        "dtype": args.dtype,
        "method": __doc__.split("Method\n------\n")[1].strip(),
        "target_step_time_ratios": STEP_TIME_TARGETS,
        "training": {},
        "density_memory": {},
        "init": {},
    }
    print("machine:", json.dumps(results["machine"]))
    for name in chosen:
        workload = available[name]
        budget = args.budget or (40 if args.quick else {"tiny_llama": 120, "convnet": 30}.get(name, 240))
        rank = 8 if name == "convnet" else args.rank
        results["training"][name] = bench_training(
            workload, rank, warmup, repeats, steps_per_block, budget, args.variants
        )
    if densities and "sparse_low_rank" in args.variants:
        for name in chosen:
            if name != "convnet":
                results["density_memory"][name] = bench_density_memory(available[name], args.rank, densities)
    language_models = [n for n in chosen if n != "convnet"]
    if args.init_repeats and language_models and not args.quick:
        init_on = language_models[-1]  # SmolLM2 unless --no-smollm2
        results["init"][init_on] = bench_init(available[init_on], args.rank, args.init_repeats, args.variants)

    print("\n" + "=" * 100)
    print("Train step = forward + backward + clip + AdamW step incl. petuning.TrainingHooks; seconds are medians.")
    print("Memory: static = tensors live between steps (counted exactly); transient = peak of torch's allocator")
    print(
        "(CPU: its events; CUDA: its statistics) during one profiled step above its start; peak = static + transient."
    )
    loads = [x for r in results["training"].values() for x in r["loadavg_1min_before_after"]]
    if max(loads) > os.cpu_count():
        print(
            f"NOTE: load average reached {max(loads):.1f} on {os.cpu_count()} CPUs: other processes competed for "
            "the cores; absolute times are inflated and ratios noisy (see ranges and ratio of minima)."
        )
    for name, res in results["training"].items():
        print_training_table(name, res)
    print("\n" + markdown_tables(results))
    write_results(args.out, results, started)


if __name__ == "__main__":
    main()
