"""Masked-tuning layers: a frozen linear layer whose weight is multiplied by learned binary masks.

For a layer with weight W (stored as (out, in), or (in, out) for transformers' Conv1D) and an adapter with
threshold tau:

- ``mask_tuning_scores[name]``   trainable real scores m; the weight's shape (every entry masked) or (k,) for the
  k selected entries of a layer with ``mask_share < 1``
- ``mask_tuning_indices[name]``  (k,) int32 flat positions in W of the selected entries (only when k < W.numel());
  saved with the adapter, never re-derived
- ``mask_tuning_mask[name]``     :class:`PackedMask`, the binary mask bit-packed in the state dict (extra state)
- ``M = 1[m > tau]`` on scored entries, 1 elsewhere; with several active adapters their masks multiply

Forward (``MaskedLinear``): ``y = x (W ⊙ M)ᵀ + b``. The masked weight is the one weight-sized temporary; it is
built from W and m, used and freed, and built again in backward for the input gradient. Nothing weight-sized is
saved for backward (only x, as for any linear layer).

Backward, straight-through: the binarization passes gradients unchanged, so with G = dL/dy and X = x
flattened to (tokens, in)::

    dL/dm = dL/dW_eff ⊙ W ⊙ (masks of the other active adapters) = (Gᵀ X) ⊙ W ⊙ ...      (gathered at the indices)

Merge sets W ← W ⊙ M (exact in any dtype) and keeps the zeroed values (positions and values), so unmerge restores
W bit for bit.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from petuning.tuners.base import PetuningLayer
from petuning.tuners.common import NAN_MESSAGE, adapters_bypassed, full_tensor


def masked_off(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean tensor of the entries whose mask is 0, i.e. ``not (m > tau)`` (a NaN score counts as masked)."""
    return (scores > threshold).logical_not_()


def apply_masks(
    weight: torch.Tensor,
    scores: Sequence[torch.Tensor],
    indices: Sequence[Optional[torch.Tensor]],
    thresholds: Sequence[float],
    inplace: bool = False,
) -> torch.Tensor:
    """``W ⊙ M_1 ⊙ M_2 ...``: a masked copy of ``weight`` (the one weight-sized temporary), or ``weight`` itself
    zeroed in place."""
    out = weight if inplace else None
    for s, idx, t in zip(scores, indices, thresholds):
        if out is None and idx is None:  # one pass: the copy and the first mask together
            out = torch.where(s.detach() > t, weight, 0.0)
            continue
        if out is None:
            out = weight.clone()
        off = masked_off(s.detach(), t)
        if idx is None:
            out.masked_fill_(off, 0)
        else:
            out.view(-1)[idx[off]] = 0
    return out


class MaskedLinear(torch.autograd.Function):
    """``y = x (W ⊙ M)ᵀ + b`` with straight-through gradients for the scores of each mask (see module docstring).

    ``apply(x, weight, bias, fan_in_fan_out, thresholds, n_masks, *scores, *indices)``; an entry of ``indices``
    is None for a mask that covers the whole weight.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, fan_in_fan_out, thresholds, n_masks, *tensors):
        scores, indices = tensors[:n_masks], tensors[n_masks:]
        with torch.no_grad():
            w = apply_masks(weight, scores, indices, thresholds)
            if fan_in_fan_out:  # transformers' Conv1D computes addmm(bias, x, W) with W as (in, out)
                flat = x.reshape(-1, x.shape[-1])
                out = (flat @ w if bias is None else torch.addmm(bias, flat, w)).view(*x.shape[:-1], w.shape[1])
            else:
                out = F.linear(x, w, bias)
        ctx.fan_in_fan_out, ctx.thresholds, ctx.n_masks = fan_in_fan_out, thresholds, n_masks
        ctx.save_for_backward(x, weight, bias, *tensors)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, *tensors = ctx.saved_tensors
        scores, indices = tensors[: ctx.n_masks], tensors[ctx.n_masks :]
        needs_x, _, needs_bias = ctx.needs_input_grad[:3]
        needs_scores = ctx.needs_input_grad[6 : 6 + ctx.n_masks]
        grad_x = grad_bias = None
        dtype = grad_out.dtype
        if needs_x:
            w = apply_masks(weight, scores, indices, ctx.thresholds).to(dtype)
            grad_x = (grad_out @ (w.T if ctx.fan_in_fan_out else w)).to(x.dtype)
            del w
        g = grad_out.reshape(-1, grad_out.shape[-1])
        if needs_bias:
            grad_bias = g.sum(0).to(bias.dtype)
        grad_scores = [None] * ctx.n_masks
        if any(needs_scores):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            # dL/dW_eff in the stored layout, times W: the straight-through gradient of a full mask
            gw = (x2.T @ g) if ctx.fan_in_fan_out else (g.T @ x2)
            gw.mul_(weight.to(dtype))
            wanted = [i for i, need in enumerate(needs_scores) if need]
            for i in wanted:
                gi = gw if i == wanted[-1] else gw.clone()
                others = [j for j in range(ctx.n_masks) if j != i]
                apply_masks(gi, [scores[j] for j in others], [indices[j] for j in others],
                            [ctx.thresholds[j] for j in others], inplace=True)
                gi = gi if indices[i] is None else gi.view(-1)[indices[i]]
                grad_scores[i] = gi.to(scores[i].dtype)
        return (grad_x, None, grad_bias, None, None, None, *grad_scores, *([None] * ctx.n_masks))


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Flatten a boolean tensor and pack it into uint8, 8 entries per byte, most significant bit first
    (``numpy.packbits`` order); the last byte is padded with zeros."""
    flat = bits.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` bits of ``packed`` as a flat boolean tensor."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    return ((packed.reshape(-1, 1) >> shifts) & 1).reshape(-1)[:numel].bool()


class PackedMask(nn.Module):
    """One adapter's binary mask as bit-packed *extra state* of the layer: ``state_dict()`` holds
    ``pack_bits(m > tau)`` under ``<layer>.mask_tuning_mask.<adapter>._extra_state`` (computed from the scores when
    asked, so never stale), and loading it (torch's ``load_state_dict``, PEFT, or transformers' ``load_adapter``)
    changes exactly the scores whose mask disagrees with the loaded bit: to ``mask_init`` (kept) or to
    ``2 tau - mask_init`` (masked). Scores loaded alongside, in either order, are therefore kept as they are."""

    def __init__(self, scores: nn.ParameterDict, adapter_name: str, threshold: float, mask_init: float) -> None:
        super().__init__()
        object.__setattr__(self, "_scores", scores)  # the layer's container, deliberately not registered twice
        self.adapter_name = adapter_name
        self.threshold = threshold
        self.mask_init = mask_init

    def get_extra_state(self) -> torch.Tensor:
        return pack_bits(full_tensor(self._scores[self.adapter_name].detach()) > self.threshold)

    def set_extra_state(self, state: Any) -> None:
        scores = self._scores[self.adapter_name]
        expected = (scores.numel() + 7) // 8
        if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8 or state.numel() != expected:
            got = f"{state.numel()} {state.dtype} values" if isinstance(state, torch.Tensor) else type(state).__name__
            raise ValueError(
                f"The packed mask of adapter {self.adapter_name!r} has {got}, but {expected} uint8 mask bytes are "
                f"expected for {scores.numel()} scores: the adapter file is truncated, corrupt, or made for another "
                "base model or mask_share."
            )
        keep = unpack_bits(state.to(scores.device), scores.numel()).view(scores.shape)
        with torch.no_grad():
            current = scores > self.threshold
            scores.masked_fill_(keep & ~current, self.mask_init)
            scores.masked_fill_(~keep & current, 2 * self.threshold - self.mask_init)


class MaskTuningLayer(PetuningLayer):
    """State and math shared by every masked-tuning layer type.

    The scores stay float32 with ``autocast_adapter_dtype=False`` (``fp32_adapter_names``): they start
    ``mask_init - threshold`` (5e-3) above the threshold and move by about one learning rate per Adam step, and
    bfloat16's spacing near 1e-2 (6e-5) would swallow steps at learning rates below about 3e-5.
    """

    method = "masked tuning"
    fp32_adapter_names = ("mask_tuning_scores",)

    adapter_layer_names = ("mask_tuning_scores",)
    other_param_names = (
        "mask_tuning_indices", "mask_tuning_mask", "mask_tuning_threshold", "mask_tuning_removed", "mask_tuning_kl_grad"
    )

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self._init_petuning_state(base_layer, kwargs, quantizable=False)
        self.mask_tuning_scores = nn.ParameterDict({})
        self.mask_tuning_indices = BufferDict({}, persistent=True)
        self.mask_tuning_mask = nn.ModuleDict({})  # PackedMask per adapter: the bit-packed masks in the state dict
        self.mask_tuning_threshold: dict[str, float] = {}
        self.mask_tuning_removed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # merged adapters' zeroed entries
        self.mask_tuning_kl_grad: dict[str, torch.Tensor] = {}  # gradient dropout's accumulated KL gradients
        self._mask_tuning_probes: dict[str, torch.Tensor] = {}  # dense stand-in scores during weight selection

    # ----------------------------------------------------------------------------------------- init
    def update_layer(
        self,
        adapter_name: str,
        mask_share: float,
        mask_init: float,
        threshold: float,
        init_weights: bool,
        inference_mode: bool = False,
        **_: Any,
    ) -> None:
        """Add adapter ``adapter_name``: scores for the whole weight (``mask_share == 1``) or for the
        ``round(mask_share * numel)`` entries of largest |W| (re-chosen by gradient with the tuner's
        ``select_masked_weights``)."""
        weight = self.get_base_layer().weight
        numel = weight.numel()
        k = numel if mask_share >= 1.0 else max(1, round(mask_share * numel))
        dtype = self.adapter_dtype()
        if k < numel:
            if numel >= 2**31:
                raise ValueError(f"A weight with {numel} entries is too large for int32 mask indices.")
            with torch.no_grad():
                top = torch.topk(weight.detach().reshape(-1).abs().float(), k).indices
            self.mask_tuning_indices[adapter_name] = top.sort().values.to(torch.int32)
            shape: tuple[int, ...] = (k,)
        else:
            shape = tuple(weight.shape)
        scores = torch.full(shape, mask_init, dtype=dtype, device=weight.device)
        if not init_weights:  # seeded by the global RNG: spread over [2 tau - init, init], about half masked
            low = 2 * threshold - mask_init
            scores = low + (mask_init - low) * torch.rand(shape, dtype=dtype, device=weight.device)
        self.mask_tuning_scores[adapter_name] = nn.Parameter(scores)
        self.mask_tuning_mask[adapter_name] = PackedMask(self.mask_tuning_scores, adapter_name, threshold, mask_init)
        self.mask_tuning_threshold[adapter_name] = threshold
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    # ---------------------------------------------------------------------------------------- math
    def _masks(self, names: Sequence[str]) -> tuple[list, list, list]:
        """Scores, indices (None for whole-weight masks) and thresholds of the adapters ``names`` that this layer
        holds; a selection probe, while one is set, stands in for the adapter's own scores."""
        scores, indices, thresholds = [], [], []
        for name in names:
            if name not in self.mask_tuning_scores:
                continue
            if name in self._mask_tuning_probes:
                scores.append(self._mask_tuning_probes[name])
                indices.append(None)
            else:
                scores.append(self.mask_tuning_scores[name])
                indices.append(self.mask_tuning_indices[name] if name in self.mask_tuning_indices else None)
            thresholds.append(self.mask_tuning_threshold[name])
        return scores, indices, thresholds

    def mask(self, adapter_name: str) -> torch.Tensor:
        """The binary mask M of ``adapter_name`` as a boolean tensor in the base weight's layout."""
        weight = self.get_base_layer().weight
        scores = self.mask_tuning_scores[adapter_name].detach()
        keep = scores > self.mask_tuning_threshold[adapter_name]
        if adapter_name not in self.mask_tuning_indices:
            return keep
        full = torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
        full.view(-1)[self.mask_tuning_indices[adapter_name][~keep]] = False
        return full

    def masked_positions(self, adapter_name: str) -> torch.Tensor:
        """Flat positions (int64) in the base weight of the entries ``adapter_name`` masks out."""
        off = masked_off(self.mask_tuning_scores[adapter_name].detach(), self.mask_tuning_threshold[adapter_name])
        if adapter_name in self.mask_tuning_indices:
            return self.mask_tuning_indices[adapter_name][off].long()
        return off.reshape(-1).nonzero().squeeze(1)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense update ``W ⊙ M - W`` (= -W on masked entries, 0 elsewhere) in the base weight's layout and dtype,
        so ``W + delta`` is exactly ``W ⊙ M``. Built only for merging and conversion, never in forward."""
        weight = self.get_base_layer().weight.detach()
        delta = torch.zeros_like(weight)
        positions = self.masked_positions(adapter_name)
        delta.view(-1)[positions] = -weight.reshape(-1)[positions]
        return delta

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Additive (``W ⊙ M = W + delta``), so a LoRA conversion exists, exact at the rank of the delta (which a
        scattered mask usually makes full)."""
        return True

    # --------------------------------------------------------------------------------------- merge
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Zero the entries the active (or given) adapters mask out, keeping their values for :meth:`unmerge`."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for name in adapter_names:
            if name not in self.mask_tuning_scores:
                continue
            if safe_merge and not torch.isfinite(self.mask_tuning_scores[name]).all():
                raise ValueError(NAN_MESSAGE.format(name))
            with torch.no_grad():
                flat = self.get_base_layer().weight.data.view(-1)
                positions = self.masked_positions(name)
                self.mask_tuning_removed[name] = (positions, flat[positions].clone())
                flat[positions] = 0
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Put the zeroed entries back, last merged adapter first: the original weight, bit for bit."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.mask_tuning_removed:
                continue
            positions, values = self.mask_tuning_removed.pop(name)
            with torch.no_grad():
                self.get_base_layer().weight.data.view(-1)[positions] = values


class Linear(nn.Module, MaskTuningLayer):
    """Masked tuning around ``nn.Linear`` or transformers' ``Conv1D`` (``fan_in_fan_out=True``, weight (in, out))."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, fan_in_fan_out: bool = False, **kwargs: Any):
        super().__init__()
        MaskTuningLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if adapters_bypassed(self):
            return self.base_layer(x, *args, **kwargs)
        scores, indices, thresholds = self._masks(self.active_adapters)
        if not scores:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        return MaskedLinear.apply(
            x, base.weight, base.bias, self.fan_in_fan_out, thresholds, len(scores), *scores, *indices
        )

    def __repr__(self) -> str:
        return "mask_tuning." + super().__repr__()
