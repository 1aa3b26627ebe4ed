"""The SFT recipe on TRL's SFTTrainer end to end on a tiny Llama (CPU): two-process DDP through torchrun, a SIGKILLed
run resumed from its checkpoint (and the uninterrupted run through `petuning train`), and the QLoRA path on a
bitsandbytes 4-bit base."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from petuning import testing
from petuning.recipe import check_reload, parse_recipe_args, run_sft
from petuning.recipe import task as data

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """A tiny Llama with the character-level ChatML tokenizer, 64 training and 8 held-out arithmetic questions,
    and a SORSA recipe config over them."""
    root = tmp_path_factory.mktemp("recipe")
    testing.build_tiny_model("llama", root / "tiny", seed=0)
    testing.build_tiny_tokenizer().save_pretrained(root / "tiny")
    (root / "data").mkdir()
    for name, (n, seed) in {"train": (64, 0), "test": (8, 1)}.items():
        lines = "".join(json.dumps(ex) + "\n" for ex in data.make_arithmetic_split(n, seed))
        (root / "data" / f"{name}.jsonl").write_text(lines)
    (root / "sorsa.yaml").write_text(
        textwrap.dedent(f"""\
        method: sorsa
        model_name_or_path: {root / "tiny"}
        method_options: {{r: 4, target_modules: all-linear, gamma: 1.0e-3}}
        dataset_name: {root / "data"}
        max_length: 128
        gradient_checkpointing: false
        max_steps: 6
        per_device_train_batch_size: 4
        learning_rate: 1.0e-2
        logging_steps: 1
        save_steps: 2
        seed: 0
        disable_tqdm: true
        eval_metric: exact_match
        eval_max_new_tokens: 4
        eval_batch_size: 4
        """)
    )
    return root


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def _adapter(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "adapter" / "adapter_model.safetensors")


WORKER = """
import sys, torch, torch.distributed as dist
from petuning.recipe import parse_recipe_args, run_sft
result = run_sft(parse_recipe_args(sys.argv[1:]))
rank, world = dist.get_rank(), dist.get_world_size()
params = {n: p.detach().clone() for n, p in result.model.named_parameters() if p.requires_grad}
torch.save({"world": world, "params": params, "metrics": result.metrics}, f"{result.trainer.args.output_dir}/rank{rank}.pt")
"""


def test_two_process_ddp(setup, tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    out = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(tmp_path / "worker.py"),
        str(setup / "sorsa.yaml"),
        "--output_dir",
        str(out),
        "--max_steps",
        "8",
        "--gradient_checkpointing",
        "true",
    ]
    run = subprocess.run(
        command, env={**_env(), "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["metrics"]["world_size"] == 2
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), f"ranks diverged on {name}"
    saved = _adapter(out)
    trained = {k: v for k, v in saved.items() if ".sorsa_B" in k and "sorsa_B0" not in k}
    assert trained and all(not torch.equal(v, saved[k.replace("sorsa_B", "sorsa_B0")]) for k, v in trained.items())
    losses = ranks[0]["metrics"]["loss_history"]
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2])
    assert json.loads((out / "results.json").read_text())["global_step"] == 8


KILLER = """
import os, signal, sys
from transformers import TrainerCallback
from petuning.recipe import parse_recipe_args, run_sft

class KillAtStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 5:  # after checkpoint-4, before checkpoint-6
            os.kill(os.getpid(), signal.SIGKILL)

run_sft(parse_recipe_args(sys.argv[1:]), callbacks=(KillAtStep(),))
"""


def test_killed_run_resumes_to_the_same_adapter(setup, tmp_path, monkeypatch):
    (tmp_path / "killer.py").write_text(KILLER)
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    run = subprocess.run(
        [sys.executable, str(tmp_path / "killer.py"), str(setup / "sorsa.yaml"), "--output_dir", str(killed)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == -9, run.stderr[-3000:]
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (killed / "adapter").exists()

    assert list((killed / "svd_cache").glob("svd-*.safetensors"))  # the killed run cached its SVD init
    import petuning.linalg

    svds = []
    monkeypatch.setattr(petuning.linalg, "top_singular_triplets", lambda *a, **k: svds.append(a) or 1 / 0)
    resumed = run_sft(parse_recipe_args([str(setup / "sorsa.yaml"), "--output_dir", str(killed)]))  # resumes
    assert svds == []  # the restart read its SVD init from the cache
    assert resumed.metrics["resumed_from"] == str(killed / "checkpoint-4") and resumed.metrics["global_step"] == 6

    # The uninterrupted run goes through the console command, with the reload check in a fresh process.
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "petuning.cli",
            "train",
            str(setup / "sorsa.yaml"),
            "--output_dir",
            str(straight),
            "--reload_check",
            "true",
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "OK: the adapter reloaded in a fresh process gives the same 8 answers" in run.stdout
    a, b = _adapter(killed), _adapter(straight)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["lora", "sorsa"])
def test_qlora_on_a_4bit_base(setup, tmp_path, method):
    bnb = pytest.importorskip("bitsandbytes")
    yaml_text = (setup / "sorsa.yaml").read_text().replace(", gamma: 1.0e-3", "")
    (tmp_path / "c.yaml").write_text(yaml_text)
    result = run_sft(
        parse_recipe_args(
            [
                str(tmp_path / "c.yaml"),
                "--method",
                method,
                "--load_in_4bit",
                "true",
                "--output_dir",
                str(tmp_path / "out"),
                "--gradient_checkpointing",
                "true",
            ]
        )
    )
    base = result.model.get_base_model()
    q_proj = base.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit) and q_proj.base_layer.weight.dtype == torch.uint8
    assert base.model.norm.weight.dtype == torch.float32  # prepare_model_for_kbit_training upcasts the rest
    assert any(getattr(m, "gradient_checkpointing", False) for m in base.modules())
    assert result.model.peft_config["default"].peft_type == method.upper()
    losses = result.metrics["loss_history"]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert check_reload(tmp_path / "out") == 0  # a fresh 4-bit base + the saved adapter gives the same answers


@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_the_recipe_under_deepspeed(setup, tmp_path, engine):
    """`accelerate launch --config_file recipes/accelerate/<engine>.yaml recipes/sft.py`, two CPU processes."""
    pytest.importorskip("deepspeed")
    out = tmp_path / engine
    options = '{"r": 4, "target_modules": "all-linear", "ortho_mode": "loss", "gamma": 1.0e-3}'  # no gradient edits
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        f"recipes/accelerate/{engine}.yaml",
        "--num_processes",
        "2",
        str(ROOT / "recipes" / "sft.py"),
        str(setup / "sorsa.yaml"),
        "--output_dir",
        str(out),
        "--method_options",
        options,
        "--save_strategy",
        "no",
    ]
    run = subprocess.run(
        command, cwd=ROOT, env={**_env(), "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((out / "results.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_step"] == 6
    assert metrics["loss_history"][-1] < metrics["loss_history"][0]
    saved = _adapter(out)
    trained = {k: v for k, v in saved.items() if ".sorsa_B" in k and "sorsa_B0" not in k}
    assert trained and all(v.numel() > 0 for v in saved.values())  # full tensors, not ZeRO-3 partitions
    assert all(not torch.equal(v, saved[k.replace("sorsa_B", "sorsa_B0")]) for k, v in trained.items())
    assert 0.0 <= metrics["exact_match"] <= 1.0  # generation with synced_gpus across the two ranks
