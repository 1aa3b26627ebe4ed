"""Every method under FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 with two CPU processes, launched the way users launch the
recipes: ``accelerate launch --config_file recipes/accelerate/<engine>.yaml --num_processes 2`` (see
tests/engine_worker.py for what each rank does).

Per engine and method: the world size is 2, both ranks end with identical full adapter parameters, the loss goes
down, the saved adapter holds full-size tensors equal to the gathered parameters, and it reloads in one process
with the distributed model's logits. Where a method cannot act under an engine, it refuses with the alternative.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_worker import probe
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from petuning import SorsaConfig

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "engine_worker.py"
METHODS = ["sorsa", "flora", "sparse_low_rank", "mask_tuning", "pat", "sorsa_official"]
REFUSALS = {  # engine -> method -> what the error must say
    "zero2": {
        "pat": "Train PAT with DDP or FSDP",
        "sorsa_official": "Use ortho_mode='loss' with DeepSpeed",
    },
    "zero3": {
        "pat": "Train PAT with DDP or FSDP",
        "sorsa_official": "Use ortho_mode='loss' with DeepSpeed",
        "mask_tuning": "Use ZeRO-2, DDP or FSDP2 for masked tuning",
    },
}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["fsdp2", "zero2", "zero3"])
def engine_run(request, tiny_llama_dir, tmp_path_factory):
    engine = request.param
    if engine.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (make installs it)")
    out = tmp_path_factory.mktemp(engine)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        f"recipes/accelerate/{engine}.yaml",
        "--num_processes",
        "2",
        str(WORKER),
        str(tiny_llama_dir),
        str(out),
        *METHODS,
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return engine, out, tiny_llama_dir


@pytest.mark.parametrize("method", METHODS)
def test_method_under_engine(engine_run, method):
    engine, out, tiny_llama_dir = engine_run
    ranks = [torch.load(out / method / f"rank{r}.pt") for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    refusal = REFUSALS.get(engine, {}).get(method)
    if refusal is not None:
        assert all(refusal in r.get("error", "") for r in ranks), ranks[0].get("error")
        return
    assert "error" not in ranks[0], ranks[0].get("traceback")
    rank0, rank1 = ranks
    assert rank0["params"].keys() == rank1["params"].keys() and rank0["params"]
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), f"ranks diverged on {name}"
    assert rank0["losses"][-1] < rank0["losses"][0], rank0["losses"]
    if engine == "zero3":  # the adapter was created on weights partitioned at load
        assert rank0["partitioned_at_load"]
    if rank0.get("singular_values"):  # SORSA's SVD of the (gathered) weights equals the single-process one
        single = get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny_llama_dir), SorsaConfig(r=4, target_modules="all-linear")
        )
        expected = {n: b for n, b in single.named_buffers() if "sorsa_S0" in n}
        assert expected.keys() == rank0["singular_values"].keys()
        for name, value in expected.items():
            torch.testing.assert_close(rank0["singular_values"][name], value, rtol=1e-5, atol=1e-6, msg=name)

    saved = load_file(out / method / "adapter" / "adapter_model.safetensors")
    assert saved and all(t.numel() > 0 for t in saved.values()), "empty tensors in the saved adapter"
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), out / method / "adapter")
    params = dict(loaded.named_parameters())
    for name, value in rank0["params"].items():
        torch.testing.assert_close(params[name], value, rtol=0, atol=0, msg=name)  # full size, the trained values
    with torch.no_grad():
        logits = loaded(input_ids=probe()).logits
    torch.testing.assert_close(logits, rank0["logits"], rtol=1e-5, atol=1e-5)
