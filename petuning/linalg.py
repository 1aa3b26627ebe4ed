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

SVD_METHOD, SVD_NITER, SVD_OVERSAMPLING = "randomized", 12, 32
"""Defaults of the SVD-initialized methods: within 1e-4 of the exact top-r fit on real SmolLM2 layers
(tests/test_sorsa_svd_real.py)."""


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

    ``method="randomized"`` runs a seeded range finder (Halko et al.) with ``oversampling`` extra directions
    and ``niter`` power iterations; it is deterministic for a given ``seed`` and never touches the global RNG.
    """
    if weight.ndim != 2:
        raise ValueError(f"Expected a 2-D weight, got shape {tuple(weight.shape)}.")
    w = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    m, n = w.shape
    if not 0 < rank <= min(m, n):
        raise ValueError(f"rank must be in [1, {min(m, n)}] for a {m}x{n} matrix, got {rank}.")
    if method == "full":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    elif method == "randomized":
        u, s, vh = _randomized_svd(w, min(rank + oversampling, m, n), niter, seed)
    else:
        raise ValueError(f"Unknown SVD method {method!r}; use 'full' or 'randomized'.")
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    pivot = u.abs().argmax(dim=0)
    signs = torch.sign(u[pivot, torch.arange(rank, device=u.device)])
    signs[signs == 0] = 1.0
    return (u * signs).contiguous(), s.contiguous(), (vh * signs[:, None]).contiguous()


def _randomized_svd(w: torch.Tensor, k: int, niter: int, seed: int):
    generator = torch.Generator(device=w.device).manual_seed(seed)
    omega = torch.randn(w.shape[1], k, generator=generator, device=w.device, dtype=w.dtype)
    q = torch.linalg.qr(w @ omega).Q
    for _ in range(niter):
        q = torch.linalg.qr(w.T @ q).Q
        q = torch.linalg.qr(w @ q).Q
    ub, s, vh = torch.linalg.svd(q.T @ w, full_matrices=False)
    return q @ ub, s, vh


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
    digest.update(f"{tuple(host.shape)}|{host.dtype}|{rank}|{method}|{niter}|{oversampling}".encode())
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
