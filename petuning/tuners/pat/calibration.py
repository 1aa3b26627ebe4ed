"""Calibration of PAT's channel mask: per-channel RMS of the residual stream, and the mask it starts from.

In the decoders PAT supports, every write into the residual stream passes through an HSM, in forward order: the token
embedding, then ``o_proj`` and ``down_proj`` of each layer. The stream after the k-th write is therefore the running
sum ``h_k = y_0 + ... + y_k`` of the HSM outputs, and the statistic is::

    rms_i = sqrt( Σ_{positions p} Σ_{k=0..2L} h_k[p, i]² / (positions · (2L + 1)) )       (d,)

over the positions the attention mask keeps (Minitron ranks hidden channels by forward activations the same way).
SmolLM2's channel 507, a massive activation, has an RMS thousands of times the median's.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from petuning.tuners.common import several_ranks

from .layer import POLAR, kept_channels


class ResidualStatistics:
    """Accumulates Σ h_k² per channel over forwards. The embedding HSM opens a forward (:meth:`start`), each later
    write adds (:meth:`add`), and :meth:`close` keeps the positions of the attention mask. A write seen outside an
    open forward (a gradient-checkpointing recompute during backward) is ignored, so nothing is counted twice."""

    def __init__(self, explicit: bool = False) -> None:
        self.explicit = explicit  # calibrate_pat_mask's own no-grad forwards; else training forwards only
        self.sum_sq: Optional[torch.Tensor] = None
        self.count = 0
        self._running: Optional[torch.Tensor] = None
        self._squares: Optional[torch.Tensor] = None
        self._states = 0

    def observes(self, training: bool) -> bool:
        return self.explicit or (training and torch.is_grad_enabled())

    def start(self, output: torch.Tensor) -> None:
        self._running = output.detach().double()
        self._squares = self._running.square()
        self._states = 1

    def add(self, output: torch.Tensor) -> None:
        if self._running is None or output.shape != self._running.shape:
            return
        self._running = self._running + output.detach().double()
        self._squares = self._squares + self._running.square()
        self._states += 1

    def close(self, attention_mask: Optional[torch.Tensor]) -> None:
        """End the forward: add its squares at the positions ``attention_mask`` (batch, seq) keeps (all without)."""
        if self._squares is None:
            return
        squares = self._squares.reshape(-1, self._squares.shape[-1])
        if isinstance(attention_mask, torch.Tensor) and attention_mask.numel() == squares.shape[0]:
            squares = squares[attention_mask.reshape(-1).to(squares.device).bool()]
        total = squares.sum(dim=0)
        self.sum_sq = total if self.sum_sq is None else self.sum_sq + total
        self.count += squares.shape[0] * self._states
        self._running = self._squares = None
        self._states = 0

    def rms(self) -> torch.Tensor:
        """The per-channel RMS (d,) in float64, summed over all ranks of an initialized process group first (so every
        rank of a DDP / FSDP run gets the same statistic). Raises if no forward was observed."""
        if self.sum_sq is None:
            raise RuntimeError(
                "PAT's mask_init='activation' calibrates the channel mask on the training forwards of the first "
                "optimizer step, but none reached the model's embedding (inputs_embeds instead of input_ids?). Call "
                "model.base_model.calibrate_pat_mask(batches) before training, or use PatConfig(mask_init='zeros')."
            )
        totals = torch.cat([self.sum_sq, torch.tensor([float(self.count)], dtype=torch.float64, device=self.sum_sq.device)])
        if several_ranks():  # on the activations' device, which the process group serves
            dist.all_reduce(totals)
        return (totals[:-1] / totals[-1]).sqrt().cpu()


def calibrated_mask(rms: torch.Tensor, width: int) -> torch.Tensor:
    """The starting mask (d,): +1/2 on the ``width`` channels with the largest RMS (which include every protected
    one), -1/2 elsewhere; so count(m >= 0) = d' and the polarization loss is 0."""
    mask = torch.full_like(rms, -POLAR)
    mask[kept_channels(rms, width)] = POLAR
    return mask
