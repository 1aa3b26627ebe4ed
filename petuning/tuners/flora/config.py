"""Configuration of FLoRA (Tucker low-rank core space, Si et al., arXiv 2405.14739)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from petuning.registry import add_peft_type

FLORA = add_peft_type("FLORA")

Ranks = Union[int, list[int]]


@dataclass
class FloraConfig(PeftConfig):
    """Configuration of a FLoRA adapter: "FLoRA: Low-Rank Core Space for N-dimension" (Si et al., 2024), the
    Tucker-core method. Not to be confused with the federated "FLoRA" or with "Flora: Low-Rank Adapters Are
    Secretly Gradient Compressors".

    Each targeted weight W₀ with modes ``[in, out, *kernel]`` (sizes I₁ … I_N) gets a Tucker update::

        ΔW = s · G ×₁ U₁ ×₂ U₂ … ×_N U_N,    G ∈ R^{J₁×…×J_N},  U_n ∈ R^{I_n×J_n}

    The core G keeps the topology of the weight: 2-D for ``nn.Linear`` / ``nn.Embedding`` / GPT-2 ``Conv1D``,
    3-D/4-D/5-D for ``nn.Conv1d/2d/3d``. For a grouped or depthwise convolution the input mode has size
    ``in_channels / groups``, as in the weight. G starts at zero and every factor at Kaiming-normal(a=√3), as in
    the official code, so the adapted model starts as the base model. The base weight is never modified while
    the adapter is attached; merging adds ΔW to it.

    Ranks are given per mode in the order ``[in, out, *kernel]`` (the official code's order): ``r=[16, 16, 2, 2]``
    for a 3x3 Conv2d. A single int sets the input and output ranks; kernel modes then take ``r_kernel``.
    """

    r: Ranks = field(
        default=8,
        metadata={
            "help": "Ranks per mode. An int J sets the input and output ranks (J_in = J_out = J; kernel modes take "
            "`r_kernel`). A list gives one rank per mode in the order [in, out, *kernel], e.g. [16, 16, 2, 2] for a "
            "3x3 Conv2d; its length must match every targeted layer's number of modes (2 for Linear/Embedding, "
            "3/4/5 for Conv1d/2d/3d), so use rank_pattern for layers of different kinds. A rank larger than its "
            "mode's size is lowered to that size (see `strict_rank`)."
        },
    )
    r_kernel: Optional[int] = field(
        default=None,
        metadata={
            "help": "Rank of every spatial kernel mode of a convolution when `r` is an int. None keeps the kernel "
            "modes at full rank (J = kernel size, the kernel is small); the official example uses 2 for 3x3 kernels."
        },
    )
    scale: float = field(
        default=2.0,
        metadata={
            "help": "The scale s in ΔW = s · G ×₁ U₁ … ×_N U_N (not divided by the rank). 2.0 matches the authors' "
            "LLM scripts (alpha = 2r, alpha/r = 2); the official convolution code defaults to 1.0 and its example "
            "uses 4.0."
        },
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input (not used for Embedding)."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names (suffix match) or a regex to adapt; 'all-linear' adapts every linear layer except "
            "the output head. Supported: nn.Linear, transformers' Conv1D, nn.Embedding, nn.Conv1d/2d/3d (also "
            "grouped and depthwise) and bitsandbytes/quantized linear layers."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex to leave out of `target_modules`."}
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={"help": "True if the layer stores its weight as (in, out), e.g. GPT-2's Conv1D. Set automatically."},
    )
    bias: Literal["none", "all", "flora_only"] = field(
        default="none", metadata={"help": "Which biases to train: none, all, or those of adapted layers."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules to train fully and save, e.g. a classifier head."}
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: the paper's init (zero core, Kaiming-normal(a=√3) factors), so the adapter starts as an "
            "identity. False: a random nonzero core as well (for tests), seeded by the global RNG."
        },
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt these layer indices (with `layers_pattern`)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list, e.g. 'layers' or 'h', for `layers_to_transform`."}
    )
    rank_pattern: Optional[dict] = field(
        default_factory=dict,
        metadata={
            "help": "Per-module rank overrides, each an int or a per-mode list: {'q_proj': 16, 'features.*': [8, 8, 2, 2]}."
        },
    )
    scale_pattern: Optional[dict] = field(
        default_factory=dict,
        metadata={"help": "Per-module overrides of `scale` (like PEFT's alpha_pattern): {'down_proj': 1.0}."},
    )
    strict_rank: bool = field(
        default=False,
        metadata={
            "help": "False: a mode rank larger than the mode's size (e.g. r=8 on a depthwise convolution, whose input "
            "mode has size 1) is lowered to that size, with one warning naming such layers, as LoRA accepts any r. "
            "True: such a layer raises instead."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = FLORA
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("`layers_pattern` needs `layers_to_transform`: say which layer indices to adapt.")
        if isinstance(self.r, tuple):
            self.r = list(self.r)
        check_ranks("FloraConfig.r", self.r)
        if self.r_kernel is not None:
            check_ranks("FloraConfig.r_kernel", self.r_kernel, allow_list=False)
        for key, ranks in (self.rank_pattern or {}).items():
            if isinstance(ranks, tuple):
                self.rank_pattern[key] = ranks = list(ranks)
            check_ranks(f"FloraConfig.rank_pattern[{key!r}]", ranks)
        scales = {"scale": self.scale, **{f"scale_pattern[{k!r}]": v for k, v in self.scale_pattern.items()}}
        for key, value in scales.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"FloraConfig.{key} must be a number, got {value!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"FloraConfig.dropout must be in [0, 1), got {self.dropout}.")
        if self.bias not in ("none", "all", "flora_only"):
            raise ValueError(f"FloraConfig.bias={self.bias!r} is not one of ('none', 'all', 'flora_only').")


def check_ranks(name: str, ranks: Ranks, allow_list: bool = True) -> None:
    """Raise a clear error unless ``ranks`` is a positive int or (if allowed) a non-empty list of them."""
    values = ranks if (allow_list and isinstance(ranks, list)) else [ranks]
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in values):
        kind = "a positive int"
        if allow_list:
            kind += " or a list of positive ints (one per mode: [in, out, *kernel])"
        raise ValueError(f"{name} must be {kind}, got {ranks!r}.")
