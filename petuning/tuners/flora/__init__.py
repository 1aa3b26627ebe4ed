"""FLoRA: Tucker low-rank core adapters for Linear, Embedding and Conv1d/2d/3d layers (Si et al., 2024)."""

from petuning.registry import register_method

from .config import FloraConfig
from .layer import Conv, Embedding, FloraLayer, Linear
from .model import FloraModel

register_method("flora", FloraConfig, FloraModel)

__all__ = ["Conv", "Embedding", "FloraConfig", "FloraLayer", "FloraModel", "Linear"]
