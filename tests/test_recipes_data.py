"""Recipe data: local JSON/JSONL files, the three layouts, completion-only labels, held-out splits, and clear
errors for a missing file or missing columns. Labels are checked against the ChatML text assembled by hand
(the tiny tokenizer is character level, so token positions are character positions)."""

from __future__ import annotations

import json
import sys

import pytest

from petuning import data
from petuning.data import IGNORE_INDEX, SFTFormat, load_records, read_json_records, tokenize_record
from petuning.models import build_tiny_tokenizer
from petuning.recipe import load_config, prepare_splits

TOK = build_tiny_tokenizer()
EOS = "<|im_end|>"


def _ids(text: str) -> list[int]:
    return TOK(text)["input_ids"]


def _chatml(messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a ChatML conversation and its labels: assistant contents plus their end-of-turn tokens."""
    ids, labels = [], []
    for message in messages:
        header = _ids(f"<|im_start|>{message['role']}\n")
        body = _ids(message["content"] + EOS + "\n")
        ids += header + body
        labels += [IGNORE_INDEX] * len(header) + (body if message["role"] == "assistant" else [IGNORE_INDEX] * len(body))
    return ids, labels


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "3+3?"},
    {"role": "assistant", "content": "6"},
]


def test_messages_learn_every_assistant_turn():
    features = tokenize_record({"messages": CHAT}, TOK, SFTFormat(kind="messages"))
    ids, labels = _chatml(CHAT)
    assert features["input_ids"] == ids and features["labels"] == labels
    assert features["attention_mask"] == [1] * len(ids)
    everything = tokenize_record({"messages": CHAT}, TOK, SFTFormat(kind="messages"), completion_only=False)
    assert everything["labels"] == ids
    assert data.tokenize_for_sft({"messages": CHAT}, TOK) == features  # the demo's helper agrees


def test_prompt_completion_strings_template_and_conversations():
    fmt = SFTFormat(kind="prompt_completion")
    features = tokenize_record({"prompt": "Q: 2+2? A:", "completion": " 4"}, TOK, fmt)
    assert features["input_ids"] == _ids("Q: 2+2? A: 4" + EOS)
    assert features["labels"] == [IGNORE_INDEX] * len("Q: 2+2? A:") + _ids(" 4" + EOS)

    templated = SFTFormat(kind="prompt_completion", completion_field="response", prompt_template="### Q:\n{query}\n### A:")
    features = tokenize_record({"query": "2+2?", "response": "4"}, TOK, templated, max_length=12)
    assert features["input_ids"] == _ids("### Q:\n2+2?\n### A:4" + EOS)[:12]
    assert data.prompt_and_reference({"query": "2+2?", "response": "4"}, TOK, templated) == (_ids("### Q:\n2+2?\n### A:"), "4")

    prompt, completion = CHAT[:4], CHAT[4:]
    features = tokenize_record({"prompt": prompt, "completion": completion}, TOK, fmt)
    ids, _ = _chatml(CHAT)
    learned = _ids("6" + EOS + "\n")
    assert features["input_ids"] == ids
    assert features["labels"] == [IGNORE_INDEX] * (len(ids) - len(learned)) + learned  # the few-shot "4" is prompt
    assert data.prompt_and_reference({"prompt": prompt, "completion": completion}, TOK, fmt) == (
        ids[: len(ids) - len(learned)], "6")


def test_text_learns_every_token():
    features = tokenize_record({"text": "hello"}, TOK, SFTFormat(kind="text"))
    assert features["input_ids"] == features["labels"] == _ids("hello" + EOS)
    with pytest.raises(ValueError, match="no prompt/reference pairs"):
        data.prompt_and_reference({"text": "hello"}, TOK, SFTFormat(kind="text"))


def test_json_array_and_json_lines(tmp_path):
    records = [{"text": "a"}, {"text": "b"}]
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n\n" for r in records))
    (tmp_path / "c.json").write_text("".join(json.dumps(r) + "\n" for r in records))  # JSON lines named .json
    for name in ("a.json", "b.jsonl", "c.json"):
        assert load_records(str(tmp_path / name)) == records
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2"):
        read_json_records(tmp_path / "bad.jsonl")
    (tmp_path / "list.jsonl").write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"record 1 is a list, expected a JSON object"):
        read_json_records(tmp_path / "list.jsonl")
    with pytest.raises(ValueError, match="a split .* does not apply"):
        load_records(str(tmp_path / "a.json"), split="test")


def test_missing_dataset_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset file '.*missing.jsonl' does not exist; give an existing"):
        load_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"dataset '\./nowhere' does not exist"):
        load_records("./nowhere")


def test_hub_ids_need_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if the package were not installed
    with pytest.raises(ImportError, match=r"needs the 'datasets' package \(pip install datasets\)"):
        load_records("someone/some-dataset")


RECORDS = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2=", "completion": "4"}]


def test_a_folder_of_jsonl_files_goes_through_datasets_json_builder(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (tmp_path / "test.jsonl").write_text(json.dumps(RECORDS[0]) + "\n")
    assert load_records(str(tmp_path)) == RECORDS
    assert load_records(str(tmp_path), split="test") == RECORDS[:1]


def test_a_dataset_saved_to_disk_loads_with_its_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "one"))
    assert load_records(str(tmp_path / "one")) == RECORDS
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(RECORDS), "validation": datasets.Dataset.from_list(RECORDS[1:])}
    ).save_to_disk(str(tmp_path / "dict"))
    assert load_records(str(tmp_path / "dict"), split="validation") == RECORDS[1:]
    with pytest.raises(ValueError, match=r"has splits \['train', 'validation'\], not 'test'"):
        load_records(str(tmp_path / "dict"), split="test")


def test_a_hub_id_offline_names_the_fix(monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # this suite runs offline anyway
    with pytest.raises(ConnectionError, match=r"could not be reached .*save_to_disk\(DIR\)\) and pass DIR"):
        load_records("someone/some-dataset")


def test_the_recipe_trains_and_evaluates_on_the_splits_of_a_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(RECORDS * 3), "test": datasets.Dataset.from_list(RECORDS[:1])}
    ).save_to_disk(str(saved))
    cfg = load_config(None, ["method=lora", f"data.dataset={saved}", "data.eval_split=test", "eval.metric=exact_match"])
    splits = prepare_splits(cfg, TOK, seed=0)
    assert (len(splits.train), len(splits.eval), splits.references) == (6, 1, ["2"])


def test_missing_columns_are_named():
    with pytest.raises(ValueError, match=r"dataset 'd' has columns \['question', 'solution'\], none of the layouts .*'messages'"):
        SFTFormat().resolve([{"question": "q", "solution": "s"}], "'d'")
    records = [{"prompt": "p", "completion": "c"}, {"prompt": "p"}]
    with pytest.raises(ValueError, match=r"record 1: missing column\(s\) \['completion'\] .*data.completion_field"):
        SFTFormat().resolve(records, "'d'")
    with pytest.raises(ValueError, match=r"record 0: missing column\(s\) \['messages'\]"):
        SFTFormat(kind="messages").resolve(records, "'d'")
    mapped = SFTFormat(prompt_field="question", completion_field="solution").resolve([{"question": "q", "solution": "s"}], "d")
    assert mapped.kind == "prompt_completion"
    with pytest.raises(ValueError, match=r"prompt_template names column 'query'"):
        tokenize_record({"q": "x", "completion": "y"}, TOK, SFTFormat(kind="prompt_completion", prompt_template="{query}"))


def _cfg(tmp_path, records, *overrides):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return load_config(None, ["method=lora", f"data.dataset={path}", *overrides])


def test_held_out_split_is_seeded_and_disjoint(tmp_path):
    records = [{"prompt": f"{i}=", "completion": str(i)} for i in range(20)]
    cfg = _cfg(tmp_path, records, "data.eval_size=0.25", "eval.metric=exact_match")
    first, again = prepare_splits(cfg, TOK, seed=0), prepare_splits(cfg, TOK, seed=0)
    assert (len(first.train), len(first.eval)) == (15, 5) and first.references == again.references
    assert set(first.references).isdisjoint({TOK.decode(f["input_ids"]).split("=")[0] for f in first.train})
    assert prepare_splits(cfg, TOK, seed=1).references != first.references


def test_split_errors(tmp_path, caplog):
    records = [{"prompt": "a long prompt " * 3, "completion": "x"}, {"prompt": "p", "completion": "x"}]
    with caplog.at_level("WARNING", logger="petuning.recipe"):
        splits = prepare_splits(_cfg(tmp_path, records, "data.max_length=10"), TOK, seed=0)
    assert len(splits.train) == 1 and "1 of 2 examples have no completion token" in caplog.text
    with pytest.raises(ValueError, match="no example keeps a completion token within data.max_length=1"):
        prepare_splits(_cfg(tmp_path, records, "data.max_length=1"), TOK, seed=0)
    with pytest.raises(ValueError, match="eval.metric needs held-out records"):
        prepare_splits(_cfg(tmp_path, records, "eval.metric=exact_match"), TOK, seed=0)
    with pytest.raises(ValueError, match="completion_only_loss=true does not apply to 'text' data"):
        prepare_splits(_cfg(tmp_path, [{"text": "abc"}], "data.completion_only_loss=true"), TOK, seed=0)
    with pytest.raises(ValueError, match="reload_check .* needs eval.metric"):
        prepare_splits(_cfg(tmp_path, records, "eval.reload_check=true"), TOK, seed=0)
    with pytest.raises(ValueError, match=r"training data .* record 0: the conversation has no assistant message"):
        prepare_splits(_cfg(tmp_path, [{"messages": [{"role": "user", "content": "hi"}]}]), TOK, seed=0)
