"""FLoRA tuner: picks the FLoRA layer type for each targeted module and resolves per-module ranks and scales."""

from __future__ import annotations

import re
import warnings

from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import (
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    get_quantization_kwargs,
    resolve_quantization_backend,
)
from torch import nn
from transformers.pytorch_utils import Conv1D

from petuning.tuners.base import PetuningTuner
from petuning.tuners.common import base_of, is_quantized_linear, pattern_value

from .config import FloraConfig
from .layer import Conv, Embedding, FloraLayer, Linear

_NESTED = re.compile(r"(\.base_layer)+(?=\.flora_)")
SUPPORTED = (
    "torch.nn.Linear, transformers' Conv1D, torch.nn.Embedding, torch.nn.Conv1d/2d/3d and bitsandbytes/quantized "
    "linear layers"
)


class FloraModel(PetuningTuner):
    """Adds FLoRA (Tucker low-rank core) adapters to a model. Created by ``peft.get_peft_model(model, FloraConfig(...))``."""

    method_label = "FLoRA"
    prefix: str = "flora_"
    tuner_layer_cls = FloraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _layer_kwargs(
        self, config: FloraConfig, adapter_name: str, key: str, target_name: str, target: nn.Module
    ) -> dict:
        return {
            "r": pattern_value(config.rank_pattern, key, config.r),
            "r_kernel": config.r_kernel,
            "scale": pattern_value(config.scale_pattern, key, config.scale),
            "dropout": config.dropout,
            "init_weights": config.init_weights,
            "module_name": key,
            "strict_rank": config.strict_rank,
            **get_quantization_kwargs(self),
        }

    def _existing_layer(self, target: nn.Module, key: str) -> FloraLayer | None:
        """A FLoRA layer at ``target``, also when another method's layer was wrapped around it (FLoRA added first);
        a clear error when ``target`` holds only another method's adapter."""
        layer = target
        while isinstance(layer, BaseTunerLayer) and not isinstance(layer, FloraLayer):
            layer = layer.base_layer
        if isinstance(layer, FloraLayer):
            return layer
        if isinstance(target, BaseTunerLayer):
            raise ValueError(
                f"FLoRA cannot adapt {key!r}: it already holds an adapter of another PEFT method "
                f"({type(target).__module__}.{type(target).__name__}). Wrapping it would move that adapter's tensors "
                "under 'base_layer.' and its saved files would no longer load on a plain base model. Add the FLoRA "
                "adapter first (other methods may then wrap it), or target different modules."
            )
        return None

    def _create_new_module(self, config: FloraConfig, adapter_name: str, target: nn.Module, key: str, **kwargs):
        base = base_of(target)
        if isinstance(base, Conv1D):
            return Linear(target, adapter_name, fan_in_fan_out=True, **kwargs)
        if config.fan_in_fan_out and not isinstance(base, nn.Embedding):
            warnings.warn(f"fan_in_fan_out=True does not fit {key!r} ({type(base).__name__}); ignored.", stacklevel=2)
        if isinstance(base, nn.Linear) or is_quantized_linear(base):
            return Linear(target, adapter_name, **kwargs)
        if resolve_quantization_backend(base) is not None:
            raise TypeError(
                f"FLoRA cannot adapt {key!r}: it is a quantized {type(base).__name__}, and only quantized linear "
                "layers are supported. Load that layer unquantized or leave it out of target_modules."
            )
        if isinstance(base, nn.Embedding):
            return Embedding(target, adapter_name, **kwargs)
        if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return Conv(target, adapter_name, **kwargs)
        raise TypeError(
            f"FLoRA cannot adapt {key!r} of type {type(base).__name__}: supported layers are {SUPPORTED}. "
            "Leave it out of target_modules (or add it to exclude_modules)."
        )

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """PEFT's key without the adapter name, and without the ``base_layer.`` segments that another method's layer
        adds when it wraps a FLoRA layer, so a FLoRA file is the same whether or not e.g. a LoRA adapter shares the
        module. Loading maps keys through the same function, so both directions agree."""
        key = super()._remove_adapter_name_from_key(key, adapter_name)
        return _NESTED.sub("", key)
