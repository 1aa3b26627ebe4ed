"""The README's Python quick start runs as written (on the embedded SmolLM2 instead of the Hub id), and every local
link of the README and of docs/ points at a file that exists."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from petuning.recipe.smollm2 import SMOLLM2_HUB_ID, smollm2_path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def quick_start() -> str:
    text = README.read_text()
    section = text[text.index("## Quick start") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_quick_start_runs_and_leaves_a_plain_merged_model(tmp_path, monkeypatch):
    code = quick_start()
    assert SMOLLM2_HUB_ID in code and len(code.strip().splitlines()) <= 10
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code.replace(SMOLLM2_HUB_ID, str(smollm2_path())), "README quick start", "exec"), namespace)
    assert "trainable params" in printed.getvalue()
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "SORSA" and config["r"] == 16
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = namespace["merged"]
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any(isinstance(module, BaseTunerLayer) for module in merged.modules())


def test_local_links_resolve():
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    missing = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            if not (page.parent / target).exists():
                missing.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not missing, missing
    linked = set(re.findall(r"\]\(docs/([^)#]+)", README.read_text()))
    assert linked == {p.name for p in (ROOT / "docs").glob("*.md")}  # every docs page is reachable from the README
