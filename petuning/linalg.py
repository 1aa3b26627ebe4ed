"""Small linear-algebra helpers shared by the SVD-initialized methods."""

from __future__ import annotations

import torch


def top_singular_triplets(
    weight: torch.Tensor,
    rank: int,
    method: str = "full",
    niter: int = 4,
    oversampling: int = 8,
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
