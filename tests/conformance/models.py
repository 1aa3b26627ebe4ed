"""Locally built models for the conformance suite, each with a seeded input batch.

Kinds: ``mlp`` (nn.Linear), ``conv1d_gpt2`` (transformers' Conv1D, GPT-2 layout), ``conv2d`` (nn.Conv2d),
``embedding`` (nn.Embedding, integer inputs), ``conv1d`` (nn.Conv1d, circular padding), ``conv2d_1x1`` (pointwise
nn.Conv2d), ``conv2d_groups`` (grouped and depthwise nn.Conv2d, dilation, reflect padding), ``conv3d`` (nn.Conv3d),
``llama`` and ``opt`` (tiny causal LMs saved to disk, so PEFT records a loadable base path).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

import petuning
from petuning.testing import build_tiny_model

LANGUAGE_MODELS = ("llama", "opt")


class MLP(nn.Module):
    """in 12 -> 24 -> 24 -> 6, with biases and a LayerNorm that is never targeted."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(12, 24)
        self.lin1 = nn.Linear(24, 24)
        self.norm = nn.LayerNorm(24)
        self.lin2 = nn.Linear(24, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.lin0(x))
        x = self.norm(torch.relu(self.lin1(x)))
        return self.lin2(x)


class Conv1DNet(nn.Module):
    """GPT-2 style: transformers' Conv1D layers store their weight as (in, out)."""

    def __init__(self) -> None:
        super().__init__()
        self.c_fc = Conv1D(24, 12)  # Conv1D(nf=out, nx=in)
        self.c_proj = Conv1D(6, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(torch.tanh(self.c_fc(x)))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.lin = nn.Linear(8 * 6 * 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.relu(self.conv(x)).flatten(1))


class EmbeddingNet(nn.Module):
    """Token ids -> nn.Embedding(30, 12) -> nn.Linear(12, 6)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 12)
        self.lin = nn.Linear(12, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.emb(x))


class Conv1dNet(nn.Module):
    """nn.Conv1d 4 -> 8 (k3), then 8 -> 6 (k5, stride 2, circular padding)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv1d(4, 8, 3, padding=1)
        self.conv1 = nn.Conv1d(8, 6, 5, stride=2, padding=2, padding_mode="circular")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(torch.relu(self.conv0(x)))


class Conv2d1x1Net(nn.Module):
    """Two pointwise (1x1) nn.Conv2d layers, 6 -> 12 -> 6."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(6, 12, 1)
        self.conv1 = nn.Conv2d(12, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(torch.relu(self.conv0(x)))


class Conv2dGroupsNet(nn.Module):
    """A grouped nn.Conv2d (4 -> 8, groups 2) and a depthwise one (8 -> 8, groups 8, dilation 2, reflect padding)."""

    def __init__(self) -> None:
        super().__init__()
        self.grouped = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8, padding_mode="reflect")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.depthwise(torch.relu(self.grouped(x)))


class Conv3dNet(nn.Module):
    """nn.Conv3d 3 -> 6 with a (2, 3, 3) kernel, stride (1, 2, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 6, (2, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


_MODULES = {
    "mlp": MLP,
    "conv1d_gpt2": Conv1DNet,
    "conv2d": ConvNet,
    "embedding": EmbeddingNet,
    "conv1d": Conv1dNet,
    "conv2d_1x1": Conv2d1x1Net,
    "conv2d_groups": Conv2dGroupsNet,
    "conv3d": Conv3dNet,
}


def build_base(kind: str, root: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The same base model (same weights) every time it is called with the same ``kind``."""
    if kind in LANGUAGE_MODELS:
        path = root / f"tiny-{kind}"
        if not path.exists():
            build_tiny_model(kind, save_dir=path, seed=0)
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _MODULES[kind]()
    return model.to(dtype).eval()


def make_inputs(kind: str) -> dict:
    generator = torch.Generator().manual_seed(1)
    if kind in LANGUAGE_MODELS:
        ids = torch.randint(4, 100, (2, 10), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == "embedding":
        return {"x": torch.randint(0, 30, (5, 7), generator=generator)}
    shape = {
        "mlp": (5, 12),
        "conv1d_gpt2": (5, 12),
        "conv2d": (2, 3, 6, 6),
        "conv1d": (2, 4, 10),
        "conv2d_1x1": (2, 6, 5, 5),
        "conv2d_groups": (2, 4, 6, 6),
        "conv3d": (2, 3, 4, 6, 6),
    }[kind]
    return {"x": torch.randn(*shape, generator=generator)}


def outputs(model: nn.Module, kind: str, inputs: dict) -> torch.Tensor:
    """Logits for language models, the plain output tensor otherwise."""
    if kind in LANGUAGE_MODELS:
        return model(**inputs).logits
    return model(inputs["x"])


def training_loss(model: nn.Module, kind: str, inputs: dict) -> torch.Tensor:
    if kind in LANGUAGE_MODELS:
        return model(**inputs, labels=inputs["input_ids"]).loss
    return outputs(model, kind, inputs).pow(2).mean()


def train_steps(model: nn.Module, kind: str, inputs: dict, steps: int = 3, lr: float = 1e-2) -> None:
    """A few AdamW steps on :func:`training_loss` with petuning's training driver attached, as a user's loop would
    have it; leaves the model in eval mode."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    with petuning.TrainingHooks(model, optimizer, max_steps=steps):
        for _ in range(steps):
            training_loss(model, kind, inputs).backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
