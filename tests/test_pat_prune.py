"""PAT's pruned export: a smaller stock transformers model with the logits of the masked, tuned model.

Tiny Llama / Qwen2 / Mistral (and a tied-embedding Llama like SmolLM2), tuned adapters with s != 1 and LoRA, and
the real SmolLM2 at a 25% pruning ratio. The parameter count is checked against a count written out by hand from
the kept width, and the pruned folder is reloaded in a subprocess that never imports petuning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from petuning import PatConfig
from petuning.testing import build_tiny_model

WIDTH = 48


def tuned_pat(path, kind_dtype=torch.float32, seed=0, train_steps=2, **overrides):
    """A PAT adapter that is far from the identity (random W1, s, m, LoRA B, then a few AdamW steps), finalized."""
    base = AutoModelForCausalLM.from_pretrained(path, dtype=kind_dtype).eval()
    kwargs = dict(
        target_width=WIDTH,
        hsm_rank=8,
        lora_r=4,
        lora_dropout=0.0,
        schedule_steps=20,
        init_weights=False,
        task_type="CAUSAL_LM",
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = get_peft_model(base, PatConfig(**kwargs))
    ids = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(train_steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.base_model.finalize_pat_mask()
    scales = torch.cat([h.pat_hsm_scale["default"].detach() for h in model.base_model.hsm_layers("default")])
    assert (scales - 1).abs().max() > 0.1, "the export must be checked with per-HSM scales s != 1"
    return model


def expected_parameter_count(config, width: int, tied: bool = False) -> int:
    """Parameters of a Llama-family model of hidden size ``width`` (attention and MLP widths unchanged)."""
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q_out, kv_out, inter = heads * head_dim, kv_heads * head_dim, config.intermediate_size
    attention_bias = getattr(config, "attention_bias", False)
    qkv_bias = q_out + 2 * kv_out if config.model_type == "qwen2" or attention_bias else 0
    biases = (
        qkv_bias + (width if attention_bias else 0) + (2 * inter + width if getattr(config, "mlp_bias", False) else 0)
    )
    per_layer = width * (q_out + 2 * kv_out) + q_out * width + 3 * width * inter + 2 * width + biases
    return (1 if tied else 2) * config.vocab_size * width + config.num_hidden_layers * per_layer + width


def inputs(seed=1):
    ids = torch.randint(4, 100, (2, 10), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize(
    "kind, overrides",
    [
        ("llama", {}),
        ("qwen2", {}),
        ("mistral", {}),
        ("llama", {"tie_word_embeddings": True}),
        ("qwen2", {"tie_word_embeddings": True}),
        ("llama", {"attention_bias": True, "mlp_bias": True}),
    ],
    ids=["llama", "qwen2", "mistral", "llama-tied", "qwen2-tied", "llama-biases"],
)
def test_pruned_logits_equal_masked_logits(tmp_path, kind, overrides):
    path = tmp_path / kind
    build_tiny_model(kind, save_dir=path, **overrides)
    model = tuned_pat(path)
    batch = inputs()
    with torch.no_grad():
        masked = model(**batch).logits
        pruned = model.base_model.petuning_prune_and_unload()
        logits = pruned(**batch).logits
        assert torch.equal(model(**batch).logits, masked), "pruning leaves the tuned model unchanged"
    # float32 round-off of a different summation order (logits are O(1))
    torch.testing.assert_close(logits, masked, atol=2e-5, rtol=1e-5)

    config, old = pruned.config, model.get_base_model().config
    assert type(pruned) is type(model.get_base_model())
    assert (config.hidden_size, config.head_dim) == (WIDTH, 16)
    assert config.rms_norm_eps == pytest.approx(old.rms_norm_eps * 64 / WIDTH)
    tied = bool(overrides.get("tie_word_embeddings"))  # a tied base stays tied (scale-only embedding HSM)
    assert config.tie_word_embeddings is tied
    assert (pruned.lm_head.weight is pruned.model.embed_tokens.weight) is tied
    assert sum(p.numel() for p in pruned.parameters()) == expected_parameter_count(old, WIDTH, tied)


def test_tied_base_with_a_low_rank_embedding_hsm_exports_an_untied_head(tmp_path):
    path = tmp_path / "llama"
    build_tiny_model("llama", save_dir=path, tie_word_embeddings=True)
    model = tuned_pat(path, embedding_low_rank=True)
    assert model.base_model.model.model.embed_tokens.has_low_rank("default")
    batch = inputs()
    with torch.no_grad():
        masked = model(**batch).logits
        pruned = model.base_model.petuning_prune_and_unload()
        torch.testing.assert_close(pruned(**batch).logits, masked, atol=2e-5, rtol=1e-5)
    assert pruned.config.tie_word_embeddings is False and pruned.lm_head.weight is not pruned.model.embed_tokens.weight


def test_pruned_model_in_half_precision(tmp_path):
    path = tmp_path / "llama"
    build_tiny_model("llama", save_dir=path)
    model = tuned_pat(path, kind_dtype=torch.bfloat16)
    pruned = model.base_model.petuning_prune_and_unload()
    assert all(p.dtype == torch.bfloat16 for p in pruned.parameters())
    with torch.no_grad():
        torch.testing.assert_close(pruned(**inputs()).logits, model(**inputs()).logits, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_pruned_folder_loads_in_stock_transformers_without_petuning(tmp_path, tied):
    path = tmp_path / "qwen2"
    build_tiny_model("qwen2", save_dir=path, tie_word_embeddings=tied)
    model = tuned_pat(path)
    pruned = model.base_model.petuning_prune_and_unload()
    out = tmp_path / "pruned"
    pruned.save_pretrained(out)
    batch = inputs()
    with torch.no_grad():
        expected = pruned(**batch).logits
    torch.save(batch["input_ids"], tmp_path / "ids.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
        ids = torch.load({str(tmp_path / "ids.pt")!r})
        with torch.no_grad():
            torch.save(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, {str(tmp_path / "out.pt")!r})
        assert not [m for m in sys.modules if m.split(".")[0] == "petuning"], "petuning was imported"
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)
    saved = json.loads((out / "config.json").read_text())
    assert saved["hidden_size"] == WIDTH and saved["head_dim"] == 16 and saved["tie_word_embeddings"] is tied


def test_kept_channels_are_the_top_of_the_mask_and_pruned_weights_fold_the_hsm(tmp_path):
    """An independent float64 check of the slicing rules on one layer of each kind."""
    path = tmp_path / "llama"
    build_tiny_model("llama", save_dir=path, dtype=torch.float64)
    model = tuned_pat(path, kind_dtype=torch.float64)
    tuner = model.base_model
    mask = tuner.pat_mask["default"].detach()
    keep = tuner.pat_kept_channels()
    assert len(keep) == WIDTH and set(keep.tolist()) == set(torch.topk(mask, WIDTH).indices.tolist())
    pruned = tuner.petuning_prune_and_unload()
    layer = tuner.model.model.layers[1].self_attn.o_proj
    w0, w1, s = (layer.pat_hsm_down["default"], layer.pat_hsm_up["default"], layer.pat_hsm_scale["default"])
    lora = layer.pat_lora_B["default"] @ layer.pat_lora_A["default"] * (layer.pat_lora_scaling["default"])
    full = torch.diag(s) @ (torch.eye(64, dtype=torch.float64) + w1 @ w0) @ (layer.base_layer.weight + lora)
    torch.testing.assert_close(pruned.model.layers[1].self_attn.o_proj.weight, full[keep].detach())
    q = tuner.model.model.layers[0].self_attn.q_proj
    q_full = q.base_layer.weight + q.pat_lora_B["default"] @ q.pat_lora_A["default"] * q.pat_lora_scaling["default"]
    torch.testing.assert_close(pruned.model.layers[0].self_attn.q_proj.weight, q_full[:, keep].detach())
    norm = tuner.model.model.layers[0].input_layernorm.weight
    torch.testing.assert_close(pruned.model.layers[0].input_layernorm.weight, norm[keep] * (64 / WIDTH) ** 0.5)


@pytest.mark.slow
def test_smollm2_pruned_by_a_quarter_matches_the_masked_model():
    from petuning.recipe.smollm2 import load_smollm2

    base, tokenizer = load_smollm2()
    assert base.config.tie_word_embeddings
    config = PatConfig(pruning_ratio=0.25, hsm_rank=16, lora_r=0, schedule_steps=10, init_weights=False)
    torch.manual_seed(0)
    model = get_peft_model(base, config)
    model.base_model.finalize_pat_mask()
    ids = tokenizer("What is 12 + 345? Answer:", return_tensors="pt").input_ids
    with torch.no_grad():
        masked = model(input_ids=ids).logits
        pruned = model.base_model.petuning_prune_and_unload()
        logits = pruned(input_ids=ids).logits
    assert pruned.config.hidden_size == 432 and pruned.config.head_dim == 64
    # float32 round-off: the tied head reads E diag(c) and the final norm w / c, each rounded once, over logits of
    # magnitude ~20 (the same math is exact to 2e-5 on the tiny tied models above)
    torch.testing.assert_close(logits, masked, atol=1e-3, rtol=1e-4)
    assert pruned.config.tie_word_embeddings, "SmolLM2 ties its head to the embedding, and so does the pruned model"
    parameters = sum(p.numel() for p in pruned.parameters())
    assert parameters == expected_parameter_count(base.config, 432, tied=True)
    assert parameters <= 0.76 * sum(p.numel() for p in base.parameters()), "at least 24% fewer parameters"


def test_export_prune_goes_through_the_tuner_and_refuses_a_soft_mask(tmp_path):
    from petuning.export import export_adapter

    path = tmp_path / "mistral"
    build_tiny_model("mistral", save_dir=path)
    model = tuned_pat(path, train_steps=0)
    model.base_model.pat_step["default"].fill_(15)  # frozen, not final
    model.save_pretrained(tmp_path / "soft")
    with pytest.raises(ValueError, match=r"not final yet \(schedule step 15 of 20\)"):
        export_adapter(tmp_path / "soft", tmp_path / "out-soft", prune=True)
    assert not (tmp_path / "out-soft").exists()
    model.base_model.finalize_pat_mask()
    model.save_pretrained(tmp_path / "final")
    with pytest.warns(UserWarning, match="No tokenizer"):
        export_adapter(tmp_path / "final", tmp_path / "out", prune=True)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(exported(**inputs()).logits, model(**inputs()).logits, atol=2e-5, rtol=1e-5)
    assert exported.config.hidden_size == WIDTH
