"""The model card petuning writes next to every export (Hub metadata, the training summary)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

from peft import PeftConfig

from petuning.export.load import _HUB_ID, PathLike, _task_type
from petuning.export.lora import LoraConversion
from petuning.export.merge import method_name
from petuning.recipe.smollm2 import SMOLLM2_HUB_ID, SMOLLM2_NAME, default_cache_dir

_PIPELINE_TAGS = {
    "CAUSAL_LM": "text-generation",
    "SEQ_CLS": "text-classification",
    "SEQ_2_SEQ_LM": "text2text-generation",
}


def training_summary(adapter_dir: PathLike) -> dict:
    """A short summary of the training run for the model card, from the files training leaves next to the adapter
    (in the adapter folder or its parent): ``trainer_state.json`` (transformers' Trainer, in checkpoints and after
    ``trainer.save_state()``: steps, epochs, batch size, last train loss, last eval metrics) and ``results.json``
    (petuning's recipes: its scalar entries). Empty if neither exists."""
    adapter_dir = Path(adapter_dir)
    folders = (adapter_dir, adapter_dir.parent)
    summary: dict = {}
    state = _first_json(folders, "trainer_state.json")
    if state:
        history = state.get("log_history") or []
        summary.update(
            steps=state.get("global_step"), epochs=state.get("epoch"), train_batch_size=state.get("train_batch_size")
        )
        losses = [entry["loss"] for entry in history if "loss" in entry]
        if losses:
            summary["final_train_loss"] = losses[-1]
        evals = [entry for entry in history if any(k.startswith("eval_") for k in entry)]
        if evals:
            summary.update({k: v for k, v in evals[-1].items() if k.startswith("eval_")})
    results = _first_json(folders, "results.json")
    summary.update({k: v for k, v in results.items() if isinstance(v, (int, float, str, bool))})
    return {k: v for k, v in summary.items() if v is not None}


def _first_json(folders: tuple[Path, ...], name: str) -> dict:
    for folder in folders:
        path = folder / name
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except ValueError:
                warnings.warn(
                    f"{path} is not valid JSON; the model card's training summary leaves it out.", stacklevel=2
                )
                return {}
            return data if isinstance(data, dict) else {}
    return {}


def hub_base_id(base_ref: Optional[str], base_model_id: Optional[str]) -> Optional[str]:
    """The base model's Hub id for the card: ``base_model_id`` if given, else ``base_ref`` when it is a Hub id and
    not a local path, else the Hub original of the embedded SmolLM2 when ``base_ref`` is its local copy. Any other
    local path is not a valid ``base_model`` (the Hub rejects the card), so it gives None."""
    if base_model_id:
        if not _HUB_ID.match(base_model_id) or Path(base_model_id).is_absolute():
            raise ValueError(f"base_model_id {base_model_id!r} is not a Hub model id like 'org/name'.")
        return base_model_id
    if base_ref and _HUB_ID.match(base_ref) and not Path(base_ref).exists():
        return base_ref
    embedded = (default_cache_dir() / SMOLLM2_NAME).resolve()
    if base_ref and Path(base_ref).is_dir() and Path(base_ref).resolve() == embedded:
        return SMOLLM2_HUB_ID  # the embedded demo model: petuning's local conversion of the Hub original
    return None


def write_model_card(
    folder: Path,
    *,
    config: PeftConfig,
    kind: str,
    base_model: Optional[str],
    summary: dict,
    conversion: Optional[LoraConversion] = None,
    gguf_file: Optional[str] = None,
) -> None:
    """Write ``README.md`` with Hub metadata and a description of the method, its config and the training run.

    ``kind`` is "merged", "pruned", "lora", "adapter", "gguf" or "pruned-gguf" (``gguf_file`` names the file).
    Metadata: ``library_name`` (transformers for merged/pruned, peft for adapters, none for GGUF, which the Hub
    recognizes by its files), ``base_model`` (a Hub id, or left out), ``base_model_relation`` (finetune / adapter),
    tags ``petuning`` and the method (GGUF: also ``gguf`` and ``llama.cpp``), and ``pipeline_tag`` from the task type.
    """
    from huggingface_hub import ModelCard, ModelCardData

    import petuning

    method = method_name(config)
    is_adapter = kind in ("lora", "adapter")
    is_gguf = kind in ("gguf", "pruned-gguf")
    gguf_tags = ["gguf", "llama.cpp"]
    tags = ["petuning", method] + {
        "lora": ["lora"],
        "pruned": ["pruned"],
        "gguf": gguf_tags,
        "pruned-gguf": ["pruned"] + gguf_tags,
    }.get(kind, [])
    if is_adapter and base_model:
        tags.append(f"base_model:adapter:{base_model}")
    data = ModelCardData(
        library_name=None if is_gguf else "peft" if is_adapter else "transformers",
        base_model=base_model,
        tags=tags,
        pipeline_tag=_PIPELINE_TAGS.get(_task_type(config)),
    )
    if base_model:
        data.base_model_relation = "adapter" if is_adapter else "finetune"
    config_dict = {k: v for k, v in config.to_dict().items() if k not in ("base_model_name_or_path", "revision")}
    title = {
        "merged": f"{method.upper()} fine-tune, merged into the base weights",
        "pruned": f"{method.upper()} fine-tune, pruned and merged",
        "lora": f"{method.upper()} fine-tune, converted to a LoRA adapter",
        "adapter": f"{method.upper()} adapter",
        "gguf": f"{method.upper()} fine-tune, merged, in GGUF for llama.cpp",
        "pruned-gguf": f"{method.upper()} fine-tune, pruned and merged, in GGUF for llama.cpp",
    }[kind]
    base_line = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "(not recorded as a Hub id)"
    gguf_how = (
        f"This is a GGUF file for llama.cpp, ollama and LM Studio: `llama-cli -m {gguf_file}`, or in transformers "
        f'`AutoModelForCausalLM.from_pretrained(repo, gguf_file="{gguf_file}")`; petuning is not needed.'
    )
    how = {
        "merged": "This is a plain transformers checkpoint: load it with `AutoModelForCausalLM.from_pretrained`; "
        "petuning is not needed.",
        "pruned": "This is a plain transformers checkpoint with a smaller hidden size: load it with "
        "`AutoModelForCausalLM.from_pretrained`; petuning is not needed.",
        "lora": "This is a standard peft LoRA adapter: load it with `PeftModel.from_pretrained(base, repo)`; "
        "petuning is not needed.",
        "adapter": "This is a petuning adapter: `import petuning` before `PeftModel.from_pretrained(base, repo)` "
        "(without it peft fails with `KeyError: '" + str(getattr(config.peft_type, "value", config.peft_type)) + "'`).",
        "gguf": gguf_how,
        "pruned-gguf": gguf_how + " Its hidden size is smaller than the base's (the file's metadata says so).",
    }[kind]
    body = [f"# {title}", "", f"Base model: {base_line}. Method: {method} (petuning {petuning.__version__}).", "", how]
    if conversion is not None:
        body += ["", "## Conversion to LoRA", "", "```", conversion.report(), "```"]
    if summary:
        body += ["", "## Training summary", "", "| | |", "|---|---|"]
        body += [f"| {key} | {value} |" for key, value in summary.items()]
    config_json = json.dumps(config_dict, indent=2, sort_keys=True, default=_jsonable)
    body += ["", "## Method configuration", "", "```json", config_json, "```", ""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))
    card.save(folder / "README.md")


def _jsonable(value):
    return sorted(value) if isinstance(value, (set, frozenset)) else str(value)
