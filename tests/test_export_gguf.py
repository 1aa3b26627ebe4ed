"""GGUF export through llama.cpp's converter: merged and PAT-pruned models read back by transformers' GGUF loader.

The reference for an f16 file is the merged model with every matrix rounded to float16 once (what the converter
stores; norms stay float32), so the read-back logits must match it to float32 round-off, far tighter than the raw
f16-vs-f32 gap. The tiny models borrow SmolLM2's tokenizer: llama.cpp's converter only accepts tokenizers it knows.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from petuning import PatConfig, SorsaConfig, cli
from petuning.export import export_adapter
from petuning.export.llama_cpp import CONVERTER, find_converter
from petuning.recipe.smollm2 import SMOLLM2_HUB_ID, load_smollm2
from petuning.testing import build_tiny_model

try:
    find_converter()
except FileNotFoundError:  # `make test` fetches it at set-up; a bare checkout may not have it yet
    pytest.skip("llama.cpp's converter is not fetched (python -m petuning.export.llama_cpp)", allow_module_level=True)


def f16_rounded(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with each matrix rounded to float16 and back, as an f16 GGUF file stores it."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.copy_(parameter.half().float())
    return model


def read_back(folder) -> tuple[torch.nn.Module, str]:
    (gguf_file,) = [p.name for p in folder.iterdir() if p.suffix == ".gguf"]
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32).eval(), gguf_file


def perturb(model, seed=0, scale=0.05):
    """Move every trainable tensor off its init, so the merge changes the weights."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


@pytest.fixture(scope="module")
def smollm2_sorsa(tmp_path_factory):
    """A SORSA adapter on SmolLM2 moved off its init and saved, and the merged model it must export to."""
    base, tokenizer = load_smollm2()
    model = get_peft_model(base, SorsaConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    perturb(model, scale=0.01)
    folder = tmp_path_factory.mktemp("smollm2") / "adapter"
    model.save_pretrained(folder)
    return folder, model.merge_and_unload().eval(), tokenizer


@pytest.mark.slow
def test_merged_smollm2_round_trips_through_gguf(smollm2_sorsa, tmp_path):
    adapter, merged, tokenizer = smollm2_sorsa
    result = export_adapter(adapter, tmp_path / "gguf", format="gguf")
    assert result.files == ["README.md", "gguf-f16.gguf"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder is left behind"
    loaded, gguf_file = read_back(tmp_path / "gguf")
    prompt = "Question: what is 17 + 25? Answer:"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        unrounded = merged(input_ids=ids).logits
        reference = f16_rounded(merged)(input_ids=ids).logits
        logits = loaded(input_ids=ids).logits
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-5)
    assert (logits - unrounded).abs().max() > 1e-3, "the reference is the f16-rounded merge, not the float32 one"
    assert loaded.config.tie_word_embeddings, "the file keeps SmolLM2's tied head"
    gguf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "gguf", gguf_file=gguf_file)
    assert gguf_tokenizer(prompt).input_ids == ids[0].tolist(), "the file's tokenizer tokenizes as the original does"
    card = (tmp_path / "gguf" / "README.md").read_text()
    assert f"base_model: {SMOLLM2_HUB_ID}" in card and "- gguf" in card and f"-m {gguf_file}" in card


WIDTH = 48


@pytest.fixture(scope="module")
def pruned_pat(tmp_path_factory):
    """A finalized PAT adapter on a tied tiny Llama (SmolLM2's tokenizer and vocabulary), and its pruned model."""
    root = tmp_path_factory.mktemp("pat")
    _, tokenizer = load_smollm2()
    build_tiny_model("llama", save_dir=root / "base", vocab_size=len(tokenizer), tie_word_embeddings=True)
    tokenizer.save_pretrained(root / "base")
    base = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    config = PatConfig(target_width=WIDTH, hsm_rank=8, lora_r=4, schedule_steps=20, init_weights=False)
    torch.manual_seed(0)
    model = get_peft_model(base, config)
    perturb(model, scale=0.1)
    model.base_model.finalize_pat_mask()
    model.save_pretrained(root / "adapter")
    ids = tokenizer("The pruned model answers: 3 + 4 = 7", return_tensors="pt").input_ids
    with torch.no_grad():
        pruned = model.base_model.petuning_prune_and_unload().eval()
    return root / "adapter", pruned, ids


@pytest.mark.parametrize("gguf_type, atol", [("f16", 1e-4), ("q8_0", None)])
def test_pruned_pat_round_trips_through_gguf(pruned_pat, tmp_path, gguf_type, atol):
    adapter, pruned, ids = pruned_pat
    if gguf_type == "f16":
        export_adapter(adapter, tmp_path / "out", format="gguf", prune=True, gguf_type=gguf_type)
    else:  # the command line
        argv = [
            "export",
            str(adapter),
            "--out",
            str(tmp_path / "out"),
            "--format",
            "gguf",
            "--prune",
            "--gguf-type",
            gguf_type,
        ]
        assert cli.main(argv) == 0
    loaded, gguf_file = read_back(tmp_path / "out")
    assert gguf_file == f"out-{gguf_type}.gguf"
    assert loaded.config.hidden_size == WIDTH and loaded.config.head_dim == pruned.config.head_dim == 16
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in pruned.parameters())
    with torch.no_grad():
        exact = pruned(input_ids=ids).logits
        logits = loaded(input_ids=ids).logits
        if atol is not None:
            torch.testing.assert_close(
                logits, f16_rounded(copy.deepcopy(pruned))(input_ids=ids).logits, atol=atol, rtol=1e-5
            )
        else:  # 8-bit blocks: close to the float model, not equal
            error = (logits - exact).norm() / exact.norm()
            assert 1e-5 < error < 0.05, error
    card = (tmp_path / "out" / "README.md").read_text()
    assert "- pruned" in card and "smaller than the base" in card


def test_unsupported_architecture_is_refused_before_anything_is_written(tmp_path):
    build_tiny_model("opt", save_dir=tmp_path / "opt")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "opt")
    get_peft_model(base, SorsaConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"GGUF export supports LlamaForCausalLM.*this model is OPTForCausalLM"):
        export_adapter(tmp_path / "adapter", tmp_path / "out", format="gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "opt"]


def test_unknown_tokenizer_and_missing_converter_are_clear_errors(tmp_path):
    build_tiny_model("llama", save_dir=tmp_path / "base")
    from petuning.testing import build_tiny_tokenizer

    build_tiny_tokenizer().save_pretrained(tmp_path / "base")  # a character-level test tokenizer llama.cpp lacks
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    get_peft_model(base, SorsaConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="llama.cpp does not recognize this model's tokenizer"):
        export_adapter(tmp_path / "adapter", tmp_path / "out", format="gguf")
    missing = rf"{re.escape(str(tmp_path / 'nowhere'))} has no {CONVERTER}.*python -m petuning.export.llama_cpp"
    with pytest.raises(FileNotFoundError, match=missing):
        export_adapter(tmp_path / "adapter", tmp_path / "out", format="gguf", llama_cpp=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="--dtype does not apply to --format gguf"):
        export_adapter(tmp_path / "adapter", tmp_path / "out", format="gguf", dtype="float16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"], "nothing half-written"
