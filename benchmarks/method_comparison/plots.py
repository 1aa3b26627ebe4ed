"""Plots of the method comparison: loss curves, and test accuracy against peak memory and forgetting.

Usage::

    python benchmarks/method_comparison/plots.py [RESULTS_DIR]           # PNGs next to the JSON files
    python benchmarks/method_comparison/plots.py --table [RESULTS_DIR]   # the markdown table of docs/benchmarks.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DEFAULT = Path(__file__).resolve().parent.parent / "results" / "method_comparison" / "toy"


def load_results(directory: Path) -> dict[str, dict]:
    """Experiment name -> result JSON, for every ``*.json`` in ``directory``."""
    results = {path.stem: json.loads(path.read_text()) for path in sorted(Path(directory).glob("*.json"))}
    if not results:
        raise FileNotFoundError(f"No result JSON files in {directory}; run benchmarks/method_comparison/run.py first.")
    return results


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the points not dominated by another (lower x is better, higher y is better), by increasing x."""
    front = [
        name
        for name, (x, y) in points.items()
        if not any((x2 <= x and y2 >= y) and (x2, y2) != (x, y) for x2, y2 in points.values())
    ]
    return sorted(front, key=lambda name: points[name][0])


def _maybe(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def results_table(results: dict[str, dict]) -> str:
    """A markdown table of the results, best new-task accuracy first."""
    header = (
        "| experiment | trainable | adapter file | new-task acc | old-task acc after | forgetting | train time "
        "| peak RSS Δ | merge error |"
    )
    rows = [header, "|" + " --- |" * 9]
    for name, result in sorted(results.items(), key=lambda kv: -kv[1]["train_info"]["test accuracy"]):
        info = result["train_info"]
        merge = info["merge max abs logit diff"]
        merge = merge if isinstance(merge, str) else f"{merge:.1e}"
        pruned = info.get("pruned test accuracy")
        acc = f"{info['test accuracy']:.3f}" + (f" (pruned: {pruned:.3f})" if pruned is not None else "")
        rows.append(
            f"| {name} | {info['num_trainable_params']:,} | {info['file_size'] / 1024:.0f} KiB | {acc} "
            f"| {_maybe(info['original task accuracy after'])} | {info['forgetting']:+.2f} | {info['train_time']:.0f} s "
            f"| {max(0, info['cpu_rss_peak_delta']) / 2**20:.0f} MiB | {merge} |"  # RSS may end a few pages below its start
        )
    return "\n".join(rows)


def plot_all(directory: Path = DEFAULT, out: Path | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = load_results(directory)
    out = Path(out or directory)
    out.mkdir(parents=True, exist_ok=True)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, result in results.items():
        metrics = result["train_info"]["metrics"]
        ax.plot([m["step"] for m in metrics], [m["train loss"] for m in metrics], marker=".", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (running mean)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths = [out / "loss_curves.png"]
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    for key, label, filename in [
        ("cpu_rss_peak_delta", "peak RSS during training (MiB)", "pareto_memory.png"),
        ("forgetting", "forgetting (rise of the old-task / general-text loss)", "pareto_forgetting.png"),
    ]:
        scale = 2**20 if key == "cpu_rss_peak_delta" else 1.0
        points = {n: (r["train_info"][key] / scale, r["train_info"]["test accuracy"]) for n, r in results.items()}
        front = pareto_front(points)
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, (x, y) in points.items():
            ax.scatter(x, y, color="tab:red" if name in front else "tab:gray")
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.plot([points[n][0] for n in front], [points[n][1] for n in front], color="tab:red", alpha=0.4)
        if key == "forgetting":  # a collapsed run sits orders of magnitude right of the others
            ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (new task)")
        fig.tight_layout()
        paths.append(out / filename)
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


if __name__ == "__main__":
    arguments = sys.argv[1:]
    table = "--table" in arguments
    arguments = [a for a in arguments if a != "--table"]
    directory = Path(arguments[0]) if arguments else DEFAULT
    if table:
        print(results_table(load_results(directory)))
    else:
        for path in plot_all(directory):
            print(path)
