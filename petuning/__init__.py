"""petuning: recent parameter-efficient fine-tuning methods as first-class PEFT methods.

``import petuning`` registers every method with PEFT, so ``get_peft_model``, ``PeftModel.from_pretrained``,
``AutoPeftModelForCausalLM`` and transformers' ``load_adapter`` accept petuning configs and adapters.
"""

from petuning import (
    import_noise,  # noqa: F401  (before peft imports bitsandbytes)
    registry,  # noqa: F401  (checks the peft version and the transformers/peft pair first)
)
from petuning.distillation import sample_teacher_rows
from petuning.training import PetuningCallback, TrainingHooks, attach_to_trainer
from petuning.tuners import (
    FloraConfig,
    FloraModel,
    MaskTuningConfig,
    MaskTuningModel,
    PatConfig,
    PatModel,
    SorsaConfig,
    SorsaModel,
    SparseLowRankConfig,
    SparseLowRankModel,
)

__version__ = "0.1.0"

__all__ = [
    "FloraConfig",
    "FloraModel",
    "MaskTuningConfig",
    "MaskTuningModel",
    "PatConfig",
    "PatModel",
    "PetuningCallback",
    "SorsaConfig",
    "SorsaModel",
    "SparseLowRankConfig",
    "SparseLowRankModel",
    "TrainingHooks",
    "__version__",
    "attach_to_trainer",
    "sample_teacher_rows",
]
