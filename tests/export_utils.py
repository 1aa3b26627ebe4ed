"""Helpers shared by the export tests: tuned adapters on tiny bases, and Python subprocesses.

Reloads run in subprocesses so that they can prove petuning is never imported (merged models, LoRA conversions)
and so that ``HF_ENDPOINT`` is set before ``huggingface_hub`` is imported (pushes, downloads).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from conformance.cases import MethodCase
from conformance.models import build_base, make_inputs, train_steps
from peft import PeftModel, get_peft_model

from petuning.testing import build_tiny_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]


def tuned_model(case: MethodCase, root: Path) -> PeftModel:
    """A PEFT model of ``case`` that is not an identity: random start plus three AdamW steps, in eval mode."""
    torch.manual_seed(0)
    model = get_peft_model(build_base(case.model, root), case.make_config(False))
    train_steps(model, case.model, make_inputs(case.model))
    return model


def tuned_adapter(case: MethodCase, root: Path, name: str) -> tuple[Path, Path, torch.Tensor]:
    """Save a :func:`tuned_model` of a language-model ``case`` on the tiny base (which gets a tokenizer), and return
    (adapter folder, base folder, the adapter model's logits)."""
    base_dir = root / f"tiny-{case.model}"
    model = tuned_model(case, root)
    if not (base_dir / "tokenizer_config.json").exists():
        build_tiny_tokenizer().save_pretrained(base_dir)
    adapter_dir = root / name
    model.save_pretrained(adapter_dir)
    with torch.no_grad():
        logits = model(**make_inputs(case.model)).logits
    return adapter_dir, base_dir, logits


def run_python(code: str, env: dict | None = None, args: list[str] | None = None, timeout: int = 300):
    """Run ``python -c code`` (or ``python -m petuning.cli args``) from the repo root; return the CompletedProcess."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_TELEMETRY": "1", **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")])
    command = [sys.executable, "-m", "petuning.cli", *args] if args is not None else [sys.executable, "-c", code]
    return subprocess.run(command, env=full_env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def front_matter(readme: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", readme, re.S)
    assert match, "the model card has no YAML front matter"
    return yaml.safe_load(match.group(1))
