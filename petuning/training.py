"""One training-hook protocol for every petuning method.

Some methods need more than the task loss: SORSA's orthonormal regularizer, PAT's mask schedule and
auxiliary losses, masked tuning's gradient dropout. A method takes part by inheriting
:class:`TrainingHooksMixin` on its tuner (or its layers) and overriding any of the hooks below; a tuner
registers itself on the model it adapts (:func:`register_hook_provider`), so the hooks run whichever way the
adapter was attached (``get_peft_model``, TRL's ``peft_config=``, transformers' ``add_adapter`` /
``load_adapter``). This module knows no method by name; it finds the providers on the model and calls them
at fixed points:

================================  ===========================================================================
hook                              when
================================  ===========================================================================
``petuning_training_forward(ctx)`` in the model's forward (training mode, gradients on), before the loss term
``petuning_auxiliary_loss()``     in the model's forward, added to ``outputs.loss`` (training mode only)
``petuning_before_optimizer_step`` gradients are final: after backward, accumulation and clipping
``petuning_after_optimizer_step``  right after the optimizer updated the parameters
``petuning_metrics()``            when the trainer logs; values are floats
================================  ===========================================================================

Drivers:

- ``transformers.Trainer`` and TRL trainers: ``callbacks=[PetuningCallback()]``. Its
  ``on_pre_optimizer_step`` runs after gradient clipping and before ``optimizer.step()``.
- plain PyTorch or accelerate loops: ``TrainingHooks(model, optimizer)`` registers optimizer step pre/post
  hooks, which fire exactly once per real optimizer step (accelerate skips the step, and so the hooks,
  on accumulation micro-batches and on fp16 overflow).

While a driver runs, the model is marked as in a training run (:func:`in_training_run`): checkpoints written
then carry everything resuming needs.

Gradient-level hooks work on the raw parameters with ``torch.autograd.grad`` and write into ``.grad``,
so under DDP no second backward runs through the wrapper: every rank holds the same parameters and adds
the same correction.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from transformers import TrainerCallback


@dataclass
class StepContext:
    """What a gradient-level hook knows about the optimizer step it runs in.

    ``step`` counts optimizer steps completed before this one; ``max_steps`` is the planned total if the
    driver knows it; ``peak_lr`` is the configured (not the scheduled) learning rate.
    """

    step: int
    max_steps: Optional[int]
    peak_lr: Optional[float]


@dataclass
class ForwardContext:
    """What a forward-level hook knows about a training forward of the wrapped model: the model itself, the
    arguments it was called with, its output, and this micro-batch's share of the optimizer step's label tokens
    (1.0 when the driver does not say; see :func:`_add_auxiliary_loss`)."""

    model: nn.Module
    args: tuple
    kwargs: dict
    output: Any
    share: Any


class TrainingHooksMixin:
    """Hooks a tuner or tuner layer may override. The defaults do nothing."""

    def petuning_training_forward(self, ctx: ForwardContext) -> None:
        """Observe a training forward (for terms that need the batch or the outputs, e.g. a second forward on the
        same inputs). It may take gradients of its own terms with ``torch.autograd.grad(..., retain_graph=True)``
        and keep them for ``petuning_before_optimizer_step``; it must not call ``backward`` or touch ``.grad``.
        Forwards it runs itself must run without gradients (the hook does not fire for those)."""

    def petuning_auxiliary_loss(self) -> Optional[torch.Tensor]:
        """A scalar added to the task loss, or None."""
        return None

    def petuning_before_optimizer_step(self, ctx: StepContext) -> None:
        """Adjust ``.grad`` of trainable parameters; gradients are clipped and final."""

    def petuning_after_optimizer_step(self, ctx: StepContext) -> None:
        """React to the parameter update (schedules, projections, decoupled steps)."""

    def petuning_metrics(self) -> dict[str, float]:
        """Values to log, e.g. ``{"sorsa_orthonormality": 0.01}``."""
        return {}


# ------------------------------------------------------------------------------------------ providers
_PROVIDERS = "_petuning_hook_providers"
_FORWARD_HOOK = "_petuning_forward_hook"
_WARNED_NO_LOSS = "_petuning_warned_no_loss"
_TRAINING_RUN = "_petuning_training_run"


def register_hook_provider(model: nn.Module, provider: TrainingHooksMixin) -> None:
    """Make ``provider`` reachable from ``model`` and from every wrapper of it, and add its auxiliary losses to
    ``model``'s ``outputs.loss`` (one forward hook per model, see :func:`_add_auxiliary_loss`).

    The reference lives in ``model.__dict__``, outside the module tree, so a provider that nothing else holds (the
    tuner of transformers' ``add_adapter`` / ``load_adapter``, which keep the injected model and drop the tuner)
    still runs, and a tuner that holds ``model`` does not become a submodule of it. Idempotent."""
    providers = model.__dict__.setdefault(_PROVIDERS, [])
    if not any(p is provider for p in providers):
        providers.append(provider)
    if _FORWARD_HOOK not in model.__dict__:
        model.__dict__[_FORWARD_HOOK] = model.register_forward_hook(_add_auxiliary_loss, with_kwargs=True)


def unregister_hook_provider(model: nn.Module, provider: TrainingHooksMixin) -> None:
    """Undo :func:`register_hook_provider`; the forward hook goes with the last provider (``unload()`` leaves no
    hook behind)."""
    providers = [p for p in model.__dict__.get(_PROVIDERS, []) if p is not provider]
    if providers:
        model.__dict__[_PROVIDERS] = providers
        return
    model.__dict__.pop(_PROVIDERS, None)
    handle = model.__dict__.pop(_FORWARD_HOOK, None)
    if handle is not None:
        handle.remove()


def _add_auxiliary_loss(module: nn.Module, args: tuple, kwargs: dict, output: Any):
    """Forward hook of a model with registered providers, in training mode with gradients on: runs every provider's
    ``petuning_training_forward``, then ``output.loss += share * auxiliary_loss``.

    It sits on the wrapped model, so it acts for every ``PeftModel`` task type (the generic ``PeftModel`` calls the
    wrapped model directly, not the tuner) and under ``Trainer``, TRL and DDP (the term is part of the same graph).
    Normalization follows the task loss: when the driver passes ``num_items_in_batch`` (``transformers.Trainer`` with
    gradient accumulation normalizes the loss over the whole accumulated batch and does not divide by the number of
    micro-batches), the term of a micro-batch is weighted by its share of the label tokens, so each optimizer step
    sees it exactly once, whatever the accumulation and world size. Under TRL's SFTTrainer, whose fused LM head
    returns per-token log-probabilities and whose loss is computed from them, the term goes into those
    log-probabilities with the same share."""
    if not module.training or not torch.is_grad_enabled():
        return None
    share = _micro_batch_share(module, kwargs)
    training_forward(module, ForwardContext(module, args, kwargs, output, share))
    loss = getattr(output, "loss", None)
    extra = auxiliary_loss(module)
    if extra is None:
        return None
    if loss is None:  # e.g. a Trainer compute_loss_func, label smoothing, or a loop computing its own loss
        if not module.__dict__.get(_WARNED_NO_LOSS):
            module.__dict__[_WARNED_NO_LOSS] = True
            warnings.warn(
                "this training forward computes no loss (it got no labels), so petuning's auxiliary losses cannot be "
                "added to it; add petuning.auxiliary_loss(model) to your loss yourself (plain loops), or let the "
                "model compute the loss (Trainer without compute_loss_func or label smoothing)",
                stacklevel=2,
            )
        return None
    output.loss = loss + share * extra.to(loss.dtype)
    log_probs, scored = getattr(output, "log_probs", None), getattr(output, "label_mask", None)
    if isinstance(log_probs, torch.Tensor) and isinstance(scored, torch.Tensor):
        # TRL's fused LM head: SFTTrainer takes the loss as -sum(log_probs) / N (N: the step's label tokens), not
        # output.loss. Lowering each of this micro-batch's n scored log-probabilities by the term adds
        # n / N * term, the same share as above.
        output.log_probs = log_probs - extra.to(log_probs.dtype) * scored.to(log_probs.dtype)
    return output


def set_training_run(model: nn.Module, active: bool) -> None:
    """Mark that a driver (``PetuningCallback``, ``TrainingHooks``) is running a training run of ``model``. While it
    is, ``save_pretrained`` writes everything resuming needs (:func:`in_training_run`), so a Trainer checkpoint
    resumes exactly; outside, methods may save a compact final adapter."""
    root = unwrap_model(model)
    for module in root.modules():  # the root, and every model a tuner registered on
        if module is root or _PROVIDERS in module.__dict__:
            if active:
                module.__dict__[_TRAINING_RUN] = True
            else:
                module.__dict__.pop(_TRAINING_RUN, None)


def in_training_run(model: nn.Module) -> bool:
    """True while a driver runs a training run of ``model`` or of a model that contains it (see
    :func:`set_training_run`)."""
    return any(m.__dict__.get(_TRAINING_RUN, False) for m in unwrap_model(model).modules())


def _micro_batch_share(module: nn.Module, kwargs: dict) -> torch.Tensor | float:
    """This micro-batch's share of the label tokens of the optimizer step, when the driver says how many there
    are (``num_items_in_batch``), counted as the driver counts them; else 1."""
    total = kwargs.get("num_items_in_batch")
    scored = predicted_labels(module, kwargs)
    if total is None or scored is None:
        return 1.0
    return scored.sum() / total


def predicted_labels(module: nn.Module, kwargs: dict) -> Optional[torch.Tensor]:
    """Boolean tensor, in the layout of the model's positions, of those whose prediction the task loss scores
    (label != -100), from the forward's ``shift_labels`` or ``labels``; a causal LM's position i predicts label
    i + 1, so its last position predicts nothing. None without token labels."""
    labels = kwargs.get("shift_labels")
    if isinstance(labels, torch.Tensor):
        return labels.ne(-100)
    labels = kwargs.get("labels")
    if not isinstance(labels, torch.Tensor):
        return None
    scored = labels.ne(-100)
    config = getattr(module, "config", None)
    if type(module).__name__.endswith("ForCausalLM") and not getattr(config, "is_encoder_decoder", False):
        scored = torch.cat([scored[..., 1:], torch.zeros_like(scored[..., :1])], dim=-1)
    return scored


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/FSDP/DeepSpeed/``torch.compile`` wrappers that hold the real model as ``.module`` or
    ``._orig_mod``."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def deepspeed_active() -> bool:
    """True when training runs under DeepSpeed (launched by accelerate with a DeepSpeed config, or ZeRO-3 set up
    through transformers' integration)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return True
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def refuse_gradient_edits_under_deepspeed(feature: str, fix: str) -> None:
    """Raise if DeepSpeed runs the optimizer: a hook that edits ``.grad`` (or the parameters) around the optimizer
    step would then act on tensors the engine no longer reads (it keeps gradients and master weights in its own
    partitioned buffers and steps inside ``backward``), so ``feature`` would silently do nothing. ``fix`` names
    what works instead."""
    if deepspeed_active():
        raise RuntimeError(
            f"{feature} edits gradients around the optimizer step, but under DeepSpeed the engine keeps gradients "
            f"and master weights in its own buffers (and steps inside backward), so it would silently do nothing. "
            f"{fix}"
        )


def hook_providers(model: nn.Module) -> list[TrainingHooksMixin]:
    """Every provider reachable from ``model``, each once, in module order: modules that implement the protocol
    and providers registered on a module with :func:`register_hook_provider`."""
    found: dict[int, TrainingHooksMixin] = {}
    for module in unwrap_model(model).modules():
        for candidate in (module, *module.__dict__.get(_PROVIDERS, ())):
            if isinstance(candidate, TrainingHooksMixin):
                found.setdefault(id(candidate), candidate)
    return list(found.values())


def auxiliary_loss(model: nn.Module) -> Optional[torch.Tensor]:
    """Sum of all providers' auxiliary losses, or None. Plain loops that compute their own loss (instead of
    passing ``labels``) add this to it."""
    terms = [t for p in hook_providers(model) if (t := p.petuning_auxiliary_loss()) is not None]
    return torch.stack([t.float() for t in terms]).sum() if terms else None


def training_forward(model: nn.Module, ctx: ForwardContext) -> None:
    for provider in hook_providers(model):
        provider.petuning_training_forward(ctx)


def before_optimizer_step(model: nn.Module, ctx: StepContext) -> None:
    with torch.enable_grad():
        for provider in hook_providers(model):
            provider.petuning_before_optimizer_step(ctx)


def after_optimizer_step(model: nn.Module, ctx: StepContext) -> None:
    with torch.enable_grad():
        for provider in hook_providers(model):
            provider.petuning_after_optimizer_step(ctx)


def collect_metrics(model: nn.Module) -> dict[str, float]:
    metrics: dict[str, float] = {}
    with torch.no_grad():
        for provider in hook_providers(model):
            metrics.update(provider.petuning_metrics())
    return metrics


class PetuningCallback(TrainerCallback):
    """Runs petuning's training hooks inside ``transformers.Trainer`` (and TRL's trainers).

    ``trainer = Trainer(..., callbacks=[PetuningCallback()])``. Metrics are added to each log entry
    (progress bar and ``trainer.state.log_history``). ``report_to`` integrations such as W&B run before
    user callbacks; to have them record petuning's metrics too, use :func:`attach_to_trainer` instead.
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        set_training_run(model, True)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        set_training_run(model, False)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        before_optimizer_step(model, self._context(args, state))

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        after_optimizer_step(model, self._context(args, state))

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or model is None or "loss" not in logs:
            return
        metrics = collect_metrics(model)
        logs.update(metrics)
        if state.log_history:
            state.log_history[-1].update(metrics)

    @staticmethod
    def _context(args, state) -> StepContext:
        return StepContext(step=state.global_step, max_steps=state.max_steps or None, peak_lr=args.learning_rate)


def attach_to_trainer(trainer) -> PetuningCallback:
    """Add a :class:`PetuningCallback` to ``trainer`` ahead of its reporting callbacks and return it."""
    callback = PetuningCallback()
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


class TrainingHooks:
    """Runs petuning's training hooks in a plain PyTorch or accelerate loop.

    ::

        hooks = petuning.TrainingHooks(model, optimizer)   # after creating the LR scheduler is fine too
        for batch in loader:
            loss = model(**batch).loss                     # auxiliary losses already included
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()                               # hooks run here, after clipping
            optimizer.zero_grad()
            progress.set_postfix(hooks.metrics())

    ``peak_lr`` defaults to the largest ``initial_lr`` (set by LR schedulers) or ``lr`` of the optimizer's
    parameter groups, read at the first step. Use as a context manager, or call :meth:`remove`, to detach.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        peak_lr: Optional[float] = None,
        max_steps: Optional[int] = None,
    ) -> None:
        self.model = model
        self.optimizer = _innermost_optimizer(optimizer)
        self.peak_lr = peak_lr
        self.max_steps = max_steps
        self.step = 0
        self._handles = [
            self.optimizer.register_step_pre_hook(self._before),
            self.optimizer.register_step_post_hook(self._after),
        ]
        set_training_run(model, True)

    def _context(self) -> StepContext:
        if self.peak_lr is None:
            self.peak_lr = max(g.get("initial_lr", g["lr"]) for g in self.optimizer.param_groups)
        return StepContext(step=self.step, max_steps=self.max_steps, peak_lr=self.peak_lr)

    def _before(self, optimizer, args, kwargs) -> None:
        before_optimizer_step(self.model, self._context())

    def _after(self, optimizer, args, kwargs) -> None:
        after_optimizer_step(self.model, self._context())
        self.step += 1

    def metrics(self) -> dict[str, float]:
        return collect_metrics(self.model)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        set_training_run(self.model, False)

    def __enter__(self) -> TrainingHooks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _innermost_optimizer(optimizer) -> torch.optim.Optimizer:
    """accelerate's ``AcceleratedOptimizer`` wraps the real optimizer as ``.optimizer``; hook the real one so
    the hooks fire only when a step really happens."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer
