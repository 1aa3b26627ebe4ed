"""The recipe configuration: a YAML file with ``key=value`` / ``--key value`` overrides.

A config has six sections; ``method`` is a name, the others are mappings::

    method: sorsa                   # "lora" (peft's LoRA, the reference) or any registered petuning method
    model: {...}                    # ModelArgs: base model, dtype, attention backend, chat template, 4-bit
    peft: {r: 16, ...}              # fields of the method's config class (SorsaConfig, LoraConfig, ...)
    data: {...}                     # DataArgs: dataset, format, columns, lengths, held-out split
    train: {...}                    # transformers.TrainingArguments, plus ``bf16: auto``, ``resume_from_checkpoint``
    eval: {...}                     # EvalArgs: the task metric, before/after training, the reload check

Overrides address a field by ``section.field`` (``train.learning_rate=1e-4``, ``--peft.r 8``,
``method=lora``); values are parsed as YAML (``[q_proj, v_proj]``, ``true``, ``null``). Every key is
checked: a misspelt key, or a ``peft`` option the chosen method does not have, is an error that says
what would be valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml
from peft import LoraConfig, PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from transformers import TrainingArguments

import petuning  # noqa: F401  (registers every petuning method with peft)

SECTIONS = ("method", "model", "peft", "data", "train", "eval")

#: PeftConfig fields the recipe sets itself.
_RECIPE_OWNED_PEFT_FIELDS = {"peft_version", "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping"}

#: ``train`` keys the recipe interprets before building ``TrainingArguments``.
_TRAIN_EXTRAS = {"bf16", "resume_from_checkpoint"}


@dataclass
class ModelArgs:
    """Which base model to load and how."""

    name_or_path: str = field(
        default="smollm2",
        metadata={"help": "'smollm2' (the embedded SmolLM2-135M-Instruct), a local directory or a Hub model id."},
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "Base weights dtype: 'auto' (bfloat16 when train.bf16 is on, else float32), "
                  "'float32', 'bfloat16' or 'float16'. Adapters stay float32."},
    )
    attn_implementation: str = field(
        default="auto",
        metadata={"help": "'auto' (flash_attention_2 where flash-attn is importable and usable on the device "
                  "and dtype, else sdpa), 'sdpa', 'eager' or 'flash_attention_2' (an error if unusable)."},
    )
    chat_template: Optional[str] = field(
        default=None,
        metadata={"help": "None: the tokenizer's own; 'chatml'; or a path to a Jinja template file."},
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "QLoRA-style: load the base in bitsandbytes 4-bit and prepare it with peft's "
                  "prepare_model_for_kbit_training."},
    )
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "'nf4' or 'fp4'."})
    bnb_4bit_use_double_quant: bool = field(default=True, metadata={"help": "Quantize the quantization constants."})
    bnb_4bit_compute_dtype: str = field(
        default="auto", metadata={"help": "'auto' (bfloat16 where supported, else float32) or a dtype name."}
    )
    bnb_4bit_quant_storage: Optional[str] = field(
        default=None,
        metadata={"help": "Storage dtype of the packed 4-bit weights; FSDP needs it equal to the dtype of the "
                  "other parameters (bfloat16). None: uint8."},
    )
    revision: Optional[str] = field(default=None, metadata={"help": "Hub revision of the model."})


@dataclass
class DataArgs:
    """Where the examples come from and how they become token ids."""

    dataset: str = field(
        default="embedded",
        metadata={"help": "'embedded' (the shipped arithmetic task), a local .json/.jsonl file, or a "
                  "datasets Hub id / local dataset directory (needs the datasets package)."},
    )
    subset: Optional[str] = field(default=None, metadata={"help": "Configuration name of a Hub dataset."})
    train_split: str = field(default="train", metadata={"help": "Split of `dataset` to train on."})
    eval_dataset: Optional[str] = field(
        default=None, metadata={"help": "A separate held-out dataset (same kinds as `dataset`)."}
    )
    eval_split: Optional[str] = field(
        default=None, metadata={"help": "Held-out split, of `eval_dataset` if given, else of `dataset`."}
    )
    eval_size: Optional[float] = field(
        default=None,
        metadata={"help": "Without an eval split: hold out this fraction (< 1) or number (>= 1) of the "
                  "training records, chosen with train.seed."},
    )
    format: str = field(default="auto", metadata={"help": "'auto', 'messages', 'prompt_completion' or 'text'."})
    messages_field: str = field(default="messages", metadata={"help": "Column holding a chat conversation."})
    prompt_field: str = field(default="prompt", metadata={"help": "Column holding the prompt."})
    completion_field: str = field(default="completion", metadata={"help": "Column holding the completion."})
    text_field: str = field(default="text", metadata={"help": "Column holding plain text."})
    prompt_template: Optional[str] = field(
        default=None,
        metadata={"help": "Build string prompts with this str.format pattern over the record's columns, "
                  "e.g. '### Instruction:\\n{query}\\n\\n### Response:'."},
    )
    max_length: int = field(default=1024, metadata={"help": "Truncate examples to this many tokens."})
    completion_only_loss: Optional[bool] = field(
        default=None,
        metadata={"help": "Learn only the completion (assistant messages). None: yes, except for 'text' data."},
    )
    packing: bool = field(
        default=False,
        metadata={"help": "Pack examples padding-free into one row per batch. Only with flash_attention_2 "
                  "(sdpa/eager would attend across examples); otherwise turned off with a warning."},
    )
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Use at most this many training records."})


@dataclass
class EvalArgs:
    """Task-metric evaluation by greedy generation on the held-out records."""

    metric: Optional[str] = field(
        default=None,
        metadata={"help": "None or 'exact_match' (the stripped greedy answer equals the reference completion)."},
    )
    max_samples: Optional[int] = field(default=None, metadata={"help": "Score at most this many held-out records."})
    max_new_tokens: int = field(default=32, metadata={"help": "Generation length for the metric."})
    batch_size: int = field(default=32, metadata={"help": "Prompts per generation batch (per process)."})
    before_training: bool = field(default=False, metadata={"help": "Also score the base model before training."})
    reload_check: bool = field(
        default=False,
        metadata={"help": "After saving, reload the adapter on a fresh base in a new process and require the "
                  "same answers (needs `metric`)."},
    )


@dataclass
class RecipeConfig:
    """A parsed, checked recipe configuration."""

    method: str
    model: ModelArgs
    peft: dict[str, Any]
    data: DataArgs
    train: dict[str, Any]
    eval: EvalArgs

    @property
    def output_dir(self) -> Path:
        return Path(self.train["output_dir"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "model": dataclasses.asdict(self.model),
            "peft": dict(self.peft),
            "data": dataclasses.asdict(self.data),
            "train": dict(self.train),
            "eval": dataclasses.asdict(self.eval),
        }


# --------------------------------------------------------------------------- methods


def available_methods() -> dict[str, type[PeftConfig]]:
    """Method name -> config class: ``"lora"`` (peft's LoRA) and every method petuning registered with peft.

    A petuning method's name is its ``PeftType`` value in lower case (``SorsaConfig`` -> ``"sorsa"``), so
    methods added to petuning appear here without any change to the recipes.
    """
    methods: dict[str, type[PeftConfig]] = {"lora": LoraConfig}
    for peft_type, config_cls in PEFT_TYPE_TO_CONFIG_MAPPING.items():
        if config_cls.__module__.split(".")[0] == "petuning":
            methods[str(getattr(peft_type, "value", peft_type)).lower()] = config_cls
    return dict(sorted(methods.items()))


def method_options(config_cls: type[PeftConfig]) -> list[str]:
    """The fields a recipe's ``peft`` section may set for a config class."""
    return [f.name for f in dataclasses.fields(config_cls) if f.init and f.name not in _RECIPE_OWNED_PEFT_FIELDS]


def config_class(method: str) -> type[PeftConfig]:
    methods = available_methods()
    if method not in methods:
        close = difflib.get_close_matches(str(method), methods, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown method {method!r}{hint}; available methods: {', '.join(methods)}")
    return methods[method]


def build_peft_config(method: str, options: dict[str, Any]) -> PeftConfig:
    """The method's config (``task_type="CAUSAL_LM"``) from the ``peft`` section, every key checked."""
    config_cls = config_class(method)
    allowed = method_options(config_cls)
    for key in options:
        if key in allowed:
            continue
        owners = [name for name, cls in available_methods().items() if key in method_options(cls)]
        where = f"it is an option of: {', '.join(owners)}" if owners else "no method has it"
        if key in _RECIPE_OWNED_PEFT_FIELDS:
            where = "the recipe sets it itself"
        raise ValueError(
            f"peft.{key} does not apply to method {method!r} ({config_cls.__name__} has no such option; {where}). "
            f"Options of {method!r}: {', '.join(allowed)}"
        )
    return config_cls(task_type="CAUSAL_LM", **options)


# --------------------------------------------------------------------------- YAML and overrides


class _Loader(yaml.SafeLoader):
    """YAML loader with YAML 1.2's scalars: ``1e-4`` (no dot) is a float, and only true/false are booleans
    (YAML 1.1 would read ``save_strategy: no`` as False)."""


_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


#: Value of a ``~section.key`` override: remove the key, so its default applies.
REMOVE = object()


def parse_value(text: str) -> Any:
    """A command-line value, parsed as YAML (``8`` -> 8, ``1e-4`` -> 0.0001, ``[a, b]`` -> list)."""
    return yaml.load(text, Loader=_Loader)


def parse_overrides(argv: list[str]) -> list[tuple[str, Any]]:
    """``key=value``, ``--key=value`` and ``--key value`` arguments as ``(key, value)`` pairs;
    a bare ``--flag`` means ``flag=true``; ``~key`` removes the key (value :data:`REMOVE`)."""
    pairs: list[tuple[str, Any]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        flag = arg.startswith("--")
        body = arg[2:] if flag else arg
        if "=" in body:
            key, value = body.split("=", 1)
            value = parse_value(value)
        elif body.startswith("~"):
            key, value = body[1:], REMOVE
        elif flag:
            key = body
            if i < len(argv) and not argv[i].startswith(("--", "~")) and "=" not in argv[i]:
                value, i = parse_value(argv[i]), i + 1
            else:
                value = True
        else:
            raise ValueError(f"cannot read argument {arg!r}: overrides look like section.key=value or --section.key value")
        pairs.append((key.replace("-", "_"), value))
    return pairs


def _fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _section_keys(section: str) -> Optional[list[str]]:
    if section == "model":
        return _fields(ModelArgs)
    if section == "data":
        return _fields(DataArgs)
    if section == "eval":
        return _fields(EvalArgs)
    if section == "train":
        return sorted(set(_fields(TrainingArguments)) | _TRAIN_EXTRAS)
    return None  # peft: depends on the method, checked by build_peft_config


def _unknown_key(key: str, candidates: list[str], where: str) -> ValueError:
    close = difflib.get_close_matches(key, candidates, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown key {key!r} in {where}{hint}")


def apply_override(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set ``section.field`` (or ``method``) in a raw config mapping, in place."""
    if key == "method":
        raw["method"] = value
        return
    section, _, name = key.partition(".")
    if not name:
        owners = [s for s in SECTIONS[1:] if (keys := _section_keys(s)) and key in keys]
        hint = f"; did you mean {owners[0]}.{key}?" if owners else f"; write section.key with a section of {SECTIONS}"
        raise ValueError(f"cannot apply override {key!r}{hint}")
    if section not in SECTIONS:
        raise _unknown_key(section, list(SECTIONS), f"override {key!r} (sections are {', '.join(SECTIONS)})")
    if "." in name:
        raise ValueError(f"override {key!r}: only section.key is supported")
    if value is REMOVE:
        (raw.get(section) or {}).pop(name, None)
    else:
        raw.setdefault(section, {})[name] = value


def load_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> RecipeConfig:
    """Read a YAML config (or start from defaults when ``path`` is None), apply command-line style overrides
    (see :func:`parse_overrides`), check every key."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe config {str(path)!r} does not exist")
        raw = yaml.load(path.read_text("utf-8"), Loader=_Loader) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a recipe config is a mapping of sections {SECTIONS}")
    for key, value in parse_overrides(list(overrides)):
        apply_override(raw, key, value)
    return config_from_dict(raw, source=str(path) if path else "the config")


def config_from_dict(raw: dict[str, Any], source: str = "the config") -> RecipeConfig:
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        key = sorted(unknown)[0]
        raise _unknown_key(key, list(SECTIONS), f"{source} (sections are {', '.join(SECTIONS)})")
    for section in SECTIONS[1:]:
        value = raw.get(section) or {}
        if not isinstance(value, dict):
            raise ValueError(f"section {section!r} of {source} must be a mapping, got {type(value).__name__}")
        keys = _section_keys(section)
        for key in value:
            if keys is not None and key not in keys:
                raise _unknown_key(key, keys, f"section {section!r} of {source}")
    method = raw.get("method") or "lora"
    peft_options = dict(raw.get("peft") or {})
    build_peft_config(method, peft_options)  # checks the method and its options now, not after loading a model
    train = dict(raw.get("train") or {})
    train.setdefault("output_dir", f"out/{method}")
    return RecipeConfig(
        method=method,
        model=ModelArgs(**(raw.get("model") or {})),
        peft=peft_options,
        data=DataArgs(**(raw.get("data") or {})),
        train=train,
        eval=EvalArgs(**(raw.get("eval") or {})),
    )
