"""The base classes of every petuning tuner and tuner layer (PEFT's ``BaseTuner`` / ``BaseTunerLayer`` protocol).

:class:`PetuningLayer` holds what every layer shares: the state PEFT's layer protocol expects, the dtype rule and
rank capping. :class:`PetuningTuner` holds what every tuner shares: injection (update the layer already there or
install a new one), layer lookup and adapter-name resolution, the dtype rule across an adapter's tensors, the
shape-checked load, one warning for all capped ranks, and the registration of its training hooks on the model, so
that they run on every attach path.

**Dtype rule.** Adapter tensors are created in float32 (float64 on a float64 base), so products of several small
factors are not rounded to 16 bits on fp16/bf16 bases; that is what PEFT's ``autocast_adapter_dtype=True`` (the
default) gives LoRA. With ``autocast_adapter_dtype=False`` they take the base weight's dtype instead, except the
containers a layer lists in ``fp32_adapter_names``: tensors that provably cannot train in 16 bit (each method's
documentation says which and why).

**Rank capping.** A rank larger than a layer (or a Tucker mode) allows is lowered to what it allows, per layer, and
the tuner warns once per injection, naming every capped layer, as LoRA accepts any ``r``. ``strict_rank=True`` in a
method's config turns that into an error naming the layer.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _get_in_out_features
from peft.utils import resolve_quantization_backend
from torch import nn

from petuning.training import TrainingHooksMixin, register_hook_provider, unregister_hook_provider


class PetuningLayer(BaseTunerLayer):
    """What every petuning tuner layer shares. ``method`` names the method in messages."""

    method: str = ""
    fp32_adapter_names: tuple[str, ...] = ()
    """Adapter containers that stay float32 (float64 on a float64 base) with ``autocast_adapter_dtype=False``."""

    def _init_petuning_state(self, base_layer: nn.Module, kwargs: dict, quantizable: bool = True) -> None:
        """The state every layer starts with: the wrapped base layer, no merged or disabled adapters, the base's
        quantization backend (None when the method refuses quantized bases), in/out features, the creation kwargs,
        and ``rank_caps[adapter]``: how a requested rank was lowered to fit this layer (absent when it fit)."""
        self.base_layer = base_layer
        self._disable_adapters = False
        self.merged_adapters = []
        self.quantization_backend = (
            resolve_quantization_backend(
                self.get_base_layer(), get_apply_tensor_subclass=kwargs.get("get_apply_tensor_subclass")
            )
            if quantizable
            else None
        )
        self.in_features, self.out_features = _get_in_out_features(self.get_base_layer())
        self.kwargs = kwargs
        self.rank_caps: dict[str, str] = {}

    # ------------------------------------------------------------------------------------------ dtypes
    def adapter_dtype(self) -> torch.dtype:
        """The dtype new adapter tensors are created in: float64 on a float64 base, else float32."""
        base_dtype = self._get_base_layer_device_and_dtype(self.get_base_layer())[1]
        return torch.float64 if base_dtype == torch.float64 else torch.float32

    def _adapter_containers(self, adapter_name: str) -> Iterator[tuple[str, Any]]:
        for attr in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, attr, None)
            if isinstance(container, (nn.ModuleDict, nn.ParameterDict, BufferDict)) and adapter_name in container:
                yield attr, container

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """Move ``adapter_name``'s tensors to the base layer's device, keeping their dtype (PEFT's default would also
        cast them to the base dtype). Tensors on the meta device stay there."""
        target = device or self._get_base_layer_device_and_dtype(self.get_base_layer())[0]
        if target is None:
            return
        for _, container in self._adapter_containers(adapter_name):
            item = container[adapter_name]
            tensors = list(item.parameters()) + list(item.buffers()) if isinstance(item, nn.Module) else [item]
            if not any(t.device.type == "meta" for t in tensors):
                container[adapter_name] = item.to(target)

    def cast_adapter_to_base_dtype(self, adapter_name: str) -> None:
        """``autocast_adapter_dtype=False``: give ``adapter_name``'s floating-point tensors the base weight's dtype,
        except those in ``fp32_adapter_names``."""
        dtype = self._get_base_layer_device_and_dtype(self.get_base_layer())[1]
        if dtype is None or not dtype.is_floating_point:  # a quantized base: the compute dtype stays float32
            return
        for attr, container in self._adapter_containers(adapter_name):
            if attr in self.fp32_adapter_names:
                continue
            item = container[adapter_name]
            if isinstance(item, (nn.Module, nn.Parameter)):  # in place: the Parameter objects stay the same
                for param in item.parameters() if isinstance(item, nn.Module) else [item]:
                    if param.is_floating_point():
                        param.data = param.data.to(dtype)
            elif item.is_floating_point():  # a buffer
                container[adapter_name] = item.to(dtype)

    # -------------------------------------------------------------------------------------------- ranks
    def fit_rank(
        self, adapter_name: str, requested: int, limit: int, reason: str, strict: bool, fix: str, module_name: str = ""
    ) -> int:
        """``requested`` if it is at most ``limit``; else ``limit``, noted in ``rank_caps`` for the tuner's one
        warning, or (``strict``) a ValueError naming the layer, the ``reason`` for the limit and the ``fix``."""
        if requested <= limit:
            return requested
        if strict:
            layer = f" for layer {module_name!r}" if module_name else ""
            raise ValueError(
                f"{self.method} rank {requested}{layer} is larger than {limit}: {reason}. {fix} (strict_rank=True; "
                "without it the rank is lowered to what the layer allows, with a warning)."
            )
        self.note_size_change(adapter_name, f"rank {requested} -> {limit}: {reason}")
        return limit

    def note_size_change(self, adapter_name: str, note: str) -> None:
        """Record that a requested size was changed to fit this layer (reported by the tuner's one warning)."""
        self.rank_caps[adapter_name] = (
            f"{self.rank_caps[adapter_name]}; {note}" if adapter_name in self.rank_caps else note
        )

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.rank_caps.pop(adapter_name, None)


class PetuningTuner(BaseTuner):
    """What every petuning tuner shares. ``method_label`` names the method in messages.

    A subclass says how a targeted module becomes a layer: :meth:`_layer_kwargs` (the arguments of the layer's
    ``update_layer`` for one module) and :meth:`_create_new_module`; :meth:`_existing_layer` finds a layer of this
    method already there (to which the new adapter is added).
    """

    method_label: str = ""
    size_settings: str = "ranks"  # the config fields that set tensor shapes, named when a file does not fit

    # ---------------------------------------------------------------------------------------- injection
    def _layer_kwargs(self, config, adapter_name: str, key: str, target_name: str, target: nn.Module) -> dict:
        raise NotImplementedError

    def _create_new_module(self, config, adapter_name: str, target: nn.Module, key: str, **kwargs) -> nn.Module:
        raise NotImplementedError

    def _existing_layer(self, target: nn.Module, key: str) -> Optional[PetuningLayer]:
        return target if isinstance(target, self.tuner_layer_cls) else None

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **optional_kwargs):
        kwargs = self._layer_kwargs(config, adapter_name, current_key, target_name, target)
        existing = self._existing_layer(target, current_key)
        if existing is not None:
            existing.update_layer(adapter_name, **kwargs)
            return
        new_module = self._create_new_module(config, adapter_name, target, current_key, **kwargs)
        if adapter_name not in self.active_adapters:  # an adapter added while another one is active does not train
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        """PEFT's injection, then one warning naming every layer whose rank was capped, and the registration of this
        tuner's training hooks on ``model`` (every attach path injects through here)."""
        self._owned_adapters().add(adapter_name)
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, state_dict)
        capped = {
            name: layer.rank_caps[adapter_name]
            for name, layer in self.petuning_layers(adapter_name)
            if adapter_name in layer.rank_caps
        }
        if capped:
            listed = "; ".join(f"{name} ({note})" for name, note in capped.items())
            warnings.warn(
                f"{self.method_label} adapter {adapter_name!r}: the requested rank is larger than {len(capped)} "
                f"layer(s) allow, so it was lowered to the largest rank each allows: {listed}. Set ranks per layer "
                "with rank_pattern, or pass strict_rank=True to refuse such layers instead.",
                UserWarning,
                stacklevel=2,
            )
        if self.provides_training_hooks():
            register_hook_provider(model, self)

    @classmethod
    def provides_training_hooks(cls) -> bool:
        """True if the tuner overrides any of petuning's training hooks."""
        hooks = [n for n in vars(TrainingHooksMixin) if n.startswith("petuning_")]
        return issubclass(cls, TrainingHooksMixin) and any(
            getattr(cls, n) is not getattr(TrainingHooksMixin, n) for n in hooks
        )

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any):
        unregister_hook_provider(self.model, self)
        return super()._unload_and_optionally_merge(*args, **kwargs)

    # ------------------------------------------------------------------------------------------- layers
    def petuning_layers(self, adapter_name: Optional[str] = None) -> list[tuple[str, PetuningLayer]]:
        """(module name, layer) of every layer of this method, or only those holding ``adapter_name``, in module
        order."""
        return [
            (name, module)
            for name, module in self.model.named_modules()
            if isinstance(module, self.tuner_layer_cls) and (adapter_name is None or _holds(module, adapter_name))
        ]

    def _resolve_adapter(self, adapter_name: Optional[str]) -> str:
        """``adapter_name``, or the first active adapter; a clear error if the tuner has no such adapter."""
        name = adapter_name or next(iter(self.active_adapters), None)
        if name is None or name not in self.peft_config:
            raise ValueError(
                f"No {self.method_label} adapter named {adapter_name!r}; loaded: {list(self.peft_config)}."
            )
        return name

    def _owned_adapters(self) -> set[str]:
        """The adapters this tuner injected. transformers' ``add_adapter`` makes one tuner per adapter, and they all
        share the model's ``peft_config``, so the config alone does not say which tuner runs an adapter's hooks."""
        return self.__dict__.setdefault("_petuning_owned_adapters", set())

    @property
    def active_adapters(self) -> list[str]:
        """This tuner's adapters that are active in its layers. transformers' ``set_adapter`` changes the layers
        without telling the tuner (it keeps no tuner), so the layers are the record; before any layer exists, the
        tuner's own ``active_adapter``."""
        for module in self.model.modules():
            if isinstance(module, self.tuner_layer_cls):
                return [n for n in module.active_adapters if n in self._owned_adapters()]
        return [self.active_adapter] if isinstance(self.active_adapter, str) else list(self.active_adapter)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._owned_adapters().discard(adapter_name)

    # ------------------------------------------------------------------------------------------- dtypes
    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's hook after an adapter is created (``get_peft_model``, ``add_adapter``, ``from_pretrained``,
        ``load_adapter``): with ``autocast_adapter_dtype=False`` the adapter takes the base dtype (see the module
        docstring); with True it is already float32."""
        if autocast_adapter_dtype:
            super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
            return
        for _, layer in self.petuning_layers(adapter_name):
            layer.cast_adapter_to_base_dtype(adapter_name)

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """PEFT's structural key remapping, then a clear error when the tensors do not have the model's shapes (an
        adapter made for another base)."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        return cls._check_state_dict_for_load(model, config, adapter_name, remapped)

    @classmethod
    def _check_state_dict_for_load(cls, model, config, adapter_name: str, state_dict: dict) -> dict:
        """The remapped state dict, after checking it fits ``model``; a method with its own file layout overrides
        this."""
        check_adapter_shapes(model, state_dict, config, cls.method_label, cls.size_settings)
        return state_dict


def _holds(layer: BaseTunerLayer, adapter_name: str) -> bool:
    return any(
        adapter_name in getattr(layer, attr)
        for attr in layer.adapter_layer_names
        if isinstance(getattr(layer, attr, None), (nn.ModuleDict, nn.ParameterDict, BufferDict, dict))
    )


def check_adapter_shapes(
    model: nn.Module, state_dict: dict[str, torch.Tensor], config, method: str, size_settings: str = "ranks"
) -> None:
    """Refuse an adapter state dict (already remapped to the model's keys) whose tensors do not have the model's
    shapes, naming a mismatching tensor: such an adapter was made for a different base model. Compares against
    the model's parameters and buffers (not ``state_dict()``, which would also build every module's extra state)."""
    expected = {
        **dict(model.named_parameters(remove_duplicate=False)),
        **dict(model.named_buffers(remove_duplicate=False)),
    }
    wrong = [
        f"{key}: adapter {tuple(value.shape)} vs model {tuple(expected[key].shape)}"
        for key, value in state_dict.items()
        if key in expected and expected[key].shape != value.shape
    ]
    if wrong:
        raise ValueError(
            f"This {method} adapter was made for a base model (or {size_settings}) with different layer shapes than the "
            f"model it is being loaded into ({len(wrong)} tensors differ, e.g. {wrong[0]}). Load it on the base model it "
            f"was made for: {getattr(config, 'base_model_name_or_path', None)!r}."
        )
