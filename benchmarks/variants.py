"""The one table of method configs the benchmarks share: ``method_speed.py`` times them against LoRA,
``method_comparison/`` trains them on the toy and real tiers.

``method_config(method, r, **options)`` builds a fresh config (PEFT configs are mutated by ``get_peft_model``, so
callers keep factories, not configs). ``r`` is the rank of every low-rank part; each method's own choices at that
rank are below, and ``options`` override them (e.g. ``density=0.05``, ``scale=1.0``, ``pruning_ratio=0.5``).

| method            | config at rank r (every linear layer of the attention and MLP blocks)                        |
|-------------------|----------------------------------------------------------------------------------------------|
| ``lora``          | PEFT ``LoraConfig(r, lora_alpha=2r, lora_dropout=0)``, the reference                        |
| ``pissa``         | the same with ``init_lora_weights="pissa"`` and ``lora_alpha=r`` (PiSSA's scale 1)           |
| ``sorsa``         | ``SorsaConfig(r)``: the defaults (regularizer gamma 4e-4, randomized SVD)                    |
| ``flora``         | ``FloraConfig(r)``: an r x r core between two factors, scale 2 (the authors' LLM scripts)     |
| ``sparse_low_rank`` | ``SparseLowRankConfig(r, alpha=2r, density=0.01)``: low-rank part plus 1% sparse values     |
| ``mask_tuning``   | ``MaskTuningConfig()``: the defaults (budget mode, scores on the 10% largest-abs(W) entries) |
|                   | (rank-free: ``r`` is ignored)                                                                |
| ``pat``           | ``PatConfig(pruning_ratio=0.25, hsm_rank=r, lora_r=r, lora_alpha=2r, lora_dropout=0)``       |
"""

from __future__ import annotations

from collections.abc import Callable

from peft import LoraConfig, PeftConfig

import petuning

#: Every linear layer of a Llama block's attention and MLP.
LM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora(r: int, targets, **options) -> PeftConfig:
    return LoraConfig(**{"r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0, "target_modules": targets, **options})


METHODS: dict[str, Callable[..., PeftConfig]] = {
    "lora": _lora,
    "pissa": lambda r, targets, **options: _lora(r, targets, init_lora_weights="pissa", lora_alpha=r, **options),
    "sorsa": lambda r, targets, **options: petuning.SorsaConfig(r=r, target_modules=targets, **options),
    "flora": lambda r, targets, **options: petuning.FloraConfig(r=r, target_modules=targets, **options),
    "sparse_low_rank": lambda r, targets, **options: petuning.SparseLowRankConfig(
        **{"r": r, "alpha": 2 * r, "density": 0.01, "target_modules": targets, **options}
    ),
    "mask_tuning": lambda r, targets, **options: petuning.MaskTuningConfig(target_modules=targets, **options),
    # PAT adapts the residual stream and its LoRA's own default targets; ``targets`` does not apply
    "pat": lambda r, targets, **options: petuning.PatConfig(
        **{"pruning_ratio": 0.25, "hsm_rank": r, "lora_r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0, **options}
    ),
}


def method_config(method: str, r: int, targets=LM_TARGETS, **options) -> PeftConfig:
    """A fresh config of ``method`` at rank ``r`` on ``targets`` (a list of module names or ``"all-linear"``)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(METHODS)}")
    return METHODS[method](r, targets, **options)
