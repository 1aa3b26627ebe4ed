"""Recipe configuration: YAML + overrides, method lookup, hardware choices, and the clear errors of issue 7."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from peft import LoraConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING

from petuning.recipe import available_methods, build_peft_config, load_config
from petuning.recipe.run import resolve_resume
from petuning.recipe.config import REMOVE, ModelArgs, parse_overrides
from petuning.recipe.setup import load_tokenizer, resolve_attention, resolve_bf16, resolve_packing

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def test_overrides_in_every_form():
    pairs = parse_overrides(
        ["train.learning_rate=1e-4", "--peft.r", "8", "--peft.target_modules=[q_proj, v_proj]", "--eval.before_training",
         "~peft.gamma", "method=lora", "--train.max-steps", "3"]
    )
    assert pairs == [
        ("train.learning_rate", 1e-4),
        ("peft.r", 8),
        ("peft.target_modules", ["q_proj", "v_proj"]),
        ("eval.before_training", True),
        ("peft.gamma", REMOVE),
        ("method", "lora"),
        ("train.max_steps", 3),
    ]
    # YAML 1.2 scalars: "no" stays a string (train.save_strategy=no), only true/false are booleans
    assert parse_overrides(["train.save_strategy=no", "a.b=off", "a.c=False"]) == [
        ("train.save_strategy", "no"), ("a.b", "off"), ("a.c", False)]


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: sorsa\npeft: {r: 4, gamma: 1e-3}\ntrain: {learning_rate: 2e-4, output_dir: x}\n")
    cfg = load_config(path, ["peft.r=2", "~peft.gamma", "train.seed=3"])
    assert cfg.method == "sorsa" and cfg.peft == {"r": 2}
    assert cfg.train == {"learning_rate": 2e-4, "output_dir": "x", "seed": 3}  # "2e-4" read as a float, not a string
    config = build_peft_config(cfg.method, cfg.peft)
    assert config.r == 2 and config.task_type == "CAUSAL_LM"


def test_every_method_name_is_its_peft_type():
    methods = available_methods()
    assert {"lora", "sorsa"} <= set(methods) and methods["lora"] is LoraConfig
    for name, config_cls in methods.items():  # the name is the method's parameter prefix without "_"
        (peft_type,) = [t for t, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items() if cls is config_cls]
        assert PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] == name + "_"


def test_unknown_method():
    with pytest.raises(ValueError, match=r"unknown method 'sorsaa' \(did you mean 'sorsa'\?\); available methods: .*lora"):
        load_config(None, ["method=sorsaa"])


def test_option_that_does_not_apply_to_the_method():
    with pytest.raises(ValueError, match=r"peft.gamma does not apply to method 'lora' .*option of: sorsa"):
        load_config(None, ["method=lora", "peft.gamma=4e-4"])
    with pytest.raises(ValueError, match=r"peft.lora_alpha does not apply to method 'sorsa' .*option of: lora"):
        load_config(None, ["method=sorsa", "peft.lora_alpha=16"])
    with pytest.raises(ValueError, match=r"peft.task_type .*the recipe sets it itself"):
        load_config(None, ["method=lora", "peft.task_type=SEQ_CLS"])


def test_misspelt_and_unqualified_keys():
    with pytest.raises(ValueError, match=r"unknown key 'learnig_rate' in section 'train'.*did you mean 'learning_rate'"):
        load_config(None, ["train.learnig_rate=1"])
    with pytest.raises(ValueError, match=r"did you mean train.learning_rate"):
        load_config(None, ["learning_rate=1"])
    with pytest.raises(ValueError, match=r"unknown key 'modle'.*did you mean 'model'"):
        load_config(None, ["modle.name_or_path=x"])
    with pytest.raises(FileNotFoundError, match="recipe config"):
        load_config("no/such/config.yaml")


def test_attention_backend_is_explicit_and_logged(caplog):
    assert resolve_attention("auto", CPU, torch.float32)[0] == "sdpa"
    assert "CUDA" in resolve_attention("auto", CPU, torch.bfloat16)[1] or "not installed" in resolve_attention("auto", CPU, torch.bfloat16)[1]
    assert resolve_attention("eager", CPU, torch.float32) == ("eager", "requested")
    with pytest.raises(ValueError, match="flash_attention_2 cannot be used"):
        resolve_attention("flash_attention_2", CPU, torch.bfloat16)
    with pytest.raises(ValueError, match="not one of"):
        resolve_attention("flash", CPU, torch.float32)
    with caplog.at_level(logging.WARNING, logger="petuning.recipe"):
        assert resolve_packing(True, "sdpa") is False
    assert "packing needs flash_attention_2" in caplog.text
    assert resolve_packing(True, "flash_attention_2") is True


def test_bf16_auto_is_off_on_cpu():
    assert resolve_bf16("auto", CPU) is False
    assert resolve_bf16(True, CPU) is True  # CPU autocast exists; only the user asks for it
    with pytest.raises(ValueError, match="true, false or 'auto'"):
        resolve_bf16("yes", CPU)


def test_resume_resolution(tmp_path):
    assert resolve_resume("auto", tmp_path / "absent") is None
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        resolve_resume(True, tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        resolve_resume(str(tmp_path / "checkpoint-9"), tmp_path)
    for step in (2, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
    assert resolve_resume("auto", tmp_path) == str(tmp_path / "checkpoint-10")  # by step number, not by name
    assert resolve_resume(True, tmp_path) == str(tmp_path / "checkpoint-10")
    assert resolve_resume(False, tmp_path) is None


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipe_configs_are_valid(path):
    """Every shipped config names a known method and only options that method has (7B ones cannot run here)."""
    cfg = load_config(path)
    assert build_peft_config(cfg.method, cfg.peft).task_type == "CAUSAL_LM"
    assert path.stem.startswith(cfg.method + "_")


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load(path):
    config = load_config_from_file(str(path))  # accelerate's own parser: unknown keys are errors
    ds_file = (config.deepspeed_config or {}).get("deepspeed_config_file")
    raw = yaml.safe_load(path.read_text())
    if ds_file:  # precision comes from the JSON's "auto" (train.bf16); accelerate refuses its own next to a JSON
        assert "mixed_precision" not in raw
    else:
        assert config.mixed_precision == "no"  # the recipe decides precision (train.bf16)
    if ds_file:
        ds = json.loads((ROOT / ds_file).read_text())
        assert ds["bf16"]["enabled"] == "auto" and ds["train_micro_batch_size_per_gpu"] == "auto"
        assert f"zero{ds['zero_optimization']['stage']}" in path.name
    if config.fsdp_config:
        assert config.fsdp_config["fsdp_cpu_ram_efficient_loading"] is False  # SVD init needs real weights everywhere
    assert yaml.safe_load(path.read_text())["compute_environment"] == "LOCAL_MACHINE"


def _plain_tokenizer(directory: Path) -> Path:
    """A character-level tokenizer with an EOS token, no pad token and no chat template or ChatML tokens."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<unk>", "</s>"] + [chr(c) for c in range(32, 127)] + ["\n"])}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
                                        unk_token="<unk>", eos_token="</s>")
    tokenizer.save_pretrained(directory)
    return directory


def test_chat_template_and_pad_token(tmp_path):
    path = _plain_tokenizer(tmp_path / "tok")
    template = tmp_path / "turns.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}"
                        "{% if add_generation_prompt %}[assistant] {% endif %}")
    tokenizer = load_tokenizer(ModelArgs(name_or_path=str(path), chat_template=str(template)))
    assert tokenizer.pad_token == "</s>"  # no pad token: the EOS pads
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "[user] hi</s>[assistant] "
    with pytest.raises(FileNotFoundError, match=r"no template file '.*absent.jinja' \(or use 'chatml'\)"):
        load_tokenizer(ModelArgs(name_or_path=str(path), chat_template=str(tmp_path / "absent.jinja")))
    with pytest.raises(ValueError, match=r"chat_template=chatml needs the tokens \['<\|im_start\|>', '<\|im_end\|>'\]"):
        load_tokenizer(ModelArgs(name_or_path=str(path), chat_template="chatml"))


def test_trainable_summary_groups_by_tensor_kind():
    from peft import get_peft_model

    from petuning.models import build_tiny_model
    from petuning.recipe.run import trainable_summary

    model = get_peft_model(build_tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                                 modules_to_save=["lm_head"]))
    lines = trainable_summary(model).splitlines()
    trainable, total = model.get_nb_trainable_parameters()
    assert lines[0] == f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)"
    # 2 layers x (q, v): A is (2, 64); B is (64, 2) for q and (32, 2) for v (2 KV heads of 16); lm_head 128 x 64
    assert lines[1:] == ["    lora_A: 4 tensors, 512 parameters", "    lora_B: 4 tensors, 384 parameters",
                         "    modules_to_save: 1 tensors, 8,192 parameters"]
