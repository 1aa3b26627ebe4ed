"""SORSA layers: the delta-form singular-factor update around a frozen linear layer.

Shapes for a layer with weight W (out, in) and rank r:

- ``sorsa_A[name]``  (r, in)   trainable, starts at the top-r right singular vectors of W
- ``sorsa_S[name]``  (r,)      trainable, starts at the top-r singular values of W divided by s
- ``sorsa_B[name]``  (out, r)  trainable, starts at the top-r left singular vectors of W
- ``sorsa_A0/S0/B0`` same shapes, frozen copies of the start (saved with the adapter, so the adapter file
  alone reproduces the tuned model on the original base)

Forward (never builds an out x in matrix)::

    y = base(x) + s * ( B (S ⊙ A x) - B0 (S0 ⊙ A0 x) )

The two products run through the same kernels on the same inputs, so at initialization they cancel
bit for bit and the output equals the base output exactly.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.utils import quantization_extra_repr
from peft.utils.integrations import gather_params_ctx
from torch import nn

from petuning.linalg import SVD_METHOD, SVD_NITER, SVD_OVERSAMPLING, cached_top_singular_triplets
from petuning.tuners.base import PetuningLayer
from petuning.tuners.common import AdditiveLayerMixin


class SorsaLayer(AdditiveLayerMixin, PetuningLayer):
    """State and math shared by every SORSA-adapted layer type (forward and merge: :class:`AdditiveLayerMixin`)."""

    method = "SORSA"

    adapter_layer_names = ("sorsa_A", "sorsa_S", "sorsa_B")
    other_param_names = ("sorsa_A0", "sorsa_S0", "sorsa_B0", "sorsa_r", "sorsa_scaling", "sorsa_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self._init_petuning_state(base_layer, kwargs)
        self.sorsa_A = nn.ParameterDict({})
        self.sorsa_S = nn.ParameterDict({})
        self.sorsa_B = nn.ParameterDict({})
        self.sorsa_A0 = BufferDict({}, persistent=True)
        self.sorsa_S0 = BufferDict({}, persistent=True)
        self.sorsa_B0 = BufferDict({}, persistent=True)
        self.sorsa_r: dict[str, int] = {}
        self.sorsa_scaling: dict[str, float] = {}
        self.sorsa_dropout = nn.ModuleDict({})

    # ----------------------------------------------------------------------------------------- init
    def update_layer(
        self,
        adapter_name: str,
        r: int,
        scale: float,
        dropout: float,
        init_weights: bool,
        svd_method: str = SVD_METHOD,
        svd_niter: int = SVD_NITER,
        svd_oversampling: int = SVD_OVERSAMPLING,
        svd_cache_dir: Optional[str] = None,
        module_name: str = "",
        inference_mode: bool = False,
        strict_rank: bool = False,
        **_: Any,
    ) -> None:
        """Add adapter ``adapter_name``: SVD of the base weight, trainable factors and frozen copies.

        The SVD is skipped when the factors are about to be overwritten by a saved adapter: when the adapter is
        created for inference (``inference_mode=True``, which ``PeftModel.from_pretrained`` and transformers'
        ``load_adapter`` set unless ``is_trainable=True``) and when PEFT creates it on the meta device
        (``low_cpu_mem_usage=True``). The factors then start at zero, which is still an exact identity."""
        where = f" (layer {module_name!r})" if module_name else ""
        limit = min(self.in_features, self.out_features)
        r = self.fit_rank(
            adapter_name,
            r,
            limit,
            f"a {self.out_features}x{self.in_features} weight has {limit} singular values",
            strict_rank,
            "Use a smaller r, or lower this layer's rank with rank_pattern.",
            module_name,
        )
        base = self.get_base_layer()
        if self.quantization_backend is None and not base.weight.dtype.is_floating_point:
            raise TypeError(
                f"SORSA needs a floating-point base weight, but the weight{where} has dtype {base.weight.dtype}. "
                "Load the model in float32/bfloat16/float16, or quantize it with bitsandbytes (supported)."
            )
        dtype = self.adapter_dtype()  # the SVD in 32 bits; autocast_adapter_dtype=False rounds it afterwards
        if inference_mode or _creating_on_meta():
            a0 = torch.zeros(r, self.in_features, dtype=dtype)
            s0 = torch.zeros(r, dtype=dtype)
            b0 = torch.zeros(self.out_features, r, dtype=dtype)
        else:
            with gather_params_ctx(base.weight):  # full weight under DeepSpeed ZeRO-3
                weight = self._base_weight_out_in()
                if not torch.isfinite(weight).all():
                    raise ValueError(f"The base weight{where} contains NaN or Inf; SORSA cannot take its SVD.")
                u, s, vh = cached_top_singular_triplets(
                    weight, r, svd_method, svd_niter, svd_oversampling, svd_cache_dir
                )
            a0, s0, b0 = vh.to(dtype), (s / scale).to(dtype), u.to(dtype)
        a, sv, b = a0.clone(), s0.clone(), b0.clone()
        if not init_weights:  # seeded by the global RNG, like PEFT's other tuners
            a = a + 0.3 * torch.randn_like(a) / a.shape[1] ** 0.5
            b = b + 0.3 * torch.randn_like(b) / b.shape[0] ** 0.5
            sv = sv * (1 + 0.5 * torch.randn_like(sv))

        self.sorsa_r[adapter_name] = r
        self.sorsa_scaling[adapter_name] = scale
        self.sorsa_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.sorsa_A[adapter_name] = nn.Parameter(a)
        self.sorsa_S[adapter_name] = nn.Parameter(sv)
        self.sorsa_B[adapter_name] = nn.Parameter(b)
        self.sorsa_A0[adapter_name] = a0
        self.sorsa_S0[adapter_name] = s0
        self.sorsa_B0[adapter_name] = b0
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _base_weight_out_in(self) -> torch.Tensor:
        """The (dequantized) base weight in (out, in) layout."""
        weight = self.get_base_weight()
        return weight.T if self.fan_in_fan_out else weight

    # ---------------------------------------------------------------------------------------- math
    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``s * (B (S ⊙ A x) - B0 (S0 ⊙ A0 x))`` for input ``x`` (..., in); returns (..., out).

        Computed in the trainable factors' dtype; the frozen ones follow it (TRL casts trainable parameters of a
        quantized base to bfloat16, which leaves the buffers A0, S0, B0 in float32).
        """
        a = self.sorsa_A[adapter_name]
        x = self.sorsa_dropout[adapter_name](self._cast_input_dtype(x, a.dtype))
        tuned = F.linear(F.linear(x, a) * self.sorsa_S[adapter_name], self.sorsa_B[adapter_name])
        a0, s0, b0 = (
            t.to(a.dtype)
            for t in (self.sorsa_A0[adapter_name], self.sorsa_S0[adapter_name], self.sorsa_B0[adapter_name])
        )
        start = F.linear(F.linear(x, a0) * s0, b0)
        delta = tuned - start
        scale = self.sorsa_scaling[adapter_name]
        return delta if scale == 1.0 else delta * scale

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense update ``s * (B diag(S) A - B0 diag(S0) A0)`` in the base weight's layout, in the factors'
        dtype (float32 or float64). Built only for merging and conversion, never in forward."""
        b = torch.cat([self.sorsa_B[adapter_name], -self.sorsa_B0[adapter_name]], dim=1)
        sa = torch.cat(
            [
                self.sorsa_S[adapter_name][:, None] * self.sorsa_A[adapter_name],
                self.sorsa_S0[adapter_name][:, None] * self.sorsa_A0[adapter_name],
            ]
        )
        delta = (b @ sa) * self.sorsa_scaling[adapter_name]
        return delta.T if self.fan_in_fan_out else delta


def _creating_on_meta() -> bool:
    """True inside PEFT's ``init_empty_weights`` context (``low_cpu_mem_usage=True``), where new parameters are
    placed on the meta device and their values come from the state dict loaded next."""
    probe = nn.Module()
    probe.register_parameter("probe", nn.Parameter(torch.empty(0)))
    return probe.probe.device.type == "meta"


class Linear(nn.Module, SorsaLayer):
    """SORSA around ``nn.Linear``, transformers' ``Conv1D`` (``fan_in_fan_out=True``) or a quantized linear."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, fan_in_fan_out: bool = False, **kwargs: Any):
        super().__init__()
        SorsaLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._forward_additive(x, *args, **kwargs)

    def extra_repr(self) -> str:
        return quantization_extra_repr(self)

    def __repr__(self) -> str:
        return "sorsa." + super().__repr__()
