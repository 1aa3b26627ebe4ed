"""One training-hook protocol for every petuning method.

Some methods need more than the task loss: SORSA's orthonormal regularizer, PAT's mask schedule and
auxiliary losses, masked tuning's gradient dropout. A method takes part by inheriting
:class:`TrainingHooksMixin` on its tuner (or its layers) and overriding any of four hooks. This module
knows no method by name; it finds the providers on the model and calls them at fixed points:

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

Gradient-level hooks work on the raw parameters with ``torch.autograd.grad`` and write into ``.grad``,
so under DDP no second backward runs through the wrapper: every rank holds the same parameters and adds
the same correction.
"""

from __future__ import annotations

import functools
import os
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
    (1.0 when the driver does not say; see :class:`AuxiliaryLossMixin`)."""

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


class AuxiliaryLossMixin(TrainingHooksMixin):
    """Tuner mixin (put it before ``BaseTuner``) that adds the auxiliary losses of the tuner and its layers to
    the wrapped model's ``outputs.loss``, in training mode, when a loss was computed.

    It works through a forward hook on the wrapped model, so it acts for every ``PeftModel`` task type (the
    generic ``PeftModel`` calls the wrapped model directly, not the tuner) and under ``Trainer``, TRL and DDP
    (the term is part of the same graph). The hook is removed by ``unload()`` / ``merge_and_unload()``.

    Normalization follows the task loss: when the driver passes ``num_items_in_batch`` (``transformers.Trainer``
    with gradient accumulation normalizes the loss over the whole accumulated batch and does not divide by the
    number of micro-batches), the term of a micro-batch is weighted by its share of the label tokens, so each
    optimizer step sees it exactly once, whatever the accumulation and world size.
    """

    _auxiliary_loss_handle = None

    def _post_injection_hook(self, model: nn.Module, config, adapter_name: str) -> None:
        super()._post_injection_hook(model, config, adapter_name)
        if self._auxiliary_loss_handle is None:
            self._auxiliary_loss_handle = model.register_forward_hook(
                functools.partial(_add_auxiliary_loss, self), with_kwargs=True
            )

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any):
        if self._auxiliary_loss_handle is not None:
            self._auxiliary_loss_handle.remove()
            self._auxiliary_loss_handle = None
        return super()._unload_and_optionally_merge(*args, **kwargs)


def _add_auxiliary_loss(tuner: nn.Module, module: nn.Module, args: tuple, kwargs: dict, output: Any):
    """Forward hook of the wrapped model: runs the providers' ``petuning_training_forward``, then
    ``output.loss += share * auxiliary_loss(tuner)``."""
    if not module.training or not torch.is_grad_enabled():
        return None
    share = _micro_batch_share(module, kwargs)
    training_forward(tuner, ForwardContext(module, args, kwargs, output, share))
    loss = getattr(output, "loss", None)
    if loss is None:
        return None
    extra = auxiliary_loss(tuner)
    if extra is None:
        return None
    output.loss = loss + share * extra.to(loss.dtype)
    return output


def _micro_batch_share(module: nn.Module, kwargs: dict) -> torch.Tensor | float:
    """This micro-batch's share of the label tokens of the optimizer step, when the driver says how many there
    are (``num_items_in_batch``), counted as the driver counts them; else 1."""
    total = kwargs.get("num_items_in_batch")
    labels = kwargs.get("shift_labels")
    if labels is None:
        labels = kwargs.get("labels")
        config = getattr(module, "config", None)
        if labels is not None and type(module).__name__.endswith("ForCausalLM") and not getattr(config, "is_encoder_decoder", False):
            labels = labels[..., 1:]  # causal LM losses predict label i+1 at position i
    if total is None or labels is None:
        return 1.0
    return labels.ne(-100).sum() / total


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
    """Every module of ``model`` that implements the protocol, each once, in module order."""
    return [m for m in unwrap_model(model).modules() if isinstance(m, TrainingHooksMixin)]


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

    def __enter__(self) -> "TrainingHooks":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _innermost_optimizer(optimizer) -> torch.optim.Optimizer:
    """accelerate's ``AcceleratedOptimizer`` wraps the real optimizer as ``.optimizer``; hook the real one so
    the hooks fire only when a step really happens."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer

