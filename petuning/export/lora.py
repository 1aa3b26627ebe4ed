"""Converting any additive petuning adapter to a standard peft LoRA adapter by SVD of each layer's ΔW."""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from peft import LoraConfig, PeftModel, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

from petuning.export.merge import _tuner_layers, method_name


@dataclass
class LayerConversion:
    """How one layer's update ΔW was expressed as a LoRA product."""

    module: str
    shape: tuple[int, ...]
    """Shape of ΔW in the base weight's layout."""
    delta_rank: int
    """Numerical rank of ΔW as the matrix LoRA factors (singular values above max(rows, cols) * eps(dtype) * σ_max,
    as ``torch.linalg.matrix_rank``)."""
    lora_rank: int
    relative_error: float
    """||ΔW - B A||_F / ||ΔW||_F (0 when ΔW = 0)."""

    @property
    def exact(self) -> bool:
        return self.delta_rank <= self.lora_rank


@dataclass
class LoraConversion:
    config: LoraConfig
    state_dict: dict[str, torch.Tensor]
    layers: list[LayerConversion] = field(default_factory=list)
    relative_error: float = 0.0
    """Over all layers: sqrt(sum ||ΔW - B A||²) / sqrt(sum ||ΔW||²)."""

    @property
    def exact(self) -> bool:
        return all(layer.exact for layer in self.layers)

    def report(self) -> str:
        lines = [f"{'module':60s} {'shape':>12s} {'rank(ΔW)':>9s} {'LoRA r':>7s} {'rel. error':>11s}"]
        for layer in self.layers:
            shape = "x".join(map(str, layer.shape))
            lines.append(
                f"{layer.module:60s} {shape:>12s} {layer.delta_rank:9d} {layer.lora_rank:7d} {layer.relative_error:11.3e}"
            )
        verdict = "exact (every ΔW fits its rank)" if self.exact else "truncated SVD"
        lines.append(f"overall relative error {self.relative_error:.3e}: {verdict}")
        return "\n".join(lines)


def adapter_to_lora(
    peft_model: PeftModel, rank: Optional[int] = None, adapter_name: Optional[str] = None
) -> LoraConversion:
    """Express an additive petuning adapter as a standard peft LoRA adapter.

    For every adapted layer, ΔW = ``layer.get_delta_weight(adapter_name)`` (the dense update in the base weight's
    layout), arranged as the matrix peft's LoRA layer of that type factors (:func:`_lora_layout`: (out, in) for linear
    layers, also for convolutions with the kernel flattened into the columns, (dim, num) for embeddings), is
    decomposed as U diag(σ) Vᵀ in float64 and the LoRA factors are ``B = U_k diag(√σ_k)``, ``A = diag(√σ_k) V_kᵀ``,
    with scaling 1
    (``lora_alpha = r`` per layer). k = rank(ΔW) when ``rank`` is None (always exact), else min(rank, rank(ΔW)),
    truncating where ΔW's rank exceeds it. Modules trained in full (``modules_to_save``) are copied.
    Non-additive adapters (a layer whose ``supports_lora_conversion`` is False, e.g. PAT) are refused.
    """
    name = adapter_name or peft_model.active_adapter
    config = peft_model.peft_config[name]
    method = method_name(config).upper()
    if rank is not None and (not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"The LoRA rank must be a positive integer, got {rank!r}.")
    if getattr(config, "trainable_token_indices", None):
        raise ValueError(f"{method} adapters with trainable_token_indices cannot be converted to LoRA yet.")
    layers = [(n, m) for n, m in _tuner_layers(peft_model) if name in _adapter_names(m)]
    refused = [n for n, m in layers if not m.supports_lora_conversion(name)]
    if not layers or refused:
        where = (
            f"layer {refused[0]!r} of this {method} adapter does not declare one (supports_lora_conversion() is "
            "False; PAT, for example, scales the residual stream instead of adding to weights)"
            if refused
            else f"this {method} adapter has no layers with a weight update"
        )
        raise ValueError(
            f"--format lora needs an additive adapter (every layer adds an update ΔW to its weight), but {where}. "
            "Export it merged instead (the default format; --prune for PAT)."
        )
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    reports = []
    dropped_total = energy_total = 0.0
    with torch.no_grad():
        for module, layer in layers:
            delta = layer.get_delta_weight(name).detach()
            matrix, pack = _lora_layout(module, layer, delta)
            u, s, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
            tol = (s[0] * max(matrix.shape) * torch.finfo(delta.dtype).eps).item() if s.numel() else 0.0
            delta_rank = int((s > tol).sum()) if s.numel() and s[0] > 0 else 0
            k = max(1, delta_rank if rank is None else min(rank, delta_rank))
            root = s[:k].sqrt()
            lora_b, lora_a = u[:, :k] * root, root[:, None] * vh[:k]
            energy, dropped = float(s.square().sum()), float(s[k:].square().sum())
            dropped_total, energy_total = dropped_total + dropped, energy_total + energy
            reports.append(
                LayerConversion(
                    module, tuple(delta.shape), delta_rank, k, math.sqrt(dropped / energy) if energy else 0.0
                )
            )
            for suffix, tensor in pack(lora_a.to(torch.float32), lora_b.to(torch.float32)).items():
                state[f"base_model.model.{module}.{suffix}"] = tensor.contiguous()
            ranks[module] = k
        for key, value in get_peft_model_state_dict(peft_model, adapter_name=name).items():
            if peft_model.base_model.prefix not in key:  # modules_to_save and trained biases
                state[key] = value.detach().clone()

    larger = [x.module for x in reports if x.lora_rank * sum(_matrix_shape(x.shape)) > math.prod(x.shape)]
    if larger:
        warnings.warn(
            f"The LoRA factors of {len(larger)} layer(s) (e.g. {larger[0]!r}) hold more numbers than the dense update "
            "they encode, because the update has a high rank (sparse updates usually do). Consider --lora-rank "
            "(a truncated, reported approximation) or the merged export.",
            UserWarning,
            stacklevel=2,
        )
    r = max(ranks.values())
    patterns = {f"^{re.escape(m)}$": k for m, k in ranks.items() if k != r}
    bias = getattr(config, "bias", "none") or "none"
    lora_config = LoraConfig(
        r=r,
        lora_alpha=r,
        rank_pattern=patterns,
        alpha_pattern=dict(patterns),
        target_modules=sorted(ranks),
        fan_in_fan_out=any(getattr(layer, "fan_in_fan_out", False) for _, layer in layers),  # GPT-2's Conv1D
        bias=bias if bias in ("none", "all") else "lora_only",
        modules_to_save=getattr(config, "modules_to_save", None),
        task_type=getattr(config, "task_type", None),
        base_model_name_or_path=config.base_model_name_or_path,
        inference_mode=True,
    )
    return LoraConversion(lora_config, state, reports, math.sqrt(dropped_total / energy_total) if energy_total else 0.0)


def _lora_layout(module: str, layer: BaseTunerLayer, delta: torch.Tensor):
    """ΔW as the matrix that peft's LoRA layer for this base layer type factors as B A, and a function packing the
    factors A (k, cols), B (rows, k) into that layer's state-dict entries.

    Linear (out, in) and transformers' Conv1D (stored (in, out)): ΔW = B A. Embedding (num, dim): ΔWᵀ = B A, stored as
    ``lora_embedding_A`` (k, num) and ``lora_embedding_B`` (dim, k). ConvNd (out, in, *kernel): ΔW reshaped to
    (out, in·prod(kernel)) = B A, with A a conv of the base's kernel and B a 1x1 conv.
    """
    base = layer.get_base_layer()
    if isinstance(base, torch.nn.Embedding):
        return delta.T, lambda a, b: {"lora_embedding_A": a, "lora_embedding_B": b}
    if isinstance(base, torch.nn.modules.conv._ConvNd):
        unsupported = {
            "groups": base.groups != 1,
            "dilation": any(d != 1 for d in base.dilation),
            f"padding_mode={base.padding_mode!r}": base.padding_mode != "zeros",
        }
        unsupported = [feature for feature, present in unsupported.items() if present]
        if unsupported:
            raise ValueError(
                f"{module!r} is a {type(base).__name__} with {', '.join(unsupported)}, which peft's LoRA conv layers "
                "do not reproduce, so --format lora cannot express its update. Export it merged instead."
            )
        ones = (1,) * (delta.ndim - 2)
        return delta.reshape(delta.shape[0], -1), lambda a, b: {
            "lora_A.weight": a.reshape(a.shape[0], *delta.shape[1:]),
            "lora_B.weight": b.reshape(*b.shape, *ones),
        }
    if delta.ndim != 2:
        raise ValueError(f"--format lora does not know the layer type of {module!r} ({type(base).__name__}).")
    matrix = delta.T if getattr(layer, "fan_in_fan_out", False) else delta
    return matrix, lambda a, b: {"lora_A.weight": a, "lora_B.weight": b}


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, cols) of a weight shape flattened to a matrix (any orientation: only the sum and product are used)."""
    return shape[0], math.prod(shape[1:])


def _adapter_names(layer: BaseTunerLayer) -> set[str]:
    names: set[str] = set()
    for attr in layer.adapter_layer_names:
        names.update(getattr(layer, attr, {}).keys())
    return names
