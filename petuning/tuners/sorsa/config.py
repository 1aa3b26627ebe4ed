"""Configuration of SORSA (Singular Values and Orthonormal Regularized Singular Vectors Adaptation)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from petuning.linalg import SVD_METHOD, SVD_NITER, SVD_OVERSAMPLING
from petuning.registry import add_peft_type

SORSA = add_peft_type("SORSA")

ORTHO_MODES = ("official", "loss", "decoupled")
ORTHO_NORMS = ("fro", "fro2")
SVD_METHODS = ("full", "randomized")


@dataclass
class SorsaConfig(PeftConfig):
    """Configuration of a SORSA adapter (Cao, arXiv 2409.00055).

    Each targeted weight W (out, in) is split by its SVD. The top-r part is trained as three tensors:
    ``sorsa_A`` (r, in), the top right singular vectors; ``sorsa_S`` (r,), the top singular values; and
    ``sorsa_B`` (out, r), the top left singular vectors. petuning keeps W untouched and adds the change of
    the principal part to the layer output (delta form)::

        y = W x + s * (B diag(S) A - B0 diag(S0) A0) x

    where ``B0, S0, A0`` are frozen copies of the initial factors. At initialization the model is exactly
    the base model; ``disable_adapter()`` and ``unload()`` give it back; merging adds the bracket to W.

    An orthonormal regularizer ``mean over A, B of (||A Aᵀ - I||_F, ||Bᵀ B - I||_F)`` keeps the singular
    vectors orthonormal. It acts through petuning's training hooks (``petuning.PetuningCallback`` for
    ``transformers.Trainer`` / TRL, ``petuning.TrainingHooks`` for plain loops); ``ortho_mode`` picks how.
    """

    r: int = field(default=8, metadata={"help": "Rank: number of singular triplets trained per layer."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names (suffix match) or a regex to adapt; 'all-linear' adapts every linear layer "
            "except the output head. nn.Linear and transformers' Conv1D are supported."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex to leave out of `target_modules`."}
    )
    alpha: Optional[float] = field(
        default=None,
        metadata={
            "help": "Optional scale numerator: s = alpha / r. None (the paper's setting) gives s = 1. With s != 1 "
            "the initial singular values are divided by s, so s*B0 diag(S0) A0 is still exactly the top-r part."
        },
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input (the paper uses 0)."})
    fan_in_fan_out: bool = field(
        default=False,
        metadata={"help": "True if the layer stores its weight as (in, out), e.g. GPT-2's Conv1D. Set automatically."},
    )
    bias: Literal["none", "all", "sorsa_only"] = field(
        default="none", metadata={"help": "Which biases to train: none, all, or those of adapted layers."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules to train fully and save, e.g. a classifier head."}
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: start at the base model (trainable factors equal the frozen ones). False: perturb the "
            "trainable factors with seeded noise so the adapter is not an identity (for tests)."
        },
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt these layer indices (with `layers_pattern`)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list, e.g. 'layers' or 'h', for `layers_to_transform`."}
    )
    rank_pattern: Optional[dict] = field(
        default_factory=dict, metadata={"help": "Per-module rank overrides: {'q_proj': 16, 'layers.0.mlp.*': 4}."}
    )
    strict_rank: bool = field(
        default=False,
        metadata={
            "help": "False: a layer with fewer than r singular values (min(in, out) < r) gets rank min(in, out), "
            "with one warning naming such layers, as LoRA accepts any r. True: such a layer raises instead."
        },
    )
    svd_method: Literal["full", "randomized"] = field(
        default=SVD_METHOD,
        metadata={
            "help": "'randomized' (default): seeded randomized block Krylov SVD (a block of r + `svd_oversampling` "
            "columns, rounded up to a multiple of 16, grown `svd_niter` Krylov steps; the top r Ritz pairs), on the "
            "weight's device. At the defaults its top-r part reconstructs every SmolLM2 layer within 1e-4 "
            "(relative) of the exact optimum, with orthonormal factors, in about a fifth of the time of a full SVD "
            "there (7B: about a minute instead of hours; benchmarks/sorsa_init.py). Where the Krylov space would span "
            "the layer's smaller side, the full SVD is taken. 'full': torch.linalg.svd, exact as in the paper. The "
            "init is an exact reparametrization either way, because the frozen copy equals the trainable start."
        },
    )
    svd_niter: int = field(
        default=SVD_NITER,
        metadata={
            "help": "Krylov steps of the randomized SVD. LLM weights have flat spectra: at r = 16 on SmolLM2, 8 steps "
            "miss the 1e-4 fit, 10 pass."
        },
    )
    svd_oversampling: int = field(
        default=SVD_OVERSAMPLING,
        metadata={"help": "Extra columns of the randomized SVD's block beyond r (before rounding up to 16)."},
    )
    svd_cache_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": "Directory caching the SVD of each base weight (keyed by a hash of the weight, the rank and the "
            "SVD settings), so a restarted run or a second adapter on the same base does not redo it. None: no cache."
        },
    )
    gamma: float = field(
        default=4e-4, metadata={"help": "Strength of the orthonormal regularizer (paper: 4e-4). 0 turns it off."}
    )
    ortho_mode: Literal["official", "loss", "decoupled"] = field(
        default="official",
        metadata={
            "help": "'official': add (gamma / peak_lr) * grad(L_reg) to the gradients after clipping, before the "
            "optimizer step (the paper's code). 'loss': add gamma * L_reg to the training loss. 'decoupled': after "
            "each optimizer step, p <- p - gamma * grad(L_reg) (the paper's equation)."
        },
    )
    ortho_norm: Literal["fro", "fro2"] = field(
        default="fro", metadata={"help": "'fro': Frobenius norm as in the paper; 'fro2': squared Frobenius norm."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = SORSA
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("`layers_pattern` needs `layers_to_transform`: say which layer indices to adapt.")
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"SorsaConfig.r must be a positive integer, got {self.r!r}.")
        for key, rank in (self.rank_pattern or {}).items():
            if not isinstance(rank, int) or rank <= 0:
                raise ValueError(f"rank_pattern[{key!r}] must be a positive integer, got {rank!r}.")
        _check_choice("ortho_mode", self.ortho_mode, ORTHO_MODES)
        _check_choice("ortho_norm", self.ortho_norm, ORTHO_NORMS)
        _check_choice("svd_method", self.svd_method, SVD_METHODS)
        _check_choice("bias", self.bias, ("none", "all", "sorsa_only"))
        if self.gamma < 0:
            raise ValueError(f"SorsaConfig.gamma must be >= 0, got {self.gamma}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SorsaConfig.dropout must be in [0, 1), got {self.dropout}.")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"SorsaConfig.alpha must be positive or None, got {self.alpha}.")
        if self.svd_niter < 0 or self.svd_oversampling < 0:
            raise ValueError("svd_niter and svd_oversampling must be >= 0.")

    def scale(self, r: int) -> float:
        """The factor s applied to the principal part for a layer of rank ``r``."""
        return 1.0 if self.alpha is None else self.alpha / r


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"SorsaConfig.{name}={value!r} is not one of {choices}.")
