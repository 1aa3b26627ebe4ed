"""Sparse-plus-low-rank layers: ``y = base(x) + (alpha / r) · B (A x) + S x`` around a frozen linear layer.

Shapes for a layer with weight W0 (out, in), rank r and nnz support entries:

- ``sparse_low_rank_A[name]``        (r, in)   trainable, Kaiming-uniform (absent when r = 0)
- ``sparse_low_rank_B[name]``        (out, r)  trainable, zero at init
- ``sparse_low_rank_values[name]``   (nnz,)    trainable, zero at init: the nonzeros of S
- ``sparse_low_rank_indices[name]``  (nnz,)    int32 buffer, saved: sorted flat indices i * in + j of the
  support in the (out, in) layout (all -1 while a gradient-chosen support is pending)

Nothing of size out x in exists in the forward or backward pass. ``S x`` runs through a custom autograd
function (:class:`SparseLinear`): forward is a CSR sparse-dense product, the input gradient is the product
with Sᵀ (a second CSR structure over the same values), and the values' gradient is the sampled product
``(grad_outᵀ x)[support]`` (SDDMM), computed per support entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.utils import quantization_extra_repr
from peft.utils.integrations import gather_params_ctx
from torch import nn

from petuning.tuners.base import PetuningLayer
from petuning.tuners.common import AdditiveLayerMixin

from .support import (
    SparseStructure,
    check_support,
    largest_score_support,
    pending_support,
    random_support,
    smallest_magnitude_support,
    support_size,
)


class SparseLinear(torch.autograd.Function):
    """``y = x Sᵀ`` for x (N, in) and the sparse S (out, in) given by ``values`` on ``structure``; y (N, out).

    Saves only ``x`` and ``values`` (x is the same tensor the low-rank part saves). Backward:
    ``dx = dy S`` through the CSR of Sᵀ, ``dvalues = (dyᵀ x)[support]`` through the sampled product.

    The CSR kernels work on token-minor operands (features x tokens), so x and dy are transposed into contiguous
    copies once per call (dy once for both products) and results are transposed back into contiguous row-major
    tensors: elementwise ops on strided views cost several times a transposing copy.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, values: torch.Tensor, structure: SparseStructure) -> torch.Tensor:
        ctx.structure = structure
        ctx.save_for_backward(x, values)
        return (structure.matrix(values) @ x.T.contiguous()).T.contiguous()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, values = ctx.saved_tensors
        structure: SparseStructure = ctx.structure
        grad_out_t = grad_out.T.contiguous()  # (out, N)
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = (structure.transposed(values) @ grad_out_t).T.contiguous()
        if ctx.needs_input_grad[1]:
            grad_values = structure.sampled_product(grad_out_t, x)
        return grad_x, grad_values, None


class _GradientProbe(torch.autograd.Function):
    """Identity on the layer output that hands ``(grad_out (N, out), x (N, in))`` to ``sink`` in backward, so the
    gradient of the frozen weight, ``grad_outᵀ x``, can be accumulated for a gradient-chosen support.

    The (pending, unused) sparse values are an input with a zero gradient: that makes the output require grad
    even where nothing before the layer does (a first layer on a frozen base), and under DDP the values still
    take part in every backward."""

    @staticmethod
    def forward(ctx, result: torch.Tensor, x: torch.Tensor, values: torch.Tensor, sink: Callable) -> torch.Tensor:
        ctx.sink = sink
        ctx.save_for_backward(x, values)
        return result.view_as(result)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, values = ctx.saved_tensors
        ctx.sink(grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1]))
        return grad, None, torch.zeros_like(values) if ctx.needs_input_grad[2] else None, None


class SparseLowRankLayer(AdditiveLayerMixin, PetuningLayer):
    """State and math shared by every sparse-plus-low-rank layer type (forward and merge: :class:`AdditiveLayerMixin`)."""

    method = "sparse_low_rank"

    adapter_layer_names = ("sparse_low_rank_A", "sparse_low_rank_B", "sparse_low_rank_values")
    other_param_names = (
        "sparse_low_rank_indices",
        "sparse_low_rank_r",
        "sparse_low_rank_scaling",
        "sparse_low_rank_dropout",
        "sparse_low_rank_warmup",
        "sparse_low_rank_scores",
        "sparse_low_rank_structure",
    )

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self._init_petuning_state(base_layer, kwargs)
        self.sparse_low_rank_A = nn.ParameterDict({})
        self.sparse_low_rank_B = nn.ParameterDict({})
        self.sparse_low_rank_values = nn.ParameterDict({})
        self.sparse_low_rank_indices = BufferDict({}, persistent=True)
        self.sparse_low_rank_r: dict[str, int] = {}
        self.sparse_low_rank_scaling: dict[str, float] = {}
        self.sparse_low_rank_dropout = nn.ModuleDict({})
        self.sparse_low_rank_warmup: dict[str, int] = {}
        # Summed squared gradients of W (out, in), float32 (float64 on float64 models), while a gradient-chosen
        # support collects data.
        self.sparse_low_rank_scores: dict[str, torch.Tensor] = {}
        # Cached CSR structure per adapter: (index tensor it was built from, its version, structure or None).
        self.sparse_low_rank_structure: dict[str, tuple[torch.Tensor, int, Optional[SparseStructure]]] = {}
        self._collecting: set[str] = set()
        self.module_name = ""

    # ----------------------------------------------------------------------------------------- init
    def update_layer(
        self,
        adapter_name: str,
        r: int,
        scaling: float,
        density: float,
        support: str,
        seed: int = 0,
        gradient_warmup_steps: int = 0,
        dropout: float = 0.0,
        init_weights: bool = True,
        module_name: str = "",
        inference_mode: bool = False,
        strict_rank: bool = False,
        **_: Any,
    ) -> None:
        """Add adapter ``adapter_name``: choose the support (or mark it pending) and create the trainable tensors."""
        self.module_name = module_name
        where = self._where()
        shape = f"{self.out_features}x{self.in_features}"
        limit = min(self.in_features, self.out_features)
        r = self.fit_rank(
            adapter_name,
            r,
            limit,
            f"the low-rank part of a {shape} update has rank at most {limit}",
            strict_rank,
            "Use a smaller r, or leave this layer out of target_modules.",
            module_name,
        )
        nnz = support_size(density, self.out_features, self.in_features, where, strict=strict_rank)
        if nnz > round(density * self.out_features * self.in_features):
            self.note_size_change(adapter_name, f"density {density} selects no entry of the {shape} weight: 1 entry")
        base = self.get_base_layer()
        if self.quantization_backend is None and not base.weight.dtype.is_floating_point:
            raise TypeError(
                f"sparse_low_rank needs a floating-point base weight, but the weight{where} has dtype "
                f"{base.weight.dtype}. Load the model in float32/bfloat16/float16, or quantize it with bitsandbytes."
            )
        numel = self.out_features * self.in_features
        if support == "random":
            indices = random_support(numel, nnz, seed, module_name)
        elif support == "magnitude":
            with gather_params_ctx(base.weight), torch.no_grad():  # full weight under DeepSpeed ZeRO-3
                indices = smallest_magnitude_support(self._base_weight_out_in(), nnz)
        else:
            indices = pending_support(nnz)

        dtype = self.adapter_dtype()
        values = torch.zeros(nnz, dtype=dtype)
        if r:
            a = torch.empty(r, self.in_features, dtype=dtype)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            b = torch.zeros(self.out_features, r, dtype=dtype)
        if not init_weights:  # seeded by the global RNG, like PEFT's other tuners
            values = torch.randn(nnz, dtype=dtype) / math.sqrt(self.in_features)
            if r:
                b = torch.randn(self.out_features, r, dtype=dtype) / math.sqrt(r)

        self.sparse_low_rank_r[adapter_name] = r
        self.sparse_low_rank_scaling[adapter_name] = scaling
        self.sparse_low_rank_warmup[adapter_name] = gradient_warmup_steps
        self.sparse_low_rank_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.sparse_low_rank_values[adapter_name] = nn.Parameter(values)
        self.sparse_low_rank_indices[adapter_name] = indices
        if r:
            self.sparse_low_rank_A[adapter_name] = nn.Parameter(a)
            self.sparse_low_rank_B[adapter_name] = nn.Parameter(b)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _where(self) -> str:
        return f" (layer {self.module_name!r})" if self.module_name else ""

    def _base_weight_out_in(self) -> torch.Tensor:
        """The (dequantized) base weight in (out, in) layout."""
        weight = self.get_base_weight()
        return weight.T if self.fan_in_fan_out else weight

    # -------------------------------------------------------------------------------------- support
    def sparse_structure(self, adapter_name: str) -> Optional[SparseStructure]:
        """The CSR structure of the adapter's support (None while it is pending), rebuilt only when the index
        buffer was replaced or written to (loading, moving to another device, choosing a pending support)."""
        indices = self.sparse_low_rank_indices[adapter_name]
        cached = self.sparse_low_rank_structure.get(adapter_name)
        if cached is not None and cached[0] is indices and cached[1] == indices._version:
            return cached[2]
        numel = self.out_features * self.in_features
        chosen = check_support(indices, self.sparse_low_rank_values[adapter_name].numel(), numel, self._where())
        structure = SparseStructure(indices, self.out_features, self.in_features) if chosen else None
        self.sparse_low_rank_structure[adapter_name] = (indices, indices._version, structure)
        return structure

    def support_pending(self, adapter_name: str) -> bool:
        """True while a gradient-chosen support still waits for its data."""
        return self.sparse_structure(adapter_name) is None

    def choose_support_from_scores(self, adapter_name: str) -> None:
        """Fix a pending support to the entries with the largest collected scores (summed squared gradients), and
        drop the scores."""
        scores = self.sparse_low_rank_scores.pop(adapter_name, None)
        if scores is None:
            raise ValueError(
                f"No gradients were collected for the sparse support{self._where()}: the layer took no part in the "
                "backward passes of the warm-up batches. Check that the batches reach it and produce a loss."
            )
        indices = self.sparse_low_rank_indices[adapter_name]
        with torch.no_grad():
            indices.copy_(largest_score_support(scores, indices.numel()).to(indices.device))

    def _accumulate_scores(self, adapter_name: str) -> Callable[[torch.Tensor, torch.Tensor], None]:
        def sink(grad_out: torch.Tensor, x: torch.Tensor) -> None:
            with torch.no_grad():
                dtype = torch.promote_types(grad_out.dtype, torch.float32)
                grad_w = grad_out.to(dtype).T @ x.to(dtype)  # (out, in): dL/dW of this micro-batch
                scores = self.sparse_low_rank_scores.get(adapter_name)
                if scores is None:
                    self.sparse_low_rank_scores[adapter_name] = grad_w.square_()
                else:
                    scores.addcmul_(grad_w, grad_w)

        return sink

    def _is_collecting(self, adapter_name: str) -> bool:
        """Whether this forward feeds the gradient statistics of a pending support, and if a training forward
        has no way to choose the support, say so."""
        if adapter_name in self._collecting:
            return True
        if not (self.training and torch.is_grad_enabled()):
            return False
        if self.sparse_low_rank_warmup[adapter_name] > 0:
            return True
        raise ValueError(
            f"The sparse support of adapter {adapter_name!r}{self._where()} is chosen from gradients "
            "(support='gradient') and needs data, but none was given. Either call "
            "petuning.tuners.sparse_low_rank.select_support_from_gradients(model, batches) before training, or set "
            "gradient_warmup_steps > 0 and train with petuning.PetuningCallback / petuning.TrainingHooks."
        )

    # ---------------------------------------------------------------------------------------- math
    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``(alpha / r) · B (A x) + S x`` for ``x`` (..., in), in float32 (float64 for float64 adapters); the
        sparse part is left out while its support is pending. Returns (..., out)."""
        values = self.sparse_low_rank_values[adapter_name]
        dtype = values.dtype if values.dtype in (torch.float32, torch.float64) else torch.float32
        x = self.sparse_low_rank_dropout[adapter_name](x.to(dtype))
        out: Optional[torch.Tensor] = None
        if self.sparse_low_rank_r[adapter_name]:
            a, b = self.sparse_low_rank_A[adapter_name], self.sparse_low_rank_B[adapter_name]
            out = F.linear(F.linear(x, a.to(dtype)), b.to(dtype)) * self.sparse_low_rank_scaling[adapter_name]
        structure = self.sparse_structure(adapter_name)
        if structure is not None:
            with torch.autocast(device_type=x.device.type, enabled=False):  # the sparse kernels run in fp32/fp64
                flat = x.reshape(-1, self.in_features)
                sparse = SparseLinear.apply(flat, values.to(dtype), structure).reshape(*x.shape[:-1], self.out_features)
            out = sparse if out is None else out + sparse
        if out is None:
            out = x.new_zeros(*x.shape[:-1], self.out_features)
        return out

    def delta_weight_out_in(self, adapter_name: str, allow_pending: bool = False) -> torch.Tensor:
        """Dense ``(alpha / r) B A + scatter(values)`` in (out, in) layout, differentiable in all trainable tensors.
        For merging, export and the nuclear-norm regularizer only; the forward never builds it."""
        values = self.sparse_low_rank_values[adapter_name]
        dtype = values.dtype if values.dtype in (torch.float32, torch.float64) else torch.float32
        structure = self.sparse_structure(adapter_name)
        if structure is None and not allow_pending:
            raise ValueError(
                f"The sparse support of adapter {adapter_name!r}{self._where()} has not been chosen yet "
                "(support='gradient'), so the update is not defined. Choose it first with "
                "select_support_from_gradients(model, batches) or by training through the warm-up steps."
            )
        delta = torch.zeros(self.out_features * self.in_features, dtype=dtype, device=values.device)
        if structure is not None:
            delta = delta.index_put((self.sparse_low_rank_indices[adapter_name].long(),), values.to(dtype))
        delta = delta.view(self.out_features, self.in_features)
        if self.sparse_low_rank_r[adapter_name]:
            a, b = self.sparse_low_rank_A[adapter_name], self.sparse_low_rank_B[adapter_name]
            delta = delta + (b.to(dtype) @ a.to(dtype)) * self.sparse_low_rank_scaling[adapter_name]
        return delta

    def _holds_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self.sparse_low_rank_values  # A and B are absent when r = 0

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense update in the base weight's layout ((in, out) for Conv1D), in the adapter's float32/float64."""
        delta = self.delta_weight_out_in(adapter_name)
        return delta.T if self.fan_in_fan_out else delta


class Linear(nn.Module, SparseLowRankLayer):
    """Sparse plus low rank around ``nn.Linear``, transformers' ``Conv1D`` (``fan_in_fan_out=True``) or a quantized
    linear layer (bitsandbytes and the other backends of PEFT's generic quantization support)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, fan_in_fan_out: bool = False, **kwargs: Any):
        super().__init__()
        SparseLowRankLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._forward_additive(x, *args, **kwargs)

    def _add_adapter_output(self, result: torch.Tensor, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if self.support_pending(adapter_name) and self._is_collecting(adapter_name):  # gradient support warm-up
            values = self.sparse_low_rank_values[adapter_name]
            result = _GradientProbe.apply(result, x.detach(), values, self._accumulate_scores(adapter_name))
        return super()._add_adapter_output(result, x, adapter_name)

    def extra_repr(self) -> str:
        return quantization_extra_repr(self)

    def __repr__(self) -> str:
        return "sparse_low_rank." + super().__repr__()
