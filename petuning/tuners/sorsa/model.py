"""SORSA tuner: injects :class:`~petuning.tuners.sorsa.layer.Linear` and applies the orthonormal regularizer."""

from __future__ import annotations

import warnings
from typing import Iterable, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import (
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    get_quantization_kwargs,
    resolve_quantization_backend,
)
from peft.utils.other import get_pattern_key
from torch import nn
from transformers.pytorch_utils import Conv1D

from petuning.training import AuxiliaryLossMixin, StepContext

from .config import SorsaConfig
from .layer import Linear, SorsaLayer


class SorsaModel(AuxiliaryLossMixin, BaseTuner):
    """Adds SORSA adapters to a model. Created by ``peft.get_peft_model(model, SorsaConfig(...))``.

    Besides PEFT's tuner API it offers :meth:`orthonormal_regularizer` (the paper's L_reg, differentiable)
    and implements petuning's training hooks, so ``petuning.PetuningCallback`` / ``petuning.TrainingHooks``
    apply the regularizer as ``SorsaConfig.ortho_mode`` says and log ``sorsa_orthonormality``.
    """

    prefix: str = "sorsa_"
    tuner_layer_cls = SorsaLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    # ------------------------------------------------------------------------------------ injection
    def _create_and_replace(self, config: SorsaConfig, adapter_name, target, target_name, parent, current_key, **kw):
        pattern = get_pattern_key(config.rank_pattern.keys(), current_key) if config.rank_pattern else None
        r = config.rank_pattern.get(pattern, config.r) if pattern else config.r
        kwargs = {
            "r": r,
            "scale": config.scale(r),
            "dropout": config.dropout,
            "init_weights": config.init_weights,
            "svd_method": config.svd_method,
            "svd_niter": config.svd_niter,
            "svd_oversampling": config.svd_oversampling,
            "module_name": current_key,
            **get_quantization_kwargs(self),
        }
        if isinstance(target, SorsaLayer):
            target.update_layer(adapter_name, **kwargs)
            return
        new_module = self._create_new_module(config, adapter_name, target, current_key, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added, inactive adapter does not train
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(config: SorsaConfig, adapter_name: str, target: nn.Module, key: str, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, Conv1D):
            fan_in_fan_out = True
        elif isinstance(base, nn.Linear) or _is_quantized_linear(base):
            fan_in_fan_out = False
        else:
            raise TypeError(
                f"SORSA cannot adapt {key!r} of type {type(base).__name__}: supported layers are torch.nn.Linear, "
                "transformers' Conv1D and bitsandbytes/quantized linear layers. Leave it out of target_modules "
                "(or add it to exclude_modules)."
            )
        if config.fan_in_fan_out and not fan_in_fan_out:
            warnings.warn(f"fan_in_fan_out=True does not fit {key!r} ({type(base).__name__}, (out, in) layout); ignored.")
        return Linear(target, adapter_name, fan_in_fan_out=fan_in_fan_out, **kwargs)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """PEFT's structural key remapping, plus a clear error when the adapter's shapes do not fit the model."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        expected = model.state_dict()
        wrong = [
            f"{key}: adapter {tuple(value.shape)} vs model {tuple(expected[key].shape)}"
            for key, value in remapped.items()
            if key in expected and expected[key].shape != value.shape
        ]
        if wrong:
            raise ValueError(
                "This SORSA adapter was trained on a base model with different layer shapes than the model it is "
                f"being loaded into ({len(wrong)} tensors differ, e.g. {wrong[0]}). Load it on the base model "
                f"it was made for: {getattr(config, 'base_model_name_or_path', None)!r}."
            )
        return remapped

    # ---------------------------------------------------------------------------------- regularizer
    def _sorsa_layers(self) -> list[SorsaLayer]:
        return [m for m in self.model.modules() if isinstance(m, SorsaLayer)]

    def sorsa_factors(self, adapter_name: str) -> list[torch.Tensor]:
        """All ``sorsa_A`` (r, in) and ``sorsa_B`` (out, r) parameters of ``adapter_name``: A, B, A, B, ..."""
        factors = []
        for layer in self._sorsa_layers():
            if adapter_name in layer.sorsa_A:
                factors += [layer.sorsa_A[adapter_name], layer.sorsa_B[adapter_name]]
        return factors

    def orthonormal_regularizer(self, adapter_name: Optional[str] = None) -> torch.Tensor:
        """L_reg = mean over all A and B of ``||A Aᵀ - I||_F`` and ``||Bᵀ B - I||_F`` (squared for
        ``ortho_norm="fro2"``), in float32 or better with autocast off. Differentiable."""
        name = adapter_name or self.active_adapters[0]
        factors = self.sorsa_factors(name)
        rows = [f if i % 2 == 0 else f.T for i, f in enumerate(factors)]  # A and Bᵀ: r rows each
        return orthonormal_regularizer(rows, squared=self.peft_config[name].ortho_norm == "fro2")

    def _regularized_adapters(self, mode: str) -> Iterable[tuple[str, SorsaConfig]]:
        for name in self.active_adapters:
            config = self.peft_config.get(name)
            if isinstance(config, SorsaConfig) and config.gamma > 0 and config.ortho_mode == mode:
                if any(f.requires_grad for f in self.sorsa_factors(name)):  # False when disabled or frozen
                    yield name, config

    def _regularizer_gradients(self, name: str) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
        factors = [f for f in self.sorsa_factors(name) if f.requires_grad]
        return factors, torch.autograd.grad(self.orthonormal_regularizer(name), factors)

    # ------------------------------------------------------------------------------ training hooks
    def petuning_auxiliary_loss(self) -> Optional[torch.Tensor]:
        terms = [config.gamma * self.orthonormal_regularizer(name) for name, config in self._regularized_adapters("loss")]
        return torch.stack(terms).sum() if terms else None

    def petuning_before_optimizer_step(self, ctx: StepContext) -> None:
        for name, config in self._regularized_adapters("official"):
            if not ctx.peak_lr:
                raise ValueError(
                    "SORSA's 'official' orthonormal regularizer scales its gradient by gamma / peak learning rate, "
                    "but no peak learning rate is known. Pass peak_lr= to petuning.TrainingHooks."
                )
            coefficient = config.gamma / ctx.peak_lr
            factors, grads = self._regularizer_gradients(name)
            for factor, grad in zip(factors, grads):
                if factor.grad is None:
                    factor.grad = coefficient * grad
                else:
                    factor.grad.add_(grad, alpha=coefficient)

    def petuning_after_optimizer_step(self, ctx: StepContext) -> None:
        for name, config in self._regularized_adapters("decoupled"):
            factors, grads = self._regularizer_gradients(name)
            with torch.no_grad():
                for factor, grad in zip(factors, grads):
                    factor.sub_(grad, alpha=config.gamma)

    def petuning_metrics(self) -> dict[str, float]:
        name = self.active_adapters[0] if self.active_adapters else None
        if name is None or not self.sorsa_factors(name):
            return {}
        return {"sorsa_orthonormality": float(self.orthonormal_regularizer(name))}


def orthonormal_regularizer(rows: list[torch.Tensor], squared: bool = False) -> torch.Tensor:
    """Mean over the (r, n) matrices ``rows`` of ``||M Mᵀ - I_r||_F`` (or its square), computed in float32 or
    better with autocast off: a 16-bit Gram matrix is too coarse near the identity to regularize anything."""
    if not rows:
        raise ValueError("No SORSA factors found: is a SORSA adapter attached and active?")
    with torch.autocast(device_type=rows[0].device.type, enabled=False):
        terms = []
        for m in rows:
            f = m if m.dtype in (torch.float32, torch.float64) else m.float()
            gram = f @ f.T
            eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
            norm = torch.linalg.matrix_norm(gram - eye)
            terms.append(norm.square() if squared else norm)
        return torch.stack(terms).mean()


def _is_quantized_linear(module: nn.Module) -> bool:
    backend = resolve_quantization_backend(module)
    return backend is not None and backend.layer_type == "linear"
