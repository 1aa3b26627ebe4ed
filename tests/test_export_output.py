"""What an export folder holds: the model card petuning writes (valid Hub metadata for every format, training
summary, method config, no local paths), the dtype asked for, the tokenizer, and the CLI's report."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conformance.cases import CASES
from export_utils import front_matter, tuned_adapter
from fake_hub import card_errors
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from petuning.cli import main
from petuning.export import export_adapter, training_summary

SORSA = next(c for c in CASES if c.id == "sorsa-llama")
BASE_ID = "petuning-tests/tiny-llama"
TRAINER_STATE = {
    "global_step": 120,
    "epoch": 2.0,
    "train_batch_size": 8,
    "log_history": [
        {"loss": 1.9, "step": 60},
        {"loss": 0.75, "step": 120},
        {"eval_loss": 0.81, "eval_accuracy": 0.9, "step": 120},
    ],
}


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("output")
    adapter, base, _logits = tuned_adapter(SORSA, root, "adapter")
    (adapter / "trainer_state.json").write_text(json.dumps(TRAINER_STATE))
    return root, adapter, base


def test_training_summary_from_trainer_state_and_recipe_results(tuned, tmp_path):
    assert training_summary(tuned[1]) == {
        "steps": 120,
        "epochs": 2.0,
        "train_batch_size": 8,
        "final_train_loss": 0.75,
        "eval_loss": 0.81,
        "eval_accuracy": 0.9,
    }
    run = tmp_path / "run"  # a recipe's output folder: run/adapter and run/results.json
    shutil.copytree(tuned[1], run / "adapter", ignore=shutil.ignore_patterns("trainer_state.json"))
    (run / "results.json").write_text(json.dumps({"global_step": 50, "exact_match": 0.9, "loss_history": [1.0, 0.5]}))
    assert training_summary(run / "adapter") == {"global_step": 50, "exact_match": 0.9}
    (run / "results.json").write_text("{broken")
    with pytest.warns(UserWarning, match="not valid JSON"):
        assert training_summary(run / "adapter") == {}


@pytest.mark.parametrize(
    "fmt, library, relation, extra_tag",
    [
        ("merged", "transformers", "finetune", None),
        ("lora", "peft", "adapter", "lora"),
        ("adapter", "peft", "adapter", None),
    ],
)
def test_model_card(tuned, tmp_path, fmt, library, relation, extra_tag):
    root, adapter, base = tuned
    result = export_adapter(adapter, tmp_path / fmt, format=fmt, base_model_id=BASE_ID)
    readme = (result.folder / "README.md").read_text()
    assert card_errors(readme) == []
    meta = front_matter(readme)
    assert meta["library_name"] == library and meta["base_model"] == BASE_ID
    assert meta["base_model_relation"] == relation and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"][:2] == ["petuning", "sorsa"]
    assert (extra_tag in meta["tags"]) if extra_tag else ("lora" not in meta["tags"])
    assert (f"base_model:adapter:{BASE_ID}" in meta["tags"]) == (library == "peft")
    assert "| final_train_loss | 0.75 |" in readme and "| eval_accuracy | 0.9 |" in readme
    shown = json.loads(readme.split("```json\n")[1].split("\n```")[0])
    assert shown["peft_type"] == "SORSA" and shown["r"] == 4 and isinstance(shown["target_modules"], list)
    assert str(base) not in readme and str(root) not in readme  # no local paths in the card
    if fmt == "lora":
        assert "exact (every ΔW fits its rank)" in readme
    if library == "peft":  # the adapter config names the Hub id, so AutoPeftModel works after a download
        assert json.loads((result.folder / "adapter_config.json").read_text())["base_model_name_or_path"] == BASE_ID


def test_local_base_without_hub_id_gives_a_valid_card_without_base_model(tuned, tmp_path):
    result = export_adapter(tuned[1], tmp_path / "m")
    readme = (result.folder / "README.md").read_text()
    meta = front_matter(readme)
    assert "base_model" not in meta and "base_model_relation" not in meta and card_errors(readme) == []
    with pytest.raises(ValueError, match="not a Hub model id"):
        export_adapter(tuned[1], tmp_path / "m2", base_model_id="/home/me/models/base")


def test_bfloat16_export_rounds_each_merged_weight_once(tuned, tmp_path):
    """The float32 merge is cast to bfloat16 afterwards: every stored weight equals the float32 merged weight rounded
    once (merging into a bfloat16 copy of the base would round twice)."""
    full = export_adapter(tuned[1], tmp_path / "fp32")
    half = export_adapter(tuned[1], tmp_path / "bf16", dtype="bfloat16")
    fp32 = AutoModelForCausalLM.from_pretrained(full.folder, dtype=torch.float32).state_dict()
    bf16 = AutoModelForCausalLM.from_pretrained(half.folder, dtype=torch.bfloat16).state_dict()
    assert all(bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], fp32[k].to(torch.bfloat16)) for k in fp32)


def test_dtype_and_tokenizer(tuned, tmp_path):
    result = export_adapter(tuned[1], tmp_path / "bf16", dtype="bfloat16", summary={"note": "given"})
    shards = [f for f in result.files if f.endswith(".safetensors")]
    for shard in shards:
        with safe_open(result.folder / shard, "pt") as handle:
            assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"BF16"}  # noqa: SIM118 (safe_open is not iterable)
    assert AutoConfig.from_pretrained(result.folder).dtype in ("bfloat16", torch.bfloat16)
    assert "| note | given |" in (result.folder / "README.md").read_text()
    original, exported = AutoTokenizer.from_pretrained(tuned[2]), AutoTokenizer.from_pretrained(result.folder)
    text = "What is 47 + 385?"
    assert exported(text).input_ids == original(text).input_ids and exported.chat_template == original.chat_template
    assert result.tokenizer_source == str(tuned[2])


def test_cli_lora_export_prints_the_conversion_report(tuned, tmp_path, capsys):
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"dataset": "arithmetic"}))
    out = tmp_path / "lora"
    code = main(
        [
            "export",
            str(tuned[1]),
            "--out",
            str(out),
            "--format",
            "lora",
            "--lora-rank",
            "2",
            "--training-summary",
            str(summary),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "model.layers.0.self_attn.q_proj" in printed and "truncated SVD" in printed
    assert f"wrote {out} (lora)" in printed
    assert "| dataset | arithmetic |" in (out / "README.md").read_text()
