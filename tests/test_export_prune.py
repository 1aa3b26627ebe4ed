"""``petuning export --prune`` on a PAT adapter: the export asks the tuner to prune (``petuning_prune_and_unload``)
and writes a smaller checkpoint that loads without petuning and reproduces the masked model's logits. The pruning
math itself is tested with PAT (tests/test_pat_prune.py); this file tests the export path around it."""

from __future__ import annotations

import json

import pytest
import torch
from export_utils import front_matter, run_python
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from petuning import PatConfig
from petuning.export import export_adapter
from petuning.testing import build_tiny_model, build_tiny_tokenizer

WIDTH = 48

RELOAD = """
import sys
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(FOLDER, dtype=torch.float32).eval()
assert not any(m == "petuning" or m.startswith("petuning.") for m in sys.modules), "petuning was imported"
with torch.no_grad():
    save_file({"logits": model(**load_file(INPUTS)).logits.contiguous()}, OUT)
"""


def _inputs():
    ids = torch.randint(4, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _pat_adapter(root, finalize: bool):
    base_dir = root / "tiny-llama"
    if not base_dir.exists():
        build_tiny_model("llama", save_dir=base_dir)
        build_tiny_tokenizer().save_pretrained(base_dir)
    torch.manual_seed(0)
    config = PatConfig(
        target_width=WIDTH,
        hsm_rank=8,
        lora_r=4,
        lora_dropout=0.0,
        schedule_steps=20,
        init_weights=False,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir).eval(), config)
    batch = _inputs()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    if finalize:
        model.base_model.finalize_pat_mask()
    adapter = root / ("pat-final" if finalize else "pat-learning")
    model.save_pretrained(adapter)
    with torch.no_grad():
        return adapter, model(**batch).logits


def test_prune_export_is_smaller_and_reloads_without_petuning(tmp_path):
    adapter, logits = _pat_adapter(tmp_path, finalize=True)
    result = export_adapter(adapter, tmp_path / "pruned", prune=True, base_model_id="org/tiny-llama")
    config = json.loads((result.folder / "config.json").read_text())
    assert config["hidden_size"] == WIDTH < 64
    meta = front_matter((result.folder / "README.md").read_text())
    assert {"petuning", "pat", "pruned"} <= set(meta["tags"]) and meta["base_model_relation"] == "finetune"
    assert "tokenizer.json" in result.files

    save_file(_inputs(), tmp_path / "inputs.safetensors")
    paths = {"FOLDER": result.folder, "INPUTS": tmp_path / "inputs.safetensors", "OUT": tmp_path / "out.safetensors"}
    process = run_python("".join(f"{k} = {str(v)!r}\n" for k, v in paths.items()) + RELOAD)
    assert process.returncode == 0, process.stderr[-3000:]
    torch.testing.assert_close(load_file(paths["OUT"])["logits"], logits, atol=2e-5, rtol=1e-5)


def test_prune_before_the_mask_is_final_is_refused(tmp_path):
    adapter, _ = _pat_adapter(tmp_path, finalize=False)
    with pytest.raises(ValueError, match="(?i)final"):
        export_adapter(adapter, tmp_path / "pruned", prune=True)
    assert not (tmp_path / "pruned").exists()


def test_pat_is_not_converted_to_lora(tmp_path):
    adapter, _ = _pat_adapter(tmp_path, finalize=True)
    with pytest.raises(
        ValueError, match="needs an additive adapter.*of this PAT adapter does not declare one.*--prune"
    ):
        export_adapter(adapter, tmp_path / "lora", format="lora")
    assert not (tmp_path / "lora").exists()
