"""Pushes to a Hub-protocol server on 127.0.0.1 (tests/fake_hub.py), driven through the ``petuning`` CLI in
subprocesses that have ``HF_ENDPOINT`` and ``HF_HUB_DISABLE_XET=1`` set before ``huggingface_hub`` is imported.

Checked: a merged sharded model and a native adapter arrive byte for byte with the card petuning wrote; downloading
them reproduces the adapter model's logits (the merged one in a process without petuning); a server error in the
middle of an upload gives a clear error, leaves the local export intact and the repo without a commit, and a retry
succeeds; the token never appears in output or files; a push without credentials is refused before any work.
"""

from __future__ import annotations

import pytest
import torch
from conformance.cases import CASES
from conformance.models import make_inputs
from export_utils import front_matter, run_python, tuned_adapter
from fake_hub import FakeHub
from safetensors.torch import load_file, save_file

from petuning.export import check_safetensors

CASE = next(c for c in CASES if c.id == "sorsa-llama")
TOKEN = "hf_fake_token_do_not_print_0123456789"
BASE_ID = "petuning-tests/tiny-llama"

DOWNLOAD = """
import sys
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

inputs = load_file(INPUTS)
merged = AutoModelForCausalLM.from_pretrained("alice/merged", dtype=torch.float32).eval()
assert not any(m == "petuning" or m.startswith("petuning.") for m in sys.modules), "petuning was imported"
import petuning  # the native adapter needs it
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
adapter = PeftModel.from_pretrained(base, "alice/adapter").eval()
with torch.no_grad():
    save_file({"merged": merged(**inputs).logits.contiguous(), "adapter": adapter(**inputs).logits.contiguous()}, OUT)
"""


@pytest.fixture(scope="module")
def hub():
    with FakeHub() as server:
        yield server


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    adapter, base, logits = tuned_adapter(CASE, root, "adapter")
    return root, adapter, base, logits


def _env(hub: FakeHub, root, token: str | None = TOKEN, home: str = "hf_home") -> dict:
    return {
        "HF_ENDPOINT": hub.url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HOME": str(root / home),
        "HF_TOKEN": token or "",
    }


def _cli(hub, root, *args, token=TOKEN, home="hf_home"):
    process = run_python("", env=_env(hub, root, token, home), args=[str(a) for a in args])
    assert TOKEN not in process.stdout + process.stderr
    return process


def _assert_token_absent(folder):
    for path in folder.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def _same_files(hub, repo, folder):
    local = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    assert hub.files(repo) == local


@pytest.fixture(scope="module")
def pushed(hub, tuned):
    root, adapter, _base, _logits = tuned
    merged = _cli(
        hub,
        root,
        "export",
        adapter,
        "--out",
        root / "merged",
        "--max-shard-size",
        "60KB",
        "--base-model-id",
        BASE_ID,
        "--push-to-hub",
        "alice/merged",
        "--private",
    )
    native = _cli(
        hub,
        root,
        "export",
        adapter,
        "--out",
        root / "native",
        "--format",
        "adapter",
        "--base-model-id",
        BASE_ID,
        "--push-to-hub",
        "alice/adapter",
    )
    return merged, native


def test_push_merged_sharded_model(hub, tuned, pushed):
    root = tuned[0]
    process = pushed[0]
    assert process.returncode == 0, process.stderr[-3000:]
    assert "pushed to alice/merged" in process.stdout
    _same_files(hub, "alice/merged", root / "merged")
    assert sum(name.endswith(".safetensors") for name in hub.files("alice/merged")) > 1
    assert hub.repos["alice/merged"]["private"] is True
    assert hub.tokens == {TOKEN}
    _assert_token_absent(root / "merged")
    meta = front_matter(hub.files("alice/merged")["README.md"].decode())
    assert meta["library_name"] == "transformers"
    assert meta["base_model"] == BASE_ID and meta["base_model_relation"] == "finetune"
    assert {"petuning", "sorsa"} <= set(meta["tags"])
    assert meta["pipeline_tag"] == "text-generation"
    body = hub.files("alice/merged")["README.md"].decode()
    assert '"peft_type": "SORSA"' in body and '"r": 4' in body


def test_push_native_adapter(hub, tuned, pushed):
    root = tuned[0]
    process = pushed[1]
    assert process.returncode == 0, process.stderr[-3000:]
    _same_files(hub, "alice/adapter", root / "native")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(hub.files("alice/adapter"))
    assert hub.repos["alice/adapter"]["private"] is False
    meta = front_matter(hub.files("alice/adapter")["README.md"].decode())
    assert meta["library_name"] == "peft" and meta["base_model_relation"] == "adapter"
    assert {"petuning", "sorsa", f"base_model:adapter:{BASE_ID}"} <= set(meta["tags"])
    assert "import petuning" in hub.files("alice/adapter")["README.md"].decode()


def test_downloads_reproduce_the_adapter_model(hub, tuned, pushed):
    root, _, base, logits = tuned
    assert all(p.returncode == 0 for p in pushed)
    save_file(make_inputs(CASE.model), root / "inputs.safetensors")
    code = (
        f"INPUTS = {str(root / 'inputs.safetensors')!r}\nBASE = {str(base)!r}\nOUT = {str(root / 'dl.safetensors')!r}\n"
    )
    process = run_python(code + DOWNLOAD, env=_env(hub, root))
    assert process.returncode == 0, process.stderr[-3000:]
    downloaded = load_file(root / "dl.safetensors")
    torch.testing.assert_close(downloaded["merged"], logits, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(downloaded["adapter"], logits, atol=0, rtol=0)


def test_failed_upload_is_clear_keeps_the_export_and_retry_succeeds(hub, tuned):
    root, adapter = tuned[0], tuned[1]
    out = root / "flaky"
    hub.fail_lfs_uploads_after(1)  # the second shard's upload fails with HTTP 507
    try:
        process = _cli(
            hub, root, "export", adapter, "--out", out, "--max-shard-size", "60KB", "--push-to-hub", "alice/flaky"
        )
    finally:
        hub.fail_lfs_uploads_after(None)
    assert process.returncode == 1
    assert "Upload of" in process.stderr and "failed" in process.stderr and "507" in process.stderr
    assert "local export" in process.stderr and f"petuning push {out} alice/flaky" in process.stderr
    assert "Traceback" not in process.stderr
    assert "alice/flaky" in hub.repos and hub.files("alice/flaky") == {}  # created, but no partial commit
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "README.md").is_file()
    for shard in shards:
        check_safetensors(shard)
    assert not [p for p in root.iterdir() if p.name.startswith(".flaky.")]  # no temp folders left behind

    # the retry authenticates with the stored login (`hf auth login` writes $HF_HOME/token) instead of HF_TOKEN
    (root / "login_home").mkdir()
    (root / "login_home" / "token").write_text(TOKEN)
    hub.tokens.clear()
    retry = _cli(hub, root, "push", out, "alice/flaky", token=None, home="login_home")
    assert retry.returncode == 0, retry.stderr[-3000:]
    assert hub.tokens == {TOKEN}
    _same_files(hub, "alice/flaky", out)
    _assert_token_absent(out)


def test_push_without_credentials_is_refused_before_exporting(hub, tuned):
    root, adapter = tuned[0], tuned[1]
    process = _cli(hub, root, "export", adapter, "--out", root / "no-token", "--push-to-hub", "alice/x", token=None)
    assert process.returncode == 1
    assert "No Hugging Face credentials" in process.stderr and "HF_TOKEN" in process.stderr
    assert not (root / "no-token").exists() and "alice/x" not in hub.repos
