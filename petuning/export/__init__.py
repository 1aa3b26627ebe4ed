"""Export a petuning adapter as a plain transformers checkpoint, a standard peft LoRA adapter or a native adapter,
with a model card petuning writes itself, and push it to the Hugging Face Hub.

Four formats (``export_adapter(..., format=...)``, CLI ``petuning export --format``):

* ``"merged"`` (default): the base named in the adapter config (or ``base=``) is loaded unquantized, in the dtype
  its checkpoint stores; the adapter is applied and merged through PEFT's generic ``merge_and_unload`` (each tuner
  merges its own layers; this module has no per-method code); the result is cast to the requested dtype and written
  as sharded safetensors with the tokenizer and generation config. It loads with
  ``AutoModelForCausalLM.from_pretrained`` in a process that never imports petuning. ``prune=True`` asks the tuner
  for ``petuning_prune_and_unload()`` instead (PAT: a smaller model).
* ``"lora"``: every additive petuning layer reports its dense update ΔW (``get_delta_weight``); ΔW is factored by
  SVD into a standard peft LoRA adapter. Exact when ``rank(ΔW) <= rank``; otherwise the truncation's relative
  Frobenius error is reported per layer and overall (:class:`LoraConversion`). Loads with peft alone.
* ``"adapter"``: the native adapter files with a card (loading them needs ``import petuning``).
* ``"gguf"``: the merged (or, with ``prune=True``, pruned) model as one GGUF file for llama.cpp, written by
  llama.cpp's own converter (:mod:`petuning.export.llama_cpp` says why), in f16, bf16 or q8_0. Llama-family models.

Rules kept everywhere: the output folder is written to a temporary sibling and renamed into place, so it appears
complete or not at all, and an existing folder is replaced only with ``overwrite=True``; only safetensors files are
read (pickle checkpoints are refused, since unpickling runs code); the Hub token is passed to ``huggingface_hub``
and nowhere else, and is scrubbed from error messages.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file

import petuning.tuners  # noqa: F401  (registers every petuning method with PEFT)
from petuning.export.llama_cpp import GGUF_TYPES, check_convertible, convert_to_gguf, find_converter
from petuning.smollm2 import SMOLLM2_HUB_ID, SMOLLM2_NAME, default_cache_dir

PathLike = Union[str, os.PathLike]

FORMATS = ("merged", "lora", "adapter", "gguf")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_TASK_AUTO_CLASSES = {
    None: "AutoModelForCausalLM",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
_PIPELINE_TAGS = {
    "CAUSAL_LM": "text-generation",
    "SEQ_CLS": "text-classification",
    "SEQ_2_SEQ_LM": "text2text-generation",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class PushError(RuntimeError):
    """A Hub upload failed. The local folder is untouched; pushing it again is safe."""


# ------------------------------------------------------------------------------------------------ reading


def check_safetensors(path: PathLike) -> None:
    """Raise ``ValueError`` if ``path`` is not a complete safetensors file.

    A safetensors file is an 8-byte little-endian header length, a JSON header giving each tensor's byte range,
    then the data. The file is truncated or corrupt when the header does not parse or the data ends before the last
    byte range ends; both are detected from the header alone, without reading the tensors.
    """
    path = Path(path)
    size = path.stat().st_size
    problem = None
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            problem = f"it has only {size} bytes, fewer than a safetensors header needs"
        else:
            (header_len,) = struct.unpack("<Q", raw)
            if 8 + header_len > size:
                problem = f"its header announces {header_len} bytes but the file has {size} bytes in total"
            else:
                try:
                    header = json.loads(handle.read(header_len))
                    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
                except (ValueError, KeyError, TypeError, IndexError) as error:
                    problem = f"its header is not valid safetensors JSON ({error})"
                else:
                    if 8 + header_len + end > size:
                        problem = (
                            f"its tensors need {8 + header_len + end} bytes but the file has only {size}: "
                            "it is truncated"
                        )
    if problem:
        raise ValueError(
            f"{path} is corrupt: {problem}. Re-save or re-download it (an interrupted copy or download "
            "usually causes this)."
        )


def _refuse_pickle(folder: Path, what: str) -> None:
    """Refuse a folder whose weights exist only as pickle files (loading them would run arbitrary code)."""
    files = [p.name for p in folder.iterdir() if p.is_file()]
    if any(name.endswith(".safetensors") for name in files):
        return
    pickles = [name for name in files if name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ValueError(
            f"The {what} in {folder} is stored as pickle ({', '.join(sorted(pickles))}). petuning reads only "
            "safetensors, because loading a pickle file can execute arbitrary code. Convert it once in a trusted "
            "environment (load it there and call save_pretrained, which writes safetensors) and export from that."
        )


def _check_weights_folder(folder: Path, what: str) -> None:
    _refuse_pickle(folder, what)
    for file in sorted(folder.glob("*.safetensors")):
        check_safetensors(file)


def _base_is_quantized(path: Path) -> Optional[str]:
    config = path / "config.json"
    if not config.is_file():
        return None
    quant = json.loads(config.read_text()).get("quantization_config")
    return (quant or {}).get("quant_method") or ("quantized" if quant else None)


def load_adapter_model(
    adapter_dir: PathLike, base: Optional[PathLike] = None, dtype: Union[str, torch.dtype] = "auto"
) -> PeftModel:
    """Load a saved adapter onto its base model, in eval mode, ready to merge or convert.

    ``base`` overrides the base recorded in ``adapter_config.json`` (a local folder or a Hub id). The base is loaded
    in ``dtype`` ("auto" = the dtype its checkpoint stores), never quantized, from safetensors only, without
    ``trust_remote_code``. Raises ``FileNotFoundError``/``ValueError`` naming the problem and the fix for a missing or
    corrupt adapter, a pickle checkpoint, a quantized checkpoint, or a base whose shapes do not fit the adapter.
    """
    import transformers

    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"Adapter folder {adapter_dir} does not exist. Pass the folder save_pretrained wrote.")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{adapter_dir} has no adapter_config.json, so it is not a saved PEFT adapter. Pass the folder that "
            "model.save_pretrained() (or Trainer.save_model()) wrote."
        )
    _refuse_pickle(adapter_dir, "adapter")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(
            f"{adapter_dir} has adapter_config.json but no {ADAPTER_WEIGHTS}: the save is incomplete."
        )
    check_safetensors(adapter_dir / ADAPTER_WEIGHTS)
    try:
        config = PeftConfig.from_pretrained(adapter_dir)
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{adapter_dir / 'adapter_config.json'} cannot be read as a PEFT config: {error}") from error

    base_ref = str(base) if base is not None else config.base_model_name_or_path
    if not base_ref:
        raise ValueError(f"The adapter config in {adapter_dir} names no base model; pass base= (CLI: --base).")
    base_path = Path(base_ref)
    if base_path.is_dir():
        _check_weights_folder(base_path, "base model")
        method = _base_is_quantized(base_path)
        if method:
            raise ValueError(
                f"The base checkpoint {base_path} is stored quantized ({method}). Merging into quantized weights "
                "rounds the update away and cannot be exact; export from the original 16/32-bit checkpoint: pass it "
                "with base= (CLI: --base)."
            )
    elif base is None and not _HUB_ID.match(base_ref):
        raise FileNotFoundError(
            f"The adapter's base model {base_ref!r} is neither a local folder nor a Hub id. Pass the base with "
            "base= (CLI: --base)."
        )
    auto_class = getattr(transformers, _TASK_AUTO_CLASSES.get(_task_type(config), "AutoModelForCausalLM"))
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) and dtype != "auto" else dtype
    model = auto_class.from_pretrained(base_ref, dtype=torch_dtype, use_safetensors=True, trust_remote_code=False)
    if getattr(model, "hf_quantizer", None) is not None:
        raise ValueError(f"The base {base_ref} loaded quantized; export needs a 16/32-bit base. Pass one with base=.")
    try:
        peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    except (RuntimeError, ValueError) as error:
        raise ValueError(
            f"The adapter in {adapter_dir} does not fit the base model {base_ref}: {_first_line(error)}. "
            f"Use the base it was trained on (adapter_config.json says {config.base_model_name_or_path!r}); "
            "pass it with base= (CLI: --base)."
        ) from error
    return peft_model.eval()


def _task_type(config: PeftConfig) -> Optional[str]:
    task = getattr(config, "task_type", None)
    return getattr(task, "value", task)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ------------------------------------------------------------------------------------------------ merging


def method_name(config: PeftConfig) -> str:
    """The method's tag: the PeftType value in lower case with hyphens ("sorsa", "sparse-low-rank")."""
    peft_type = getattr(config.peft_type, "value", config.peft_type)
    return str(peft_type).lower().replace("_", "-")


def _tuner_layers(peft_model: PeftModel) -> Iterator[tuple[str, BaseTunerLayer]]:
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, BaseTunerLayer):
            yield name, module


def check_not_quantized(peft_model: PeftModel) -> None:
    """Refuse to merge into a quantized (e.g. bitsandbytes 4-bit) base: the merged weight would be re-quantized,
    so the merged model would not match the adapter model and the update would be partly rounded away."""
    quantized = getattr(peft_model.base_model.model, "hf_quantizer", None) is not None or any(
        getattr(layer, "quantization_backend", None) is not None for _, layer in _tuner_layers(peft_model)
    )
    if quantized:
        raise ValueError(
            "This model's base is quantized (e.g. bitsandbytes 4-bit). petuning does not merge into quantized "
            "weights: the sum would be re-quantized, so the merged model would differ from the adapter model and "
            "much of the update would be rounded away. Save the adapter and export it with "
            "petuning.export.export_adapter(adapter_dir, out) (CLI: petuning export ADAPTER_DIR --out DIR), which "
            "reloads the base in 16/32-bit and merges there."
        )


def merge(peft_model: PeftModel, prune: bool = False) -> torch.nn.Module:
    """Fold the adapter into the base and return the plain transformers model.

    ``prune=False``: PEFT's ``merge_and_unload(safe_merge=True)`` (each tuner merges its own layers; NaNs are
    refused). ``prune=True``: the tuner's ``petuning_prune_and_unload()`` (PAT). Quantized bases are refused.
    """
    check_not_quantized(peft_model)
    if not prune:
        return peft_model.merge_and_unload(safe_merge=True)
    prune_and_unload = getattr(peft_model.base_model, "petuning_prune_and_unload", None)
    if prune_and_unload is None:
        method = method_name(peft_model.peft_config[peft_model.active_adapter]).upper()
        raise ValueError(
            f"--prune applies only to PAT adapters (they learn which hidden channels to remove); this adapter is "
            f"{method}, which does not prune. Export it without --prune to merge it."
        )
    return prune_and_unload()


# --------------------------------------------------------------------------------------- LoRA conversion


@dataclass
class LayerConversion:
    """How one layer's update ΔW was expressed as a LoRA product."""

    module: str
    shape: tuple[int, ...]
    """Shape of ΔW in the base weight's layout."""
    delta_rank: int
    """Numerical rank of ΔW as the matrix LoRA factors (singular values above max(rows, cols) * eps(dtype) * σ_max,
    as ``torch.linalg.matrix_rank``)."""
    lora_rank: int
    relative_error: float
    """||ΔW - B A||_F / ||ΔW||_F (0 when ΔW = 0)."""

    @property
    def exact(self) -> bool:
        return self.delta_rank <= self.lora_rank


@dataclass
class LoraConversion:
    config: LoraConfig
    state_dict: dict[str, torch.Tensor]
    layers: list[LayerConversion] = field(default_factory=list)
    relative_error: float = 0.0
    """Over all layers: sqrt(sum ||ΔW - B A||²) / sqrt(sum ||ΔW||²)."""

    @property
    def exact(self) -> bool:
        return all(layer.exact for layer in self.layers)

    def report(self) -> str:
        lines = [f"{'module':60s} {'shape':>12s} {'rank(ΔW)':>9s} {'LoRA r':>7s} {'rel. error':>11s}"]
        for layer in self.layers:
            shape = "x".join(map(str, layer.shape))
            lines.append(
                f"{layer.module:60s} {shape:>12s} {layer.delta_rank:9d} {layer.lora_rank:7d} {layer.relative_error:11.3e}"
            )
        verdict = "exact (every ΔW fits its rank)" if self.exact else "truncated SVD"
        lines.append(f"overall relative error {self.relative_error:.3e}: {verdict}")
        return "\n".join(lines)


def convert_to_lora(
    peft_model: PeftModel, rank: Optional[int] = None, adapter_name: Optional[str] = None
) -> LoraConversion:
    """Express an additive petuning adapter as a standard peft LoRA adapter.

    For every adapted layer, ΔW = ``layer.get_delta_weight(adapter_name)`` (the dense update in the base weight's
    layout), arranged as the matrix peft's LoRA layer of that type factors (:func:`_lora_layout`: (out, in) for linear
    layers, also for convolutions with the kernel flattened into the columns, (dim, num) for embeddings), is
    decomposed as U diag(σ) Vᵀ in float64 and the LoRA factors are ``B = U_k diag(√σ_k)``, ``A = diag(√σ_k) V_kᵀ``,
    with scaling 1
    (``lora_alpha = r`` per layer). k = rank(ΔW) when ``rank`` is None (always exact), else min(rank, rank(ΔW)),
    truncating where ΔW's rank exceeds it. Modules trained in full (``modules_to_save``) are copied.
    Non-additive adapters (a layer whose ``supports_lora_conversion`` is False, e.g. PAT) are refused.
    """
    name = adapter_name or peft_model.active_adapter
    config = peft_model.peft_config[name]
    method = method_name(config).upper()
    if rank is not None and (not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"The LoRA rank must be a positive integer, got {rank!r}.")
    if getattr(config, "trainable_token_indices", None):
        raise ValueError(f"{method} adapters with trainable_token_indices cannot be converted to LoRA yet.")
    layers = [(n, m) for n, m in _tuner_layers(peft_model) if name in _adapter_names(m)]
    refused = [n for n, m in layers if not m.supports_lora_conversion(name)]
    if not layers or refused:
        where = (
            f"layer {refused[0]!r} of this {method} adapter does not declare one (supports_lora_conversion() is "
            "False; PAT, for example, scales the residual stream instead of adding to weights)"
            if refused
            else f"this {method} adapter has no layers with a weight update"
        )
        raise ValueError(
            f"--format lora needs an additive adapter (every layer adds an update ΔW to its weight), but {where}. "
            "Export it merged instead (the default format; --prune for PAT)."
        )
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    reports = []
    dropped_total = energy_total = 0.0
    with torch.no_grad():
        for module, layer in layers:
            delta = layer.get_delta_weight(name).detach()
            matrix, pack = _lora_layout(module, layer, delta)
            u, s, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
            tol = (s[0] * max(matrix.shape) * torch.finfo(delta.dtype).eps).item() if s.numel() else 0.0
            delta_rank = int((s > tol).sum()) if s.numel() and s[0] > 0 else 0
            k = max(1, delta_rank if rank is None else min(rank, delta_rank))
            root = s[:k].sqrt()
            lora_b, lora_a = u[:, :k] * root, root[:, None] * vh[:k]
            energy, dropped = float(s.square().sum()), float(s[k:].square().sum())
            dropped_total, energy_total = dropped_total + dropped, energy_total + energy
            reports.append(
                LayerConversion(
                    module, tuple(delta.shape), delta_rank, k, math.sqrt(dropped / energy) if energy else 0.0
                )
            )
            for suffix, tensor in pack(lora_a.to(torch.float32), lora_b.to(torch.float32)).items():
                state[f"base_model.model.{module}.{suffix}"] = tensor.contiguous()
            ranks[module] = k
        for key, value in get_peft_model_state_dict(peft_model, adapter_name=name).items():
            if peft_model.base_model.prefix not in key:  # modules_to_save and trained biases
                state[key] = value.detach().clone()

    larger = [x.module for x in reports if x.lora_rank * sum(_matrix_shape(x.shape)) > math.prod(x.shape)]
    if larger:
        warnings.warn(
            f"The LoRA factors of {len(larger)} layer(s) (e.g. {larger[0]!r}) hold more numbers than the dense update "
            "they encode, because the update has a high rank (sparse updates usually do). Consider --lora-rank "
            "(a truncated, reported approximation) or the merged export.",
            UserWarning,
            stacklevel=2,
        )
    r = max(ranks.values())
    patterns = {f"^{re.escape(m)}$": k for m, k in ranks.items() if k != r}
    bias = getattr(config, "bias", "none") or "none"
    lora_config = LoraConfig(
        r=r,
        lora_alpha=r,
        rank_pattern=patterns,
        alpha_pattern=dict(patterns),
        target_modules=sorted(ranks),
        fan_in_fan_out=any(getattr(layer, "fan_in_fan_out", False) for _, layer in layers),  # GPT-2's Conv1D
        bias=bias if bias in ("none", "all") else "lora_only",
        modules_to_save=getattr(config, "modules_to_save", None),
        task_type=getattr(config, "task_type", None),
        base_model_name_or_path=config.base_model_name_or_path,
        inference_mode=True,
    )
    return LoraConversion(lora_config, state, reports, math.sqrt(dropped_total / energy_total) if energy_total else 0.0)


def _lora_layout(module: str, layer: BaseTunerLayer, delta: torch.Tensor):
    """ΔW as the matrix that peft's LoRA layer for this base layer type factors as B A, and a function packing the
    factors A (k, cols), B (rows, k) into that layer's state-dict entries.

    Linear (out, in) and transformers' Conv1D (stored (in, out)): ΔW = B A. Embedding (num, dim): ΔWᵀ = B A, stored as
    ``lora_embedding_A`` (k, num) and ``lora_embedding_B`` (dim, k). ConvNd (out, in, *kernel): ΔW reshaped to
    (out, in·prod(kernel)) = B A, with A a conv of the base's kernel and B a 1x1 conv.
    """
    base = layer.get_base_layer()
    if isinstance(base, torch.nn.Embedding):
        return delta.T, lambda a, b: {"lora_embedding_A": a, "lora_embedding_B": b}
    if isinstance(base, torch.nn.modules.conv._ConvNd):
        unsupported = {
            "groups": base.groups != 1,
            "dilation": any(d != 1 for d in base.dilation),
            f"padding_mode={base.padding_mode!r}": base.padding_mode != "zeros",
        }
        unsupported = [feature for feature, present in unsupported.items() if present]
        if unsupported:
            raise ValueError(
                f"{module!r} is a {type(base).__name__} with {', '.join(unsupported)}, which peft's LoRA conv layers "
                "do not reproduce, so --format lora cannot express its update. Export it merged instead."
            )
        ones = (1,) * (delta.ndim - 2)
        return delta.reshape(delta.shape[0], -1), lambda a, b: {
            "lora_A.weight": a.reshape(a.shape[0], *delta.shape[1:]),
            "lora_B.weight": b.reshape(*b.shape, *ones),
        }
    if delta.ndim != 2:
        raise ValueError(f"--format lora does not know the layer type of {module!r} ({type(base).__name__}).")
    matrix = delta.T if getattr(layer, "fan_in_fan_out", False) else delta
    return matrix, lambda a, b: {"lora_A.weight": a, "lora_B.weight": b}


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, cols) of a weight shape flattened to a matrix (any orientation: only the sum and product are used)."""
    return shape[0], math.prod(shape[1:])


def _adapter_names(layer: BaseTunerLayer) -> set[str]:
    names: set[str] = set()
    for attr in layer.adapter_layer_names:
        names.update(getattr(layer, attr, {}).keys())
    return names


# ------------------------------------------------------------------------------------------------ model card


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


# ------------------------------------------------------------------------------------------------ writing


@contextlib.contextmanager
def atomic_folder(out: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``out``; on success rename it to ``out``, on error delete it.

    ``out`` therefore appears complete or not at all. An existing ``out`` is refused unless ``overwrite``; then it is
    replaced only after the new folder is complete.
    """
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists. Choose another --out or pass --overwrite to replace it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / out.name)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_tokenizer(folder: Path, sources: list[str]) -> Optional[str]:
    """Copy the tokenizer from the first of ``sources`` that has one; return that source (None if none has)."""
    from transformers import AutoTokenizer

    for source in sources:
        if Path(source).is_dir() and not any(
            (Path(source) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
        ):
            continue
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        except (OSError, ValueError):
            continue
        tokenizer.save_pretrained(folder)
        return source
    warnings.warn(
        f"No tokenizer found in {sources}; the export has none. Save one next to the adapter to include it.",
        stacklevel=2,
    )
    return None


@dataclass
class ExportResult:
    folder: Path
    format: str
    files: list[str]
    conversion: Optional[LoraConversion] = None
    tokenizer_source: Optional[str] = None
    url: Optional[str] = None


def export_adapter(
    adapter_dir: PathLike,
    out: PathLike,
    *,
    format: str = "merged",
    base: Optional[PathLike] = None,
    base_model_id: Optional[str] = None,
    dtype: Union[str, torch.dtype] = "auto",
    max_shard_size: Union[int, str] = "5GB",
    prune: bool = False,
    lora_rank: Optional[int] = None,
    gguf_type: str = "f16",
    llama_cpp: Optional[PathLike] = None,
    summary: Optional[dict] = None,
    overwrite: bool = False,
    push_to_hub: Optional[str] = None,
    private: bool = False,
    token: Optional[str] = None,
) -> ExportResult:
    """Export the adapter saved in ``adapter_dir`` to the folder ``out`` (see the module docstring for formats).

    ``base``: base model folder or Hub id (default: the one in ``adapter_config.json``); ``base_model_id``: the Hub id
    written to the card when the base is a local folder; ``dtype``: "auto" (the base checkpoint's), "float32",
    "bfloat16", "float16" or a torch dtype; ``max_shard_size``: per safetensors shard (merged); ``gguf_type``: "f16",
    "bf16" or "q8_0" (gguf); ``llama_cpp``: a llama.cpp checkout to take the converter from (gguf; default: the copy
    ``python -m petuning.export.llama_cpp`` fetches); ``summary``: training summary for the card (default:
    :func:`training_summary`); ``push_to_hub``: a repo id to upload the folder to (see :func:`push_folder`).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}.")
    if prune and format not in ("merged", "gguf"):
        raise ValueError("--prune produces a merged model; it cannot be combined with --format lora/adapter.")
    if lora_rank is not None and format != "lora":
        raise ValueError("--lora-rank only applies to --format lora.")
    if format == "gguf" and dtype != "auto":
        raise ValueError("--dtype does not apply to --format gguf; choose the file's precision with --gguf-type.")
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"--gguf-type must be one of {GGUF_TYPES}, got {gguf_type!r}.")
    if format == "gguf":
        find_converter(llama_cpp)  # fail before any work when the converter is missing
    if isinstance(dtype, str) and dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}.")
    if push_to_hub:
        check_repo_id(push_to_hub)
        token = _resolve_token(token)
    out, adapter_dir = Path(out).absolute(), Path(adapter_dir).absolute()
    for protected in (adapter_dir, Path(base).absolute() if base else None):
        if protected is not None and (out == protected or out in protected.parents):
            raise ValueError(f"--out {out} would overwrite the input {protected}; choose another folder.")

    if format == "adapter" and dtype != "auto":
        raise ValueError("--dtype does not apply to --format adapter (the adapter's files are copied as they are).")
    # Merge in the checkpoint's own dtype and cast afterwards, so each merged weight is rounded once; convert from
    # float32, so that the SVD sees ΔW at full precision.
    peft_model = load_adapter_model(adapter_dir, base, "float32" if format == "lora" else "auto")
    config = peft_model.peft_config[peft_model.active_adapter]
    base_ref = str(base) if base is not None else config.base_model_name_or_path
    base_id = hub_base_id(base_ref, base_model_id)
    if summary is None:
        summary = training_summary(adapter_dir)
    conversion = None
    gguf_file = None
    if format == "gguf":
        check_convertible(peft_model.get_base_model().config.to_dict())
    with atomic_folder(out, overwrite) as tmp:
        if format == "gguf":
            gguf_file = f"{out.name}-{gguf_type}.gguf"
            with tempfile.TemporaryDirectory(prefix=f".{out.name}.hf-", dir=out.parent) as hf_dir:
                merge(peft_model, prune=prune).save_pretrained(hf_dir)
                tokenizer_source = _save_tokenizer(Path(hf_dir), [str(adapter_dir), base_ref])
                if tokenizer_source is None:
                    raise ValueError(
                        f"GGUF export needs a tokenizer (the file carries it), and neither {adapter_dir} nor the base "
                        f"{base_ref} has one; save it next to the adapter (tokenizer.save_pretrained(adapter_dir))"
                    )
                convert_to_gguf(hf_dir, tmp / gguf_file, gguf_type, llama_cpp)
            kind = "pruned-gguf" if prune else "gguf"
        elif format == "merged":
            model = merge(peft_model, prune=prune)
            if isinstance(dtype, torch.dtype) or dtype != "auto":
                model = model.to(DTYPES.get(dtype, dtype))
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
            kind = "pruned" if prune else "merged"
        elif format == "lora":
            conversion = convert_to_lora(peft_model, lora_rank)
            if base_id:
                conversion.config.base_model_name_or_path = base_id
            conversion.config.save_pretrained(tmp)
            out_dtype = torch.float32 if dtype == "auto" else DTYPES.get(dtype, dtype)
            save_file({k: v.to(out_dtype) for k, v in conversion.state_dict.items()}, tmp / ADAPTER_WEIGHTS)
            kind = "lora"
        else:
            shutil.copy2(adapter_dir / ADAPTER_WEIGHTS, tmp / ADAPTER_WEIGHTS)
            adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
            if base_id:  # a Hub id instead of a local path, so that AutoPeftModel works after download
                adapter_config["base_model_name_or_path"] = base_id
            (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
            kind = "adapter"
        if format != "gguf":  # a GGUF file carries its tokenizer; the other formats get its files next to the weights
            tokenizer_source = _save_tokenizer(tmp, [str(adapter_dir), base_ref])
        write_model_card(
            tmp,
            config=config,
            kind=kind,
            base_model=base_id,
            summary=summary,
            conversion=conversion,
            gguf_file=gguf_file,
        )
    result = ExportResult(out, format, sorted(p.name for p in out.iterdir()), conversion, tokenizer_source)
    if push_to_hub:
        result.url = push_folder(out, push_to_hub, private=private, token=token)
    return result


# ------------------------------------------------------------------------------------------------ pushing


def check_repo_id(repo_id: str) -> None:
    """Raise ``ValueError`` unless ``repo_id`` is a valid Hub repo id ("name" or "namespace/name")."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(
            f"{repo_id!r} is not a valid Hub repo id: {_first_line(error)} Use 'namespace/name'."
        ) from None


def _resolve_token(token: Optional[str]) -> str:
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise PermissionError(
            "No Hugging Face credentials found for the push. Set the HF_TOKEN environment variable or run "
            "`hf auth login`, then retry."
        )
    return token


def push_folder(folder: PathLike, repo_id: str, *, private: bool = False, token: Optional[str] = None) -> str:
    """Upload an exported folder to the Hub model repo ``repo_id`` (created if missing) in one commit.

    Uses ``HfApi.create_repo`` + ``upload_folder`` (not ``push_to_hub``, which under transformers 5 replaces the
    card). The token comes from ``token``, ``HF_TOKEN`` or the stored login, and never appears in messages.
    Raises :class:`PushError` if the upload fails; the local folder is left as it was, so retrying is safe.
    Returns the commit URL.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    if not (folder / "README.md").is_file():
        raise FileNotFoundError(f"{folder} is not a petuning export (no README.md). Export it first.")
    check_repo_id(repo_id)
    token = _resolve_token(token)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            commit_message=f"Upload {folder.name} exported by petuning",
        )
    except (HfHubHTTPError, OSError, ValueError, RuntimeError) as error:
        message = _describe_chain(error).replace(token, "***")
        raise PushError(
            f"Upload of {folder} to {repo_id} failed: {message}\nThe local export in {folder} is complete "
            f"and unchanged, and the Hub repo received no partial commit. Retry with: petuning push {folder} {repo_id}"
        ) from None
    return str(commit.commit_url)


def _describe_chain(error: BaseException) -> str:
    """The first line of an error and of each error that caused it ("uploading x failed: 507 Server Error ...")."""
    lines, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        line = _first_line(error)
        if line not in lines:
            lines.append(line)
        error = error.__cause__ or error.__context__
    return " <- ".join(lines)
