"""PEFT contracts on every attach path: training hooks reached through transformers' add_adapter / load_adapter,
``autocast_adapter_dtype=False``, exact Trainer resume for every method, and ranks capped per layer as LoRA
accepts any r."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import petuning
from petuning import FloraConfig, MaskTuningConfig, PatConfig, SorsaConfig, SparseLowRankConfig
from petuning.testing import cpu_training_args
from petuning.training import hook_providers

# Every method at small sizes on the tiny Llama, without dropout, so that two runs from the same seed agree exactly.
METHODS = {
    "sorsa": lambda: SorsaConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"),
    "flora": lambda: FloraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"),
    "sparse_low_rank": lambda: SparseLowRankConfig(
        r=4, density=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
    ),
    # a fixed budget ramp: the resume test's interrupted run has another max_steps, which moves an automatic one
    "mask_tuning": lambda: MaskTuningConfig(
        target_modules=["q_proj", "v_proj"],
        mask_share=0.25,
        masked_budget=0.05,
        budget_start_step=0,
        budget_end_step=4,
        task_type="CAUSAL_LM",
    ),
    "pat": lambda: PatConfig(hsm_rank=8, lora_r=4, lora_dropout=0.0, schedule_steps=6, task_type="CAUSAL_LM"),
}


def _base(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def _dataset(n: int = 16, length: int = 12):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 120, (n, length), generator=generator)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]


def _args(out, steps: int, **extra) -> TrainingArguments:
    return cpu_training_args(out, steps, data_seed=0, dataloader_num_workers=0, lr_scheduler_type="constant", **extra)


def _train(model, out, steps: int, **extra) -> Trainer:
    trainer = Trainer(
        model=model, args=_args(out, steps, **extra), train_dataset=_dataset(), callbacks=[petuning.PetuningCallback()]
    )
    return trainer


def _adapter_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------- 1. hooks on every path
def test_add_adapter_keeps_the_training_hooks_reachable(tiny_llama_dir, tmp_path):
    model = _base(tiny_llama_dir)
    model.add_adapter(SorsaConfig(r=4, target_modules=["q_proj", "v_proj"], gamma=0.1), adapter_name="sorsa")
    assert [type(p).__name__ for p in hook_providers(model)] == ["SorsaModel"]
    trainer = _train(model, tmp_path, steps=2)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all("sorsa_orthonormality" in entry for entry in logged)


def test_the_regularizer_acts_under_add_adapter(tiny_llama_dir, tmp_path):
    """The same training run with and without gamma differs: the hook really edits the gradients."""
    finals = []
    for gamma in (0.0, 1.0):
        model = _base(tiny_llama_dir)
        torch.manual_seed(0)
        model.add_adapter(SorsaConfig(r=4, target_modules=["q_proj"], gamma=gamma, init_weights=False))
        _train(model, tmp_path / str(gamma), steps=2).train()
        finals.append({n: p.detach() for n, p in model.named_parameters() if "sorsa_A" in n})
    assert any(not torch.equal(finals[0][n], finals[1][n]) for n in finals[0])


def test_load_adapter_is_trainable_keeps_the_training_hooks(tiny_llama_dir, tmp_path):
    peft_model = get_peft_model(
        _base(tiny_llama_dir), MaskTuningConfig(target_modules=["q_proj"], gradient_dropout=True)
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    model = _base(tiny_llama_dir)
    model.load_adapter(str(tmp_path / "adapter"), adapter_name="masks", is_trainable=True)
    assert [type(p).__name__ for p in hook_providers(model)] == ["MaskTuningModel"]
    trainer = _train(model, tmp_path / "run", steps=2)
    trainer.train()
    assert any("mask_tuning_gradient_dropped_share" in entry for entry in trainer.state.log_history)


def test_two_adapters_added_through_transformers_each_run_their_own_hooks(tiny_llama_dir):
    model = _base(tiny_llama_dir)
    model.add_adapter(SorsaConfig(r=2, target_modules=["q_proj"]), adapter_name="a")
    model.add_adapter(SorsaConfig(r=2, target_modules=["v_proj"]), adapter_name="b")
    providers = hook_providers(model)
    assert len(providers) == 2
    model.set_adapter("b")
    assert [p.active_adapters for p in providers] == [[], ["b"]]  # the layers, not the tuners, are the record
    assert [sorted(p.petuning_metrics()) for p in providers] == [[], ["sorsa_orthonormality"]]  # b's hooks run once


def test_pat_refuses_transformers_add_adapter_naming_get_peft_model(tiny_llama_dir):
    with pytest.raises(ValueError, match=r"shared state.*get_peft_model"):
        _base(tiny_llama_dir).add_adapter(PatConfig(hsm_rank=8))


def test_unload_removes_the_registered_hooks(tiny_llama_dir):
    model = get_peft_model(_base(tiny_llama_dir), SorsaConfig(r=2, target_modules=["q_proj"]))
    assert hook_providers(model)
    plain = model.unload()
    assert not hook_providers(plain)
    assert not any(m._forward_hooks for m in plain.modules())


# -------------------------------------------------------------------------------- 2. adapter dtypes
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_adapter_dtype_false_keeps_the_base_dtype(tiny_llama_dir, tmp_path, method, dtype):
    model = get_peft_model(_base(tiny_llama_dir, dtype), METHODS[method](), autocast_adapter_dtype=False)
    model.add_adapter("other", METHODS[method](), autocast_adapter_dtype=False)
    prefix = model.prefix

    def dtypes(m, adapter):
        return {
            n: p.dtype
            for n, p in m.named_parameters()
            if prefix in n and adapter in n.split(".") and p.is_floating_point()
        }

    for adapter in ("default", "other"):
        found = dtypes(model, adapter)
        assert found
        fp32 = {n for n, d in found.items() if d == torch.float32}
        if method == "mask_tuning":  # the one documented exception: the scores
            assert fp32 == {n for n in found if "mask_tuning_scores" in n} and fp32
        else:
            assert set(found.values()) == {dtype}, found
    model.save_pretrained(tmp_path)
    loaded = dtypes(
        PeftModel.from_pretrained(_base(tiny_llama_dir, dtype), tmp_path, autocast_adapter_dtype=False), "default"
    )
    expected = {n: torch.float32 if "mask_tuning_scores" in n else dtype for n in loaded}
    assert loaded == expected
    upcast = get_peft_model(_base(tiny_llama_dir, dtype), METHODS[method]())
    assert set(dtypes(upcast, "default").values()) == {torch.float32}


# ------------------------------------------------------------------------------------ 3. exact resume
@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_trainer_run_resumed_from_its_checkpoint_equals_the_uninterrupted_run(tiny_llama_dir, tmp_path, method):
    def fresh():
        torch.manual_seed(0)
        return get_peft_model(_base(tiny_llama_dir), METHODS[method]())

    steps = 6
    straight = fresh()
    _train(straight, tmp_path / "straight", steps).train()

    interrupted = fresh()
    _train(interrupted, tmp_path / "run", 3, save_strategy="steps", save_steps=3).train()
    resumed = fresh()
    _train(resumed, tmp_path / "run", steps, save_strategy="steps", save_steps=3).train(
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3")
    )
    want, got = _adapter_state(straight), _adapter_state(resumed)
    assert want.keys() == got.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    if method == "mask_tuning":  # the final adapter stays compact: masked positions, no float scores
        resumed.save_pretrained(tmp_path / "final")
        from safetensors.torch import load_file

        assert not [k for k in load_file(tmp_path / "final" / "adapter_model.safetensors") if "mask_tuning_scores" in k]


# ------------------------------------------------------------------------------------- 4. rank capping
class _WithRouter(nn.Module):
    """A layer as wide as a MoE router (64 -> 4) next to an ordinary one, and a depthwise convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 64)
        self.router = nn.Linear(64, 4)
        self.depthwise = nn.Conv1d(4, 4, 3, padding=1, groups=4)

    def forward(self, x):
        return self.depthwise(self.router(self.proj(x)).unsqueeze(-1).expand(-1, -1, 3)).sum(-1)


@pytest.mark.parametrize(
    "config, capped",
    [
        (SorsaConfig(r=8, target_modules=["proj", "router"]), ["router"]),
        (SparseLowRankConfig(r=8, target_modules=["proj", "router"]), ["router"]),
        (FloraConfig(target_modules=["proj", "router", "depthwise"]), ["router", "depthwise"]),
    ],
)
def test_a_rank_larger_than_a_layer_allows_is_capped_with_one_warning(config, capped):
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="lowered to the largest rank each allows") as caught:
        model = get_peft_model(_WithRouter(), config)
    messages = [str(w.message) for w in caught if "lowered to the largest rank" in str(w.message)]
    assert len(messages) == 1 and all(f"{name} (" in messages[0] for name in capped) and "proj (" not in messages[0]
    assert torch.isfinite(model(torch.randn(2, 16))).all()
    layers = {n.split(".")[-1]: m for n, m in model.named_modules() if hasattr(m, "rank_caps")}
    assert sorted(n for n, layer in layers.items() if layer.rank_caps) == sorted(capped)


@pytest.mark.parametrize(
    "config",
    [
        SorsaConfig(r=8, target_modules=["router"], strict_rank=True),
        SparseLowRankConfig(r=8, target_modules=["router"], strict_rank=True),
        FloraConfig(target_modules=["depthwise"], strict_rank=True),
    ],
)
def test_strict_rank_refuses_the_layer_by_name(config):
    with pytest.raises(ValueError, match=r"for layer '(router|depthwise)' is larger than .*strict_rank=True"):
        get_peft_model(_WithRouter(), config)


def test_a_density_that_selects_nothing_keeps_one_entry():
    with pytest.warns(UserWarning, match=r"router .*density 0.001 selects no entry.*1 entry"):
        model = get_peft_model(_WithRouter(), SparseLowRankConfig(r=2, density=0.001, target_modules=["router"]))
    assert model.base_model.model.router.sparse_low_rank_values["default"].numel() == 1


def test_pat_defaults_are_valid_and_its_hsm_rank_is_capped_at_the_hidden_size(tiny_llama_dir):
    config = PatConfig()
    assert config.pruning_ratio == 0.25 and config.target_width is None
    with pytest.warns(UserWarning, match=r"hsm_rank=200 exceeds the hidden size 64.*Using hsm_rank=64"):
        model = get_peft_model(_base(tiny_llama_dir), config)
    downs = [p for n, p in model.named_parameters() if "pat_hsm_down" in n]
    assert downs and all(p.shape == (64, 64) for p in downs)
    assert model.base_model.pat_kept_channels().numel() == 48
    with pytest.raises(ValueError, match="strict_rank=True"):
        get_peft_model(_base(tiny_llama_dir), PatConfig(strict_rank=True))


def test_a_config_with_a_fitting_rank_warns_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_peft_model(_WithRouter(), SorsaConfig(r=4, target_modules=["proj", "router"]))
