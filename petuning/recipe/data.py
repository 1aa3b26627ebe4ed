"""The recipe's datasets: loaded with ``datasets``, checked, and handed to TRL's ``SFTTrainer`` as they are.

``dataset_name`` is ``"embedded"`` (the shipped arithmetic task), a local data file (``.json``, ``.jsonl``,
``.csv``, ``.parquet``: its records are the ``train`` split), a folder written by ``save_to_disk``, or anything
``datasets.load_dataset`` reads (a folder of data files, whose names give the splits, or a Hub id). The layouts are
TRL's: conversational ``messages``, ``prompt``/``completion`` (strings or conversations), or plain text in
``dataset_text_field``. The embedded task comes as conversational prompt/completion pairs, so that TRL learns the
answers only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from petuning.recipe.task import load_embedded_task

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _embedded():
    from datasets import Dataset, DatasetDict

    def pairs(split: str) -> Dataset:
        records = load_embedded_task(split)
        return Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in records])

    return DatasetDict({"train": pairs("train"), "test": pairs("test")})


def load_splits(name: str, config: Optional[str] = None):
    """The ``DatasetDict`` ``name`` refers to (see the module docstring); errors name the fix."""
    import datasets

    if name == "embedded":
        return _embedded()
    path = Path(name).expanduser()
    if path.suffix in _FILE_BUILDERS:
        if not path.is_file():
            raise FileNotFoundError(
                f"dataset file {name!r} does not exist; give an existing data file, 'embedded' for the embedded "
                "arithmetic task, a dataset folder or a Hugging Face Hub dataset id"
            )
        return datasets.load_dataset(_FILE_BUILDERS[path.suffix], data_files={"train": str(path)})
    if path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json")):
        loaded = datasets.load_from_disk(str(path))
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
    if name.startswith((".", "/", "~")) and not path.exists():
        raise FileNotFoundError(f"dataset {name!r} does not exist")
    try:
        return datasets.load_dataset(name, config)
    except ConnectionError as error:
        raise ConnectionError(
            f"dataset {name!r} is not a local file or folder (no {path.absolute()}), and the Hugging Face Hub could "
            f"not be reached for it ({error}). Fix: download it where the Hub is reachable "
            f"(datasets.load_dataset({name!r}).save_to_disk(DIR)) and pass DIR, give a local data file, or, if this "
            "machine is online, unset HF_HUB_OFFLINE. The 7B configs' data/ folders are made by "
            "recipes/prepare_dataset.py."
        ) from None


def split(splits, name: str, which: str, dataset: str):
    """``splits[which]``, or an error listing the splits there are."""
    if which not in splits:
        raise ValueError(
            f"dataset {dataset!r} has the splits {sorted(splits)}, not {which!r}; set {name} to one of them"
        )
    return splits[which]


def check_layout(dataset, name: str, text_field: str) -> str:
    """The TRL layout of ``dataset`` ("messages", "prompt_completion" or "text"), or an error naming its columns."""
    columns = set(dataset.column_names)
    if "messages" in columns:
        return "messages"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if text_field in columns:
        return "text"
    raise ValueError(
        f"dataset {name} has the columns {sorted(columns)}, none of the layouts SFTTrainer reads: 'messages', "
        f"'prompt' + 'completion', or {text_field!r} (dataset_text_field). Rename your columns "
        "(dataset.rename_column) or set dataset_text_field"
    )


def prompts_and_references(dataset, layout: str, tokenizer) -> tuple[list[list[int]], list[str]]:
    """Token ids of each held-out prompt a model answers, and the stripped reference answers."""
    if layout == "text":
        raise ValueError("a plain-text dataset has no prompt/reference pairs; eval_metric does not apply to it")
    prompts, references = [], []
    for index, record in enumerate(dataset):
        if layout == "messages":
            messages = record["messages"]
            if not messages or messages[-1].get("role") != "assistant":
                raise ValueError(f"held-out record {index}: the conversation must end with the assistant's answer")
            prompt, reference = messages[:-1], messages[-1]["content"]
        else:
            prompt, completion = record["prompt"], record["completion"]
            reference = completion if isinstance(completion, str) else "".join(m["content"] for m in completion)
        if isinstance(prompt, str):
            prompts.append(tokenizer(prompt)["input_ids"])
        else:
            prompts.append(
                tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
            )
        references.append(reference.strip())
    return prompts, references
