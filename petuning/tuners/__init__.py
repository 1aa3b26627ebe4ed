"""petuning's PEFT methods, one subpackage each. Importing a subpackage registers its method with PEFT."""

from .flora import FloraConfig, FloraModel
from .sorsa import SorsaConfig, SorsaModel

__all__ = ["FloraConfig", "FloraModel", "SorsaConfig", "SorsaModel"]
