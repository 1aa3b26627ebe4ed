"""Shared test set-up: offline, CPU, petuning registered, GPU tests skipped cleanly; shared fixtures."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest
import torch

import petuning  # noqa: F401  (registers the methods)
from petuning.testing import build_tiny_model


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A saved tiny Llama (``build_tiny_model("llama", seed=0)``, float32), built once per session. Read-only: a
    test that writes next to a base builds its own."""
    path = tmp_path_factory.mktemp("tiny-llama-base") / "tiny-llama"
    build_tiny_model("llama", save_dir=path, seed=0)
    return path
