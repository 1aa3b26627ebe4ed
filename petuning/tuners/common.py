"""Layer-level rules every petuning method shares."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils import resolve_quantization_backend
from peft.utils.other import get_pattern_key
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers.pytorch_utils import Conv1D

NAN_MESSAGE = "NaNs detected in the merged weights. The adapter {} seems to be broken"
"""PEFT's wording for a failed ``safe_merge`` (PEFT's own tests match it)."""


def check_mergeable(layer: BaseTunerLayer, method: str) -> None:
    """Refuse to merge into a forward-only quantized base, and warn before a lossy merge into a bitsandbytes
    or other re-quantized base: the weight is dequantized, updated and quantized again, so the merged model
    no longer matches the adapter model exactly and ``unmerge`` cannot restore the original."""
    backend = layer.quantization_backend
    if backend is None:
        return
    if not backend.supports_merge:
        raise TypeError(
            f"Cannot merge {method} into a {backend} base layer: that quantization format is forward-only. "
            "Load the base in 16/32-bit and merge there."
        )
    warnings.warn(
        f"Merging {method} into a quantized ({backend}) base layer re-quantizes the weight: the merged model "
        "differs from the adapter model by the quantization error, and unmerging cannot restore the original "
        "weight. For an exact merge, load the base in 16/32-bit and merge there.",
        UserWarning,
        stacklevel=3,
    )


def several_ranks() -> bool:
    """Whether an initialized process group has more than one rank (DDP, FSDP2): collectives are then needed."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP2 ``DTensor`` (an all-gather, which autograd reduces back to the shards), or
    ``tensor`` itself. Terms computed outside a module's forward (regularizers, losses on adapter tensors, metrics)
    meet the parameters sharded there."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like_parameter(value: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    """A full ``value`` of ``parameter``'s shape laid out like ``parameter``: this rank's shard of it for an FSDP2
    ``DTensor`` (every rank computed the same ``value``, so no data moves), else ``value``."""
    if not isinstance(parameter, DTensor):
        return value
    return distribute_tensor(value, parameter.device_mesh, parameter.placements, src_data_rank=None)


def adapters_bypassed(layer: BaseTunerLayer) -> bool:
    """True when ``layer``'s forward is just its base layer's: adapters merged, or disabled (unmerged first)."""
    if layer.disable_adapters and layer.merged:
        layer.unmerge()
    return layer.disable_adapters or layer.merged


def is_quantized_linear(module: nn.Module) -> bool:
    """True for a linear layer of one of PEFT's generic quantization backends (bitsandbytes 4/8-bit, HQQ, torchao,
    forward-only formats)."""
    backend = resolve_quantization_backend(module)
    return backend is not None and backend.layer_type == "linear"


# ------------------------------------------------------------------------------------- tuner injection
def base_of(target: nn.Module) -> nn.Module:
    """The module a targeted ``target`` wraps: its base layer if it is already a tuner layer, else itself."""
    return target.get_base_layer() if isinstance(target, BaseTunerLayer) else target


def pattern_value(pattern: Optional[dict], key: str, default):
    """A per-module override such as ``rank_pattern``: the value of the first pattern key that matches module
    ``key`` by PEFT's rules (``get_pattern_key``: the pattern matches the name's end), else ``default``."""
    if not pattern:
        return default
    return pattern.get(get_pattern_key(pattern.keys(), key), default)


def linear_fan_in_fan_out(base: nn.Module, key: str, method: str, requested: bool) -> bool:
    """The weight layout of a linear-like ``base`` at module ``key``: True for transformers' ``Conv1D`` (weight
    (in, out)), False for ``nn.Linear`` and quantized linears (weight (out, in)). A ``requested`` True that does not
    fit warns and is ignored; any other layer type raises a TypeError naming ``method`` and the fix."""
    if isinstance(base, Conv1D):
        return True
    if not (isinstance(base, nn.Linear) or is_quantized_linear(base)):
        raise TypeError(
            f"{method} cannot adapt {key!r} of type {type(base).__name__}: supported layers are torch.nn.Linear, "
            "transformers' Conv1D and bitsandbytes/quantized linear layers. Leave it out of target_modules (or add "
            "it to exclude_modules)."
        )
    if requested:
        warnings.warn(
            f"fan_in_fan_out=True does not fit {key!r} ({type(base).__name__}, (out, in) layout); ignored.",
            stacklevel=2,
        )
    return False


class AdditiveLayerMixin:
    """Forward, ``merge`` and ``unmerge`` for a tuner layer whose update is additive, ``y = base(x) + Σ Δ(x)``.

    The layer provides ``adapter_output(x, adapter_name)`` (the update applied to ``x``, factored, never a dense
    weight) and ``get_delta_weight(adapter_name)`` (the dense update in the base weight's layout and the adapter's
    32/64-bit dtype, for merging and export). Merging forms ``W + ΔW`` in the adapter's dtype and rounds to the base
    dtype once. ``method`` names the method in messages; an adapter is present on the layer when it is a key of the
    first of ``adapter_layer_names``."""

    method: str = ""

    def _forward_additive(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The ``forward`` of an additive layer: base output plus every active adapter's ``adapter_output``."""
        if adapters_bypassed(self):
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        for name in self.active_adapters:
            if self._holds_adapter(name):
                result = self._add_adapter_output(result, x, name)
        return result

    def _add_adapter_output(self, result: torch.Tensor, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return result + self.adapter_output(x, adapter_name).to(result.dtype)

    def _holds_adapter(self, adapter_name: str) -> bool:
        return adapter_name in getattr(self, self.adapter_layer_names[0])

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the active (or given) adapters' updates into the base weight. With ``safe_merge`` a non-finite
        result raises and the base stays untouched."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        check_mergeable(self, self.method)
        for name in adapter_names:
            if not self._holds_adapter(name):
                continue
            with torch.no_grad():
                base = self.get_base_weight()
                delta = self.get_delta_weight(name)
                merged = base.to(delta.dtype) + delta
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(NAN_MESSAGE.format(name))
                self.set_base_weight(merged.to(base.dtype))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract merged adapters again, last merged first."""
        if not self.merged:
            return
        check_mergeable(self, self.method)
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if not self._holds_adapter(name):
                continue
            with torch.no_grad():
                base = self.get_base_weight()
                delta = self.get_delta_weight(name)
                self.set_base_weight((base.to(delta.dtype) - delta).to(base.dtype))

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """An additive update converts to a LoRA adapter (exactly at its rank, see ``petuning export --format lora``)."""
        return True


def eval_logits(model: nn.Module, args: tuple, kwargs: dict, disabled: Optional[list] = None) -> torch.Tensor:
    """Logits of ``model`` on the given inputs in eval mode (no dropout, and petuning's training hooks stay quiet),
    without the loss (labels and the loss' own arguments are dropped). With ``disabled`` layers: those adapters
    bypassed (their ``_disable_adapters`` flag alone: ``enable_adapters`` would also flip ``requires_grad``), without
    gradients, i.e. a reference forward of the base model; else with gradients. Modes and flags are restored."""
    switched = [(layer, layer._disable_adapters) for layer in set(disabled or ())]
    modes = [(m, m.training) for m in model.modules()]
    unused = ("labels", "shift_labels", "num_items_in_batch", "fused_lm_head")
    try:
        for layer, _ in switched:
            layer._disable_adapters = True
        model.eval()
        with torch.set_grad_enabled(disabled is None):
            return model(*args, **{k: v for k, v in kwargs.items() if k not in unused}).logits
    finally:
        for layer, flag in switched:
            layer._disable_adapters = flag
        for module, training in modes:
            module.training = training


def forward_logits(ctx, feature: str, fix: str) -> torch.Tensor:
    """The logits (batch, seq, vocab) of the training forward ``ctx`` (a :class:`petuning.training.ForwardContext`),
    for a term that compares them with a reference forward's. Raises ``TypeError`` naming ``feature`` and ``fix``
    when the output has none that carry gradients, e.g. under TRL's SFTTrainer, whose loss goes through a fused LM
    head that returns per-token log-probabilities instead of logits."""
    logits = getattr(ctx.output, "logits", None)
    if isinstance(logits, torch.Tensor) and logits.dim() == 3 and logits.requires_grad:
        return logits
    why = (
        " (TRL's SFTTrainer computes its loss with a fused LM head, which returns per-token log-probabilities, "
        "not logits)"
        if "fused_lm_head" in ctx.kwargs
        else ""
    )
    raise TypeError(
        f"{feature} compares the model's logits with a reference forward's, but the output of "
        f"{type(ctx.model).__name__} has no `logits` that depend on the adapter{why}. {fix}"
    )


def kl_to_reference(logits: torch.Tensor, reference: torch.Tensor, positions: Optional[torch.Tensor]) -> torch.Tensor:
    """``KL(softmax(reference) || softmax(logits))`` over the last axis, averaged over the ``positions`` (boolean,
    of the positions' shape; every position when None), computed in float32 or better."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if positions is not None:
        keep = positions.reshape(-1)
        logits, reference = logits.reshape(-1, logits.shape[-1])[keep], reference.reshape(-1, reference.shape[-1])[keep]
    log_p = F.log_softmax(logits.to(dtype), dim=-1)
    log_q = F.log_softmax(reference.to(dtype), dim=-1)
    per_position = (log_q.exp() * (log_q - log_p)).sum(-1)
    return per_position.sum() / max(per_position.numel(), 1)
