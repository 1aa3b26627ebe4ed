"""Configuration of PAT (Pruning-Aware Tuning with Hybrid Sparsification Modules)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from petuning.registry import add_peft_type

PAT = add_peft_type("PAT")

PRODUCERS = ("o_proj", "down_proj")
"""Linear layers that write into the residual stream; an HSM follows each of them (and the token embedding)."""
CONSUMERS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
"""Linear layers that read the residual stream; pruning removes their input columns."""
DECODER_LINEARS = CONSUMERS[:3] + PRODUCERS[:1] + CONSUMERS[3:] + PRODUCERS[1:]
DEFAULT_PRUNING_RATIO = 0.25
"""The paper's anchor (Llama-2-7B, 4096 -> 3072), used when neither `target_width` nor `pruning_ratio` is given."""


@dataclass
class PatConfig(PeftConfig):
    """Configuration of a PAT adapter (Liu et al., "PAT: Pruning-Aware Tuning for Large Language Models", AAAI 2025).

    PAT learns which channels of the hidden (residual-stream) dimension ``d`` of a Llama-family decoder to remove,
    while it fine-tunes. A Hybrid Sparsification Module (HSM) sits after the token embedding and after every
    ``o_proj`` and ``down_proj``, i.e. on every write into the residual stream. HSM k maps a hidden vector y to::

        HSM_k(y) = s_k ⊙ g_t ⊙ (y + W1_k W0_k y)      W0_k (r, d), W1_k (d, r), s_k (d,)

    where ``g_t = σ(τ_t m) + b_t`` is a gate computed from ONE trainable mask ``m`` (d,) shared by all HSMs. The
    temperature τ_t rises and the offset b_t decays over ``schedule_steps`` optimizer steps T; m stops learning at
    0.8 T, and from step T on the gate is the hard 0/1 indicator of the ``target_width`` largest entries of m. A
    mask loss drives the number of kept channels to ``target_width``; an identity loss keeps each W0_k's rows
    orthonormal. At initialization (W1 = 0, s ⊙ g_0 = 1) the model is exactly the base model.

    Defaults that differ from the paper, because the paper's choices break real models (docs/pat.md): m starts
    calibrated from the residual stream's per-channel RMS (``mask_init``), massive-activation channels are never
    pruned (``protect_ratio``), the schedule spans the run (``schedule_steps="auto"``), and on a tied model the
    embedding HSM is scale-only, so the pruned model stays tied (``embedding_low_rank``).

    Optionally (the paper's recipe) a LoRA adapter is trained on the decoder's linear layers as well.

    The schedule and the losses run through petuning's training hooks: pass ``petuning.PetuningCallback()`` to
    ``transformers.Trainer`` / TRL, or wrap the optimizer in ``petuning.TrainingHooks`` in a plain loop. Once the
    mask is final, ``model.base_model.petuning_prune_and_unload()`` (CLI: ``petuning export --prune``) returns a
    smaller stock transformers model with hidden size ``target_width`` that computes the same logits.
    """

    target_width: Optional[int] = field(
        default=None,
        metadata={
            "help": "Hidden channels to keep, d' (a positive integer below the model's hidden size). Give this or "
            "`pruning_ratio`, not both; with neither, the paper's pruning_ratio=0.25 applies."
        },
    )
    pruning_ratio: Optional[float] = field(
        default=None,
        metadata={
            "help": "Fraction of hidden channels to remove, in (0, 1); the kept width is round(d * (1 - ratio)), "
            "rounded down to a multiple of `width_multiple`. None with no `target_width`: 0.25, the paper's anchor "
            "on Llama-2-7B (4096 -> 3072)."
        },
    )
    width_multiple: int = field(
        default=1,
        metadata={
            "help": "With `pruning_ratio`: round the kept width down to a multiple of this (64 or 128 keeps matrix "
            "kernels efficient on GPUs). Ignored with an explicit `target_width`."
        },
    )
    hsm_rank: int = field(
        default=200,
        metadata={
            "help": "Rank r of each HSM's low-rank branch W1 W0 (the paper hard-codes 200). On a model whose hidden "
            "size d is smaller, r = d is used, with a warning (see `strict_rank`)."
        },
    )
    strict_rank: bool = field(
        default=False,
        metadata={
            "help": "False: an hsm_rank above the hidden size is lowered to it, with a warning (W0 (r, d) cannot have "
            "more than d orthonormal rows). True: such a model raises instead."
        },
    )
    schedule_steps: Union[int, str] = field(
        default="auto",
        metadata={
            "help": "Horizon T of the mask schedule in optimizer steps. 'auto': the run's max_steps, taken from the "
            "Trainer or petuning.TrainingHooks(max_steps=...) at the first optimizer step (an error names the fix "
            "when the driver does not know it). An integer fixes T (the paper uses 10000). The mask stops learning "
            "at 0.8 T and is hard from T on; training may continue past T."
        },
    )
    mask_init: str = field(
        default="activation",
        metadata={
            "help": "How the channel mask m starts. 'activation' (default): calibrated from the model. The "
            "per-channel RMS of the residual stream (after the embedding and after every o_proj/down_proj write) "
            "is measured on the training micro-batches of the first optimizer step (all ranks together), or on "
            "batches given to model.base_model.calibrate_pat_mask(); m starts at +0.5 on the d' channels with the "
            "largest RMS and -0.5 elsewhere (the count and polarization losses are then 0), and each HSM scale s "
            "starts at 1/g_0, so the model still starts exactly as the base model. 'norm_output': the same "
            "calibration, but the channels are ranked by what the decoder reads, the mean square of every RMSNorm's "
            "output γ ⊙ h / rms(h) over the 2L + 1 residual states (protection still follows the RMS). 'zeros': "
            "the paper's m = 0 (every channel tied at the decision point; on SmolLM2 this prunes a "
            "massive-activation channel)."
        },
    )
    protect_ratio: Optional[float] = field(
        default=100.0,
        metadata={
            "help": "With a calibrated mask_init: channels whose calibration RMS exceeds this multiple of the "
            "median channel's are never pruned (massive activations, which act as biases the model relies on; on "
            "SmolLM2 channel 507 alone costs +8.8 nats). At most d' channels are protected (the largest). None: "
            "no protection."
        },
    )
    embedding_low_rank: Optional[bool] = field(
        default=None,
        metadata={
            "help": "Whether the embedding's HSM has the low-rank branch W1 W0. None: not when the LM head is tied "
            "to the embedding (SmolLM2, Qwen2.5, Llama-3.2), so the pruned model stays tied (the scale-only HSM is "
            "folded exactly into the embedding and the final norm); yes otherwise. True on a tied model: the "
            "pruned model gets its own LM head (49152 x d' more parameters on SmolLM2)."
        },
    )
    frozen_gate: str = field(
        default="hard",
        metadata={
            "help": "Gate while the mask is frozen (0.8 T <= t < T). 'hard': already the final 0/1 gate of the d' "
            "largest mask entries, so the last 20% of the schedule trains LoRA and HSMs on the pruned model and "
            "reaching T changes nothing. 'soft': the paper's σ(τ m) with τ frozen, then a jump to the hard gate at "
            "T (harmless only if the mask has polarized, i.e. σ(τ m) is already near 0/1, which needs a long "
            "schedule: the paper's 10000 steps)."
        },
    )
    mask_loss_weight: float = field(
        default=1.0, metadata={"help": "Weight of the mask loss (count term + polarization), paper: 1."}
    )
    count_loss_weight: float = field(
        default=10.0,
        metadata={"help": "Factor of the kept-count term |count(m >= 0) - d'| / d' inside the mask loss (paper: 10)."},
    )
    identity_loss_weight: float = field(
        default=1.0,
        metadata={
            "help": "Weight of the identity loss mean_k ||W0_k W0_kᵀ - I_r||_F² / r², averaged over ALL HSMs "
            "(the official code counts only the embedding's and the last layer's). 0 turns it off."
        },
    )
    distill_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of a self-distillation term (not in the paper): KL(teacher || model) of the next-token "
            "distributions, averaged over the positions the attention mask keeps and the task loss does not score "
            "(the prompt, and every position of a row whose labels are all -100, such as the rows "
            "petuning.sample_teacher_rows samples from the original: data-free distillation). The teacher is the same model with the PAT adapter bypassed, in eval mode: the unpruned "
            "original, so it needs no second copy; it costs one extra no-grad forward per training forward. It "
            "pulls the pruned model back towards the original's language modelling, which the task loss alone does "
            "not restore. 0 turns it off."
        },
    )
    lora_r: int = field(
        default=20, metadata={"help": "Rank of the LoRA adapter on the decoder linears (paper: 20); 0: no LoRA."}
    )
    lora_alpha: float = field(default=4.0, metadata={"help": "LoRA scaling numerator: scale = lora_alpha / lora_r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input (paper: 0.05)."})
    lora_target_modules: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Decoder linears that get LoRA, by name; None: all seven (q/k/v/o/gate/up/down_proj), as in "
            "the paper. The LM head is never adapted."
        },
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Filled in by PAT from the architecture (the embedding, o_proj/down_proj and the LoRA "
            "targets); do not set it. Choose LoRA layers with `lora_target_modules`."
        },
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules to train fully and save, e.g. a classifier head."}
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: start exactly at the base model. False: seeded random W1, s, m and LoRA B, so the "
            "adapter is not an identity (for tests); m is then not calibrated."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PAT
        if self.target_width is not None and self.pruning_ratio is not None:
            raise ValueError(
                "PatConfig takes one of `target_width` (hidden channels to keep) and `pruning_ratio` (fraction to "
                f"remove), not both; got target_width={self.target_width!r}, pruning_ratio={self.pruning_ratio!r}."
            )
        if self.target_width is None and self.pruning_ratio is None:
            self.pruning_ratio = DEFAULT_PRUNING_RATIO
        if self.target_width is not None and (
            isinstance(self.target_width, bool) or not isinstance(self.target_width, int) or self.target_width <= 0
        ):
            raise ValueError(
                f"PatConfig.target_width must be a positive integer below the hidden size, got {self.target_width!r}."
            )
        if self.pruning_ratio is not None and not 0.0 < self.pruning_ratio < 1.0:
            raise ValueError(f"PatConfig.pruning_ratio must be in (0, 1), got {self.pruning_ratio!r}.")
        for name in ("width_multiple", "hsm_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"PatConfig.{name} must be a positive integer, got {value!r}.")
        if self.schedule_steps != "auto" and (
            isinstance(self.schedule_steps, bool) or not isinstance(self.schedule_steps, int) or self.schedule_steps < 2
        ):
            raise ValueError(
                f"PatConfig.schedule_steps must be 'auto' or an integer >= 2, got {self.schedule_steps!r}."
            )
        if self.mask_init not in ("activation", "norm_output", "zeros"):
            raise ValueError(
                f"PatConfig.mask_init must be 'activation', 'norm_output' or 'zeros', got {self.mask_init!r}."
            )
        if self.protect_ratio is not None and not self.protect_ratio > 1.0:
            raise ValueError(
                f"PatConfig.protect_ratio must be above 1 (a multiple of the median channel's RMS) or None, got "
                f"{self.protect_ratio!r}."
            )
        if self.frozen_gate not in ("hard", "soft"):
            raise ValueError(f"PatConfig.frozen_gate must be 'hard' or 'soft', got {self.frozen_gate!r}.")
        for name in ("mask_loss_weight", "count_loss_weight", "identity_loss_weight", "distill_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"PatConfig.{name} must be >= 0, got {getattr(self, name)}.")
        if isinstance(self.lora_r, bool) or not isinstance(self.lora_r, int) or self.lora_r < 0:
            raise ValueError(f"PatConfig.lora_r must be an integer >= 0 (0 turns LoRA off), got {self.lora_r!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"PatConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if self.lora_target_modules is not None:
            self.lora_target_modules = sorted(set(self.lora_target_modules))
            unknown = [n for n in self.lora_target_modules if n not in DECODER_LINEARS]
            if unknown:
                raise ValueError(
                    f"PatConfig.lora_target_modules: {unknown} are not decoder linears of a Llama-family block; "
                    f"choose among {list(DECODER_LINEARS)}."
                )
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)

    def kept_width(self, hidden_size: int) -> int:
        """d', the number of hidden channels the pruned model keeps, for a model of hidden size ``hidden_size``."""
        if self.target_width is not None:
            width = self.target_width
            if width >= hidden_size:
                raise ValueError(
                    f"PatConfig.target_width={width} must be below the model's hidden size {hidden_size} (PAT "
                    "removes hidden channels)."
                )
            return width
        width = round(hidden_size * (1.0 - self.pruning_ratio)) // self.width_multiple * self.width_multiple
        if not 0 < width < hidden_size:
            raise ValueError(
                f"pruning_ratio={self.pruning_ratio} with width_multiple={self.width_multiple} leaves {width} of "
                f"{hidden_size} hidden channels; choose values that keep between 1 and {hidden_size - 1}."
            )
        return width

    def lora_targets(self) -> tuple[str, ...]:
        """Names of the decoder linears that get LoRA (empty without LoRA)."""
        if self.lora_r == 0:
            return ()
        return tuple(self.lora_target_modules) if self.lora_target_modules is not None else DECODER_LINEARS
