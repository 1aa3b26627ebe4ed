"""Small modules built in code for the layer-math tests (no config, no download)."""

from __future__ import annotations

import itertools

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


class MLP(nn.Module):
    """``widths[0] -> ... -> widths[-1]`` with biases and tanh between: layers ``lin1 .. lin{n}``. Default
    12 -> 10 -> 8, i.e. ``lin2(tanh(lin1(x)))``."""

    def __init__(self, dtype: torch.dtype = torch.float32, widths: tuple[int, ...] = (12, 10, 8)):
        super().__init__()
        self.depth = len(widths) - 1
        for index, (fan_in, fan_out) in enumerate(itertools.pairwise(widths), start=1):
            setattr(self, f"lin{index}", nn.Linear(fan_in, fan_out, dtype=dtype))

    def forward(self, x):
        for index in range(1, self.depth):
            x = torch.tanh(getattr(self, f"lin{index}")(x))
        return getattr(self, f"lin{self.depth}")(x)


class Conv1DNet(nn.Module):
    """GPT-2 style Conv1D: weight stored as (in 14, out 9), non-zero bias."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.proj = Conv1D(nf=9, nx=14)
        with torch.no_grad():
            self.proj.weight.normal_(0, 0.3)
            self.proj.bias.normal_(0, 0.5)
        self.to(dtype)

    def forward(self, x):
        return self.proj(x)
