"""Sparse-plus-low-rank tuner: injects :class:`~petuning.tuners.sparse_low_rank.layer.Linear`, chooses
gradient-based supports, and applies the optional nuclear-norm regularizer through petuning's training hooks."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Optional

import torch
import torch.distributed as dist
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, get_quantization_kwargs
from torch import nn

from petuning.training import StepContext, TrainingHooksMixin, unwrap_model
from petuning.tuners.base import PetuningTuner
from petuning.tuners.common import base_of, linear_fan_in_fan_out, several_ranks

from .config import SparseLowRankConfig
from .layer import Linear, SparseLowRankLayer


class SparseLowRankModel(TrainingHooksMixin, PetuningTuner):
    """Adds sparse-plus-low-rank adapters to a model. Created by
    ``peft.get_peft_model(model, SparseLowRankConfig(...))``.

    Training hooks (``petuning.PetuningCallback`` / ``petuning.TrainingHooks``): the nuclear-norm regularizer is
    an auxiliary loss, and for ``support="gradient"`` with ``gradient_warmup_steps > 0`` the support is fixed
    after that many optimizer steps.
    """

    method_label = "sparse_low_rank"
    prefix: str = "sparse_low_rank_"
    tuner_layer_cls = SparseLowRankLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def __init__(self, model, config, adapter_name, **kwargs):
        self._nuclear_generators: dict[str, torch.Generator] = {}
        super().__init__(model, config, adapter_name, **kwargs)

    # ------------------------------------------------------------------------------------ injection
    def _layer_kwargs(
        self, config: SparseLowRankConfig, adapter_name: str, key: str, target_name: str, target: nn.Module
    ) -> dict:
        return {
            "r": config.r,
            "scaling": config.scaling,
            "density": config.density,
            "support": config.support,
            "seed": config.seed,
            "gradient_warmup_steps": config.gradient_warmup_steps,
            "dropout": config.dropout,
            "init_weights": config.init_weights,
            "module_name": key,
            "inference_mode": config.inference_mode,
            "strict_rank": config.strict_rank,
            **get_quantization_kwargs(self),
        }

    def _create_new_module(self, config: SparseLowRankConfig, adapter_name: str, target: nn.Module, key: str, **kwargs):
        fan_in_fan_out = linear_fan_in_fan_out(base_of(target), key, "sparse_low_rank", config.fan_in_fan_out)
        return Linear(target, adapter_name, fan_in_fan_out=fan_in_fan_out, **kwargs)

    # ------------------------------------------------------------------------------------- layers
    def sparse_low_rank_layers(self, adapter_name: str) -> list[SparseLowRankLayer]:
        """The layers that hold adapter ``adapter_name``, in module order."""
        return _layers(self.model, adapter_name)

    # ------------------------------------------------------------------------------ nuclear norm
    def nuclear_norm(self, adapter_name: Optional[str] = None, layers: Optional[list[SparseLowRankLayer]] = None):
        """``Σ ||ΔW||_*`` over ``layers`` (default: every layer of the adapter) of the full dense update, in float32
        or better with autocast off. Differentiable in A, B and the sparse values. A pending sparse part
        counts as zero."""
        name = adapter_name or self.active_adapters[0]
        layers = self.sparse_low_rank_layers(name) if layers is None else layers
        if not layers:
            raise ValueError(f"No sparse_low_rank layers hold adapter {name!r}.")
        device = layers[0].sparse_low_rank_values[name].device
        with torch.autocast(device_type=device.type, enabled=False):
            return torch.stack(
                [torch.linalg.svdvals(layer.delta_weight_out_in(name, allow_pending=True)).sum() for layer in layers]
            ).sum()

    def petuning_auxiliary_loss(self) -> Optional[torch.Tensor]:
        """``nuclear_norm_weight · Σ ||ΔW||_*`` over ``nuclear_norm_layers`` layers drawn at random per forward
        (SaRA's amortization; every rank draws the same layers), for each active adapter that trains."""
        terms = []
        for name in self.active_adapters:
            config = self.peft_config.get(name)
            if not isinstance(config, SparseLowRankConfig) or config.nuclear_norm_weight == 0:
                continue
            layers = [
                layer for layer in self.sparse_low_rank_layers(name) if layer.sparse_low_rank_values[name].requires_grad
            ]
            if not layers:
                continue
            if 0 < config.nuclear_norm_layers < len(layers):
                generator = self._nuclear_generators.setdefault(name, torch.Generator().manual_seed(config.seed))
                chosen = torch.randperm(len(layers), generator=generator)[: config.nuclear_norm_layers]
                layers = [layers[i] for i in sorted(chosen.tolist())]
            terms.append(config.nuclear_norm_weight * self.nuclear_norm(name, layers))
        return torch.stack(terms).sum() if terms else None

    # -------------------------------------------------------------------------- gradient support
    def petuning_after_optimizer_step(self, ctx: StepContext) -> None:
        """Fix gradient-chosen supports once their ``gradient_warmup_steps`` optimizer steps are done."""
        for name in self.active_adapters:
            config = self.peft_config.get(name)
            if not isinstance(config, SparseLowRankConfig) or config.gradient_warmup_steps == 0:
                continue
            if ctx.step + 1 < config.gradient_warmup_steps:
                continue
            pending = [layer for layer in self.sparse_low_rank_layers(name) if layer.support_pending(name)]
            if pending:
                _choose_supports(pending, name)

    def petuning_metrics(self) -> dict[str, float]:
        name = self.active_adapters[0] if self.active_adapters else None
        config = self.peft_config.get(name)
        if not isinstance(config, SparseLowRankConfig) or config.support != "gradient":
            return {}
        layers = self.sparse_low_rank_layers(name)
        return {"sparse_low_rank_pending_supports": float(sum(layer.support_pending(name) for layer in layers))}


def select_support_from_gradients(
    model: nn.Module,
    batches: Iterable,
    adapter_name: Optional[str] = None,
    loss_fn: Optional[Callable[[nn.Module, object], torch.Tensor]] = None,
) -> int:
    """Choose the pending ``support="gradient"`` supports of ``model`` from a few batches, in one call.

    For every batch the loss is computed (``model(**batch).loss`` for dict batches with labels, else
    ``loss_fn(model, batch)``) and backpropagated; each adapted layer adds the square of its weight gradient
    ``dL/dW = grad_outᵀ x`` to a float32 (out, in) score (RoSA's diagonal Fisher). The support becomes the
    ``round(density · out · in)`` entries with the largest scores. The model's mode (train/eval) is kept, the
    parameters' ``.grad`` are restored afterwards, and under ``torch.distributed`` the scores are summed over
    ranks first, so every rank chooses the same support. Memory: one float32 copy of each adapted weight while
    it runs.

    Works on a ``PeftModel``, on the tuner, and on a model prepared with ``inject_adapter_in_model``. Returns
    the number of batches used.
    """
    root = unwrap_model(model)
    name = adapter_name or _default_adapter(root)
    layers = _layers(root, name)
    if not layers:
        raise ValueError(f"No sparse_low_rank layers hold adapter {name!r}: is a SparseLowRankConfig adapter attached?")
    pending = [layer for layer in layers if layer.support_pending(name)]
    if not pending:
        raise ValueError(
            f"Adapter {name!r} has no support left to choose: supports are chosen once, from gradients only "
            "(support='gradient'). Create a fresh adapter to choose again."
        )
    saved_grads = {p: p.grad for p in root.parameters()}
    count = 0
    for layer in pending:
        layer._collecting.add(name)
    try:
        with torch.enable_grad():
            for batch in batches:
                loss = loss_fn(model, batch) if loss_fn is not None else _batch_loss(model, batch)
                loss.backward()
                count += 1
    finally:
        for layer in pending:
            layer._collecting.discard(name)
        for param, grad in saved_grads.items():
            param.grad = grad
    if count == 0:
        for layer in pending:
            layer.sparse_low_rank_scores.pop(name, None)
        raise ValueError("select_support_from_gradients needs at least one batch, but `batches` was empty.")
    _choose_supports(pending, name)
    return count


def _batch_loss(model: nn.Module, batch) -> torch.Tensor:
    if not isinstance(batch, dict):
        raise TypeError(
            f"Batches of type {type(batch).__name__} need a loss_fn(model, batch) -> loss; without one, batches must "
            "be dicts of model inputs that include labels."
        )
    loss = getattr(model(**batch), "loss", None)
    if loss is None:
        raise ValueError("The model returned no loss for a batch: include `labels`, or pass loss_fn(model, batch).")
    return loss


def _choose_supports(layers: list[SparseLowRankLayer], name: str) -> None:
    """Sum each layer's scores over ranks (same module order everywhere) and fix its support."""
    if several_ranks():
        for layer in layers:
            scores = layer.sparse_low_rank_scores.get(name)
            if scores is None:  # keep every rank's collective calls aligned
                scores = layer.sparse_low_rank_scores[name] = torch.zeros(
                    layer.out_features, layer.in_features, device=layer.sparse_low_rank_values[name].device
                )
            dist.all_reduce(scores)
    for layer in layers:
        layer.choose_support_from_scores(name)


def _layers(root: nn.Module, adapter_name: str) -> list[SparseLowRankLayer]:
    return [m for m in root.modules() if isinstance(m, SparseLowRankLayer) and adapter_name in m.sparse_low_rank_values]


def _default_adapter(root: nn.Module) -> str:
    names = {n for m in root.modules() if isinstance(m, SparseLowRankLayer) for n in m.active_adapters}
    if len(names) != 1:
        raise ValueError(
            f"Pass adapter_name=: the model has {len(names)} active sparse_low_rank adapters {sorted(names)}."
        )
    return names.pop()
