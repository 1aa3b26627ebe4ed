"""SORSA tuner: injects :class:`~petuning.tuners.sorsa.layer.Linear` and applies the orthonormal regularizer."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import torch
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, get_quantization_kwargs
from torch import nn

from petuning.training import StepContext, TrainingHooksMixin, refuse_gradient_edits_under_deepspeed
from petuning.tuners.base import PetuningTuner
from petuning.tuners.common import base_of, full_tensor, like_parameter, linear_fan_in_fan_out, pattern_value

from .config import SorsaConfig
from .layer import Linear, SorsaLayer


class SorsaModel(TrainingHooksMixin, PetuningTuner):
    """Adds SORSA adapters to a model. Created by ``peft.get_peft_model(model, SorsaConfig(...))``.

    Besides PEFT's tuner API it offers :meth:`orthonormal_regularizer` (the paper's L_reg, differentiable)
    and implements petuning's training hooks, so ``petuning.PetuningCallback`` / ``petuning.TrainingHooks``
    apply the regularizer as ``SorsaConfig.ortho_mode`` says and log ``sorsa_orthonormality``.
    """

    method_label = "SORSA"
    prefix: str = "sorsa_"
    tuner_layer_cls = SorsaLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    # ------------------------------------------------------------------------------------ injection
    def _layer_kwargs(
        self, config: SorsaConfig, adapter_name: str, key: str, target_name: str, target: nn.Module
    ) -> dict:
        r = pattern_value(config.rank_pattern, key, config.r)
        return {
            "r": r,
            "scale": config.scale(r),
            "dropout": config.dropout,
            "init_weights": config.init_weights,
            "svd_method": config.svd_method,
            "svd_niter": config.svd_niter,
            "svd_oversampling": config.svd_oversampling,
            "svd_cache_dir": config.svd_cache_dir,
            "module_name": key,
            "inference_mode": config.inference_mode,
            "strict_rank": config.strict_rank,
            **get_quantization_kwargs(self),
        }

    def _create_new_module(self, config: SorsaConfig, adapter_name: str, target: nn.Module, key: str, **kwargs):
        fan_in_fan_out = linear_fan_in_fan_out(base_of(target), key, "SORSA", config.fan_in_fan_out)
        return Linear(target, adapter_name, fan_in_fan_out=fan_in_fan_out, **kwargs)

    # ---------------------------------------------------------------------------------- regularizer
    def sorsa_factors(self, adapter_name: str) -> list[torch.Tensor]:
        """All ``sorsa_A`` (r, in) and ``sorsa_B`` (out, r) parameters of ``adapter_name``: A, B, A, B, ..."""
        factors = []
        for _, layer in self.petuning_layers(adapter_name):
            factors += [layer.sorsa_A[adapter_name], layer.sorsa_B[adapter_name]]
        return factors

    def orthonormal_regularizer(self, adapter_name: Optional[str] = None) -> torch.Tensor:
        """L_reg = mean over all A and B of ``||A Aᵀ - I||_F`` and ``||Bᵀ B - I||_F`` (squared for
        ``ortho_norm="fro2"``), in float32 or better with autocast off. Differentiable."""
        name = self._resolve_adapter(adapter_name)
        factors = [full_tensor(f) for f in self.sorsa_factors(name)]
        return orthonormal_regularizer(_as_rows(factors), self.peft_config[name].ortho_norm == "fro2")

    def _adapters_in_mode(self, mode: str) -> Iterator[tuple[str, SorsaConfig, list[torch.Tensor]]]:
        """Active adapters regularized in ``mode`` whose factors train: name, config and A/B factors."""
        for name in self.active_adapters:
            config = self.peft_config.get(name)
            if not (isinstance(config, SorsaConfig) and config.gamma > 0 and config.ortho_mode == mode):
                continue
            factors = self.sorsa_factors(name)
            if any(f.requires_grad for f in factors):  # False when adapters are disabled or frozen
                yield name, config, factors

    def _regularized(self, mode: str) -> Iterator[tuple[SorsaConfig, list[torch.Tensor], list[torch.Tensor]]]:
        """Like :meth:`_adapters_in_mode`, with the gradient of L_reg for each factor (closed form, batched by
        shape, without autograd), laid out like the factor: under FSDP2 every rank gathers the whole factors (the
        regularizer needs all rows) and keeps its shard of the gradient."""
        for _, config, factors in self._adapters_in_mode(mode):
            refuse_gradient_edits_under_deepspeed(
                f"SORSA's ortho_mode={mode!r}",
                "Use ortho_mode='loss' with DeepSpeed (autograd carries it), or DDP / FSDP.",
            )
            with torch.no_grad():
                whole = [full_tensor(f) for f in factors]
            row_grads = orthonormal_regularizer_grads(_as_rows(whole), config.ortho_norm == "fro2")
            yield config, factors, [like_parameter(g, f) for g, f in zip(_as_rows(row_grads), factors)]

    # ------------------------------------------------------------------------------ training hooks
    def petuning_auxiliary_loss(self) -> Optional[torch.Tensor]:
        terms = [
            config.gamma
            * orthonormal_regularizer(_as_rows([full_tensor(f) for f in factors]), config.ortho_norm == "fro2")
            for _, config, factors in self._adapters_in_mode("loss")
        ]
        return torch.stack(terms).sum() if terms else None

    def petuning_before_optimizer_step(self, ctx: StepContext) -> None:
        for config, factors, grads in self._regularized("official"):
            if not ctx.peak_lr:
                raise ValueError(
                    "SORSA's 'official' orthonormal regularizer scales its gradient by gamma / peak learning rate, "
                    "but no peak learning rate is known. Pass peak_lr= to petuning.TrainingHooks."
                )
            coefficient = config.gamma / ctx.peak_lr
            for factor, grad in zip(factors, grads):
                if not factor.requires_grad:
                    continue
                if factor.grad is None:
                    factor.grad = (coefficient * grad).to(factor.dtype)
                else:
                    factor.grad.add_(grad.to(factor.grad.dtype), alpha=coefficient)

    def petuning_after_optimizer_step(self, ctx: StepContext) -> None:
        with torch.no_grad():
            for config, factors, grads in self._regularized("decoupled"):
                for factor, grad in zip(factors, grads):
                    if factor.requires_grad:
                        factor.sub_(grad.to(factor.dtype), alpha=config.gamma)

    def petuning_metrics(self) -> dict[str, float]:
        name = next(iter(self.active_adapters), None)
        if name is None or not self.sorsa_factors(name):
            return {}
        return {"sorsa_orthonormality": float(self.orthonormal_regularizer(name))}


def _as_rows(factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """A, B, A, B, ... -> A, Bᵀ, A, Bᵀ, ...: every matrix with its r orthonormal vectors as rows. Applying it
    twice gives the original list back, which maps row gradients to factor gradients."""
    return [f if i % 2 == 0 else f.T for i, f in enumerate(factors)]


def orthonormal_regularizer(rows: list[torch.Tensor], squared: bool = False) -> torch.Tensor:
    """Mean over the (r, n) matrices ``rows`` of ``||M Mᵀ - I_r||_F`` (or its square), computed in float32 or
    better with autocast off: a 16-bit Gram matrix is too coarse near the identity to regularize anything."""
    norms = torch.cat([norm for _, _, _, norm in _gram_residuals(rows)])
    return (norms.square() if squared else norms).mean()


def orthonormal_regularizer_grads(rows: list[torch.Tensor], squared: bool = False) -> list[torch.Tensor]:
    """Gradient of :func:`orthonormal_regularizer` with respect to each of ``rows``, in closed form:
    with D = M Mᵀ - I and N = len(rows), d/dM ||D||_F / N = 2 D M / (||D||_F N) and d/dM ||D||_F² / N = 4 D M / N.
    The matrices are batched by shape, so a model with hundreds of layers costs a few batched products."""
    grads: list[Optional[torch.Tensor]] = [None] * len(rows)
    with torch.no_grad():
        for index, m, d, norm in _gram_residuals(rows):
            scale = 4.0 / len(rows) if squared else 2.0 / (norm.clamp_min(torch.finfo(norm.dtype).tiny) * len(rows))
            g = d @ m * (scale if squared else scale[:, None, None])
            for i, grad in zip(index, g):
                grads[i] = grad
    return grads


def _gram_residuals(rows: list[torch.Tensor]):
    """Yield, per group of same-shaped matrices: their indices, the stack M (k, r, n), D = M Mᵀ - I (k, r, r) and
    ||D||_F (k,), in float32 (float64 for float64 factors) with autocast off."""
    if not rows:
        raise ValueError("No SORSA factors found: is a SORSA adapter attached and active?")
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(rows):
        groups.setdefault((tuple(m.shape), m.dtype, m.device), []).append(i)
    with torch.autocast(device_type=rows[0].device.type, enabled=False):
        for (shape, dtype, device), index in groups.items():
            m = torch.stack([rows[i] for i in index])
            if dtype not in (torch.float32, torch.float64):
                m = m.float()
            d = m @ m.transpose(1, 2) - torch.eye(shape[0], device=device, dtype=m.dtype)
            yield index, m, d, torch.linalg.matrix_norm(d)
