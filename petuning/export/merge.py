"""Merging an adapter into its base (or pruning, for PAT) through the tuners' own merge."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from peft import PeftConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer


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
