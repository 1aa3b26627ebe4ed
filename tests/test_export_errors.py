"""Bad input to the export gets a clear error naming the problem and the fix, and nothing is lost."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conformance.cases import CASES
from conformance.models import make_inputs
from export_utils import tuned_adapter
from peft import IA3Config, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import petuning.export as export
from petuning.cli import main
from petuning.export import adapter_to_lora, check_safetensors, export_adapter, load_adapter_model, merge
from petuning.testing import build_tiny_model

LM_CASES = [c for c in CASES if c.model in ("llama", "opt")]
SORSA = next(c for c in CASES if c.id == "sorsa-llama")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    adapter, base, logits = tuned_adapter(SORSA, root, "adapter")
    return root, adapter, base, logits


def _copy_adapter(adapter, target):
    shutil.copytree(adapter, target)
    return target


# ------------------------------------------------------------------------------------------ inputs


def test_missing_adapter_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_adapter(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        export_adapter(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_and_corrupt_safetensors_are_refused(tuned, tmp_path):
    adapter = _copy_adapter(tuned[1], tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    data = weights.read_bytes()
    check_safetensors(weights)  # the intact file passes
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated"):
        export_adapter(adapter, tmp_path / "out")
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(ValueError, match="corrupt.*not valid safetensors JSON"):
        export_adapter(adapter, tmp_path / "out")
    weights.write_bytes(data[:5])
    with pytest.raises(ValueError, match="fewer than a safetensors header"):
        export_adapter(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pickle_adapter_and_pickle_base_are_refused(tuned, tmp_path):
    adapter = _copy_adapter(tuned[1], tmp_path / "adapter")
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickle.*adapter_model.bin.*execute arbitrary code"):
        export_adapter(adapter, tmp_path / "out")

    base = tmp_path / "pickled-base"
    base.mkdir()
    shutil.copy(tuned[2] / "config.json", base / "config.json")
    (base / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="base model.*pickle.*pytorch_model.bin"):
        export_adapter(tuned[1], tmp_path / "out", base=base)


@pytest.mark.parametrize("case", LM_CASES, ids=[c.id for c in LM_CASES])
def test_base_with_different_shapes_is_refused(case, tmp_path):
    adapter = tuned_adapter(case, tmp_path, "adapter")[0]
    other = tmp_path / "other-base"
    widths = {
        "llama": dict(hidden_size=32, intermediate_size=96),
        "opt": dict(hidden_size=32, word_embed_proj_dim=32, ffn_dim=96),
    }
    build_tiny_model(case.model, save_dir=other, **widths[case.model])
    with pytest.raises(ValueError, match=r"does not fit the base model .*other-base.*pass it with base="):
        export_adapter(adapter, tmp_path / "out", base=other)
    assert not (tmp_path / "out").exists()


def test_quantized_checkpoint_is_refused(tuned, tmp_path):
    base = tmp_path / "quantized-base"
    shutil.copytree(tuned[2], base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="stored quantized \\(bitsandbytes\\).*16/32-bit"):
        export_adapter(tuned[1], tmp_path / "out", base=base)


def test_4bit_model_is_not_merged_but_its_adapter_exports_from_full_precision(tuned, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    _root, _, base_dir, _ = tuned
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_type="nf4")
    try:
        base4 = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quant, dtype=torch.float32)
    except Exception as exc:
        pytest.skip(f"bitsandbytes 4-bit does not load on CPU here: {exc!r}")
    torch.manual_seed(0)
    qlora = get_peft_model(base4, SORSA.make_config(False))
    with pytest.raises(ValueError, match="quantized.*reloads the base in 16/32-bit"):
        merge(qlora)
    adapter = tmp_path / "qlora-adapter"
    qlora.save_pretrained(adapter)
    result = export_adapter(adapter, tmp_path / "merged")
    # the export merged into the float32 base: same logits as the adapter applied to the float32 base
    full = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).eval()
    merged = AutoModelForCausalLM.from_pretrained(result.folder).eval()
    assert merged.dtype == torch.float32
    inputs = make_inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, full(**inputs).logits, atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ options


def test_prune_applies_only_to_pat(tuned, tmp_path):
    with pytest.raises(ValueError, match="--prune applies only to PAT.*this adapter is SORSA"):
        export_adapter(tuned[1], tmp_path / "out", prune=True)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_non_additive_adapter_is_not_converted_to_lora(tuned, tmp_path):
    ia3 = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tuned[2]),
        IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    with pytest.raises(
        ValueError, match="--format lora needs an additive adapter.*of this IA3 adapter does not declare one"
    ):
        adapter_to_lora(ia3)


def test_inconsistent_options(tuned, tmp_path):
    adapter = tuned[1]
    with pytest.raises(ValueError, match="format must be one of"):
        export_adapter(adapter, tmp_path / "o", format="onnx")
    with pytest.raises(ValueError, match="--prune .* cannot be combined"):
        export_adapter(adapter, tmp_path / "o", format="lora", prune=True)
    with pytest.raises(ValueError, match="--lora-rank only applies"):
        export_adapter(adapter, tmp_path / "o", lora_rank=2)
    with pytest.raises(ValueError, match="--dtype does not apply to --format adapter"):
        export_adapter(adapter, tmp_path / "o", format="adapter", dtype="float16")
    with pytest.raises(ValueError, match="dtype must be"):
        export_adapter(adapter, tmp_path / "o", dtype="int8")
    with pytest.raises(ValueError, match="LoRA rank must be a positive integer"):
        export_adapter(adapter, tmp_path / "o", format="lora", lora_rank=0)
    for out in (adapter, adapter.parent):  # replacing either would delete the adapter
        with pytest.raises(ValueError, match="would overwrite the input"):
            export_adapter(adapter, out, overwrite=True)
    assert not (tmp_path / "o").exists() and (adapter / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("repo_id", ["bad repo id", "a/b/c", "-leading/dash", "x" * 100])
def test_invalid_repo_id_is_refused_before_any_work(tuned, tmp_path, repo_id):
    with pytest.raises(ValueError, match="not a valid Hub repo id"):
        export_adapter(tuned[1], tmp_path / "out", push_to_hub=repo_id, token="unused")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ atomic writes


def test_existing_output_is_kept_unless_overwrite(tuned, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists.*--overwrite"):
        export_adapter(tuned[1], out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    export_adapter(tuned[1], out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders left


def test_failed_export_leaves_nothing_and_keeps_the_old_folder(tuned, tmp_path, monkeypatch):
    def broken_card(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_model_card", broken_card)
    with pytest.raises(OSError, match="disk full"):
        export_adapter(tuned[1], tmp_path / "new")
    assert list(tmp_path.iterdir()) == []
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    with pytest.raises(OSError, match="disk full"):
        export_adapter(tuned[1], old, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old"] and (old / "keep.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------ CLI


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Adapter folder") and "Traceback" not in err
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--private"]) == 1
    assert "--private only applies with --push-to-hub" in capsys.readouterr().err


def test_load_adapter_model_reproduces_the_adapter(tuned):
    model = load_adapter_model(tuned[1])
    with torch.no_grad():
        torch.testing.assert_close(model(**make_inputs("llama")).logits, tuned[3], atol=0, rtol=0)
