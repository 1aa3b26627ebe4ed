"""Configuration of masked tuning (R-AMT: regularized mask tuning, Zheng et al., ICCV 2023)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from petuning.registry import add_peft_type

MASK_TUNING = add_peft_type("MASK_TUNING")


@dataclass
class MaskTuningConfig(PeftConfig):
    """Configuration of a masked-tuning adapter (R-AMT, arXiv 2307.15049).

    Every targeted weight W stays frozen. The adapter learns real-valued scores m for (a share of) its entries
    and the layer computes with ``W ⊙ M``, where ``M = 1[m > threshold]`` for entries that carry a score and 1
    elsewhere. The binarization passes the gradient straight through (dL/dm = dL/dM = dL/dW_eff ⊙ W). Scores
    start at ``mask_init > threshold``, so the initial model is exactly the base model.

    Training terms, applied through petuning's training hooks (``petuning.PetuningCallback`` for
    ``transformers.Trainer`` / TRL, ``petuning.TrainingHooks`` for plain loops):

    - ``l2_weight * sum over layers of ||m||_2`` (unsquared, per score tensor) is added to the loss; its gradient
      pushes every score towards the threshold, i.e. towards masking.
    - gradient dropout (``gradient_dropout=True``): the gradient of ``KL(p_base || p_tuned)`` with respect to m is
      computed on the same batch, where ``p_base`` is the model with its masked-tuning adapters disabled. Each
      score's task gradient is kept when it agrees in sign with the KL gradient, else kept with probability
      ``|g_task| / (|g_task| + |g_kl|)``; dropped gradients are scaled by ``1 - gradient_dropout_lambda``. Cost:
      one extra forward without gradients and one extra backward per micro-batch, plus a gradient-sized buffer
      per score tensor.

    The saved adapter holds the binary masks bit-packed (1 bit per score) unless ``save_scores=True``, which
    keeps the float scores so that training can resume exactly. Loading bit-packed masks sets the scores to
    ``mask_init`` (kept) or ``2 * threshold - mask_init`` (masked), i.e. the same masks.
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names (suffix match) or a regex to mask; 'all-linear' masks every linear layer except the "
            "output head. nn.Linear and transformers' Conv1D are supported. The paper masks the attention weights."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex to leave out of `target_modules`."}
    )
    mask_share: float = field(
        default=1.0,
        metadata={
            "help": "Share in (0, 1] of each targeted weight's entries that get a mask score. 1.0 masks every entry "
            "(scores have the weight's shape). Below 1, the entries are chosen per layer, at creation by largest |W| "
            "and, for the gradient-based choice, by `select_masked_weights(batches)` on the model before training."
        },
    )
    mask_init: float = field(
        default=1e-2, metadata={"help": "Initial value of every score (paper: 1e-2). Must exceed `threshold`."}
    )
    threshold: float = field(
        default=5e-3, metadata={"help": "Binarization threshold tau: M = 1[m > tau] (paper: 5e-3)."}
    )
    l2_weight: float = field(
        default=1e-4,
        metadata={"help": "Weight of the L2 term sum ||m||_2 added to the loss (paper: 1e-4). 0 turns it off."},
    )
    gradient_dropout: bool = field(
        default=False,
        metadata={
            "help": "Apply the paper's gradient dropout against KL(base || tuned) on the same batch (needs a model "
            "whose output has `logits`). Costs one extra no-grad forward and one extra backward per micro-batch."
        },
    )
    gradient_dropout_lambda: float = field(
        default=0.3,
        metadata={
            "help": "Strength lambda in [0, 1] of gradient dropout: a dropped gradient is scaled by 1 - lambda "
            "(paper: 0.3 for most datasets, 1.0 drops it completely)."
        },
    )
    gradient_dropout_seed: int = field(
        default=0,
        metadata={
            "help": "Seed of gradient dropout's random draws (mixed with the optimizer step), so every DDP rank makes "
            "the same choice and runs are reproducible."
        },
    )
    save_scores: bool = field(
        default=False,
        metadata={"help": "Save the float scores (to resume training) instead of the bit-packed binary masks."},
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules to train fully and save, e.g. a classifier head."}
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: all scores start at `mask_init` (the base model). False: seeded scores spread around the "
            "threshold, so about half of the entries start masked (for tests)."
        },
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only mask these layer indices (with `layers_pattern`)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list, e.g. 'layers' or 'h', for `layers_to_transform`."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = MASK_TUNING
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("`layers_pattern` needs `layers_to_transform`: say which layer indices to mask.")
        if isinstance(self.mask_share, bool) or not isinstance(self.mask_share, (int, float)):
            raise TypeError(f"MaskTuningConfig.mask_share must be a number in (0, 1], got {self.mask_share!r}.")
        if not 0.0 < self.mask_share <= 1.0:
            raise ValueError(
                f"MaskTuningConfig.mask_share must be in (0, 1] (the share of each weight's entries that get a mask "
                f"score), got {self.mask_share}. Use 1.0 to mask every entry, e.g. 0.05 for 5%."
            )
        if not self.mask_init > self.threshold:
            raise ValueError(
                f"MaskTuningConfig.mask_init ({self.mask_init}) must be larger than threshold ({self.threshold}), "
                "otherwise the initial masks are not all ones and the adapter does not start at the base model."
            )
        if self.l2_weight < 0:
            raise ValueError(f"MaskTuningConfig.l2_weight must be >= 0, got {self.l2_weight}.")
        if not 0.0 <= self.gradient_dropout_lambda <= 1.0:
            raise ValueError(
                f"MaskTuningConfig.gradient_dropout_lambda must be in [0, 1], got {self.gradient_dropout_lambda}."
            )

    @property
    def masked_score(self) -> float:
        """The score given to a masked entry when loading bit-packed masks: the mirror of ``mask_init`` about the
        threshold, so both kinds of entries sit at the same distance from it."""
        return 2 * self.threshold - self.mask_init
