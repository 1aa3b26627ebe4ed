"""A bitsandbytes 4-bit (NF4) linear base on CPU for tests, skipped where bitsandbytes or its CPU path is missing."""

from __future__ import annotations

import pytest
import torch
from torch import nn


def quantized_model(in_features: int):
    """``(bitsandbytes, model)``: ``model.proj`` is a ``Linear4bit(in_features, 16)`` quantized from a seeded
    ``nn.Linear``, followed by ReLU and a float ``head`` of 16 -> 4. Skips the test when the 4-bit round trip
    fails on this machine."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    ref = nn.Linear(in_features, 16)
    try:
        q = bnb.nn.Linear4bit(in_features, 16, bias=True, compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(ref.weight.data.clone(), requires_grad=False, quant_type="nf4")
        q.bias = nn.Parameter(ref.bias.data.clone(), requires_grad=False)
        q = q.to("cpu")
        q(torch.randn(2, in_features))
        assert q.weight.quant_state is not None
    except Exception as exc:
        pytest.skip(f"bitsandbytes 4-bit does not work on CPU here: {exc!r}")

    class Q(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = q
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            return self.head(torch.relu(self.proj(x)))

    return bnb, Q()
