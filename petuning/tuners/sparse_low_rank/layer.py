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
import threading
import weakref
from typing import Any, Callable, Optional

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


TOKEN_BLOCK = 128
"""Tokens per block of the token-minor operands on CPU. A transposing copy of a whole (N, features) activation
outgrows the L2 cache at SmolLM2's MLP width and costs more than the sparse product itself; per block of 128
tokens it stays cache-resident (``benchmarks/method_speed.py``). Fewer tokens make one block; accelerators
take all tokens as one block."""


def _block_size(x: torch.Tensor) -> int:
    tokens = max(x.shape[0], 1)
    return min(TOKEN_BLOCK, tokens) if x.device.type == "cpu" else tokens


class _TokenMinor(torch.autograd.Function):
    """``x`` (N, in) -> token-minor blocks ``x_t`` (n_blocks, in, block) in ``dtype``: ``x_t[b] = x[b·block :
    (b+1)·block]ᵀ``, the last block zero-padded. Backward transposes the blocks' gradient back into x's layout
    and dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        n, features = x.shape
        block = _block_size(x)
        ctx.n, ctx.dtype = n, x.dtype
        full, rest = divmod(n, block)
        x_t = torch.empty(full + (rest > 0), features, block, dtype=dtype, device=x.device)
        if full:
            x_t[:full].copy_(x[: full * block].view(full, block, features).transpose(1, 2))
        if rest:
            x_t[full, :, :rest].copy_(x[full * block :].T)
            x_t[full, :, rest:].zero_()
        return x_t

    @staticmethod
    def backward(ctx, grad_t: torch.Tensor):
        blocks, features, block = grad_t.shape
        full, rest = divmod(ctx.n, block)
        grad = torch.empty(ctx.n, features, dtype=ctx.dtype, device=grad_t.device)
        if full:
            grad[: full * block].view(full, block, features).copy_(grad_t[:full].transpose(1, 2))
        if rest:
            grad[full * block :].copy_(grad_t[full, :, :rest].T)
        return grad, None


class _TokenMinorCache(threading.local):
    """The last :func:`token_minor` result of this thread, reused while the same input tensor (same object, not
    written to since) is asked for again in the same dtype and grad mode: q/k/v, and gate/up, read one input, so
    one set of transposed blocks serves them all in the forward, and their input gradients are summed in the
    token-minor layout and transposed back once in the backward."""

    def __init__(self) -> None:
        self.source: Optional[weakref.ref] = None
        self.key: tuple = ()
        self.result: Optional[torch.Tensor] = None


_token_minor_cache = _TokenMinorCache()


def token_minor(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Token-minor blocks (n_blocks, in, block) of ``x`` (..., in) flattened to N tokens, in ``dtype``,
    differentiable (:class:`_TokenMinor`), shared by sibling layers (:class:`_TokenMinorCache`). The input is
    held weakly, so a freed input never matches a new one; a write through ``.data``, which bumps no version
    counter, between two calls on one tensor is not seen."""
    cache = _token_minor_cache
    key = (x._version, dtype, torch.is_grad_enabled(), x.requires_grad)
    if cache.source is not None and cache.source() is x and cache.key == key:
        return cache.result
    result = _TokenMinor.apply(x.reshape(-1, x.shape[-1]), dtype)
    cache.source, cache.key, cache.result = weakref.ref(x), key, result
    return result


class SparseLinear(torch.autograd.Function):
    """``y = x Sᵀ`` (N, out) for ``x`` (N, in), its token-minor blocks ``x_t`` (n_blocks, in, block)
    (:func:`token_minor`) and the sparse S (out, in) given by ``values`` on ``structure``.

    torch's CSR kernels run on token-minor operands (features x tokens), so every product runs per block of
    tokens, where the transposing copies stay cache-resident: ``y[block] = (S x_t[b])ᵀ``. Saved for backward:
    ``x`` itself (the tensor the low-rank part saves too, so the sparse part adds no activation memory) and
    ``values``. Backward per block, with ``dy_t = dy[block]ᵀ`` and ``x_tb = x[block]ᵀ`` transposed into reused
    buffers: ``dx_t[b] = Sᵀ dy_t`` through the CSR of Sᵀ (summed over sibling layers in x_t's gradient), and
    ``dvalues += (dy_t x_tbᵀ)[support]`` by ``sampled_addmm``, which reads ``x_tbᵀ`` as a column-major view.
    Nothing of size out x in is formed.
    """

    @staticmethod
    def forward(ctx, x_t: torch.Tensor, x: torch.Tensor, values: torch.Tensor, structure: SparseStructure):
        n, block = x.shape[0], x_t.shape[2]
        ctx.structure, ctx.block = structure, block
        ctx.save_for_backward(x, values)
        matrix = structure.matrix(values)
        y = torch.empty(n, structure.shape[0], dtype=x_t.dtype, device=x_t.device)
        part = torch.empty(structure.shape[0], block, dtype=x_t.dtype, device=x_t.device)
        for b, start in enumerate(range(0, n, block)):
            rows = min(block, n - start)
            torch.mm(matrix, x_t[b], out=part)
            y[start : start + rows].copy_(part[:, :rows].T)
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, values = ctx.saved_tensors
        structure: SparseStructure = ctx.structure
        n, (out_features, in_features), block = x.shape[0], structure.shape, ctx.block
        want_x, want_values = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        dtype, device = values.dtype, values.device
        grad_x_t = torch.empty(-(-n // block), in_features, block, dtype=dtype, device=device) if want_x else None
        grad_values = torch.zeros_like(values) if want_values else None
        transposed = structure.transposed(values) if want_x else None
        pattern = structure.matrix(torch.zeros_like(values)) if want_values else None
        grad_t = torch.empty(out_features, block, dtype=dtype, device=device)
        x_block = torch.empty(in_features, block, dtype=dtype, device=device) if want_values else None
        for b, start in enumerate(range(0, n, block)):
            rows = min(block, n - start)
            grad_t[:, :rows].copy_(grad_out[start : start + rows].T)
            grad_t[:, rows:].zero_()  # the last block's padding: no gradient there, nothing sampled from it
            if want_x:
                torch.mm(transposed, grad_t, out=grad_x_t[b])
            if want_values:
                x_block[:, :rows].copy_(x[start : start + rows].T)
                grad_values += torch.sparse.sampled_addmm(pattern, grad_t, x_block.T, beta=0.0).values()
        return grad_x_t, None, grad_values, None


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
        dropout = self.sparse_low_rank_dropout[adapter_name]
        shared = x if isinstance(dropout, nn.Identity) else None  # the input itself: sibling layers share its copy
        x = dropout(x.to(dtype))
        out: Optional[torch.Tensor] = None
        if self.sparse_low_rank_r[adapter_name]:
            a, b = self.sparse_low_rank_A[adapter_name], self.sparse_low_rank_B[adapter_name]
            out = F.linear(F.linear(x, a.to(dtype)), b.to(dtype)) * self.sparse_low_rank_scaling[adapter_name]
        structure = self.sparse_structure(adapter_name)
        if structure is not None:
            with torch.autocast(device_type=x.device.type, enabled=False):  # the sparse kernels run in fp32/fp64
                flat_x = x.reshape(-1, self.in_features)
                x_t = token_minor(x if shared is None else shared, dtype)
                flat = SparseLinear.apply(x_t, flat_x.detach(), values.to(dtype), structure)
                sparse = flat.reshape(*x.shape[:-1], self.out_features)
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
