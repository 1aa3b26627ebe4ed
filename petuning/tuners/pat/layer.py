"""PAT layers: Hybrid Sparsification Modules (HSMs) on the residual stream, optional LoRA, and the shared gate.

Shapes, for hidden size d, HSM rank r, and a linear layer with weight W (out, in):

- ``pat_hsm_down[name]``  W0 (r, d)   trainable, Kaiming-uniform (a = √5), like LoRA's A
- ``pat_hsm_up[name]``    W1 (d, r)   trainable, zeros (so the HSM starts as the identity)
- ``pat_hsm_scale[name]`` s  (d,)     trainable, ones (1/g_0 once a calibrated mask is set, see calibration.py)
- the embedding of a model whose LM head is tied to it has a scale-only HSM (no W0, W1), so the pruned model can
  stay tied
- ``pat_lora_A[name]``    A  (r', in) trainable, Kaiming-uniform;  ``pat_lora_B[name]`` B (out, r') zeros
- the mask m (d,) is NOT stored here: it lives once on the tuner, and every layer reads the gate g_t from the
  shared :class:`PatGate`.

An HSM follows the token embedding and every ``o_proj`` / ``down_proj`` (the layers whose output is d-wide and is
added to the residual stream). With y the layer's output (base, plus LoRA if any)::

    HSM(y) = s ⊙ g_t ⊙ (y + W1 (W0 y))

computed in the adapter dtype (float32, or float64 on a float64 base) without ever forming a d x d matrix. The
other decoder linears (q/k/v/gate/up) carry only the optional LoRA: ``y = W x + (α/r') B (A dropout(x))``.

Gate schedule (T = ``schedule_steps``, t = optimizer steps taken)::

    t < 0.8 T:        g_t = σ̃(τ_t m) + b_t,  τ_t = 1 / (1 - ln(max(t, 1)) / ln T + 1e-6),  b_t = max(0.5 - t/T, 0)
    0.8 T <= t < T:   m no longer learns; g = the final hard gate (``frozen_gate="hard"``, default), or the
                      paper's g_t = σ̃(τ_{0.8T} m) (``frozen_gate="soft"``)
    t >= T:           g   = 1 on the d' largest entries of m, 0 elsewhere (the final, hard mask)

Protected channels (massive activations, found by the calibration) are always among the kept d' and see
max(m, 1/2) in the soft gate.

where σ̃(x) = 1 / (1 + exp(min(-x, 10))) is the paper's sigmoid clipped below at σ(-10). At t = 0 with m = 0 the
gate is exactly 1. The gate is a d-vector recomputed by each HSM (O(d) work, negligible next to the HSM's
matrix products), so there is no per-forward cache to invalidate.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from petuning.tuners.base import PetuningLayer
from petuning.tuners.common import NAN_MESSAGE, adapters_bypassed

FREEZE_FRACTION = 0.8
"""The mask stops learning at this fraction of the schedule (paper)."""
GATE_LOGIT_CLAMP = 10.0
"""exp(-x) is evaluated at min(-x, 10), so the soft gate never drops below σ(-10) ≈ 4.5e-5 (paper)."""
POLAR = 0.5
"""The values ±1/2 the polarization loss pulls m to; a calibrated mask starts there, and a protected channel's gate
is computed from max(m, 1/2)."""


# ------------------------------------------------------------------------------------------------ schedule
def schedule(step: int, total: Optional[int]) -> tuple[float, float]:
    """Temperature τ_t and offset b_t of the gate at optimizer step ``step`` of a schedule of ``total`` steps.
    ``total`` None (``schedule_steps="auto"`` before the run's length is known) is allowed at step 0 only, where
    τ_0 = 1 and b_0 = 1/2 whatever T is."""
    if total is None:
        _check_unresolved(step)
        return 1.0 / (1.0 + 1e-6), 0.5
    freeze = FREEZE_FRACTION * total
    t = min(float(step), freeze)
    tau = 1.0 / (1.0 - math.log(max(t, 1.0)) / math.log(total) + 1e-6)
    offset = max(0.5 - step / total, 0.0) if step < freeze else 0.0
    return tau, offset


def mask_phase(step: int, total: Optional[int]) -> str:
    """'learning' (t < 0.8 T), 'frozen' (0.8 T <= t < T) or 'final' (t >= T); 'learning' at step 0 of an
    unresolved (``None``) schedule."""
    if total is None:
        _check_unresolved(step)
        return "learning"
    if step >= total:
        return "final"
    return "frozen" if step >= FREEZE_FRACTION * total else "learning"


def _check_unresolved(step: int) -> None:
    if step != 0:
        raise RuntimeError(
            f"PAT's schedule length is unknown at step {step}: schedule_steps='auto' is resolved at the first "
            "optimizer step from the driver's max_steps. Train with petuning.PetuningCallback / petuning.TrainingHooks("
            "max_steps=...), or give PatConfig(schedule_steps=<int>)."
        )


def kept_channels(mask: torch.Tensor, width: int, protected: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Indices (ascending) of the ``width`` channels the hard gate keeps: the ``protected`` ones (bool (d,), at most
    ``width``) first, then the largest entries of ``mask``; ties go to the lower index."""
    priority = mask.detach()
    if protected is not None:
        priority = torch.where(protected, torch.full_like(priority, math.inf), priority)
    order = torch.sort(priority, descending=True, stable=True).indices[:width]
    return torch.sort(order).values


def protected_channels(rms: torch.Tensor, ratio: Optional[float], width: int) -> Optional[torch.Tensor]:
    """Bool (d,): the channels whose calibration RMS exceeds ``ratio`` × the median channel's, at most the ``width``
    largest; None without a ratio or before calibration (``rms`` all zero)."""
    if ratio is None or not bool((rms > 0).any()):
        return None
    candidates = rms > ratio * rms.median()
    if int(candidates.sum()) > width:
        candidates = torch.zeros_like(candidates)
        candidates[kept_channels(rms, width)] = True
    return candidates


def gate_values(
    mask: torch.Tensor,
    step: int,
    total: Optional[int],
    width: int,
    hard_when_frozen: bool = False,
    protected: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The gate g_t (d,) for mask ``mask`` at step ``step`` (see the module docstring), in the mask's dtype;
    ``hard_when_frozen`` makes the frozen phase use the final hard gate. The ``protected`` channels (bool (d,)) are
    kept by the hard gate and see max(m, 1/2) in the soft one.

    Once the mask stops learning, the gate still depends on ``mask`` through a zero-weighted term, so the mask
    receives an exact-zero gradient (not none): DDP's reducer then sees the same parameters every step.
    """
    phase = mask_phase(step, total)
    if phase == "final" or (phase == "frozen" and hard_when_frozen):
        gate = torch.zeros_like(mask.detach())
        gate[kept_channels(mask, width, protected)] = 1.0
    else:
        tau, offset = schedule(step, total)
        effective = mask if protected is None else torch.where(protected, mask.clamp_min(POLAR), mask)
        logits = tau * (effective if phase == "learning" else effective.detach())
        gate = 1.0 / (1.0 + torch.exp(torch.clamp(-logits, max=GATE_LOGIT_CLAMP))) + offset
    if phase != "learning" and mask.requires_grad and torch.is_grad_enabled():
        gate = gate + 0.0 * mask
    return gate


def polarization_gap(
    mask: torch.Tensor, step: int, total: Optional[int], width: int, protected: Optional[torch.Tensor] = None
) -> float:
    """mean_i |σ̃(τ_t m_i) - h_i|, with h the final hard gate: how far the soft gate (without offset) still is from
    the 0/1 gate the pruned model will use. Near 0 once the mask has polarized; about 0.5 while m stays near 0."""
    mask = mask.detach()
    hard = torch.zeros_like(mask)
    hard[kept_channels(mask, width, protected)] = 1.0
    if protected is not None:
        mask = torch.where(protected, mask.clamp_min(POLAR), mask)
    soft = 1.0 / (1.0 + torch.exp(torch.clamp(-schedule(step, total)[0] * mask, max=GATE_LOGIT_CLAMP)))
    return float((soft - hard).abs().mean())


class PatGate:
    """The tuner's shared mask state as the layers see it: for an adapter name, the current gate g_t (d,).

    A plain object (not an ``nn.Module``), so holding it does not register the mask inside every layer. What it
    reads lives once, on the tuner, and is saved with the adapter: the mask ``masks[name]`` (d,), the step counter
    ``steps[name]``, the schedule length ``totals[name]`` (T; 0 while ``schedule_steps="auto"`` is unresolved) and
    the calibration statistic ``channel_rms[name]`` (d,; 0 before calibration), from which the protected channels
    follow. ``widths[name]`` is d'; ``collectors[name]`` gathers the statistic while a calibration is pending.
    """

    def __init__(self, masks: nn.ParameterDict, steps: BufferDict, totals: BufferDict, channel_rms: BufferDict) -> None:
        self.masks = masks
        self.steps = steps
        self.totals = totals
        self.channel_rms = channel_rms
        self.widths: dict[str, int] = {}
        self.hard_when_frozen: dict[str, bool] = {}
        self.protect_ratios: dict[str, Optional[float]] = {}
        self.collectors: dict[str, Any] = {}
        self._protected_cache: dict[str, tuple[int, Optional[torch.Tensor]]] = {}

    def step(self, name: str) -> int:
        return int(self.steps[name])

    def total(self, name: str) -> Optional[int]:
        """T, or None while ``schedule_steps="auto"`` has not been resolved."""
        return int(self.totals[name]) or None

    def phase(self, name: str) -> str:
        return mask_phase(self.step(name), self.total(name))

    def protected(self, name: str) -> Optional[torch.Tensor]:
        """Bool (d,) of the channels the hard gate always keeps, or None (no calibration or no protect_ratio)."""
        rms = self.channel_rms[name]
        cached = self._protected_cache.get(name)
        if cached is None or cached[0] != rms._version:
            protected = protected_channels(rms, self.protect_ratios[name], self.widths[name])
            cached = (rms._version, None if protected is None else protected.to(self.masks[name].device))
            self._protected_cache[name] = cached
        return cached[1]

    def __call__(self, name: str) -> torch.Tensor:
        return gate_values(
            self.masks[name],
            self.step(name),
            self.total(name),
            self.widths[name],
            self.hard_when_frozen[name],
            self.protected(name),
        )

    def kept(self, name: str) -> torch.Tensor:
        return kept_channels(self.masks[name], self.widths[name], self.protected(name))

    def observe(self, name: str, output: torch.Tensor, training: bool, first: bool) -> None:
        """Pass an HSM output to a pending calibration (``first``: the embedding's, which opens a forward)."""
        collector = self.collectors.get(name)
        if collector is not None and collector.observes(training):
            (collector.start if first else collector.add)(output)


# ---------------------------------------------------------------------------------------------------- layers
class PatLayer(PetuningLayer):
    """State and math shared by PAT's linear and embedding layers."""

    method = "PAT"
    adapter_layer_names = ("pat_lora_A", "pat_lora_B", "pat_hsm_down", "pat_hsm_up", "pat_hsm_scale")
    other_param_names = ("pat_lora_scaling", "pat_lora_dropout")

    def __init__(self, base_layer: nn.Module, gate: PatGate, **kwargs: Any) -> None:
        self._init_petuning_state(base_layer, kwargs, quantizable=False)
        self.pat_lora_A = nn.ParameterDict({})
        self.pat_lora_B = nn.ParameterDict({})
        self.pat_hsm_down = nn.ParameterDict({})
        self.pat_hsm_up = nn.ParameterDict({})
        self.pat_hsm_scale = nn.ParameterDict({})
        self.pat_lora_scaling: dict[str, float] = {}
        self.pat_lora_dropout = nn.ModuleDict({})
        self.pat_gate = gate
        self._pat_merge_backup: list[tuple[str, Any, Any]] = []

    # ----------------------------------------------------------------------------------------- init
    def update_layer(
        self,
        adapter_name: str,
        hsm_rank: int,
        hsm: bool,
        lora_r: int,
        lora_alpha: float,
        lora_dropout: float,
        init_weights: bool,
        inference_mode: bool = False,
        **_: Any,
    ) -> None:
        """Add adapter ``adapter_name``: an HSM (if ``hsm``) and a LoRA of rank ``lora_r`` (if > 0)."""
        dtype = self.adapter_dtype()
        if lora_r > 0:
            a = torch.empty(lora_r, self.in_features, dtype=dtype)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            b = torch.zeros(self.out_features, lora_r, dtype=dtype)
            if not init_weights:  # seeded by the global RNG, like PEFT's other tuners
                b = 0.2 * torch.randn_like(b) / math.sqrt(lora_r)
            self.pat_lora_A[adapter_name] = nn.Parameter(a)
            self.pat_lora_B[adapter_name] = nn.Parameter(b)
            self.pat_lora_scaling[adapter_name] = lora_alpha / lora_r
            self.pat_lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        if hsm:
            d = self.out_features
            scale = torch.ones(d, dtype=dtype)
            if not init_weights:
                scale = scale + 0.2 * torch.randn_like(scale)
            self.pat_hsm_scale[adapter_name] = nn.Parameter(scale)
        if hsm and hsm_rank > 0:  # rank 0: a scale-only HSM (the embedding of a tied model)
            down = torch.empty(hsm_rank, d, dtype=dtype)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))
            up = torch.zeros(d, hsm_rank, dtype=dtype)
            if not init_weights:
                up = 0.3 * torch.randn_like(up) / math.sqrt(hsm_rank)
            self.pat_hsm_down[adapter_name] = nn.Parameter(down)
            self.pat_hsm_up[adapter_name] = nn.Parameter(up)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    # ---------------------------------------------------------------------------------------- math
    def has_hsm(self, adapter_name: str) -> bool:
        return adapter_name in self.pat_hsm_scale

    def has_low_rank(self, adapter_name: str) -> bool:
        """Whether the HSM has its low-rank branch W1 W0 (not so for a scale-only HSM)."""
        return adapter_name in self.pat_hsm_down

    def lora_delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``(α/r') B (A dropout(x))`` for ``x`` (..., in), in the adapter dtype; returns (..., out)."""
        a = self.pat_lora_A[adapter_name]
        x = self.pat_lora_dropout[adapter_name](self._cast_input_dtype(x, a.dtype))
        return F.linear(F.linear(x, a), self.pat_lora_B[adapter_name]) * self.pat_lora_scaling[adapter_name]

    def hsm(self, y: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``s ⊙ g_t ⊙ (y + W1 (W0 y))`` for ``y`` (..., d) (``s ⊙ g_t ⊙ y`` for a scale-only HSM); computed in the
        adapter dtype, returned in y's dtype. A pending calibration sees the output."""
        scale = self.pat_hsm_scale[adapter_name]
        z = self._cast_input_dtype(y, scale.dtype)
        if self.has_low_rank(adapter_name):
            z = z + F.linear(F.linear(z, self.pat_hsm_down[adapter_name]), self.pat_hsm_up[adapter_name])
        out = (z * (scale * self.pat_gate(adapter_name))).to(y.dtype)
        self.pat_gate.observe(adapter_name, out, self.training, first=isinstance(self, Embedding))
        return out

    def hsm_factors(
        self, adapter_name: str, dtype=torch.float64
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The HSM as a matrix ``M = diag(s ⊙ g)(I + W1 W0)`` in factored form, in ``dtype``: returns
        ``(s ⊙ g (d,), W1 (d, r), W0 (r, d))``, with ``W1 = W0 = None`` for a scale-only HSM (M = diag(s ⊙ g)).
        Used by merge and prune, which never form the d x d matrix."""
        with torch.no_grad():
            scale = (self.pat_hsm_scale[adapter_name] * self.pat_gate(adapter_name)).to(dtype)
            if not self.has_low_rank(adapter_name):
                return scale, None, None
            return scale, self.pat_hsm_up[adapter_name].to(dtype), self.pat_hsm_down[adapter_name].to(dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Only LoRA-only layers are additive; an HSM multiplies the output (and prunes channels)."""
        return not self.has_hsm(adapter_name)

    def _active_here(self) -> list[str]:
        return [n for n in self.active_adapters if n in self.pat_lora_A or n in self.pat_hsm_scale]

    def _forward_pat(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The ``forward`` of a PAT layer: the base output, passed through ``_apply_adapter`` for every active adapter
        held here; the plain base output when adapters are disabled (unmerging first) or merged."""
        if adapters_bypassed(self):
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for name in self._active_here():
            result = self._apply_adapter(result, x, name)
        return result


class Linear(nn.Module, PatLayer):
    """PAT around an ``nn.Linear``: LoRA (optional), then an HSM if the layer writes into the residual stream."""

    def __init__(self, base_layer: nn.Linear, adapter_name: str, gate: PatGate, **kwargs: Any) -> None:
        super().__init__()
        PatLayer.__init__(self, base_layer, gate, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._forward_pat(x, *args, **kwargs)

    def _apply_adapter(self, result: torch.Tensor, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``result`` plus the LoRA update of ``x`` (if any), then the HSM (if this layer has one)."""
        if adapter_name in self.pat_lora_A:
            result = result + self.lora_delta(x, adapter_name).to(result.dtype)
        if self.has_hsm(adapter_name):
            result = self.hsm(result, adapter_name)
        return result

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The LoRA update ``(α/r') B A`` (out, in) in the adapter dtype (zero without LoRA). An HSM is not a
        weight delta; :meth:`merged_weight` folds it."""
        if adapter_name not in self.pat_lora_A:
            return torch.zeros_like(self.get_base_layer().weight, dtype=self.adapter_dtype())
        b, a = self.pat_lora_B[adapter_name], self.pat_lora_A[adapter_name]
        return (b @ a) * self.pat_lora_scaling[adapter_name]

    def merged_weight(self, adapter_name: str, dtype=torch.float64) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Weight (out, in) and bias of the layer with ``adapter_name`` folded in, in ``dtype``:
        ``W' = diag(s ⊙ g)(I + W1 W0)(W + ΔW_LoRA)`` and ``b' = diag(s ⊙ g)(I + W1 W0) b`` for an HSM layer,
        ``W + ΔW_LoRA`` and ``b`` otherwise."""
        base = self.get_base_layer()
        with torch.no_grad():
            weight = base.weight.to(dtype) + self.get_delta_weight(adapter_name).to(dtype)
            bias = None if base.bias is None else base.bias.to(dtype)
            if self.has_hsm(adapter_name):
                scale, up, down = self.hsm_factors(adapter_name, dtype=dtype)
                if up is not None:
                    weight = weight + up @ (down @ weight)
                    bias = None if bias is None else bias + up @ (down @ bias)
                weight = scale[:, None] * weight
                bias = None if bias is None else scale * bias
        return weight, bias

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold the active (or given) adapters into the base weight and bias. The original tensors are kept aside
        (not copied) so that :meth:`unmerge` restores them exactly: a hard gate zeroes rows, which no subtraction
        can undo."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.pat_lora_A and not self.has_hsm(name):
                continue
            weight, bias = self.merged_weight(name, dtype=torch.promote_types(base.weight.dtype, self.adapter_dtype()))
            if safe_merge and not (torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())):
                raise ValueError(NAN_MESSAGE.format(name))
            self._pat_merge_backup.append((name, base.weight.data, None if base.bias is None else base.bias.data))
            base.weight.data = weight.to(base.weight.dtype)
            if bias is not None:
                base.bias.data = bias.to(base.bias.dtype)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Restore the base weight and bias as they were before merging, last merged first."""
        base = self.get_base_layer()
        while self.merged_adapters:
            self.merged_adapters.pop()
            _, weight, bias = self._pat_merge_backup.pop()
            base.weight.data = weight
            if bias is not None:
                base.bias.data = bias

    def __repr__(self) -> str:
        return "pat." + super().__repr__()


class Embedding(nn.Module, PatLayer):
    """PAT around the token embedding: the HSM acts on the embedding vectors, before the first decoder layer."""

    def __init__(self, base_layer: nn.Embedding, adapter_name: str, gate: PatGate, **kwargs: Any) -> None:
        super().__init__()
        PatLayer.__init__(self, base_layer, gate, **kwargs)
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._forward_pat(x, *args, **kwargs)

    def _apply_adapter(self, result: torch.Tensor, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The HSM applied to the embedding vectors ``result``."""
        return self.hsm(result, adapter_name)

    def merged_weight(self, adapter_name: str, dtype=torch.float64) -> torch.Tensor:
        """The embedding (vocab, d) with the HSM folded in: ``E' = (E + (E W0ᵀ) W1ᵀ) diag(s ⊙ g)``."""
        with torch.no_grad():
            table = self.get_base_layer().weight.to(dtype)
            scale, up, down = self.hsm_factors(adapter_name, dtype=dtype)
            if up is not None:
                table = table + (table @ down.T) @ up.T
            return table * scale

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold the HSM into the embedding table. The folded table is a new parameter, so an output layer tied to
        the embedding keeps the original weights (the merged model's embeddings are untied); :meth:`unmerge`
        puts the original parameter back (and so re-ties them)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if not self.has_hsm(name):
                continue
            table = self.merged_weight(name, dtype=torch.promote_types(base.weight.dtype, self.adapter_dtype()))
            if safe_merge and not torch.isfinite(table).all():
                raise ValueError(NAN_MESSAGE.format(name))
            self._pat_merge_backup.append((name, base.weight, None))
            base.weight = nn.Parameter(table.to(base.weight.dtype), requires_grad=base.weight.requires_grad)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        base = self.get_base_layer()
        while self.merged_adapters:
            self.merged_adapters.pop()
            _, weight, _ = self._pat_merge_backup.pop()
            base.weight = weight

    def __repr__(self) -> str:
        return "pat." + super().__repr__()


# ---------------------------------------------------------------------------------------------------- losses
def mask_loss(mask: torch.Tensor, width: int, count_weight: float) -> torch.Tensor:
    """The paper's mask loss: ``count_weight * |Σ_i STE(1[m_i >= 0]) - d'| / d'`` plus the polarization terms
    ``mean_{m_i > 0} (m_i - 1/2)² + mean_{m_i <= 0} (m_i + 1/2)²``.

    The straight-through estimator counts hard in the forward pass and passes the gradient through unchanged, so the
    count term pushes every m_i by ``± count_weight / d'`` until the count reaches d'. An empty group contributes 0
    (the official code takes the mean of an empty tensor at step 0 and logs NaN)."""
    hard = (mask >= 0).to(mask.dtype)
    count = (hard + mask - mask.detach()).sum()
    positive = mask > 0
    polarization = _masked_mean((mask - 0.5).square(), positive) + _masked_mean((mask + 0.5).square(), ~positive)
    return count_weight * (count - width).abs() / width + polarization


def _masked_mean(values: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    return (values * selected).sum() / selected.sum().clamp_min(1)


def identity_loss(downs: list[torch.Tensor]) -> torch.Tensor:
    """Mean over HSMs k of ``||W0_k W0_kᵀ - I_r||_F² / r²`` for the (r, d) matrices ``downs``, in float32 or better
    with autocast off (the paper's MSE against the identity, which keeps W0's rows orthonormal)."""
    with torch.autocast(device_type=downs[0].device.type, enabled=False):
        stacked = torch.stack(downs)
        if stacked.dtype not in (torch.float32, torch.float64):
            stacked = stacked.float()
        r = stacked.shape[1]
        residual = stacked @ stacked.transpose(1, 2) - torch.eye(r, dtype=stacked.dtype, device=stacked.device)
        return residual.square().sum(dim=(1, 2)).mean() / r**2
