"""SORSA: trainable top-r singular triplets with an orthonormal regularizer (delta form)."""

from petuning.registry import register_method

from .config import SorsaConfig
from .layer import Linear, SorsaLayer
from .model import SorsaModel, orthonormal_regularizer

register_method("sorsa", SorsaConfig, SorsaModel)

__all__ = ["Linear", "SorsaConfig", "SorsaLayer", "SorsaModel", "orthonormal_regularizer"]
