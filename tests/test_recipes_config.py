"""Recipe arguments: TRL's parser over the YAML file and flags, method lookup, hardware choices, clear errors."""

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
from trl import ModelConfig

from petuning.recipe import available_methods, build_peft_config, parse_recipe_args
from petuning.recipe.run import resolve_resume
from petuning.recipe.setup import load_tokenizer, resolve_attention, resolve_packing

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def test_the_file_then_command_line_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "method: sorsa\nmethod_options: {r: 4, gamma: 1e-3}\ndataset_name: embedded\n"
        "learning_rate: 2.0e-4\noutput_dir: x\nmax_steps: 5\n"
    )
    args = parse_recipe_args([str(path), "--max_steps", "7", "--method_options", '{"r": 2}', "--seed", "3"])
    assert args.petuning.method == "sorsa" and args.petuning.method_options == {"r": 2, "gamma": 1e-3}
    assert (args.training.learning_rate, args.training.max_steps, args.training.seed) == (2e-4, 7, 3)
    assert args.training.output_dir == "x" and args.script.dataset_name == "embedded"
    config = build_peft_config(args.petuning.method, args.petuning.method_options)
    assert (config.r, config.gamma, config.task_type) == (2, 1e-3, "CAUSAL_LM")
    same = parse_recipe_args(["--config", str(path)])  # TRL's own spelling
    assert same.petuning.method_options == {"r": 4, "gamma": 1e-3} and same.training.max_steps == 5
    with pytest.raises(ValueError, match="--method_options must be a JSON object"):
        parse_recipe_args([str(path), "--method_options", "r=2"])


def test_bf16_and_dtype_follow_the_hardware_unless_set(tmp_path):
    base = ["--dataset_name", "embedded", "--output_dir", str(tmp_path)]
    args = parse_recipe_args(base)
    assert args.training.bf16 is False and args.model.dtype == "float32"  # TRL's default is bf16=True
    args = parse_recipe_args([*base, "--bf16", "true", "--use_cpu", "true"])
    assert args.training.bf16 is True and args.model.dtype == "bfloat16"
    args = parse_recipe_args([*base, "--bf16", "true", "--use_cpu", "true", "--dtype", "float32"])
    assert args.model.dtype == "float32"


def test_every_method_name_is_its_peft_type():
    methods = available_methods()
    assert {"lora", "sorsa"} <= set(methods) and methods["lora"] is LoraConfig
    for name, config_cls in methods.items():  # the name is the method's parameter prefix without "_"
        (peft_type,) = [t for t, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items() if cls is config_cls]
        assert PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] == name + "_"


def parse(*argv):
    return parse_recipe_args(["--dataset_name", "embedded", "--output_dir", "x", *argv])


def test_unknown_method():
    with pytest.raises(ValueError, match=r"unknown method 'sorsaa' \(did you mean 'sorsa'\?\); available methods: "):
        parse("--method", "sorsaa")


def test_option_that_does_not_apply_to_the_method():
    with pytest.raises(ValueError, match=r"method_options.gamma does not apply to method 'lora' .*option of: sorsa"):
        parse("--method", "lora", "--method_options", '{"gamma": 4e-4}')
    with pytest.raises(ValueError, match=r"method_options.lora_alpha does not apply to method 'sorsa' .*of: lora"):
        parse("--method", "sorsa", "--method_options", '{"lora_alpha": 16}')
    with pytest.raises(ValueError, match=r"method_options.task_type .*the recipe sets it itself"):
        parse("--method", "lora", "--method_options", '{"task_type": "SEQ_CLS"}')


def test_misspelt_keys_missing_file_and_missing_dataset(tmp_path):
    (tmp_path / "c.yaml").write_text("method: lora\nlearnig_rate: 1.0\n")
    with pytest.raises(ValueError, match=r"unknown key 'learnig_rate' in .*c.yaml; did you mean 'learning_rate'"):
        parse_recipe_args([str(tmp_path / "c.yaml")])
    with pytest.raises(FileNotFoundError, match="recipe config"):
        parse_recipe_args(["no/such/config.yaml"])
    with pytest.raises(ValueError, match="dataset_name is missing"):
        parse_recipe_args(["--output_dir", "x"])
    with pytest.raises(ValueError, match="reload_check compares generated answers, so it needs eval_metric"):
        parse("--reload_check", "true")
    with pytest.raises(ValueError, match="eval_metric='bleu' is not one of"):
        parse("--eval_metric", "bleu")


def test_attention_backend_is_explicit_and_logged(caplog):
    assert resolve_attention("auto", CPU, torch.float32)[0] == "sdpa"
    assert (
        "CUDA" in resolve_attention("auto", CPU, torch.bfloat16)[1]
        or "not installed" in resolve_attention("auto", CPU, torch.bfloat16)[1]
    )
    assert resolve_attention("eager", CPU, torch.float32) == ("eager", "requested")
    with pytest.raises(ValueError, match="flash_attention_2 cannot be used"):
        resolve_attention("flash_attention_2", CPU, torch.bfloat16)
    with pytest.raises(ValueError, match="not one of"):
        resolve_attention("flash", CPU, torch.float32)
    with caplog.at_level(logging.WARNING, logger="petuning.recipe"):
        assert resolve_packing(True, "sdpa") is False
    assert "packing needs flash_attention_2" in caplog.text
    assert resolve_packing(True, "flash_attention_2") is True


def test_resume_resolution(tmp_path):
    assert resolve_resume(None, tmp_path / "absent") is None
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        resolve_resume("true", tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        resolve_resume(str(tmp_path / "checkpoint-9"), tmp_path)
    for step in (2, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
    assert resolve_resume(None, tmp_path) == str(tmp_path / "checkpoint-10")  # by step number, not by name
    assert resolve_resume("true", tmp_path) == str(tmp_path / "checkpoint-10")
    assert resolve_resume("false", tmp_path) is None and resolve_resume(False, tmp_path) is None


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipe_configs_are_valid(path):
    """Every shipped config names a known method and only options that method has (7B ones cannot run here)."""
    args = parse_recipe_args([str(path)])
    assert build_peft_config(args.petuning.method, args.petuning.method_options).task_type == "CAUSAL_LM"
    assert path.stem.startswith(args.petuning.method + "_")


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load(path):
    config = load_config_from_file(str(path))  # accelerate's own parser: unknown keys are errors
    ds_file = (config.deepspeed_config or {}).get("deepspeed_config_file")
    raw = yaml.safe_load(path.read_text())
    if ds_file:  # precision comes from the JSON's "auto" (bf16); accelerate refuses its own next to a JSON
        assert "mixed_precision" not in raw
    else:
        assert config.mixed_precision == "no"  # the recipe decides precision (bf16)
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
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
        unk_token="<unk>",
        eos_token="</s>",
    )
    tokenizer.save_pretrained(directory)
    return directory


def test_chat_template_and_pad_token(tmp_path):
    path = _plain_tokenizer(tmp_path / "tok")
    template = tmp_path / "turns.jinja"
    template.write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    tokenizer = load_tokenizer(ModelConfig(model_name_or_path=str(path)), str(template))
    assert tokenizer.pad_token == "</s>"  # no pad token: the EOS pads
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "[user] hi</s>[assistant] "
    with pytest.raises(FileNotFoundError, match=r"chat_template_path: no template file '.*absent.jinja'"):
        load_tokenizer(ModelConfig(model_name_or_path=str(path)), str(tmp_path / "absent.jinja"))


def test_trainable_summary_groups_by_tensor_kind():
    from peft import get_peft_model

    from petuning.recipe.run import trainable_summary
    from petuning.testing import build_tiny_model

    model = get_peft_model(
        build_tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    )
    lines = trainable_summary(model).splitlines()
    trainable, total = model.get_nb_trainable_parameters()
    assert lines[0] == f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)"
    # 2 layers x (q, v): A is (2, 64); B is (64, 2) for q and (32, 2) for v (2 KV heads of 16); lm_head 128 x 64
    assert lines[1:] == [
        "    lora_A: 4 tensors, 512 parameters",
        "    lora_B: 4 tensors, 384 parameters",
        "    modules_to_save: 1 tensors, 8,192 parameters",
    ]


def test_options_the_recipe_cannot_honour_are_refused():
    with pytest.raises(ValueError, match="use_peft is not used by petuning's recipe; set method: lora"):
        parse("--use_peft", "true")
    with pytest.raises(ValueError, match=r"lora_r is TRL's LoRA flag.*method_options: \{r: \.\.\.\}"):
        parse("--lora_r", "8")
    with pytest.raises(ValueError, match="load_in_8bit is not used .* use load_in_4bit"):
        parse("--load_in_8bit", "true")
    with pytest.raises(ValueError, match="clone a model's template"):
        parse("--chat_template_path", "someone/model", "--eval_metric", "exact_match")
    with pytest.raises(ValueError, match="--config needs a file"):
        parse_recipe_args(["--config"])
    assert parse("--dtype", "auto").model.dtype == "float32"  # auto follows bf16, as when unset


def test_the_saved_arguments_read_back_as_a_config(tmp_path):
    args = parse("--method", "sorsa", "--method_options", '{"r": 2}', "--max_steps", "7", "--learning_rate", "3e-4")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(args.to_dict(), sort_keys=False))
    again = parse_recipe_args([str(tmp_path / "recipe.yaml")])
    assert again.petuning.method == "sorsa" and again.petuning.method_options == {"r": 2}
    assert (again.training.max_steps, again.training.learning_rate) == (7, 3e-4)
    assert again.script.dataset_name == "embedded" and again.training.output_dir == "x"


def test_the_command_line_says_errors_in_one_paragraph(capsys):
    from petuning.cli import main

    assert main(["train", "--method", "sorsaa", "--dataset_name", "embedded", "--output_dir", "x"]) == 1
    assert capsys.readouterr().err.startswith("error: unknown method 'sorsaa' (did you mean 'sorsa'?)")
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--dataset_name", "embedded", "--help"])
    assert exit_.value.code == 0 and "--method_options" in capsys.readouterr().out
