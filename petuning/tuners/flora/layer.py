"""FLoRA layers: a Tucker update ``ΔW = s · G ×₁ U_in ×₂ U_out ×₃ U_k1 …`` around a frozen layer.

Per adapter, for a base weight whose modes ``[in, out, *kernel]`` have sizes I_n and ranks J_n:

- ``flora_G[name]``     (J_in, J_out, *J_kernel)  trainable core, starts at zero
- ``flora_U[name][n]``  (I_n, J_n)                trainable factor of mode n, starts at Kaiming-normal(a=√3)

Mode sizes: ``nn.Linear`` and GPT-2 ``Conv1D`` (in, out); ``nn.Embedding`` (num_embeddings, embedding_dim);
``nn.ConvNd`` (in_channels / groups, out_channels, *kernel_size), so grouped and depthwise kernels work.

Forward, never building anything larger than the base weight:

- Linear:    ``y = base(x) + (x U_in) (s U_out Gᵀ)ᵀ``: two thin matmuls, like LoRA, plus a J_in x out product.
- Embedding: ``y = base(ids) + U_in[ids] (s U_out Gᵀ)ᵀ``: a row gather, no vocabulary x dim matrix.
- ConvNd with groups = 1, when it costs fewer multiply-adds: a 1x1 convolution by U_inᵀ (in → J_in), a
  convolution with the core kernel ``G ×₃ U_k1 …`` (J_in → J_out, with the base's stride / padding / dilation /
  padding_mode), and a 1x1 convolution by ``s U_out`` (J_out → out). Channel maps commute with every padding mode,
  so this equals the convolution with ΔW.
- ConvNd otherwise (grouped, depthwise, or when the dense kernel is cheaper): one convolution with the kernel ΔW,
  which has the base weight's own shape, using the base layer's convolution parameters.

The adapter tensors are float32 (float64 on a float64 base); inputs are cast to them and the result back.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from peft.utils import quantization_extra_repr
from torch import nn

from petuning.tuners.base import PetuningLayer
from petuning.tuners.common import AdditiveLayerMixin

INIT_NEGATIVE_SLOPE = math.sqrt(3)
"""Kaiming-normal ``a`` of the official code: std = 1 / sqrt(2 J_n) for a factor (I_n, J_n)."""


def mode_product(tensor: torch.Tensor, factor: torch.Tensor, mode: int) -> torch.Tensor:
    """The n-mode product ``tensor ×_mode factor``: contracts dimension ``mode`` of ``tensor`` (size J) with the
    columns of ``factor`` (I, J); the result has size I in that dimension."""
    return torch.movedim(torch.tensordot(tensor, factor, dims=([mode], [1])), -1, mode)


def tucker_product(core: torch.Tensor, factors: list[torch.Tensor], first_mode: int = 0) -> torch.Tensor:
    """``core ×_{first_mode} factors[0] ×_{first_mode+1} factors[1] …``."""
    for offset, factor in enumerate(factors):
        core = mode_product(core, factor, first_mode + offset)
    return core


class FloraLayer(AdditiveLayerMixin, PetuningLayer):
    """State and math shared by every FLoRA-adapted layer type (forward and merge: :class:`AdditiveLayerMixin`)."""

    method = "FLoRA"

    adapter_layer_names = ("flora_G", "flora_U")
    other_param_names = ("flora_r", "flora_scale", "flora_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self._init_petuning_state(base_layer, kwargs)
        self.flora_G = nn.ParameterDict({})
        self.flora_U = nn.ModuleDict({})  # name -> ParameterList, one factor per mode [in, out, *kernel]
        self.flora_r: dict[str, tuple[int, ...]] = {}
        self.flora_scale: dict[str, float] = {}
        self.flora_dropout = nn.ModuleDict({})

    # ------------------------------------------------------------------------------- shape & ranks
    @abstractmethod
    def modes(self) -> list[tuple[str, int]]:
        """(name, size) of every mode of the weight, in the order [in, out, *kernel]."""

    def resolve_ranks(
        self,
        adapter_name: str,
        r: Union[int, list[int]],
        r_kernel: Optional[int],
        module_name: str = "",
        strict_rank: bool = False,
    ) -> tuple[int, ...]:
        """Per-mode ranks for this layer from an int (input/output rank; kernel modes take ``r_kernel`` or full
        rank) or a per-mode list; a rank larger than its mode is lowered to the mode's size (a clear error with
        ``strict_rank``)."""
        where = f"layer {module_name!r}" if module_name else f"this {type(self.get_base_layer()).__name__}"
        key = module_name or "<module name>"
        modes = self.modes()
        described = ", ".join(f"{name}={size}" for name, size in modes)
        if isinstance(r, int):
            ranks = [r, r] + [size if r_kernel is None else r_kernel for _, size in modes[2:]]
        else:
            ranks = list(r)
            if len(ranks) != len(modes):
                raise ValueError(
                    f"FLoRA got {len(ranks)} ranks {ranks} for {where}, whose weight has {len(modes)} modes "
                    f"[{described}]. Give one rank per mode in the order [in, out, *kernel], or a single int; use "
                    "rank_pattern to give layers of different kinds their own lists."
                )
        fitting = [min(j, s) for j, (_, s) in zip(ranks, modes)]
        fix = (
            f"A Tucker factor cannot have more columns than its mode has entries (modes: {described}). Lower it, e.g. "
            f"rank_pattern={{{key!r}: {fitting}}}, or leave the layer out of target_modules."
        )
        return tuple(
            self.fit_rank(adapter_name, rank, size, f"its {name!r} mode has size {size}", strict_rank, fix, module_name)
            for (name, size), rank in zip(modes, ranks)
        )

    # ----------------------------------------------------------------------------------------- init
    def update_layer(
        self,
        adapter_name: str,
        r: Union[int, list[int]],
        scale: float,
        dropout: float,
        init_weights: bool,
        r_kernel: Optional[int] = None,
        module_name: str = "",
        inference_mode: bool = False,
        strict_rank: bool = False,
        **_: Any,
    ) -> None:
        """Add adapter ``adapter_name``: a zero core and Kaiming-normal(a=√3) factors (a random core as well with
        ``init_weights=False``)."""
        ranks = self.resolve_ranks(adapter_name, r, r_kernel, module_name, strict_rank)
        dtype = self.adapter_dtype()
        factors = []
        for (_, size), rank in zip(self.modes(), ranks):
            factor = torch.empty(size, rank, dtype=dtype)
            nn.init.kaiming_normal_(factor, a=INIT_NEGATIVE_SLOPE)  # fan_in = rank
            factors.append(nn.Parameter(factor))
        core = torch.zeros(ranks, dtype=dtype)
        if not init_weights:  # seeded by the global RNG, like PEFT's other tuners
            core = 0.2 * torch.randn_like(core)

        self.flora_r[adapter_name] = ranks
        self.flora_scale[adapter_name] = float(scale)
        self.flora_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.flora_G[adapter_name] = nn.Parameter(core)
        self.flora_U[adapter_name] = nn.ParameterList(factors)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    # ---------------------------------------------------------------------------------------- math
    def tucker_update(self, adapter_name: str) -> torch.Tensor:
        """``s · G ×₁ U_in ×₂ U_out …`` with modes in the order [in, out, *kernel], in the adapter's dtype."""
        factors = list(self.flora_U[adapter_name])
        return tucker_product(self.flora_G[adapter_name], factors) * self.flora_scale[adapter_name]

    def output_map(self, adapter_name: str) -> torch.Tensor:
        """``s · U_out Gᵀ`` (out, J_in) for the 2-D layers: maps the input-rank coordinates to the output."""
        u_out = self.flora_U[adapter_name][1]
        return (u_out @ self.flora_G[adapter_name].T) * self.flora_scale[adapter_name]

    @abstractmethod
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense update in the base weight's layout and the adapter's dtype; for merging and export only."""

    @abstractmethod
    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The adapter's contribution to the layer output for input ``x``, in the adapter's dtype."""


class _FloraModule(nn.Module, FloraLayer):
    """The forward every FLoRA layer type shares: base output plus each active adapter's contribution."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        super().__init__()
        FloraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._forward_additive(x, *args, **kwargs)

    def _adapter_input(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return self.flora_dropout[adapter_name](self._cast_input_dtype(x, self.flora_G[adapter_name].dtype))

    def extra_repr(self) -> str:
        return quantization_extra_repr(self)

    def __repr__(self) -> str:
        return "flora." + super().__repr__()


class Linear(_FloraModule):
    """FLoRA around ``nn.Linear``, transformers' ``Conv1D`` (``fan_in_fan_out=True``) or a quantized linear."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, fan_in_fan_out: bool = False, **kwargs: Any):
        super().__init__(base_layer, adapter_name, **kwargs)
        self.fan_in_fan_out = fan_in_fan_out
        self.update_layer(adapter_name, **kwargs)

    def modes(self) -> list[tuple[str, int]]:
        return [("in", self.in_features), ("out", self.out_features)]

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``(x U_in) (s U_out Gᵀ)ᵀ`` for x (..., in); returns (..., out)."""
        u_in = self.flora_U[adapter_name][0]
        return F.linear(F.linear(self._adapter_input(x, adapter_name), u_in.T), self.output_map(adapter_name))

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s U_out Gᵀ U_inᵀ`` (out, in), or (in, out) for ``fan_in_fan_out``."""
        delta = self.tucker_update(adapter_name)  # (in, out)
        return delta if self.fan_in_fan_out else delta.T


class Embedding(_FloraModule):
    """FLoRA around ``nn.Embedding``: the update of the (num_embeddings, embedding_dim) table is looked up by row."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any):
        super().__init__(base_layer, adapter_name, **kwargs)
        if self.get_base_layer().max_norm is not None:
            raise ValueError(
                f"FLoRA cannot adapt an nn.Embedding with max_norm={self.get_base_layer().max_norm} "
                f"({kwargs.get('module_name', '')!r}): the lookup renormalizes rows, which is not linear, so the "
                "adapter could not be merged exactly. Leave this layer out of target_modules."
            )
        self.update_layer(adapter_name, **kwargs)

    def modes(self) -> list[tuple[str, int]]:
        return [("num_embeddings", self.in_features), ("embedding_dim", self.out_features)]

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``U_in[ids] (s U_out Gᵀ)ᵀ`` for token ids x (...); returns (..., embedding_dim). No dropout on ids."""
        rows = F.embedding(x, self.flora_U[adapter_name][0])
        out = F.linear(rows, self.output_map(adapter_name))
        embed_scale = self._get_embed_scale()  # e.g. Gemma's scaled embeddings scale the looked-up rows
        return out if embed_scale is None else out * embed_scale.to(out.dtype)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s U_in G U_outᵀ`` (num_embeddings, embedding_dim), the layout of ``nn.Embedding.weight``."""
        return self.tucker_update(adapter_name)


class Conv(_FloraModule):
    """FLoRA around ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d``, including grouped and depthwise convolutions."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any):
        super().__init__(base_layer, adapter_name, **kwargs)
        self.update_layer(adapter_name, **kwargs)

    def modes(self) -> list[tuple[str, int]]:
        base = self.get_base_layer()
        kernel_names = {1: ("kernel",), 2: ("kernel_h", "kernel_w"), 3: ("kernel_d", "kernel_h", "kernel_w")}
        in_name = "in" if base.groups == 1 else f"in/groups ({base.in_channels}/{base.groups})"
        return [(in_name, base.in_channels // base.groups), ("out", base.out_channels)] + list(
            zip(kernel_names[len(base.kernel_size)], base.kernel_size)
        )

    def uses_factored_path(self, adapter_name: str) -> bool:
        """True if the 1x1 → core → 1x1 convolution chain costs fewer multiply-adds per output position than one
        convolution with the dense kernel (never for grouped convolutions, whose kernel is block-diagonal)."""
        base = self.get_base_layer()
        if base.groups != 1:
            return False
        j_in, j_out = self.flora_r[adapter_name][:2]
        kernel, stride = math.prod(base.kernel_size), math.prod(base.stride)
        factored = base.in_channels * j_in * stride + j_in * j_out * kernel + j_out * base.out_channels
        return factored < base.in_channels * base.out_channels * kernel

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        base = self.get_base_layer()
        x = self._adapter_input(x, adapter_name)
        if not self.uses_factored_path(adapter_name):
            return base._conv_forward(x, self.get_delta_weight(adapter_name), None)
        core, factors = self.flora_G[adapter_name], list(self.flora_U[adapter_name])
        conv = (F.conv1d, F.conv2d, F.conv3d)[len(base.kernel_size) - 1]
        point = (1,) * len(base.kernel_size)
        hidden = conv(x, factors[0].T.reshape(*factors[0].T.shape, *point))  # in -> J_in
        core_kernel = tucker_product(core, factors[2:], first_mode=2).transpose(0, 1)  # (J_out, J_in, *kernel)
        hidden = base._conv_forward(hidden, core_kernel, None)  # base stride / padding / dilation / padding_mode
        u_out = factors[1] * self.flora_scale[adapter_name]
        return conv(hidden, u_out.reshape(*u_out.shape, *point))  # J_out -> out

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s G ×₁ U_in ×₂ U_out ×₃ U_k…`` as (out, in / groups, *kernel), the layout of the base kernel."""
        return self.tucker_update(adapter_name).transpose(0, 1)
