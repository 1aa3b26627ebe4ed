"""PAT: pruning-aware tuning with Hybrid Sparsification Modules, and a pruned export to stock transformers."""

from petuning.registry import register_method

from .config import PatConfig
from .layer import Embedding, Linear, PatGate, PatLayer
from .model import SUPPORTED_MODEL_TYPES, PatModel
from .prune import prune_and_unload

register_method("pat", PatConfig, PatModel)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "Embedding",
    "Linear",
    "PatConfig",
    "PatGate",
    "PatLayer",
    "PatModel",
    "prune_and_unload",
]
