"""Recipe data: what reaches TRL's SFTTrainer (the embedded task as prompt/completion pairs, so only the answer is
learned), local files and folders, saved datasets, the held-out prompts and references, and clear errors for a
missing file, a missing split or missing columns."""

from __future__ import annotations

import json

import pytest
import torch
from trl import SFTConfig, SFTTrainer

from petuning.recipe.data import check_layout, load_splits, prompts_and_references, split
from petuning.recipe.task import IGNORE_INDEX, load_embedded_task
from petuning.testing import build_tiny_model, build_tiny_tokenizer

datasets = pytest.importorskip("datasets")
TOK = build_tiny_tokenizer()
RECORDS = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2=", "completion": "4"}]


def test_the_embedded_task_reaches_sfttrainer_with_the_answer_as_the_only_label(tmp_path):
    splits = load_splits("embedded")
    assert {name: len(ds) for name, ds in splits.items()} == {"train": 2000, "test": 200}
    first = load_embedded_task("train")[0]["messages"]
    assert splits["train"][0] == {"prompt": first[:-1], "completion": first[-1:]}
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_length=128)
    trainer = SFTTrainer(
        model=build_tiny_model("llama"), args=args, train_dataset=splits["train"].select(range(4)), processing_class=TOK
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    for ids, labels, record in zip(batch["input_ids"], batch["labels"], splits["train"]):
        learned = TOK.decode([t for t, label in zip(ids.tolist(), labels.tolist()) if label != IGNORE_INDEX])
        assert learned.startswith(record["completion"][0]["content"] + "<|im_end|>")  # the answer, then end of turn
        assert record["prompt"][-1]["content"] not in learned  # the question is not learned


def test_local_files_folders_and_saved_datasets(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    assert list(load_splits(str(tmp_path / "a.jsonl"))["train"]) == RECORDS
    (tmp_path / "a.json").write_text(json.dumps(RECORDS))
    assert list(load_splits(str(tmp_path / "a.json"))["train"]) == RECORDS
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (folder / "test.jsonl").write_text(json.dumps(RECORDS[0]) + "\n")
    loaded = load_splits(str(folder))
    assert list(loaded["train"]) == RECORDS and list(loaded["test"]) == RECORDS[:1]
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "one"))
    assert list(load_splits(str(tmp_path / "one"))["train"]) == RECORDS
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(RECORDS), "validation": datasets.Dataset.from_list(RECORDS[1:])}
    ).save_to_disk(str(tmp_path / "dict"))
    saved = load_splits(str(tmp_path / "dict"))
    assert list(saved["validation"]) == RECORDS[1:]
    with pytest.raises(ValueError, match=r"has the splits \['train', 'validation'\], not 'test'; set dataset_test"):
        split(saved, "dataset_test_split", "test", "dict")


def test_missing_files_and_an_offline_hub_id_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"dataset file '.*missing.jsonl' does not exist; give an existing"):
        load_splits(str(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"dataset '\./nowhere' does not exist"):
        load_splits("./nowhere")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # this suite runs offline anyway
    with pytest.raises(ConnectionError, match=r"could not be reached .*save_to_disk\(DIR\)\) and pass DIR"):
        load_splits("someone/some-dataset")


def test_layouts_and_missing_columns():
    assert check_layout(datasets.Dataset.from_list(RECORDS), "d", "text") == "prompt_completion"
    assert check_layout(datasets.Dataset.from_list([{"messages": []}]), "d", "text") == "messages"
    assert check_layout(datasets.Dataset.from_list([{"body": "x"}]), "d", "body") == "text"
    with pytest.raises(ValueError, match=r"dataset d has the columns \['question', 'solution'\], none of the layouts"):
        check_layout(datasets.Dataset.from_list([{"question": "q", "solution": "s"}]), "d", "text")


def test_held_out_prompts_and_references():
    chat = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": " 4 "}]
    prompts, references = prompts_and_references(datasets.Dataset.from_list([{"messages": chat}]), "messages", TOK)
    assert references == ["4"]
    assert TOK.decode(prompts[0]) == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    prompts, references = prompts_and_references(datasets.Dataset.from_list(RECORDS), "prompt_completion", TOK)
    assert references == ["2", "4"] and TOK.decode(prompts[0]) == "1+1="
    with pytest.raises(ValueError, match="must end with the assistant's answer"):
        prompts_and_references(datasets.Dataset.from_list([{"messages": chat[:1]}]), "messages", TOK)
    with pytest.raises(ValueError, match="plain-text dataset has no prompt/reference pairs"):
        prompts_and_references(datasets.Dataset.from_list([{"text": "x"}]), "text", TOK)


def test_a_petuning_config_in_a_plain_sfttrainer_script_runs_its_hooks(tmp_path):
    """What docs/recipes.md shows TRL users: the config as peft_config, then attach_to_trainer."""
    import petuning

    args = SFTConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to="none",
        max_steps=3,
        logging_steps=1,
        gradient_checkpointing=False,
        per_device_train_batch_size=2,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=build_tiny_model("llama"),
        args=args,
        processing_class=TOK,
        train_dataset=load_splits("embedded")["train"].select(range(6)),
        peft_config=petuning.SorsaConfig(r=2, target_modules=["q_proj", "v_proj"]),
    )
    petuning.attach_to_trainer(trainer)
    assert trainer.model.peft_config["default"].peft_type == "SORSA"
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3 and all("sorsa_orthonormality" in entry for entry in logged)  # the method's metric
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if p.requires_grad)
