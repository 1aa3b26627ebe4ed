"""Spectral comparison of a tuned model against its base.

For every 2-D weight that the tuning changed, with W0 the base weight (m, n), W the tuned one and
``U0 S0 V0ᵀ`` / ``U S Vᵀ`` their SVDs (singular values in descending order):

- **relative update** ``||W - W0||_F / ||W0||_F`` and the **update rank** (how many singular values of
  ``W - W0`` hold 90% of its energy);
- **intruder dimensions** (Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of Equivalence"): the
  indices ``i < top_k`` of tuned left singular vectors ``U[:, i]`` whose largest cosine similarity with any
  base left singular vector is below ``threshold``, i.e. new high-ranking directions the base did not have;
- **principal-subspace drift**: ``1 - ||U0[:, :k]ᵀ U[:, :k]||_F² / k`` (and the same for V), 0 when the top-k
  subspace is unchanged, 1 when it is orthogonal to the old one;
- both spectra (the first ``top_k`` singular values go to the JSON; plots show more).

:func:`compare_state_dicts` does the work on two state dicts; :func:`analyze` loads two checkpoints (or a base
plus a PEFT adapter, merged first), writes ``summary.json`` and PNG plots. ``petuning analyze BASE TUNED``
is the command-line form.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

EMBEDDING_PATTERN = r"(embed|wte|wpe|lm_head|shared)"


@dataclass
class LayerComparison:
    """What changed in one weight matrix. Singular values are those of the base and tuned weights."""

    name: str
    shape: tuple[int, int]
    relative_update: float
    update_rank_90: int
    intruders: list[int]
    max_intruder_similarity: list[float]
    left_subspace_drift: float
    right_subspace_drift: float
    base_singular_values: list[float]
    tuned_singular_values: list[float]


def compare_weights(
    name: str, base: torch.Tensor, tuned: torch.Tensor, top_k: int = 10, threshold: float = 0.5
) -> LayerComparison:
    """Compare one base weight (m, n) with its tuned version (same shape); SVDs in float64."""
    if base.shape != tuned.shape or base.ndim != 2:
        raise ValueError(
            f"{name}: need two 2-D weights of the same shape, got {tuple(base.shape)} and {tuple(tuned.shape)}."
        )
    w0, w = base.detach().double(), tuned.detach().double()
    u0, s0, v0h = torch.linalg.svd(w0, full_matrices=False)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    k = min(top_k, s.numel())
    # |cos| between each of the top-k tuned directions and every base direction; its row maximum
    similarity = (u[:, :k].T @ u0).abs().amax(dim=1)
    delta_s = torch.linalg.svdvals(w - w0)
    energy = delta_s.square().cumsum(0)
    total = float(energy[-1]) if energy.numel() else 0.0
    update_rank = int((energy < 0.9 * total).sum()) + 1 if total > 0 else 0
    return LayerComparison(
        name=name,
        shape=tuple(base.shape),
        relative_update=float(torch.linalg.matrix_norm(w - w0) / torch.linalg.matrix_norm(w0).clamp_min(1e-300)),
        update_rank_90=update_rank,
        intruders=[i for i in range(k) if similarity[i] < threshold],
        max_intruder_similarity=[round(float(x), 6) for x in similarity],
        left_subspace_drift=_drift(u0[:, :k], u[:, :k]),
        right_subspace_drift=_drift(v0h[:k].T, vh[:k].T),
        base_singular_values=[float(x) for x in s0[:k]],
        tuned_singular_values=[float(x) for x in s[:k]],
    )


def _drift(old: torch.Tensor, new: torch.Tensor) -> float:
    """1 - mean squared cosine of the principal angles between two k-dim subspaces (orthonormal columns)."""
    return float(1.0 - (old.T @ new).square().sum() / old.shape[1])


def compare_state_dicts(
    base: dict[str, torch.Tensor],
    tuned: dict[str, torch.Tensor],
    top_k: int = 10,
    threshold: float = 0.5,
    modules: Optional[str] = None,
    include_embeddings: bool = False,
) -> list[LayerComparison]:
    """Compare every 2-D weight present in both state dicts with equal shapes that the tuning changed.

    ``modules`` is a regular expression the weight name must contain (``re.search``); embeddings and output
    heads (names matching ``EMBEDDING_PATTERN``) are left out unless ``include_embeddings``.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold is a cosine similarity and must be in (0, 1], got {threshold}.")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}.")
    reports = []
    for name, weight in base.items():
        other = tuned.get(name)
        if other is None or weight.ndim != 2 or other.shape != weight.shape or not weight.is_floating_point():
            continue
        if modules and not re.search(modules, name):
            continue
        if not include_embeddings and re.search(EMBEDDING_PATTERN, name):
            continue
        if torch.equal(weight, other):
            continue
        reports.append(compare_weights(name, weight, other, top_k, threshold))
    if not reports:
        raise ValueError(
            "No changed 2-D weight was found in common between the base and the tuned model (check that TUNED was "
            "fine-tuned from BASE, that an adapter was merged, and the --modules filter)."
        )
    return reports


def _safetensors_files(path: str | Path) -> list[Path]:
    """The safetensors files of a model folder; a clear error for an adapter folder or a pickle-only checkpoint."""
    path = Path(path)
    if (path / "adapter_config.json").exists():
        raise ValueError(f"{path} is an adapter; pass the base model folder it was trained on.")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" It holds pickle files ({', '.join(pickles)}), which petuning does not read." if pickles else ""
        raise FileNotFoundError(f"No .safetensors files in {path}.{hint} Re-save the model with safetensors.")
    return files


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint folder (``model.safetensors`` or a sharded index). Only safetensors are read."""
    weights: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(path):
        weights.update(load_file(file))
    return weights


def load_pair(base: str | Path, tuned: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Base and tuned weights. A tuned *adapter* folder is merged into the base model, which is read once: its
    weights are copied before the merge."""
    tuned = Path(tuned)
    if not (tuned / "adapter_config.json").exists():
        return load_weights(base), load_weights(tuned)
    _safetensors_files(base)  # the same checks (safetensors only, not an adapter) before loading the model
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import petuning  # noqa: F401  (registers petuning's methods with PEFT)

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    base_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return base_weights, PeftModel.from_pretrained(model, tuned).merge_and_unload().state_dict()


def summarize(reports: list[LayerComparison], top_k: int, threshold: float) -> dict:
    """Model-level figures plus the per-layer comparisons, ready for JSON."""
    n = len(reports)
    return {
        "settings": {"top_k": top_k, "threshold": threshold},
        "layers_compared": n,
        "layers_with_intruders": sum(bool(r.intruders) for r in reports),
        "intruders_total": sum(len(r.intruders) for r in reports),
        "mean_relative_update": sum(r.relative_update for r in reports) / n,
        "mean_left_subspace_drift": sum(r.left_subspace_drift for r in reports) / n,
        "mean_right_subspace_drift": sum(r.right_subspace_drift for r in reports) / n,
        "layers": [asdict(r) for r in reports],
    }


def plot(reports: list[LayerComparison], out_dir: Path, most: int = 6) -> list[Path]:
    """``layers.png`` (intruders and drift per layer) and ``spectra.png`` (base vs tuned spectra of the
    ``most`` layers that changed most). Needs matplotlib (``pip install petuning[analysis]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("Plots need matplotlib: pip install 'petuning[analysis]' (or pass --no-plots).") from error
    out_dir.mkdir(parents=True, exist_ok=True)
    index = range(len(reports))
    fig, ax = plt.subplots(figsize=(max(6.0, len(reports) * 0.12), 3.5))
    ax.bar(index, [len(r.intruders) for r in reports], color="tab:red", label="intruder dimensions")
    ax.set_xlabel("layer (in checkpoint order)")
    ax.set_ylabel("intruders in top-k")
    drift = ax.twinx()
    drift.plot(index, [r.left_subspace_drift for r in reports], color="tab:blue", label="left subspace drift")
    drift.set_ylabel("subspace drift (0 = unchanged)")
    drift.set_ylim(0, 1)
    fig.legend(loc="upper right")
    fig.tight_layout()
    paths = [out_dir / "layers.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    chosen = sorted(reports, key=lambda r: (len(r.intruders), r.relative_update), reverse=True)[:most]
    cols = min(3, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, report in zip(axes.flat, chosen):
        ax.semilogy(report.base_singular_values, "o-", label="base")
        ax.semilogy(report.tuned_singular_values, "x--", label="tuned")
        for i in report.intruders:
            ax.axvline(i, color="tab:red", alpha=0.3)
        ax.set_title(report.name, fontsize=7)
        ax.set_xlabel("singular value index")
    for ax in list(axes.flat)[len(chosen) :]:
        ax.axis("off")
    axes.flat[0].legend()
    fig.tight_layout()
    paths.append(out_dir / "spectra.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def analyze(
    base: str | Path,
    tuned: str | Path,
    out_dir: str | Path,
    top_k: int = 10,
    threshold: float = 0.5,
    modules: Optional[str] = None,
    include_embeddings: bool = False,
    plots: bool = True,
) -> dict:
    """Compare checkpoint ``tuned`` (a model folder, or an adapter folder merged into ``base``) with ``base``;
    write ``summary.json`` (and plots) into ``out_dir`` and return the summary."""
    reports = compare_state_dicts(*load_pair(base, tuned), top_k, threshold, modules, include_embeddings)
    summary = summarize(reports, top_k, threshold)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if plots:
        plot(reports, out)
    return summary
