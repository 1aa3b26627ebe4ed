"""Small linear-algebra helpers shared by the SVD-initialized methods."""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

SVD_METHOD, SVD_NITER, SVD_OVERSAMPLING = "randomized", 10, 0
"""Defaults of the SVD-initialized methods: within 1e-4 of the exact top-r fit on every SmolLM2 layer at r = 8 and
16 (tests/test_sorsa_svd_real.py)."""
BLOCK_MULTIPLE = 16
"""The randomized SVD's block width is rounded up to a multiple of this: on CPU a 16-column product with a SmolLM2
weight is no slower than an 8- or 12-column one (full vector width; measured faster), so the extra columns are free
oversampling."""


def top_singular_triplets(
    weight: torch.Tensor,
    rank: int,
    method: str = SVD_METHOD,
    niter: int = SVD_NITER,
    oversampling: int = SVD_OVERSAMPLING,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets of a 2-D ``weight`` (m, n), computed in float32 (float64 for a float64
    weight; 16-bit weights are upcast, since LAPACK has no half-precision SVD).

    Returns ``U`` (m, rank), ``S`` (rank,) in descending order and ``Vh`` (rank, n), such that
    ``U diag(S) Vh`` is the best rank-``rank`` approximation of ``weight`` (exactly, for ``method="full"``;
    up to the randomized error otherwise). Signs are canonical: the largest-magnitude entry of each column
    of ``U`` is positive, so the result does not depend on the LAPACK/cuSOLVER sign convention.

    ``method="randomized"`` is a seeded randomized block Krylov SVD (Musco & Musco, 2015): a random block of
    b = ``rank + oversampling`` columns (rounded up to a multiple of :data:`BLOCK_MULTIPLE`) grows ``niter``
    steps of the Krylov space of WᵀW, and the top ``rank`` Ritz pairs of that (niter + 1)·b-dimensional space
    are returned. It is deterministic for a given ``seed`` and never touches the global RNG. Where the space
    would span the smaller side of ``weight`` the exact SVD is taken instead (it is then the cheaper one).
    """
    if weight.ndim != 2:
        raise ValueError(f"Expected a 2-D weight, got shape {tuple(weight.shape)}.")
    w = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    m, n = w.shape
    if not 0 < rank <= min(m, n):
        raise ValueError(f"rank must be in [1, {min(m, n)}] for a {m}x{n} matrix, got {rank}.")
    block = -(-(rank + oversampling) // BLOCK_MULTIPLE) * BLOCK_MULTIPLE
    if method == "randomized" and (niter + 1) * block < min(m, n):
        u, s, vh = _block_krylov_svd(w, rank, block, niter, seed)
    elif method in ("full", "randomized"):
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    else:
        raise ValueError(f"Unknown SVD method {method!r}; use 'full' or 'randomized'.")
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    pivot = u.abs().argmax(dim=0)
    signs = torch.sign(u[pivot, torch.arange(rank, device=u.device)])
    signs[signs == 0] = 1.0
    return (u * signs).contiguous(), s.contiguous(), (vh * signs[:, None]).contiguous()


def _block_krylov_svd(w: torch.Tensor, rank: int, block: int, steps: int, seed: int):
    """Top-``rank`` triplets of ``w`` from the Krylov space K = [Y, GY, …, G^steps Y] of G = AᵀA, where A (m, n)
    is ``w`` or its transpose with n <= m, and Y (n, ``block``) is a seeded Gaussian block.

    K is kept orthonormal (each new block is orthogonalized against all earlier ones and QR'd, twice), and A K
    is built alongside it, so the Rayleigh–Ritz step needs no further pass over A: the eigenvectors E of
    (AK)ᵀ(AK) give the Ritz vectors K E, and the SVD of the thin A K E = U S Zᵀ gives V = K E Z with A V = U S.
    Cost: 2·steps + 1 products of A or Aᵀ with ``block`` columns, like a range finder with ``steps`` power
    iterations, whose accuracy needs far more of them on flat spectra.
    """
    tall = w.shape[0] >= w.shape[1]
    a = w if tall else w.T
    generator = torch.Generator(device=w.device).manual_seed(seed)
    start = torch.randn(a.shape[1], block, generator=generator, device=w.device, dtype=w.dtype)
    basis = [torch.linalg.qr(start).Q]
    images = [a @ basis[0]]
    for _ in range(steps):
        krylov = torch.cat(basis, dim=1)
        y = a.T @ images[-1]
        for _ in range(2):  # the second round repairs a block that was nearly inside K (an invariant subspace)
            y = torch.linalg.qr(y - krylov @ (krylov.T @ y)).Q
        basis.append(y)
        images.append(a @ basis[-1])
    krylov, image = torch.cat(basis, dim=1), torch.cat(images, dim=1)
    ritz = torch.linalg.eigh(image.T @ image).eigenvectors[:, -rank:].flip(1)
    u, s, zh = torch.linalg.svd(image @ ritz, full_matrices=False)
    v = krylov @ ritz @ zh.T
    return (u, s, v.T) if tall else (v, s, u.T)


def cached_top_singular_triplets(
    weight: torch.Tensor,
    rank: int,
    method: str = SVD_METHOD,
    niter: int = SVD_NITER,
    oversampling: int = SVD_OVERSAMPLING,
    cache_dir: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`top_singular_triplets`, memoized on disk under ``cache_dir`` (no caching when it is None).

    The key is a SHA-256 of the weight's bytes, shape and dtype plus the SVD settings, so a restarted run (or
    another adapter on the same base) reads the factors back instead of redoing the SVD, and a changed weight
    never hits a stale entry. Entries are safetensors files written atomically; an unreadable entry is
    recomputed and replaced with a warning.
    """
    if cache_dir is None:
        return top_singular_triplets(weight, rank, method, niter, oversampling)
    digest = hashlib.sha256()
    host = weight.detach().contiguous().cpu()
    # "krylov": entries of the earlier range-finder 'randomized' never match
    digest.update(f"{tuple(host.shape)}|{host.dtype}|{rank}|{method}|krylov|{niter}|{oversampling}".encode())
    digest.update(memoryview(host.view(torch.uint8).numpy()))  # hashed in place, no bytes copy
    path = Path(cache_dir) / f"svd-{digest.hexdigest()}.safetensors"
    if path.exists():
        try:
            entry = load_file(path, device=str(weight.device))
            return entry["U"], entry["S"], entry["Vh"]
        except (SafetensorError, KeyError, OSError) as error:
            warnings.warn(f"Ignoring unreadable SVD cache entry {path} ({error}); recomputing it.", stacklevel=2)
    u, s, vh = top_singular_triplets(weight, rank, method, niter, oversampling)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(handle)
    try:
        save_file({"U": u.cpu(), "S": s.cpu(), "Vh": vh.cpu()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return u, s, vh
