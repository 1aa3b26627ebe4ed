"""Sparse plus low rank: ΔW = (alpha / r) B A + S with a fixed sparse support (SLTrain / SaRA / RoSA style)."""

from petuning.registry import register_method

from .config import SparseLowRankConfig
from .layer import Linear, SparseLinear, SparseLowRankLayer
from .model import SparseLowRankModel, select_support_from_gradients

register_method("sparse_low_rank", SparseLowRankConfig, SparseLowRankModel)

__all__ = [
    "Linear",
    "SparseLinear",
    "SparseLowRankConfig",
    "SparseLowRankLayer",
    "SparseLowRankModel",
    "select_support_from_gradients",
]
