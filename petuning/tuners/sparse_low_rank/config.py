"""Configuration of sparse-plus-low-rank adapters (SLTrain / SaRA / RoSA style)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from petuning.registry import add_peft_type

SPARSE_LOW_RANK = add_peft_type("SPARSE_LOW_RANK")

SUPPORTS = ("random", "magnitude", "gradient")


@dataclass
class SparseLowRankConfig(PeftConfig):
    """Configuration of a sparse-plus-low-rank adapter.

    Each targeted weight W0 (out, in) stays frozen and gets the update::

        ΔW = (alpha / r) · B A  +  S

    ``B A`` is a LoRA-style low-rank part (``sparse_low_rank_A`` (r, in), Kaiming-uniform; ``sparse_low_rank_B``
    (out, r), zero at init). ``S`` is sparse: ``round(density · out · in)`` trainable values
    (``sparse_low_rank_values``, zero at init) at a fixed support stored as sorted int32 flat indices
    ``i · in + j`` (``sparse_low_rank_indices``, saved in the adapter file, never re-derived at load time).
    At initialization the model is exactly the base model.

    The support is chosen by ``support``:

    * ``"random"``: uniform without replacement, seeded by ``seed`` and the module name (SLTrain);
    * ``"magnitude"``: the entries of W0 with the smallest ``|w|`` (SaRA), ties broken by position;
    * ``"gradient"``: the entries with the largest sum of squared gradients dL/dW over warm-up batches
      (RoSA's diagonal Fisher). It needs data: either call
      ``petuning.tuners.sparse_low_rank.select_support_from_gradients(model, batches)`` once before training,
      or set ``gradient_warmup_steps`` and train with petuning's training hooks, which collect the gradients
      during the first optimizer steps (the low-rank part trains meanwhile) and then fix the support.

    The forward never forms a dense out x in update and the gradient of the sparse values is computed at the
    support only (sampled dense-dense matmul). ``nuclear_norm_weight`` adds SaRA's low-rank regularizer
    ``weight · ||ΔW||_*`` to the training loss through petuning's training hooks.
    """

    r: int = field(default=8, metadata={"help": "Rank of the low-rank part B A; 0 gives a purely sparse adapter."})
    alpha: float = field(default=8.0, metadata={"help": "Scale numerator of the low-rank part: scaling = alpha / r."})
    density: float = field(
        default=0.01,
        metadata={
            "help": "Fraction δ of each weight's entries in the sparse support, 0 < δ < 1 (nnz = round(δ·out·in))."
        },
    )
    support: Literal["random", "magnitude", "gradient"] = field(
        default="random",
        metadata={
            "help": "How the sparse support is chosen: 'random' (SLTrain), 'magnitude' (SaRA), 'gradient' (RoSA)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the 'random' support (combined with each module's name)."})
    strict_rank: bool = field(
        default=False,
        metadata={
            "help": "False: on a layer with min(in, out) < r the low-rank part gets rank min(in, out), and a density "
            "that rounds to no entry keeps one entry, with one warning naming such layers (as LoRA accepts any r). "
            "True: such a layer raises instead."
        },
    )
    gradient_warmup_steps: int = field(
        default=0,
        metadata={
            "help": "For support='gradient': number of optimizer steps over which petuning's training hooks collect "
            "squared gradients before fixing the support. 0 means the support comes from "
            "select_support_from_gradients(model, batches) instead."
        },
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names (suffix match) or a regex to adapt; 'all-linear' adapts every linear layer "
            "except the output head. nn.Linear, transformers' Conv1D and quantized linears are supported."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex to leave out of `target_modules`."}
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input (both parts)."})
    fan_in_fan_out: bool = field(
        default=False,
        metadata={"help": "True if the layer stores its weight as (in, out), e.g. GPT-2's Conv1D. Set automatically."},
    )
    bias: Literal["none", "all", "sparse_low_rank_only"] = field(
        default="none", metadata={"help": "Which biases to train: none, all, or those of adapted layers."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules to train fully and save, e.g. a classifier head."}
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: B = 0 and sparse values = 0, so the adapter starts as the identity. False: seeded random "
            "B and values (for tests)."
        },
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt these layer indices (with `layers_pattern`)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list, e.g. 'layers' or 'h', for `layers_to_transform`."}
    )
    nuclear_norm_weight: float = field(
        default=0.0,
        metadata={
            "help": "λ of SaRA's regularizer λ·||ΔW||_* on the full update, added to the training loss by "
            "petuning's training hooks (0 turns it off; SaRA uses 5e-4)."
        },
    )
    nuclear_norm_layers: int = field(
        default=1,
        metadata={
            "help": "Adapted layers whose nuclear norm is penalized per forward, drawn at random (seeded by `seed`) as "
            "in SaRA to amortize the SVDs; 0 penalizes every layer."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = SPARSE_LOW_RANK
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("`layers_pattern` needs `layers_to_transform`: say which layer indices to adapt.")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 0:
            raise ValueError(f"SparseLowRankConfig.r must be an integer >= 0 (0: no low-rank part), got {self.r!r}.")
        if not 0.0 < self.density < 1.0:
            raise ValueError(
                f"SparseLowRankConfig.density must lie strictly between 0 and 1, got {self.density}. It is the "
                "fraction of each weight's entries that the sparse part trains, e.g. 0.01 for 1%."
            )
        if self.support not in SUPPORTS:
            raise ValueError(f"SparseLowRankConfig.support={self.support!r} is not one of {SUPPORTS}.")
        if self.gradient_warmup_steps < 0:
            raise ValueError(
                f"SparseLowRankConfig.gradient_warmup_steps must be >= 0, got {self.gradient_warmup_steps}."
            )
        if self.gradient_warmup_steps and self.support != "gradient":
            raise ValueError(
                f"gradient_warmup_steps={self.gradient_warmup_steps} only applies to support='gradient' "
                f"(got support={self.support!r})."
            )
        if self.alpha <= 0:
            raise ValueError(f"SparseLowRankConfig.alpha must be positive, got {self.alpha}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SparseLowRankConfig.dropout must be in [0, 1), got {self.dropout}.")
        if self.bias not in ("none", "all", "sparse_low_rank_only"):
            raise ValueError(
                f"SparseLowRankConfig.bias={self.bias!r} is not one of ('none', 'all', 'sparse_low_rank_only')."
            )
        if self.nuclear_norm_weight < 0:
            raise ValueError(f"SparseLowRankConfig.nuclear_norm_weight must be >= 0, got {self.nuclear_norm_weight}.")
        if self.nuclear_norm_layers < 0:
            raise ValueError(f"SparseLowRankConfig.nuclear_norm_layers must be >= 0, got {self.nuclear_norm_layers}.")

    @property
    def scaling(self) -> float:
        """The factor alpha / r of the low-rank part (0 without one)."""
        return self.alpha / self.r if self.r else 0.0
