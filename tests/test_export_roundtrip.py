"""Round trips for every language-model case in the conformance matrix (methods join by adding cases there):

adapter -> merged checkpoint -> reload in a process that never imports petuning -> the adapter model's logits;
adapter -> LoRA (exact rank) -> peft-only reload -> the same logits; adapter -> LoRA (rank 1) -> the reported
per-layer error is the true one (and the optimal one), and the peft-only reload is the model the report describes.
All reloads run in one subprocess to keep the suite fast.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conformance.cases import CASES
from conformance.models import LANGUAGE_MODELS, build_base, make_inputs
from export_utils import run_python, tuned_adapter
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

from petuning.export import export_adapter, load_adapter_model

LM_CASES = [c for c in CASES if c.model in LANGUAGE_MODELS]
IDS = [c.id for c in LM_CASES]

RELOAD = """
import json, sys
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

jobs = json.load(open(sys.argv[1] if len(sys.argv) > 1 else JOBS))
logits = {}
for job in jobs:
    model = AutoModelForCausalLM.from_pretrained(job["load"], dtype=torch.float32)
    if job["adapter"]:
        model = PeftModel.from_pretrained(model, job["adapter"])
    with torch.no_grad():
        logits[job["key"]] = model.eval()(**load_file(job["inputs"])).logits.contiguous()
imported = sorted(m for m in sys.modules if m == "petuning" or m.startswith("petuning."))
assert not imported, f"petuning was imported: {imported}"
save_file(logits, OUT)
"""


def _convertible(adapter_dir) -> bool:
    model = load_adapter_model(adapter_dir)
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    return bool(layers) and all(m.supports_lora_conversion("default") for m in layers)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Per case: the adapter's and the base's logits, each export (or the error it raised), and the logits of every
    export reloaded in one petuning-free subprocess."""
    root = tmp_path_factory.mktemp("roundtrip")
    results, jobs = {}, []
    for case in LM_CASES:
        entry = results[case.id] = {}
        inputs_file = root / f"inputs-{case.model}.safetensors"
        save_file(make_inputs(case.model), inputs_file)
        adapter, base, entry["logits"] = tuned_adapter(case, root, f"adapter-{case.id}")
        entry["adapter"], entry["base"] = adapter, base
        for kind, options in (
            ("merged", dict(max_shard_size="60KB")),
            ("lora", dict(format="lora")),
            ("lora1", dict(format="lora", lora_rank=1)),
        ):
            try:
                entry[kind] = export_adapter(adapter, root / f"{kind}-{case.id}", **options)
            except ValueError as error:
                entry[kind] = error
                continue
            merged = kind == "merged"
            jobs.append(
                {
                    "key": f"{case.id}/{kind}",
                    "load": str(entry[kind].folder if merged else base),
                    "adapter": None if merged else str(entry[kind].folder),
                    "inputs": str(inputs_file),
                }
            )
    (root / "jobs.json").write_text(json.dumps(jobs))
    code = f"JOBS = {str(root / 'jobs.json')!r}\nOUT = {str(root / 'reloaded.safetensors')!r}\n" + RELOAD
    process = run_python(code)
    assert process.returncode == 0, process.stderr[-3000:]
    reloaded = load_file(root / "reloaded.safetensors")
    for key, logits in reloaded.items():
        case_id, kind = key.split("/")
        results[case_id][f"{kind}_reloaded"] = logits
    return results


def _result(entry, kind):
    result = entry[kind]
    if isinstance(result, Exception):
        raise result
    return result


@pytest.mark.parametrize("case", LM_CASES, ids=IDS)
def test_merged_export_reloads_without_petuning(case, exports, tmp_path):
    entry = exports[case.id]
    result = _result(entry, "merged")
    shards = [f for f in result.files if f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in result.files  # sharded at 60KB
    assert {"config.json", "generation_config.json", "tokenizer.json", "README.md"} <= set(result.files)
    with torch.no_grad():
        base_logits = build_base(case.model, tmp_path)(**make_inputs(case.model)).logits
    assert (entry["logits"] - base_logits).abs().max() > 1e-3  # the adapter changes the model
    torch.testing.assert_close(entry["merged_reloaded"], entry["logits"], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("case", LM_CASES, ids=IDS)
def test_lora_conversion_exact_or_refused(case, exports):
    entry = exports[case.id]
    if not _convertible(entry["adapter"]):
        assert isinstance(entry["lora"], ValueError) and "additive" in str(entry["lora"])
        return
    conversion = _result(entry, "lora").conversion
    assert conversion.exact and conversion.relative_error < 1e-5
    assert json.loads((entry["lora"].folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
    torch.testing.assert_close(entry["lora_reloaded"], entry["logits"], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("case", LM_CASES, ids=IDS)
def test_truncated_lora_reports_its_true_error(case, exports, tmp_path):
    """Rank 1: each reported error equals ||ΔW - B A|| / ||ΔW|| measured on the written factors, and equals the
    Eckart-Young optimum from an independent float64 SVD; the peft-only reload is the base plus those factors."""
    entry = exports[case.id]
    if not _convertible(entry["adapter"]):
        assert isinstance(entry["lora1"], ValueError) and "additive" in str(entry["lora1"])
        return
    result = _result(entry, "lora1")
    conversion = result.conversion
    factors = load_file(result.folder / "adapter_model.safetensors")
    deltas = {
        name: layer.get_delta_weight("default").detach().double().numpy()
        for name, layer in load_adapter_model(entry["adapter"]).base_model.model.named_modules()
        if isinstance(layer, BaseTunerLayer)
    }
    assert {layer.module for layer in conversion.layers} == set(deltas)
    base = build_base(case.model, tmp_path)
    weights = dict(base.named_parameters())
    dropped = energy = 0.0
    for layer in conversion.layers:
        delta = deltas[layer.module]
        if getattr(base.get_submodule(layer.module), "fan_in_fan_out", False):
            delta = delta.T
        a = factors[f"base_model.model.{layer.module}.lora_A.weight"].double().numpy()
        b = factors[f"base_model.model.{layer.module}.lora_B.weight"].double().numpy()
        assert a.shape[0] == b.shape[1] == layer.lora_rank == 1
        actual = np.linalg.norm(delta - b @ a) / np.linalg.norm(delta)
        s = np.linalg.svd(delta, compute_uv=False)
        optimal = np.sqrt((s[1:] ** 2).sum() / (s**2).sum())
        assert layer.relative_error == pytest.approx(actual, rel=1e-4, abs=1e-7)
        assert layer.relative_error == pytest.approx(optimal, rel=1e-4, abs=1e-7)
        dropped, energy = dropped + (s[1:] ** 2).sum(), energy + (s**2).sum()
        with torch.no_grad():
            weights[f"{layer.module}.weight"] += torch.from_numpy(b @ a).float()
    assert conversion.relative_error == pytest.approx(np.sqrt(dropped / energy), rel=1e-4)
    assert not conversion.exact and conversion.relative_error > 1e-3
    assert "truncated" in (result.folder / "README.md").read_text()
    with torch.no_grad():
        expected = base(**make_inputs(case.model)).logits
    torch.testing.assert_close(entry["lora1_reloaded"], expected, atol=2e-5, rtol=1e-5)
