"""Small modules built in code for the layer-math tests (no config, no download)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


class MLP(nn.Module):
    """12 -> 10 -> 8 with biases: ``lin2(tanh(lin1(x)))``."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.lin1 = nn.Linear(12, 10, dtype=dtype)
        self.lin2 = nn.Linear(10, 8, dtype=dtype)

    def forward(self, x):
        return self.lin2(torch.tanh(self.lin1(x)))


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
