"""Masked-tuning tuner: injects :class:`~petuning.tuners.mask_tuning.layer.Linear`, keeps budget-mode masks on their
schedule, stores the masked positions compactly, and applies R-AMT's L2 term and gradient dropout through
petuning's training hooks."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Optional

import torch
import torch.distributed as dist
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, resolve_quantization_backend
from torch import nn
from torch.distributed.tensor import DTensor
from transformers.pytorch_utils import Conv1D

from petuning.training import (
    ForwardContext,
    StepContext,
    TrainingHooksMixin,
    in_training_run,
    predicted_labels,
    refuse_gradient_edits_under_deepspeed,
)
from petuning.tuners.base import PetuningTuner
from petuning.tuners.common import base_of, eval_logits, forward_logits, full_tensor, kl_to_reference, several_ranks

from .config import MaskTuningConfig
from .layer import Linear, MaskTuningLayer, largest_magnitude

SCORES = "mask_tuning_scores"
MASK = "mask_tuning_mask"
"""Container of the compactly stored masked positions (state-dict key ``<layer>.mask_tuning_mask.<adapter>._extra_state``)."""
INDICES = "mask_tuning_indices"
MASS_FLIP_SHARE = 0.01
"""Threshold mode: one optimizer step that masks more than this share of an adapter's scored entries triggers a
warning."""


def gradient_dropout(
    g_task: torch.Tensor, g_kl: torch.Tensor, strength: float, uniform: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """R-AMT's gradient dropout rule, elementwise. Returns the new task gradient and the boolean "kept" tensor.

    A task gradient is kept when it agrees in sign with the KL gradient (``g_task * g_kl >= 0``), else kept when
    ``uniform < |g_task| / (|g_task| + |g_kl|)``; a dropped gradient is multiplied by ``1 - strength``.
    ``uniform`` holds draws from U[0, 1) of the gradients' shape.
    """
    agree = (g_task * g_kl) >= 0
    total = g_task.abs() + g_kl.abs()
    keep_prob = torch.where(total > 0, g_task.abs() / total.clamp_min(torch.finfo(total.dtype).tiny), 1.0)
    kept = agree | (uniform < keep_prob)
    return torch.where(kept, g_task, g_task * (1.0 - strength)), kept


def label_positions(ctx: ForwardContext, logits: torch.Tensor) -> Optional[torch.Tensor]:
    """Boolean tensor of ``logits.shape[:-1]``: the positions the task loss scores (:func:`predicted_labels`), or
    else those with ``attention_mask == 1``; None when neither fits the logits."""
    for positions in (predicted_labels(ctx.model, ctx.kwargs), ctx.kwargs.get("attention_mask")):
        if isinstance(positions, torch.Tensor) and positions.shape == logits.shape[:-1]:
            return positions != 0
    return None


class MaskTuningModel(TrainingHooksMixin, PetuningTuner):
    """Adds masked-tuning adapters to a model. Created by ``peft.get_peft_model(model, MaskTuningConfig(...))``.

    Besides PEFT's tuner API it offers :meth:`select_masked_weights` (gradient-based choice of the entries that get
    scores when ``mask_share < 1``), :meth:`mask_statistics` / :meth:`masked_share` (how much of the targeted
    weights is masked out), and implements petuning's training hooks: the L2 term, gradient dropout, and the
    metrics ``mask_tuning_masked_share`` and ``mask_tuning_gradient_dropped_share``.
    """

    method_label = "masked-tuning"
    size_settings = "mask_share"
    prefix: str = "mask_tuning_"
    tuner_layer_cls = MaskTuningLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    _kl_weight = 0.0  # sum of the micro-batch shares whose KL gradients are accumulated in the layers
    _kl_forwards = 0  # forwards since the last optimizer step that applied gradient dropout
    _dropped_share: Optional[float] = None
    _masked_counts: Optional[dict[str, int]] = None  # masked scored entries per adapter after the last step
    _warned_mass_flip: tuple[str, ...] = ()  # adapters already warned about a mass flip

    def __init__(self, *args, **kwargs) -> None:
        self._newly_masked: dict[str, int] = {}  # budget mode: entries masked by the last step, per adapter
        self._undriven_versions: dict[str, int] = {}  # budget mode: score versions seen in forwards without a driver
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------------------------ injection
    def _layer_kwargs(
        self, config: MaskTuningConfig, adapter_name: str, key: str, target_name: str, target: nn.Module
    ) -> dict:
        return {
            "mask_share": config.mask_share,
            "mask_init": config.mask_init,
            "threshold": config.threshold,
            "init_weights": config.init_weights,
            "budgeted": config.mask_mode == "budget",
            "initial_budget": config.masked_budget,
        }

    def _create_new_module(self, config: MaskTuningConfig, adapter_name: str, target: nn.Module, key: str, **kwargs):
        base = base_of(target)
        if resolve_quantization_backend(base) is not None:
            raise TypeError(
                f"Masked tuning cannot target {key!r} ({type(base).__name__}): it multiplies the weight elementwise, "
                "which a quantized weight does not allow. Load the model in float32/bfloat16/float16."
            )
        if isinstance(base, Conv1D):
            fan_in_fan_out = True
        elif isinstance(base, nn.Linear):
            fan_in_fan_out = False
        else:
            raise TypeError(
                f"Masked tuning cannot target {key!r} of type {type(base).__name__}: it masks the weight matrix of "
                "a linear layer (torch.nn.Linear or transformers' Conv1D). Leave it out of target_modules (or add "
                "it to exclude_modules)."
            )
        if hasattr(base.weight, "ds_id"):
            raise RuntimeError(
                f"Masked tuning cannot target {key!r} under DeepSpeed ZeRO-3: it multiplies the base weight itself "
                "inside its own forward, and ZeRO-3 partitions that weight across ranks (gathering it only for the "
                "base layer's forward). Use ZeRO-2, DDP or FSDP2 for masked tuning."
            )
        if not base.weight.dtype.is_floating_point:
            raise TypeError(
                f"Masked tuning needs a floating-point weight, but {key!r} has dtype {base.weight.dtype}. Load the "
                "model in float32/bfloat16/float16."
            )
        return Linear(target, adapter_name, fan_in_fan_out=fan_in_fan_out, **kwargs)

    # ------------------------------------------------------------------------------------ save/load
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """PEFT's selection: the compactly stored masked positions, plus the float scores and the scored entries'
        indices only if ``config.save_scores`` or while a training run is in progress (a Trainer checkpoint must
        resume exactly)."""
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        if getattr(config, "save_scores", True) or in_training_run(model):
            return selected
        dropped = (f".{SCORES}.{adapter_name}", f".{INDICES}.{adapter_name}")
        return {k: v for k, v in selected.items() if not k.endswith(dropped)}

    @classmethod
    def _check_state_dict_for_load(cls, model, config, adapter_name: str, remapped: dict) -> dict:
        """A compact file carries only the masked positions: the scores and scored entries a new adapter starts
        with are added (real tensors, so a meta-initialized adapter loads too; the positions are applied when
        their extra state is read, see ``MaskedPositions``). Then the shape check every tuner does."""
        suffix = f".{MASK}.{adapter_name}._extra_state"
        for layer_key in [k.removesuffix(suffix) for k in remapped if k.endswith(suffix)]:
            layer = model.get_submodule(layer_key)
            scores_key, indices_key = f"{layer_key}.{SCORES}.{adapter_name}", f"{layer_key}.{INDICES}.{adapter_name}"
            if scores_key not in remapped:
                shape = layer.mask_tuning_scores[adapter_name].shape
                remapped[scores_key] = torch.full(shape, config.mask_init, dtype=torch.float32)
            if adapter_name in layer.mask_tuning_indices and indices_key not in remapped:
                k = layer.mask_tuning_indices[adapter_name].numel()
                remapped[indices_key] = largest_magnitude(layer.get_base_layer().weight, k).to(torch.int32)
        return super()._check_state_dict_for_load(model, config, adapter_name, remapped)

    # ------------------------------------------------------------------------------------- queries
    def _layers(self, adapter_name: str) -> list[tuple[str, MaskTuningLayer]]:
        return self.petuning_layers(adapter_name)

    def mask_statistics(self, adapter_name: Optional[str] = None) -> dict[str, int]:
        """Entry counts over the targeted weights of ``adapter_name`` (default: the first active adapter):
        ``total`` entries, ``scored`` entries that carry a score, ``masked`` entries whose mask is 0."""
        name = self._resolve_adapter(adapter_name)
        stats = {"total": 0, "scored": 0, "masked": 0}
        sharded_masked = 0
        sharded = False
        for _, layer in self._layers(name):
            scores = layer.mask_tuning_scores[name].detach()
            stats["total"] += layer.get_base_layer().weight.numel()
            stats["scored"] += scores.numel()  # a DTensor's numel is the whole tensor's
            if isinstance(scores, DTensor) and not layer.budgeted(name):  # threshold mode: this rank's shard
                sharded = True
                sharded_masked += int(_local(layer.off(name)).sum())
            else:
                stats["masked"] += int(layer.off(name).sum())
        if sharded:  # FSDP2: each rank counted its shard
            masked = torch.tensor(sharded_masked)
            dist.all_reduce(masked)
            stats["masked"] += int(masked)
        return stats

    def masked_share(self, adapter_name: Optional[str] = None) -> float:
        """Share of the targeted weights' entries that ``adapter_name`` masks out (sets to 0)."""
        stats = self.mask_statistics(adapter_name)
        return stats["masked"] / max(stats["total"], 1)

    # ------------------------------------------------------------------------------------ selection
    @torch.no_grad()
    def select_masked_weights(
        self,
        batches: Iterable,
        loss_fn: Optional[Callable[[nn.Module, object], torch.Tensor]] = None,
        adapter_name: Optional[str] = None,
    ) -> dict[str, int]:
        """Choose, per layer, which ``round(mask_share * numel)`` entries get a score: those with the largest
        ``|dL/dm|`` at the all-ones mask, i.e. ``|(sum over batches of dL/dW) ⊙ W|`` (the first-order change of
        the loss when the entry is masked). Resets the scores to ``mask_init``; call it before creating the
        optimizer.

        ``batches``: an iterable of model inputs (dicts are passed as ``model(**batch)``); ``loss_fn(model, batch)``
        returns the loss, by default ``model(**batch).loss``. The model runs in eval mode (no dropout). Memory: one
        float32 accumulator of each targeted weight's size while it runs. Returns ``{layer name: entries chosen}``.
        """
        name = self._resolve_adapter(adapter_name)
        config = self.peft_config[name]
        layers = [(n, layer) for n, layer in self._layers(name) if name in layer.mask_tuning_indices]
        if not layers:
            raise ValueError(
                f"Adapter {name!r} has mask_share={config.mask_share}: every entry of the targeted weights already has "
                "a score, so there is nothing to select. Use mask_share < 1 to mask only the most important entries."
            )
        probes = {}
        for _, layer in layers:
            weight = layer.get_base_layer().weight
            probes[layer] = torch.full(weight.shape, config.mask_init, dtype=torch.float32, device=weight.device)
        importance = {layer: torch.zeros_like(p) for layer, p in probes.items()}
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        n_batches = 0
        try:
            for layer, probe in probes.items():
                layer._mask_tuning_probes[name] = probe.requires_grad_(True)
            for batch in batches:
                with torch.enable_grad():
                    loss = loss_fn(self.model, batch) if loss_fn else _default_loss(self.model, batch)
                    grads = torch.autograd.grad(loss, list(probes.values()), allow_unused=True)
                for layer, grad in zip(probes, grads):
                    if grad is not None:
                        importance[layer] += grad
                n_batches += 1
        finally:
            for layer in probes:
                layer._mask_tuning_probes.pop(name, None)
            for module, training in modes:
                module.training = training
        if n_batches == 0:
            raise ValueError("select_masked_weights got no batches: pass an iterable of at least one model input.")
        chosen = {}
        for layer_name, layer in layers:
            indices = layer.mask_tuning_indices[name]
            top = torch.topk(importance[layer].abs().reshape(-1), indices.numel()).indices.sort().values
            indices.copy_(top.to(indices.dtype))
            layer.mask_tuning_scores[name].fill_(config.mask_init)
            if layer.budgeted(name):
                layer.mask_tuning_off[name].zero_()
            chosen[layer_name] = indices.numel()
        return chosen

    # ------------------------------------------------------------------------------ training hooks
    def _trained(
        self, with_gradient_dropout: bool = False
    ) -> Iterator[tuple[str, MaskTuningConfig, list[MaskTuningLayer]]]:
        """Active adapters whose scores train (optionally only those with gradient dropout on)."""
        for name in self.active_adapters:
            config = self.peft_config.get(name)
            if not isinstance(config, MaskTuningConfig) or (with_gradient_dropout and not config.gradient_dropout):
                continue
            layers = [layer for _, layer in self._layers(name) if layer.mask_tuning_scores[name].requires_grad]
            if layers:
                yield name, config, layers

    def petuning_auxiliary_loss(self) -> Optional[torch.Tensor]:
        """``l2_weight * sum over layers of ||m||_2`` for every training adapter."""
        terms = [
            config.l2_weight
            * torch.stack([full_tensor(layer.mask_tuning_scores[name].norm()) for layer in layers]).sum()
            for name, config, layers in self._trained()
            if config.l2_weight > 0
        ]
        return torch.stack(terms).sum() if terms else None

    def petuning_training_forward(self, ctx: ForwardContext) -> None:
        """Gradient dropout, first half: the gradient of ``KL(p_base || p_tuned)`` on this batch with respect to the
        scores, the reference being the same model with its masked-tuning adapters disabled. Accumulated (weighted
        by the micro-batch share) until the optimizer step."""
        self._refuse_budget_without_driver(ctx.model)
        adapters = list(self._trained(with_gradient_dropout=True))
        if not adapters:
            return
        refuse_gradient_edits_under_deepspeed(
            "Masked tuning's gradient dropout", "Set gradient_dropout=False under DeepSpeed, or train with DDP."
        )
        logits = forward_logits(
            ctx,
            "Masked tuning's gradient dropout",
            "Set gradient_dropout=False, or train with "
            "transformers' Trainer or petuning.TrainingHooks and a model whose output has logits.",
        )
        layers = [layer for _, _, ls in adapters for layer in ls]
        params = [layer.mask_tuning_scores[name] for name, _, ls in adapters for layer in ls]
        keys = [(layer, name) for name, _, ls in adapters for layer in ls]
        rows = logits.shape[0]
        n = math.ceil(min(config.gradient_dropout_batch_share for _, config, _ in adapters) * rows)
        share = float(ctx.share)
        if n >= rows:  # the whole micro-batch: differentiate this forward's own logits
            reference = eval_logits(ctx.model, ctx.args, ctx.kwargs, disabled=layers)
            kl = kl_to_reference(logits, reference, label_positions(ctx, logits))
            grads = torch.autograd.grad(kl * share, params, retain_graph=True, allow_unused=True)
        else:  # its first n rows, forwarded again with and without the masks
            sub = ForwardContext(ctx.model, *_leading_rows(ctx.args, ctx.kwargs, n, rows), None, ctx.share)
            reference = eval_logits(ctx.model, sub.args, sub.kwargs, disabled=layers)
            tuned = eval_logits(ctx.model, sub.args, sub.kwargs)
            kl = kl_to_reference(tuned, reference, label_positions(sub, tuned))
            grads = torch.autograd.grad(kl * share, params, allow_unused=True)
        if all(g is None for g in grads):
            raise RuntimeError(
                "Masked tuning's gradient dropout found no path from the logits to the mask scores, so it cannot take "
                "the KL gradient. Reentrant gradient checkpointing hides parameters from torch.autograd.grad: use "
                "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})."
            )
        with torch.no_grad():
            for (layer, name), grad in zip(keys, grads):
                if grad is None:
                    continue
                acc = layer.mask_tuning_kl_grad.get(name)
                layer.mask_tuning_kl_grad[name] = grad if acc is None else acc.add_(grad)
        self._kl_weight += share
        self._kl_forwards += 1
        if self._kl_forwards == 256:
            warnings.warn(
                "Masked tuning's gradient dropout has computed KL gradients for 256 forwards without an optimizer step "
                "applying them: attach petuning.PetuningCallback (Trainer/TRL) or petuning.TrainingHooks (plain loops), "
                "otherwise gradient dropout has no effect.",
                UserWarning,
                stacklevel=2,
            )

    def _refuse_budget_without_driver(self, model: nn.Module) -> None:
        """A budget-mode adapter masks only what the after-step hook schedules, so an optimizer that updates its
        scores without petuning's driver trains nothing. Detected at the next training forward: the scores changed
        in place (their version counter moved) and no driver ran."""
        if in_training_run(model):
            self._undriven_versions.clear()
            return
        for name, config, layers in self._trained():
            if config.mask_mode != "budget":
                continue
            version = sum(layer.mask_tuning_scores[name]._version for layer in layers)
            if self._undriven_versions.setdefault(name, version) != version:
                raise RuntimeError(
                    f"Masked-tuning adapter {name!r} (mask_mode='budget') is being trained without petuning's "
                    "training driver, so its masks never change: its budget schedule runs after each optimizer step. "
                    "Pass callbacks=[petuning.PetuningCallback()] to transformers' Trainer or TRL's trainers, or wrap "
                    "a plain loop in `with petuning.TrainingHooks(model, optimizer, max_steps=...):`. "
                    "(MaskTuningConfig(mask_mode='threshold') is the paper's rule, which needs no driver.)"
                )

    def _count_masked(self, threshold_only: bool = False) -> dict[str, tuple[int, int]]:
        """Training adapter -> (masked, scored) entries among its scored entries (this rank's shard of
        threshold-mode scores under FSDP)."""
        counts = {}
        for name, config, layers in self._trained():
            if threshold_only and config.mask_mode != "threshold":
                continue
            masked = sum(int(_local(layer.off(name)).sum()) for layer in layers)
            counts[name] = (masked, sum(_local(layer.mask_tuning_scores[name].detach()).numel() for layer in layers))
        return counts

    @torch.no_grad()
    def _advance_budgets(self, ctx: StepContext) -> None:
        """Budget mode: after optimizer step ``ctx.step + 1``, every layer masks its scheduled ``k_t`` lowest-scored
        entries among those whose score has reached the threshold, adding no more per step than the ramp's
        steepest step and swapping at most ``budget_swap_share * k_t`` of the masked ones; checked identical on
        every rank."""
        checks = []
        for name, config, layers in self._trained():
            if config.mask_mode != "budget":
                continue
            share = config.budget_share(ctx.step + 1, ctx.max_steps)
            growth = config.largest_step_share(ctx.max_steps)
            newly = 0
            for layer in layers:
                numel = layer.get_base_layer().weight.numel()
                masked = int(layer.mask_tuning_off[name].sum())
                # the schedule's k_t, reached no faster than the ramp's steepest step (scores may reach the
                # threshold late, all at once)
                target = min(round(share * numel), masked + math.ceil(growth * numel))
                scores = full_tensor(layer.mask_tuning_scores[name].detach())
                eligible = scores <= config.threshold  # evidence: the score has travelled the margin
                newly += advance_budget(layer.mask_tuning_off[name], scores, target, config.budget_swap_share, eligible)
                checks.append(layer.mask_tuning_off[name])
            self._newly_masked[name] = newly
        if checks and several_ranks():
            _check_identical_on_every_rank(checks)

    def petuning_after_optimizer_step(self, ctx: StepContext) -> None:
        """Budget mode: advance the masks along the schedule. Threshold mode: warn (once per adapter) when one
        optimizer step masks more than MASS_FLIP_SHARE of the scored entries."""
        self._advance_budgets(ctx)
        previous, self._masked_counts = self._masked_counts or {}, {}
        for name, (masked, scored) in self._count_masked(threshold_only=True).items():
            self._masked_counts[name] = masked
            newly = masked - previous.get(name, masked)
            if newly > MASS_FLIP_SHARE * scored and name not in self._warned_mass_flip:
                self._warned_mass_flip += (name,)
                warnings.warn(
                    f"Masked tuning: optimizer step {ctx.step + 1} masked {newly:,} more of adapter {name!r}'s "
                    f"{scored:,} scored weights ({newly / scored:.1%}) at once. Adam moves every score by about one "
                    "learning rate per step whatever its gradient's size, so scores whose gradients keep one sign "
                    "cross the threshold together, which can zero many large weights in one step (the loss usually "
                    "jumps). Use mask_mode='budget' (the default), or a smaller learning rate over more steps (R-AMT: "
                    "8e-5 for 30 epochs), fewer targets (R-AMT masks attention weights only), or a larger margin "
                    "mask_init - threshold.",
                    UserWarning,
                    stacklevel=2,
                )

    def petuning_before_optimizer_step(self, ctx: StepContext) -> None:
        """Before the first step, the masked counts the mass-flip check compares against; then gradient dropout's
        rule on the (clipped, final) task gradients."""
        if self._masked_counts is None:
            self._masked_counts = {
                name: masked for name, (masked, _) in self._count_masked(threshold_only=True).items()
            }
        self._apply_gradient_dropout(ctx)

    def _apply_gradient_dropout(self, ctx: StepContext) -> None:
        """Gradient dropout, second half: the paper's rule on the task gradients of the scores, against the KL
        gradients accumulated since the last step (averaged across ranks)."""
        pending = [
            (layer, name, config)
            for name, config, layers in self._trained(with_gradient_dropout=True)
            for layer in layers
            if name in layer.mask_tuning_kl_grad
        ]
        if not pending:
            return
        weight, self._kl_weight, self._kl_forwards = self._kl_weight, 0.0, 0
        kl_grads = [layer.mask_tuning_kl_grad.pop(name) / max(weight, 1e-12) for layer, name, _ in pending]
        if several_ranks():
            flat = torch.cat([g.reshape(-1) for g in kl_grads])  # every rank must make the same choices
            dist.all_reduce(flat, op=dist.ReduceOp.AVG)
            kl_grads = [chunk.view_as(g) for chunk, g in zip(flat.split([g.numel() for g in kl_grads]), kl_grads)]
        generator = torch.Generator().manual_seed(pending[0][2].gradient_dropout_seed * 1_000_003 + ctx.step)
        dropped = total = 0
        with torch.no_grad():
            for (layer, name, config), g_kl in zip(pending, kl_grads):
                param = layer.mask_tuning_scores[name]
                uniform = torch.rand(param.shape, generator=generator, dtype=torch.float32).to(param.device)
                if param.grad is None:
                    continue
                new, kept = gradient_dropout(
                    param.grad, g_kl.to(param.grad.dtype), config.gradient_dropout_lambda, uniform
                )
                param.grad.copy_(new)
                dropped += int((~kept).sum())
                total += kept.numel()
        self._dropped_share = dropped / max(total, 1)

    def petuning_metrics(self) -> dict[str, float]:
        if not self.active_adapters or not any(True for _ in self._layers(self.active_adapters[0])):
            return {}
        metrics = {"mask_tuning_masked_share": self.masked_share()}
        name = self.active_adapters[0]
        if name in self._newly_masked:
            metrics["mask_tuning_newly_masked"] = float(self._newly_masked[name])
        if self._dropped_share is not None:
            metrics["mask_tuning_gradient_dropped_share"] = self._dropped_share
        return metrics

    def _unload_and_optionally_merge(self, *args, **kwargs):
        for module in self.model.modules():
            if isinstance(module, MaskTuningLayer):
                module.mask_tuning_kl_grad.clear()
        return super()._unload_and_optionally_merge(*args, **kwargs)


def advance_budget(
    off: torch.Tensor, scores: torch.Tensor, target: int, swap_share: float, eligible: Optional[torch.Tensor] = None
) -> int:
    """Move the boolean masked set ``off`` (in place) towards the ``target`` lowest of the ``eligible`` ``scores``
    (all entries when None; same shapes). A masked entry that is no longer eligible is unmasked. The set then grows
    to ``target`` entries (or all eligible ones, if fewer) with the lowest unmasked scores, and at most
    ``ceil(swap_share * target)`` masked entries that are no longer among the lowest (highest scores first) are
    swapped for lower-scored ones. It never holds more than ``target`` entries afterwards (a smaller target
    unmasks the highest-scored). Returns the number of newly masked entries."""
    flat, s = off.view(-1), scores.reshape(-1).float()
    if eligible is not None:
        ok = eligible.reshape(-1)
        flat &= ok
        s = torch.where(ok, s, torch.inf)
        target = min(target, int(ok.sum()))
    target = min(max(target, 0), s.numel())
    masked = flat.nonzero().squeeze(1)
    if target < masked.numel():
        flat[masked[torch.topk(s[masked], masked.numel() - target).indices]] = False
    if target == 0 or (swap_share == 0 and target <= masked.numel()):
        return 0
    want = torch.zeros_like(flat)
    want[torch.topk(s, target, largest=False).indices] = True
    add = (want & ~flat).nonzero().squeeze(1)
    drop = (flat & ~want).nonzero().squeeze(1)
    n_swap = min(drop.numel(), math.ceil(swap_share * target))
    n_add = target - int(flat.sum()) + n_swap
    if n_swap:
        flat[drop[torch.topk(s[drop], n_swap).indices]] = False
    if n_add:
        flat[add[torch.topk(s[add], n_add, largest=False).indices]] = True
    return n_add


def _check_identical_on_every_rank(offs: list[torch.Tensor]) -> None:
    """Raise if the ranks' masked sets differ (their scores should be identical under DDP and FSDP2)."""
    fingerprint = (
        torch.stack([torch.stack([o.sum(), (o.reshape(-1).nonzero().squeeze(1) % 1_000_003).sum()]) for o in offs])
        .to(torch.float64)
        .cpu()
    )
    low, high = fingerprint.clone(), fingerprint.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(
            "Masked tuning's budget chose different masks on different ranks, so the replicas have diverged: every "
            "rank must hold the same scores (train under DDP or FSDP2 with the same seed on every rank)."
        )


def _leading_rows(args: tuple, kwargs: dict, n: int, rows: int) -> tuple[tuple, dict]:
    """The first ``n`` examples of a forward's inputs: every tensor whose first dimension is the batch (``rows``)
    is cut to its first ``n`` rows; everything else is passed as it is."""

    def cut(value):
        return value[:n] if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows else value

    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _default_loss(model: nn.Module, batch) -> torch.Tensor:
    output = model(**batch) if isinstance(batch, dict) else model(batch)
    loss = getattr(output, "loss", None)
    if loss is None:
        raise ValueError(
            "select_masked_weights could not find a loss: the model's output has no `loss` (pass `labels` in each "
            "batch) or pass loss_fn=lambda model, batch: ... returning a scalar."
        )
    return loss
