"""Calibration of PAT's channel mask: per-channel RMS of the residual stream, and the mask it starts from.

In the decoders PAT supports, every write into the residual stream passes through an HSM, in forward order: the token
embedding, then ``o_proj`` and ``down_proj`` of each layer. The stream after the k-th write is therefore the running
sum ``h_k = y_0 + ... + y_k`` of the HSM outputs, and the statistic is::

    rms_i = sqrt( Σ_{positions p} Σ_{k=0..2L} h_k[p, i]² / (positions · (2L + 1)) )       (d,)

over the positions the attention mask keeps (Minitron ranks hidden channels by forward activations the same way).
SmolLM2's channel 507, a massive activation, has an RMS thousands of times the median's.

With ``mask_init="norm_output"`` the channels are ranked instead by what the decoder reads: state h_k is read through
the RMSNorm with weight γ_k (``input_layernorm``/``post_attention_layernorm`` of its layer, the final norm for
h_2L), and the score is the mean square of the norms' outputs::

    score_i = Σ_p Σ_k (γ_k[i] h_k[p, i])² / (mean_j h_k[p, j]² + eps) / (positions · (2L + 1))     (d,)

A massive channel has a huge RMS but a small γ, so the RMS alone overrates what the model reads from it (and
underrates the rest); the protected channels still follow the RMS.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import torch.distributed as dist

from petuning.tuners.common import several_ranks

from .layer import POLAR, kept_channels


class ResidualStatistics:
    """Accumulates Σ h_k² per channel over forwards. The embedding HSM opens a forward (:meth:`start`), each later
    write adds (:meth:`add`), and :meth:`close` keeps the positions of the attention mask. A write seen outside an
    open forward (a gradient-checkpointing recompute during backward) is ignored, so nothing is counted twice."""

    def __init__(self, explicit: bool = False, norms: Optional[Callable[[], list[tuple[torch.Tensor, float]]]] = None):
        self.explicit = explicit  # calibrate_pat_mask's own no-grad forwards; else training forwards only
        self.norms = norms  # with mask_init="norm_output": (γ_k, eps) of the norm reading each state, in order
        self.sum_sq: Optional[torch.Tensor] = None
        self.norm_sum_sq: Optional[torch.Tensor] = None
        self.count = 0
        self._running: Optional[torch.Tensor] = None
        self._squares: Optional[torch.Tensor] = None
        self._norm_squares: Optional[torch.Tensor] = None
        self._readers: list[tuple[torch.Tensor, float]] = []
        self._states = 0

    def observes(self, training: bool) -> bool:
        return self.explicit or (training and torch.is_grad_enabled())

    def start(self, output: torch.Tensor) -> None:
        self._running = output.detach().double()
        self._squares = self._running.square()
        self._states = 1
        if self.norms is not None:
            self._readers = self.norms()
            self._norm_squares = self._normalized_square(0)

    def add(self, output: torch.Tensor) -> None:
        if self._running is None or output.shape != self._running.shape:
            return
        self._running = self._running + output.detach().double()
        self._squares = self._squares + self._running.square()
        if self._norm_squares is not None and self._states < len(self._readers):
            self._norm_squares = self._norm_squares + self._normalized_square(self._states)
        self._states += 1

    def _normalized_square(self, k: int) -> torch.Tensor:
        """(γ_k ⊙ h_k / rms(h_k))² of the current state h_k, as its RMSNorm computes it (in float64)."""
        weight, eps = self._readers[k]
        state = self._running
        normalized = state * torch.rsqrt(state.square().mean(dim=-1, keepdim=True) + eps)
        return (normalized * weight.to(state)).square()

    def close(self, attention_mask: Optional[torch.Tensor]) -> None:
        """End the forward: add its squares at the positions ``attention_mask`` (batch, seq) keeps (all without)."""
        if self._squares is None:
            return
        squares = self._kept_positions(self._squares, attention_mask)
        total = squares.sum(dim=0)
        self.sum_sq = total if self.sum_sq is None else self.sum_sq + total
        if self._norm_squares is not None:
            normalized = self._kept_positions(self._norm_squares, attention_mask).sum(dim=0)
            self.norm_sum_sq = normalized if self.norm_sum_sq is None else self.norm_sum_sq + normalized
        self.count += squares.shape[0] * self._states
        self._running = self._squares = self._norm_squares = None
        self._states = 0

    @staticmethod
    def _kept_positions(values: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        rows = values.reshape(-1, values.shape[-1])
        if isinstance(attention_mask, torch.Tensor) and attention_mask.numel() == rows.shape[0]:
            rows = rows[attention_mask.reshape(-1).to(rows.device).bool()]
        return rows

    def rms(self) -> torch.Tensor:
        """The per-channel RMS (d,) in float64, summed over all ranks of an initialized process group first (so every
        rank of a DDP / FSDP run gets the same statistic). Raises if no forward was observed."""
        self._check_observed()
        return self._mean_over_ranks(self.sum_sq).sqrt()

    def _check_observed(self) -> None:
        if self.sum_sq is None:
            raise RuntimeError(
                "PAT's calibrated mask_init ('activation', 'norm_output') calibrates the channel mask on the "
                "training forwards of the first optimizer step, but none reached the model's embedding (inputs_embeds "
                "instead of input_ids?). Call model.base_model.calibrate_pat_mask(batches) before training, or use "
                "PatConfig(mask_init='zeros')."
            )

    def norm_output_score(self) -> torch.Tensor:
        """The ``mask_init="norm_output"`` score (d,) in float64, over all ranks like :meth:`rms`."""
        self._check_observed()
        return self._mean_over_ranks(self.norm_sum_sq)

    def _mean_over_ranks(self, sums: torch.Tensor) -> torch.Tensor:
        totals = torch.cat([sums, torch.tensor([float(self.count)], dtype=torch.float64, device=sums.device)])
        if several_ranks():  # on the activations' device, which the process group serves
            dist.all_reduce(totals)
        return (totals[:-1] / totals[-1]).cpu()


def calibrated_mask(score: torch.Tensor, width: int, protected: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The starting mask (d,): +1/2 on the ``protected`` channels (bool (d,)) and on the largest ``score`` entries up
    to ``width`` channels, -1/2 elsewhere; so count(m >= 0) = d' and the polarization loss is 0."""
    mask = torch.full_like(score, -POLAR)
    mask[kept_channels(score, width, protected)] = POLAR
    return mask
