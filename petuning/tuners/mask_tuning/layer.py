"""Masked-tuning layers: a frozen linear layer whose weight is multiplied by learned binary masks.

For a layer with weight W (stored as (out, in), or (in, out) for transformers' Conv1D) and an adapter:

- ``mask_tuning_scores[name]``   trainable real scores m; the weight's shape (every entry scored) or (k,) for the
  k selected entries of a layer with ``mask_share < 1``
- ``mask_tuning_indices[name]``  (k,) int32 sorted flat positions in W of the scored entries (only when
  k < W.numel())
- ``mask_tuning_off[name]``      budget mode only: boolean, the scores' shape, True where the entry is masked; kept
  by the tuner's schedule (the k_t lowest scores, see ``MaskTuningModel``), not derived from m in forward
- ``mask_tuning_mask[name]``     :class:`MaskedPositions`, the positions the adapter zeroes, stored compactly in the
  state dict (extra state; :mod:`.encoding`)
- the mask M is 0 where the entry is "off" and 1 elsewhere: off = ``m <= tau`` in threshold mode (the paper's
  rule), the stored set in budget mode. With several active adapters their masks multiply.

Forward (``MaskedLinear``): ``y = x (W ⊙ M)ᵀ + b``. The masked weight is the one weight-sized temporary; it is
built from W and the off-sets, used and freed, and built again in backward for the input gradient. Nothing
weight-sized is saved for backward (only x, as for any linear layer).

Backward, straight-through: the binarization passes gradients unchanged, so with G = dL/dy and X = x
flattened to (tokens, in)::

    dL/dm = dL/dW_eff ⊙ W ⊙ (masks of the other active adapters) = (Gᵀ X) ⊙ W ⊙ ...      (gathered at the indices)

Merge sets W ← W ⊙ M (exact in any dtype) and keeps the zeroed values (positions and values), so unmerge restores
W bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from petuning.tuners.base import PetuningLayer
from petuning.tuners.common import NAN_MESSAGE, adapters_bypassed, full_tensor

from .encoding import decode_positions, encode_positions


def masked_off(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Threshold mode: boolean tensor of the entries whose mask is 0, i.e. ``not (m > tau)`` (a NaN score counts
    as masked)."""
    return (scores > threshold).logical_not_()


def apply_masks(
    weight: torch.Tensor,
    offs: Sequence[torch.Tensor],
    indices: Sequence[Optional[torch.Tensor]],
    inplace: bool = False,
) -> torch.Tensor:
    """``W ⊙ M_1 ⊙ M_2 ...`` for boolean "masked" tensors ``offs`` (over the whole weight, or over the entries at
    ``indices``): a masked copy of ``weight`` (the one weight-sized temporary), or ``weight`` itself zeroed in
    place."""
    out = weight if inplace else None
    for off, idx in zip(offs, indices):
        if out is None and idx is None:  # one pass: the copy and the first mask together
            out = torch.where(off, 0.0, weight)
            continue
        if out is None:
            out = weight.clone()
        if idx is None:
            out.masked_fill_(off, 0)
        else:
            out.view(-1)[idx[off]] = 0
    return out


def _offs(
    scores: Sequence[torch.Tensor], sets: Sequence[Optional[torch.Tensor]], thresholds: Sequence[Optional[float]]
):
    """Each mask's boolean "masked" tensor: the stored set (budget mode), or ``m <= tau`` computed now (threshold
    mode, so that nothing but the scores themselves is kept for backward)."""
    return [off if t is None else masked_off(s.detach(), t) for s, off, t in zip(scores, sets, thresholds)]


class MaskedLinear(torch.autograd.Function):
    """``y = x (W ⊙ M)ᵀ + b`` with straight-through gradients for the scores of each mask (see module docstring).

    ``apply(x, weight, bias, fan_in_fan_out, thresholds, n_masks, *scores, *sets, *indices)``: per mask, either a
    threshold (threshold mode; its set is None) or None and the stored boolean set (budget mode); an entry of
    ``indices`` is None for a mask that covers the whole weight.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, fan_in_fan_out, thresholds, n_masks, *tensors):
        scores, sets, indices = tensors[:n_masks], tensors[n_masks : 2 * n_masks], tensors[2 * n_masks :]
        with torch.no_grad():
            w = apply_masks(weight, _offs(scores, sets, thresholds), indices)
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
        n = ctx.n_masks
        scores, indices = tensors[:n], tensors[2 * n :]
        offs = _offs(scores, tensors[n : 2 * n], ctx.thresholds)
        needs_x, _, needs_bias = ctx.needs_input_grad[:3]
        needs_scores = ctx.needs_input_grad[6 : 6 + n]
        grad_x = grad_bias = None
        dtype = grad_out.dtype
        if needs_x:
            w = apply_masks(weight, offs, indices).to(dtype)
            grad_x = (grad_out @ (w.T if ctx.fan_in_fan_out else w)).to(x.dtype)
            del w
        g = grad_out.reshape(-1, grad_out.shape[-1])
        if needs_bias:
            grad_bias = g.sum(0).to(bias.dtype)
        grad_scores = [None] * n
        if any(needs_scores):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            # dL/dW_eff in the stored layout, times W: the straight-through gradient of a full mask
            gw = (x2.T @ g) if ctx.fan_in_fan_out else (g.T @ x2)
            gw.mul_(weight.to(dtype))
            wanted = [i for i, need in enumerate(needs_scores) if need]
            for i in wanted:
                gi = gw if i == wanted[-1] else gw.clone()
                others = [j for j in range(n) if j != i]
                apply_masks(gi, [offs[j] for j in others], [indices[j] for j in others], inplace=True)
                gi = gi if indices[i] is None else gi.view(-1)[indices[i]]
                grad_scores[i] = gi.to(scores[i].dtype)
        return (grad_x, None, grad_bias, None, None, None, *grad_scores, *([None] * (2 * n)))


class MaskedPositions(nn.Module):
    """One adapter's mask as *extra state* of its layer: ``state_dict()`` holds
    ``encode_positions(positions the adapter zeroes, W.numel())`` under
    ``<layer>.mask_tuning_mask.<adapter>._extra_state`` (computed when asked, so never stale). Loading it (torch's
    ``load_state_dict``, PEFT, or transformers' ``load_adapter``) makes the layer mask exactly those positions
    (:meth:`MaskTuningLayer.set_masked_positions`), whatever the scores or indices loaded before it."""

    def __init__(self, layer: MaskTuningLayer, adapter_name: str) -> None:
        super().__init__()
        object.__setattr__(self, "_layer", layer)  # the owning layer, deliberately not registered as a child
        self.adapter_name = adapter_name

    def get_extra_state(self) -> torch.Tensor:
        layer = self._layer
        if layer.mask_tuning_scores[self.adapter_name].is_meta:  # an adapter created on meta, before loading
            return torch.empty(1, dtype=torch.uint8, device="meta")
        return encode_positions(layer.masked_positions(self.adapter_name), layer.get_base_layer().weight.numel())

    def set_extra_state(self, state: Any) -> None:
        numel = self._layer.get_base_layer().weight.numel()
        try:
            positions = decode_positions(state, numel)
        except ValueError as error:
            raise ValueError(
                f"The stored mask of adapter {self.adapter_name!r} cannot be read ({error}): the adapter file is "
                "truncated, corrupt, or made for another base model."
            ) from None
        self._layer.set_masked_positions(self.adapter_name, positions)


class MaskTuningLayer(PetuningLayer):
    """State and math shared by every masked-tuning layer type.

    The scores stay float32 with ``autocast_adapter_dtype=False`` (``fp32_adapter_names``): in threshold mode they
    start ``mask_init - threshold`` (5e-3) above the threshold and move by about one learning rate per Adam step,
    and bfloat16's spacing near 1e-2 (6e-5) would swallow steps at learning rates below about 3e-5.
    """

    method = "masked tuning"
    fp32_adapter_names = ("mask_tuning_scores",)

    adapter_layer_names = ("mask_tuning_scores",)
    other_param_names = (
        "mask_tuning_indices",
        "mask_tuning_off",
        "mask_tuning_mask",
        "mask_tuning_threshold",
        "mask_tuning_init",
        "mask_tuning_removed",
        "mask_tuning_kl_grad",
    )

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self._init_petuning_state(base_layer, kwargs, quantizable=False)
        self.mask_tuning_scores = nn.ParameterDict({})
        self.mask_tuning_indices = BufferDict({}, persistent=True)
        self.mask_tuning_off = BufferDict({}, persistent=False)  # budget mode: the masked entries, kept by the tuner
        self.mask_tuning_mask = nn.ModuleDict({})  # MaskedPositions per adapter: the zeroed positions, compactly
        self.mask_tuning_threshold: dict[str, float] = {}
        self.mask_tuning_init: dict[str, float] = {}
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
        budgeted: bool = False,
        initial_budget: float = 0.5,
        inference_mode: bool = False,
        **_: Any,
    ) -> None:
        """Add adapter ``adapter_name``: scores for the whole weight (``mask_share == 1``) or for the
        ``round(mask_share * numel)`` entries of largest |W| (ties to the lower position; re-chosen by gradient with
        the tuner's ``select_masked_weights``). ``budgeted``: the masked set is kept by the tuner's budget schedule
        (empty at the start) instead of derived from ``m <= threshold``. ``init_weights=False`` (for tests) seeds
        scores around the threshold; a budgeted adapter then starts with its ``initial_budget`` share of the
        weight's entries masked (the lowest scores)."""
        weight = self.get_base_layer().weight
        numel = weight.numel()
        k = numel if mask_share >= 1.0 else max(1, round(mask_share * numel))
        dtype = self.adapter_dtype()
        if k < numel:
            if numel >= 2**31:
                raise ValueError(f"A weight with {numel} entries is too large for int32 mask indices.")
            self.mask_tuning_indices[adapter_name] = largest_magnitude(weight, k).to(torch.int32)
            shape: tuple[int, ...] = (k,)
        else:
            shape = tuple(weight.shape)
        scores = torch.full(shape, mask_init, dtype=dtype, device=weight.device)
        if not init_weights:  # seeded by the global RNG: spread over [2 tau - init, init], about half masked
            low = 2 * threshold - mask_init
            scores = low + (mask_init - low) * torch.rand(shape, dtype=dtype, device=weight.device)
        self.mask_tuning_scores[adapter_name] = nn.Parameter(scores)
        self.mask_tuning_mask[adapter_name] = MaskedPositions(self, adapter_name)
        self.mask_tuning_threshold[adapter_name] = threshold
        self.mask_tuning_init[adapter_name] = mask_init
        if budgeted:
            off = torch.zeros(shape, dtype=torch.bool, device=weight.device)
            if not init_weights:
                n = min(round(initial_budget * numel), k)
                off.view(-1)[torch.topk(scores.reshape(-1), n, largest=False).indices] = True
            self.mask_tuning_off[adapter_name] = off
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    # ---------------------------------------------------------------------------------------- math
    def budgeted(self, adapter_name: str) -> bool:
        """Whether the tuner's budget schedule keeps this adapter's masked set (else ``m <= threshold`` does)."""
        return adapter_name in self.mask_tuning_off

    def off(self, adapter_name: str) -> torch.Tensor:
        """Boolean tensor of the scores' shape: True where ``adapter_name`` masks the entry."""
        if self.budgeted(adapter_name):
            return self.mask_tuning_off[adapter_name]
        return masked_off(self.mask_tuning_scores[adapter_name].detach(), self.mask_tuning_threshold[adapter_name])

    def _masks(self, names: Sequence[str]) -> tuple[list, list, list, list]:
        """Per adapter in ``names`` that this layer holds: its scores, its stored set (budget mode) or None, its
        threshold (threshold mode) or None, and its indices (None for whole-weight masks). A selection probe, while
        one is set, stands in for the adapter's scores, with nothing masked."""
        scores, sets, thresholds, indices = [], [], [], []
        for name in names:
            if name not in self.mask_tuning_scores:
                continue
            if name in self._mask_tuning_probes:
                probe = self._mask_tuning_probes[name]
                scores.append(probe)
                sets.append(torch.zeros(probe.shape, dtype=torch.bool, device=probe.device))
                thresholds.append(None)
                indices.append(None)
                continue
            scores.append(self.mask_tuning_scores[name])
            budgeted = self.budgeted(name)
            sets.append(self.mask_tuning_off[name] if budgeted else None)
            thresholds.append(None if budgeted else self.mask_tuning_threshold[name])
            indices.append(self.mask_tuning_indices[name] if name in self.mask_tuning_indices else None)  # noqa: SIM401 (a BufferDict has no get)
        return scores, sets, thresholds, indices

    def mask(self, adapter_name: str) -> torch.Tensor:
        """The binary mask M of ``adapter_name`` as a boolean tensor in the base weight's layout."""
        weight = self.get_base_layer().weight
        full = torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
        full.view(-1)[self.masked_positions(adapter_name)] = False
        return full

    def masked_positions(self, adapter_name: str) -> torch.Tensor:
        """Sorted flat positions (int64) in the base weight of the entries ``adapter_name`` masks out."""
        off = full_tensor(self.off(adapter_name))
        if adapter_name in self.mask_tuning_indices:
            return self.mask_tuning_indices[adapter_name][off].long()
        return off.reshape(-1).nonzero().squeeze(1)

    @torch.no_grad()
    def set_masked_positions(self, adapter_name: str, positions: torch.Tensor) -> None:
        """Make ``adapter_name`` mask exactly the flat ``positions`` of the base weight (loading a saved mask).

        Budget mode: the set becomes the adapter's masked set and the scores are left alone (they only rank).
        Threshold mode: scores that disagree with the new mask move to ``mask_init`` (kept) or its mirror
        ``2 tau - mask_init`` (masked), so scores loaded alongside a consistent mask stay as they are. When a
        position has no score (a mask chosen on other scored entries, e.g. by gradient), the scored entries become
        the masked positions plus the largest-|W| others, and every score restarts."""
        weight = self.get_base_layer().weight
        positions = positions.to(weight.device)
        scores = self.mask_tuning_scores[adapter_name]
        if hasattr(scores.data, "to_local"):
            raise RuntimeError(
                f"Cannot load the mask of adapter {adapter_name!r} into a sharded (FSDP2) layer: load the adapter "
                "before calling fully_shard."
            )
        if adapter_name in self.mask_tuning_indices:
            idx = self.mask_tuning_indices[adapter_name]
            if positions.numel() > idx.numel():
                raise ValueError(
                    f"The stored mask of adapter {adapter_name!r} zeroes {positions.numel()} entries of a layer whose "
                    f"adapter scores only {idx.numel()}: it was made with a larger mask_share. Load it with its own "
                    "adapter_config.json."
                )
            where = torch.searchsorted(idx.long(), positions).clamp_max(idx.numel() - 1)
            if not bool((idx[where].long() == positions).all()):
                idx.copy_(largest_magnitude(weight, idx.numel(), first=positions).to(idx.dtype))
                scores.data.fill_(self.mask_tuning_init[adapter_name])
                where = torch.searchsorted(idx.long(), positions)
            off = torch.zeros(idx.shape, dtype=torch.bool, device=weight.device)
            off[where] = True
        else:
            off = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
            off[positions] = True
            off = off.view(weight.shape)
        if self.budgeted(adapter_name):  # budget mode: the set is the state; scores keep their ranking
            self.mask_tuning_off[adapter_name].copy_(off)
            return
        threshold, init = self.mask_tuning_threshold[adapter_name], self.mask_tuning_init[adapter_name]
        kept = scores.data > threshold
        scores.data.masked_fill_(~off & ~kept, init)
        scores.data.masked_fill_(off & kept, 2 * threshold - init)

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


def largest_magnitude(weight: torch.Tensor, k: int, first: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sorted flat positions (int64) of the ``k`` entries of largest |W| (all of the flat positions ``first``
    before any other), ties going to the lower position, so the choice is the same on every device and run."""
    magnitude = weight.detach().reshape(-1).abs().float()
    if first is not None:
        magnitude = magnitude.index_fill(0, first, float("inf"))
    order = torch.argsort(magnitude, descending=True, stable=True)
    return order[:k].sort().values


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
        scores, sets, thresholds, indices = self._masks(self.active_adapters)
        if not scores:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        return MaskedLinear.apply(
            x, base.weight, base.bias, self.fan_in_fan_out, tuple(thresholds), len(scores), *scores, *sets, *indices
        )

    def __repr__(self) -> str:
        return "mask_tuning." + super().__repr__()
