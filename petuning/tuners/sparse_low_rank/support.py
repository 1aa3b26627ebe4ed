"""Sparse supports: how they are chosen, and the index structure the sparse kernels run on.

A support is a sorted 1-D int32 tensor of distinct flat indices ``i * in + j`` into the (out, in) layout of the
weight (also for GPT-2's Conv1D, whose weight is stored transposed). A support that is still to be chosen from
gradients is all ``-1`` (:data:`PENDING`).
"""

from __future__ import annotations

import warnings
import zlib
from typing import Optional

import torch

PENDING = -1
"""Index value of a support that has not been chosen yet (``support="gradient"`` before its data arrived)."""

MAX_NUMEL = 2**31 - 1
"""Flat indices are stored as int32, so a weight may have at most this many entries."""

TOKEN_CHUNK = 8192
"""Tokens per sampled-product call in the backward pass; bounds the transposed copies of the token-by-feature
matrices that the sparse kernel makes, independently of the batch size."""


def support_size(density: float, out_features: int, in_features: int, where: str = "", strict: bool = True) -> int:
    """``round(density * out * in)``, refusing weights too large for int32 indices; a density that rounds to 0 is
    refused (``strict``) or gives one entry."""
    numel = out_features * in_features
    if numel > MAX_NUMEL:
        raise ValueError(
            f"The {out_features}x{in_features} weight{where} has more than 2**31 - 1 entries, too many for the int32 "
            "support indices of sparse_low_rank. Leave this layer out of target_modules."
        )
    nnz = round(density * numel)
    if nnz == 0 and not strict:
        return 1
    if nnz == 0:
        raise ValueError(
            f"density={density} selects no entry of the {out_features}x{in_features} weight{where} "
            f"(round(density * {numel}) = 0). Use density >= {1 / numel:.2g}, or leave this layer out."
        )
    return nnz


def random_support(numel: int, nnz: int, seed: int, module_name: str) -> torch.Tensor:
    """``nnz`` distinct indices drawn uniformly from ``range(numel)``; the same for the same seed and module name
    (the name is hashed with CRC-32, so the layer order does not matter and layers of equal shape differ)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(module_name.encode())) % 2**63)
    return torch.randperm(numel, generator=generator)[:nnz].sort().values.to(torch.int32)


def smallest_magnitude_support(weight: torch.Tensor, nnz: int) -> torch.Tensor:
    """Indices of the ``nnz`` entries of ``weight`` (out, in) with the smallest ``|w|``; ties go to the lower index."""
    order = torch.argsort(weight.detach().abs().flatten().float(), stable=True)
    return order[:nnz].sort().values.to(torch.int32)


def largest_score_support(scores: torch.Tensor, nnz: int) -> torch.Tensor:
    """Indices of the ``nnz`` largest entries of ``scores`` (e.g. summed squared gradients); ties go to the lower
    index."""
    order = torch.sort(scores.flatten(), descending=True, stable=True).indices
    return order[:nnz].sort().values.to(torch.int32)


def pending_support(nnz: int) -> torch.Tensor:
    return torch.full((nnz,), PENDING, dtype=torch.int32)


class SparseStructure:
    """CSR index structure of a support S (out, in) and of its transpose, on the support's device.

    ``matrix(values)`` is S as a sparse CSR tensor, ``transposed(values)`` is Sᵀ (in, out); both share their
    index tensors with this object, so building them per call costs only the tensor headers (and, for Sᵀ, one
    gather of the values). The CSR indices are int64 on CPU, where torch's MKL sparse kernels would otherwise
    convert int32 indices on every call, and int32 on accelerators.
    """

    def __init__(self, flat: torch.Tensor, out_features: int, in_features: int) -> None:
        flat = flat.long()
        index_dtype = torch.int64 if flat.device.type == "cpu" else torch.int32
        rows, cols = flat // in_features, flat % in_features
        self.shape = (out_features, in_features)
        self.nnz = flat.numel()
        self.crow = _crow(rows, out_features, index_dtype)
        self.col = cols.to(index_dtype)
        self.perm_t = torch.argsort(cols * out_features + rows)  # keys are distinct, so the order is unique
        self.crow_t = _crow(cols, in_features, index_dtype)
        self.col_t = rows[self.perm_t].to(index_dtype)

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        return _csr(self.crow, self.col, values, self.shape)

    def transposed(self, values: torch.Tensor) -> torch.Tensor:
        return _csr(self.crow_t, self.col_t, values[self.perm_t], self.shape[::-1])

    def sampled_product(self, grad_out_t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``g[k] = Σ_t grad_out[t, i_k] · x[t, j_k]`` for every support entry k = (i_k, j_k): the gradient of the
        sparse values, i.e. (grad_outᵀ x) read at the support only, without forming the (out, in) product.

        ``grad_out_t`` (out, N) is grad_out transposed (contiguous is fastest), ``x`` (N, in); returns (nnz,).
        torch's sampled dense-dense matmul (``torch.sparse.sampled_addmm``) computes one dot product over the
        tokens per support entry; the tokens are processed in chunks of :data:`TOKEN_CHUNK`, so the kernel's
        working copies stay bounded whatever the batch size.
        """
        pattern = self.matrix(torch.zeros(self.nnz, dtype=x.dtype, device=x.device))
        total: Optional[torch.Tensor] = None
        for start in range(0, x.shape[0], TOKEN_CHUNK):
            g, xs = grad_out_t[:, start : start + TOKEN_CHUNK], x[start : start + TOKEN_CHUNK]
            part = torch.sparse.sampled_addmm(pattern, g, xs, beta=0.0).values()
            total = part if total is None else total + part
        if total is None:
            return torch.zeros(self.nnz, dtype=x.dtype, device=x.device)
        return total


def check_support(flat: torch.Tensor, nnz: int, numel: int, where: str = "") -> bool:
    """True if ``flat`` is a chosen support, False if it is still pending; raises for anything else (a corrupt or
    foreign adapter file): indices must be int32, distinct, sorted and inside the weight."""
    if flat.dtype != torch.int32 or flat.dim() != 1 or flat.numel() != nnz:
        raise ValueError(
            f"The sparse support{where} must be a 1-D int32 tensor of {nnz} indices, got {flat.dtype} "
            f"{tuple(flat.shape)}. The adapter file is corrupt or belongs to another model."
        )
    if nnz and bool((flat == PENDING).all()):
        return False
    if nnz and (int(flat[0]) < 0 or int(flat[-1]) >= numel or not bool((flat[1:] > flat[:-1]).all())):
        raise ValueError(
            f"The sparse support{where} is not a sorted set of distinct indices in [0, {numel}). The adapter file is "
            "corrupt or belongs to a model with other layer shapes."
        )
    return True


def _crow(rows: torch.Tensor, n_rows: int, dtype: torch.dtype) -> torch.Tensor:
    counts = torch.bincount(rows, minlength=n_rows)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(dtype)


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta state", emitted once per process
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)
