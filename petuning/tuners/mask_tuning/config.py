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

    Every targeted weight W stays frozen. The adapter learns real-valued scores m for a share of its entries
    (``mask_share``, the largest |W| by default) and the layer computes with ``W ⊙ M``, where M is 0 on the
    entries the adapter masks and 1 elsewhere. The binarization passes the gradient straight through
    (dL/dm = dL/dM = dL/dW_eff ⊙ W). The initial model is exactly the base model. Which entries are masked:

    - ``mask_mode="budget"`` (default): after each optimizer step, each layer masks the ``k_t`` lowest-scored of
      its entries whose score has reached ``threshold``, where ``k_t / W.numel()`` follows a cubic ramp from 0 at
      ``budget_start_step`` to ``masked_budget`` at ``budget_end_step`` (movement pruning's schedule) and stays
      there. A step may also swap up to ``budget_swap_share * k_t`` masked entries for lower-scored ones; an entry
      whose score climbs back above the threshold is unmasked. Under Adam a score falls by about one learning
      rate per step while its gradient keeps one sign, so reaching the threshold takes sustained evidence
      (``(mask_init - threshold) / lr`` steps of it), and among those that did, the lowest scores are the most
      consistent. The budget caps how many can flip, so the paper's mass flips cannot happen, and it is never
      exceeded. Needs petuning's training driver.
    - ``mask_mode="threshold"``: the paper's rule ``M = 1[m > threshold]``. Adam moves every score by about one
      learning rate per step whatever its gradient's size, so scores whose gradients keep one sign cross together
      (on SmolLM2 all-linear at lr 2e-4 this masks millions of weights around step 25 and the model collapses).

    Training terms, applied through petuning's training hooks (``petuning.PetuningCallback`` for
    ``transformers.Trainer`` / TRL, ``petuning.TrainingHooks`` for plain loops):

    - ``l2_weight * sum over layers of ||m||_2`` (unsquared, per score tensor) is added to the loss; its gradient
      pushes every score towards masking (threshold mode's sparsity pressure; budget mode has the budget).
    - gradient dropout (``gradient_dropout=True``): the gradient of ``KL(p_base || p_tuned)`` (averaged over the
      label positions) with respect to m, where ``p_base`` is the model with its masked-tuning adapters disabled.
      Each score's task gradient is kept when it agrees in sign with the KL gradient, else kept with probability
      ``|g_task| / (|g_task| + |g_kl|)``; dropped gradients are scaled by ``1 - gradient_dropout_lambda``.

    The saved adapter holds the positions the masks zero (a bitmap or delta-coded positions, whichever is
    smaller) unless ``save_scores=True`` or a training run is saving a checkpoint, which also keep the float
    scores and the scored entries so that training resumes exactly.
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
        default=0.1,
        metadata={
            "help": "Share in (0, 1] of each targeted weight's entries that get a mask score (only those can be "
            "masked). The entries are chosen per layer, at creation by largest |W| and, for the gradient-based "
            "choice, by `select_masked_weights(batches)` before training. 1.0 scores every entry (scores have the "
            "weight's shape; float32 scores, gradients and Adam moments then cost 16 bytes per weight entry)."
        },
    )
    mask_mode: str = field(
        default="budget",
        metadata={
            "help": "'budget': the k_t lowest-scored entries of each layer are masked, k_t ramping to `masked_budget` "
            "(stable on LLMs). 'threshold': the paper's M = 1[m > threshold] (mass flips under Adam on LLMs)."
        },
    )
    masked_budget: float = field(
        default=0.001,
        metadata={
            "help": "Budget mode: share of each targeted weight's entries masked at the end of the ramp; at most "
            "`mask_share`. On SmolLM2 (all linear layers, 100 steps) 0.1% learns the task with +0.09 nats of "
            "general-text loss, 0.25% forgets +0.70 and 2% collapses: the scored entries are the largest weights."
        },
    )
    budget_start_step: Optional[int] = field(
        default=None,
        metadata={
            "help": "Budget mode: optimizer steps with nothing masked, while the scores gather evidence. None: 5% of "
            "the run's max_steps (from the Trainer or `TrainingHooks(max_steps=...)`)."
        },
    )
    budget_end_step: Optional[int] = field(
        default=None,
        metadata={"help": "Budget mode: step at which the ramp reaches `masked_budget`. None: 70% of max_steps."},
    )
    budget_swap_share: float = field(
        default=0.05,
        metadata={
            "help": "Budget mode: per optimizer step, at most this share of the current budget may be swapped for "
            "lower-scored entries (besides the entries the ramp adds). 0 freezes masked entries once chosen."
        },
    )
    mask_init: float = field(
        default=1e-2, metadata={"help": "Initial value of every score (paper: 1e-2). Must exceed `threshold`."}
    )
    threshold: float = field(
        default=5e-3,
        metadata={
            "help": "Threshold tau (paper: 5e-3). Threshold mode: M = 1[m > tau]. Budget mode: only entries with "
            "m <= tau can be masked (the evidence an entry needs)."
        },
    )
    l2_weight: Optional[float] = field(
        default=None,
        metadata={
            "help": "Weight of the L2 term sum ||m||_2 added to the loss. None: the paper's 1e-4 in threshold mode, "
            "0 (off) in budget mode, where the budget sets the sparsity."
        },
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
    gradient_dropout_batch_share: float = field(
        default=0.25,
        metadata={
            "help": "Share in (0, 1] of each micro-batch's examples (the first ones) on which the KL gradient is taken. "
            "1.0 is the paper (the whole batch, from the training forward's own graph: one extra no-grad forward and "
            "one extra backward, about 2.9x a LoRA step). Below 1, those examples are forwarded again with and without "
            "the masks, which costs that share of a forward and backward."
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
        metadata={
            "help": "Also save the float scores and the scored entries (to resume training); by default only the "
            "positions the masks zero are saved (what inference needs)."
        },
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules to train fully and save, e.g. a classifier head."}
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: all scores start at `mask_init` and nothing is masked (the base model). False (for tests): "
            "seeded scores spread around the threshold, so about half of the scored entries start masked in "
            "threshold mode, and the lowest-scored `masked_budget` share in budget mode."
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
        if self.mask_mode not in ("budget", "threshold"):
            raise ValueError(f"MaskTuningConfig.mask_mode must be 'budget' or 'threshold', got {self.mask_mode!r}.")
        if self.l2_weight is None:
            self.l2_weight = 1e-4 if self.mask_mode == "threshold" else 0.0
        if self.mask_mode == "budget":
            self._check_budget()
        if self.l2_weight < 0:
            raise ValueError(f"MaskTuningConfig.l2_weight must be >= 0, got {self.l2_weight}.")
        if not 0.0 < self.gradient_dropout_batch_share <= 1.0:
            raise ValueError(
                f"MaskTuningConfig.gradient_dropout_batch_share must be in (0, 1], got {self.gradient_dropout_batch_share}."
            )
        if not 0.0 <= self.gradient_dropout_lambda <= 1.0:
            raise ValueError(
                f"MaskTuningConfig.gradient_dropout_lambda must be in [0, 1], got {self.gradient_dropout_lambda}."
            )

    def _check_budget(self) -> None:
        if not 0.0 < self.masked_budget <= self.mask_share:
            raise ValueError(
                f"MaskTuningConfig.masked_budget must be in (0, mask_share = {self.mask_share}] (only scored entries "
                f"can be masked), got {self.masked_budget}. Lower masked_budget or raise mask_share."
            )
        if not 0.0 <= self.budget_swap_share <= 1.0:
            raise ValueError(f"MaskTuningConfig.budget_swap_share must be in [0, 1], got {self.budget_swap_share}.")
        start, end = self.budget_start_step, self.budget_end_step
        for name, value in (("budget_start_step", start), ("budget_end_step", end)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"MaskTuningConfig.{name} must be a step count >= 0 or None (auto), got {value!r}.")
        if start is not None and end is not None and end <= start:
            raise ValueError(f"MaskTuningConfig.budget_end_step ({end}) must be after budget_start_step ({start}).")

    def budget_steps(self, max_steps: Optional[int]) -> tuple[int, int]:
        """``(start, end)`` of the budget ramp in optimizer steps, the automatic ones from ``max_steps``."""
        start, end = self.budget_start_step, self.budget_end_step
        if (start is None or end is None) and not max_steps:
            raise ValueError(
                "Masked tuning's budget ramp follows the run's length, but the training driver does not know it: "
                "pass max_steps to petuning.TrainingHooks(model, optimizer, max_steps=...) (Trainer and TRL pass it "
                "themselves), or set MaskTuningConfig(budget_start_step=..., budget_end_step=...)."
            )
        if start is None:
            start = min(round(0.05 * max_steps), (end if end is not None else max_steps) - 1)
        if end is None:
            end = max(round(0.7 * max_steps), start + 1)
        return start, end

    def budget_share(self, step: int, max_steps: Optional[int]) -> float:
        """Share of each layer's entries masked after ``step`` optimizer steps: 0 until the ramp starts, then
        ``masked_budget * (1 - (1 - progress)^3)``, then ``masked_budget``."""
        start, end = self.budget_steps(max_steps)
        progress = min(max((step - start) / (end - start), 0.0), 1.0)
        return self.masked_budget * (1.0 - (1.0 - progress) ** 3)

    def largest_step_share(self, max_steps: Optional[int]) -> float:
        """The ramp's steepest growth in one step (its first): ``3 * masked_budget / (end - start)``. Entries that
        reach the threshold late are added at most this fast, so no step masks more than the schedule ever does."""
        start, end = self.budget_steps(max_steps)
        return 3.0 * self.masked_budget / (end - start)
