"""Layer-level rules every petuning method shares."""

from __future__ import annotations

import warnings

from peft.tuners.tuners_utils import BaseTunerLayer

NAN_MESSAGE = "NaNs detected in the merged weights. The adapter {} seems to be broken"
"""PEFT's wording for a failed ``safe_merge`` (PEFT's own tests match it)."""


def check_mergeable(layer: BaseTunerLayer, method: str) -> None:
    """Refuse to merge into a forward-only quantized base, and warn before a lossy merge into a bitsandbytes
    or other re-quantized base: the weight is dequantized, updated and quantized again, so the merged model
    no longer matches the adapter model exactly and ``unmerge`` cannot restore the original."""
    backend = layer.quantization_backend
    if backend is None:
        return
    if not backend.supports_merge:
        raise TypeError(
            f"Cannot merge {method} into a {backend} base layer: that quantization format is forward-only. "
            "Load the base in 16/32-bit and merge there."
        )
    warnings.warn(
        f"Merging {method} into a quantized ({backend}) base layer re-quantizes the weight: the merged model "
        "differs from the adapter model by the quantization error, and unmerging cannot restore the original "
        "weight. For an exact merge, load the base in 16/32-bit and merge there.",
        UserWarning,
        stacklevel=3,
    )
