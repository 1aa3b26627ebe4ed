"""The speed harness (benchmarks/method_speed.py) on small stand-ins for its workloads: every variant runs, the
ratios are against LoRA measured in the same run, the dense-masked baseline computes the same adapter, and the
conv net's FLoRA is matched to LoRA's parameter count."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import method_speed
from variants import METHODS, method_config

from petuning.testing import build_tiny_model

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture
def small_workloads(monkeypatch):
    real = method_speed.workloads()
    tiny = method_speed.lm_workload("tiny_llama", "small", lambda: build_tiny_model("llama", seed=0, **SMALL), 2, 16)
    monkeypatch.setattr(method_speed, "workloads", lambda: {**real, "tiny_llama": tiny})


def test_every_variant_runs_against_lora_and_the_tables_come_from_the_json(small_workloads, tmp_path):
    out = tmp_path / "speed.json"
    method_speed.main(
        ["--no-smollm2", "--repeats", "2", "--steps-per-block", "1", "--warmup", "0", "--budget", "1"]
        + ["--densities", "0.05", "--init-repeats", "0", "--out", str(out)]
    )
    results = json.loads(out.read_text())
    tiny = results["training"]["tiny_llama"]
    assert list(tiny["variants"]) == list(method_speed.VARIANTS)  # lora first, every variant
    assert set(tiny["ratios"]) == {f"{v}/lora" for v in method_speed.VARIANTS if v != "lora"} | {
        "sparse_low_rank/sparse_low_rank_dense_masked"
    }
    for name, ratio in tiny["ratios"].items():
        variant, reference = name.split("/")
        a, b = tiny["variants"][variant], tiny["variants"][reference]
        assert ratio["step_time"] == pytest.approx(a["step_s_median"] / b["step_s_median"])
        assert ratio["peak_memory"] == pytest.approx(a["memory"]["peak_mib"] / b["memory"]["peak_mib"])
    for variant in tiny["variants"].values():
        assert variant["n_steps"] == 2 and variant["adapter_file_bytes"] > 0 and variant["memory"]["peak_mib"] > 0
        assert abs(variant["memory"]["end_of_step_delta_mib"]) < 1.0  # the step freed what it allocated
    masked = tiny["variants"]["mask_tuning"]
    assert masked["adapter_file_bytes_with_scores"] > masked["adapter_file_bytes"]
    # the dense twin builds out x in updates and gradients the sparse path never holds
    density = results["density_memory"]["tiny_llama"]
    assert set(density) == {"sparse_low_rank@0.05", "sparse_low_rank_dense_masked@0.05"}
    transient = {key: d["memory"]["transient_peak_mib"] for key, d in density.items()}
    assert transient["sparse_low_rank_dense_masked@0.05"] > transient["sparse_low_rank@0.05"]

    conv = results["training"]["convnet"]
    assert list(conv["variants"]) == ["lora", "flora"] and conv["rank"] == 8
    assert 0.8 < conv["ratios"]["flora/lora"]["trainable_params"] < 1.25  # FLoRA at the closest integer rank
    assert conv["variants"]["flora"]["rank"] != 8

    tables = method_speed.markdown_tables(results)
    assert "| mask_tuning |" in tables and "with scores" in tables and "| sparse_low_rank@0.05 |" in tables


def test_bfloat16_bases_halve_the_base_model_memory(small_workloads, tmp_path):
    static = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.json"
        method_speed.main(
            ["--no-smollm2", "--no-convnet", "--variants", "lora", "sparse_low_rank", "--repeats", "2"]
            + ["--steps-per-block", "1", "--warmup", "0", "--densities", "--init-repeats", "0", "--dtype", dtype]
            + ["--out", str(out)]
        )
        results = json.loads(out.read_text())
        assert results["dtype"] == dtype and results["device"] == "cpu"
        memory = results["training"]["tiny_llama"]["variants"]["lora"]["memory"]
        static[dtype] = memory["static_breakdown_mib"]["base_model"]  # the tensors that are not the adapter's
    assert static["bfloat16"] == pytest.approx(static["float32"] / 2, rel=0.01)


def test_dense_masked_baseline_computes_the_sparse_adapter():
    workload = method_speed.lm_workload("t", "small", lambda: build_tiny_model("llama", seed=0, **SMALL), 2, 8)
    batch = workload.make_batch(workload.make_base(), torch.Generator().manual_seed(0))
    outputs = {}
    for name in ("sparse_low_rank", "sparse_low_rank_dense_masked"):
        torch.manual_seed(0)
        config = workload.config(name, 4, density=0.1, init_weights=False)  # non-zero adapter
        runner = method_speed.StepRunner(workload, method_speed.VARIANTS[name], config, batch)
        patched = {
            layer.adapter_output.__func__ is method_speed.dense_masked_output
            for layer in runner.model.modules()
            if isinstance(layer, method_speed.SparseLowRankLayer)
        }
        assert patched == {name.endswith("dense_masked")}  # every layer of the twin computes densely, none else
        runner.model.eval()
        outputs[name] = runner.model(input_ids=batch["input_ids"]).logits
    base = workload.make_base()(input_ids=batch["input_ids"]).logits
    assert not torch.allclose(outputs["sparse_low_rank"], base, atol=1e-4)
    torch.testing.assert_close(outputs["sparse_low_rank_dense_masked"], outputs["sparse_low_rank"], atol=1e-5, rtol=0)


def test_variant_table_builds_every_method_and_refuses_unknown_names():
    from peft import LoraConfig

    import petuning

    kinds = {"lora": LoraConfig, "pissa": LoraConfig, "sorsa": petuning.SorsaConfig, "flora": petuning.FloraConfig,
             "sparse_low_rank": petuning.SparseLowRankConfig, "mask_tuning": petuning.MaskTuningConfig,
             "pat": petuning.PatConfig}  # fmt: skip
    assert set(METHODS) == set(kinds)
    for method, kind in kinds.items():
        assert type(method_config(method, 4)) is kind
    assert method_config("pissa", 4).init_lora_weights == "pissa" and method_config("pat", 4).hsm_rank == 4
    assert method_config("lora", 4, lora_alpha=1).lora_alpha == 1  # options override the table
    with pytest.raises(ValueError, match="unknown method 'dora'"):
        method_config("dora", 4)


def test_profile_ops_names_the_operators_only_the_variant_runs(small_workloads, tmp_path, monkeypatch):
    out = tmp_path / "profile.json"
    monkeypatch.setattr(method_speed, "PROFILE_RESULTS", out)
    method_speed.main(["--profile-ops", "sparse_low_rank", "--no-smollm2", "--steps-per-block", "1"])
    result = json.loads(out.read_text())
    totals = result["step_self_cpu_s"]
    assert totals["lora"] > 0 and totals["sparse_low_rank"] > 0
    ops = result["top_differences_s"]
    deltas = [abs(d["delta"]) for d in ops.values()]
    assert deltas == sorted(deltas, reverse=True)  # largest difference first
    # the sparse adapter's own operators appear, and LoRA never runs them
    only_sparse = [op for op, d in ops.items() if d["lora"] == 0.0 and d["sparse_low_rank"] > 0]
    assert any("sparse" in op.lower() for op in only_sparse), only_sparse
