"""Masked tuning (R-AMT): learned binary masks over frozen weights, with an L2 term and gradient dropout."""

from petuning.registry import register_method

from .config import MaskTuningConfig
from .layer import Linear, MaskTuningLayer
from .model import MaskTuningModel, gradient_dropout

register_method("mask_tuning", MaskTuningConfig, MaskTuningModel)

__all__ = ["Linear", "MaskTuningConfig", "MaskTuningLayer", "MaskTuningModel", "gradient_dropout"]
