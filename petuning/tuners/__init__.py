"""petuning's PEFT methods, one subpackage each. Importing a subpackage registers its method with PEFT."""

from .sorsa import SorsaConfig, SorsaModel

__all__ = ["SorsaConfig", "SorsaModel"]
