"""petuning's PEFT methods, one subpackage each. Importing a subpackage registers its method with PEFT."""

from .flora import FloraConfig, FloraModel
from .mask_tuning import MaskTuningConfig, MaskTuningModel
from .pat import PatConfig, PatModel
from .sorsa import SorsaConfig, SorsaModel
from .sparse_low_rank import SparseLowRankConfig, SparseLowRankModel

__all__ = [
    "FloraConfig",
    "FloraModel",
    "MaskTuningConfig",
    "MaskTuningModel",
    "PatConfig",
    "PatModel",
    "SorsaConfig",
    "SorsaModel",
    "SparseLowRankConfig",
    "SparseLowRankModel",
]
