"""The tuned comparison of the real tier: each method family's learning rate chosen on a validation split, then two
more seeds at the chosen setting.

Protocol:

- Training draws from the first 1 900 questions of the embedded train split; its last 100 questions are the
  validation split. The test questions (the first 100 of the test split) are never used for a choice.
- Each family runs a grid of three learning rates half a decade apart (a 10x span). The best run is the one with
  the highest validation exact match (PAT: its pruned model's), ties going to the lower validation loss. When the
  best rate is at an end of the grid, the next rate beyond it runs too, up to ``EXTEND_LIMIT`` times, so a choice
  is never pinned to the edge of the grid.
- A family with variants (FLoRA's scale) runs them at the chosen rate, and the best of all is chosen.
- Seeds 1 and 2 then run at the chosen setting (``--seeds`` changes the list); seed 0's run is the sweep's own. The
  seed sets the initialisation and the order of the batches; the splits stay the same.

Every run is one JSON, ``real_tuned/<experiment>_lr<lr>_seed<seed>.json`` in PEFT's result shape (``run_info``
records the seed and the split). A run whose JSON exists is not run again, so the sweep resumes where it stopped;
the summary (``summary.json``, the markdown table of ``--table``, ``tuned_accuracy.png``) covers what exists.

Usage::

    python benchmarks/method_comparison/sweep.py [--families LoRA SORSA ...]   # run (or resume), then summarise
    python benchmarks/method_comparison/sweep.py --report                       # summarise what exists
    python benchmarks/method_comparison/sweep.py --table                        # print the markdown table
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402

OUT = run.RESULTS / "real_tuned"
VALIDATION = 100  # held-out training questions
SEEDS = (0, 1, 2)
LADDER = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)  # rates half a decade apart
EXTEND_LIMIT = 2  # extra rates beyond an end of the grid, at most


@dataclass(frozen=True)
class Family:
    """One method, its experiment (``methods.EXPERIMENTS``) and its learning-rate grid (three rungs of LADDER)."""

    name: str
    experiment: str
    grid: tuple[float, float, float]
    variants: tuple[str, ...] = ()  # other experiments tried at the chosen rate (FLoRA's scales)


FAMILIES = {
    family.name: family
    for family in [
        Family("LoRA", "lora-r8", (3e-4, 1e-3, 3e-3)),
        Family("SORSA", "sorsa-r8", (1e-4, 3e-4, 1e-3)),  # SVD-initialised like PiSSA: smaller rates
        Family("PiSSA", "pissa-r8", (1e-4, 3e-4, 1e-3)),
        Family("FLoRA", "flora-r8", (3e-4, 1e-3, 3e-3), variants=("flora-r8-s1", "flora-r8-s4")),
        Family("sparse-plus-low-rank", "sparse-low-rank-r4-d1", (3e-4, 1e-3, 3e-3)),
        Family("masked tuning", "mask-tuning-share3", (3e-4, 1e-3, 3e-3)),
        Family("PAT (pruned model)", "pat-prune25-r8", (3e-4, 1e-3, 3e-3)),
    ]
}

Runner = Callable[[str, float, int], "dict | None"]  # (experiment, lr, seed) -> result JSON, None if it failed


def result_name(experiment: str, lr: float, seed: int) -> str:
    return f"{experiment}_lr{lr:g}_seed{seed}"


def accuracy(result: dict, split: str) -> float:
    """Exact match on ``split`` ("validation" or "test"); PAT's is its pruned model's."""
    info = result["train_info"]
    return info.get(f"pruned {split} accuracy", info[f"{split} accuracy"])


def selection_key(result: dict) -> tuple[float, float]:
    """Higher is better: validation exact match, then the lower validation loss (PAT: the exact match of its pruned
    model, the loss of the model before pruning)."""
    return accuracy(result, "validation"), -result["train_info"]["validation loss"]


def choose(family: Family, runner: Runner) -> tuple[str, float] | None:
    """Run ``family``'s grid (extended past a winning end), then its variants; the chosen (experiment, lr).

    None when a run failed: the sweep reports it and moves on to the next family.
    """
    rates = list(family.grid)
    results = {}
    for _ in range(EXTEND_LIMIT + 1):
        for lr in rates:
            if (family.experiment, lr) not in results:
                if (result := runner(family.experiment, lr, SEEDS[0])) is None:
                    return None
                results[family.experiment, lr] = result
        best_lr = max(rates, key=lambda lr: selection_key(results[family.experiment, lr]))
        index = LADDER.index(best_lr)
        if best_lr == rates[0] and index > 0:
            rates.insert(0, LADDER[index - 1])
        elif best_lr == rates[-1] and index < len(LADDER) - 1:
            rates.append(LADDER[index + 1])
        else:
            break
    for variant in family.variants:
        if (result := runner(variant, best_lr, SEEDS[0])) is None:
            return None
        results[variant, best_lr] = result
    return max(results, key=lambda key: selection_key(results[key]))


def sweep(families: list[Family], runner: Runner, seeds: tuple[int, ...] = SEEDS) -> dict[str, tuple[str, float]]:
    """Choose each family's setting on seed ``seeds[0]``, then run the other ``seeds`` there; family name -> chosen
    (experiment, lr)."""
    chosen = {}
    for family in families:
        if (setting := choose(family, runner)) is None:
            print(f"[{family.name}] a run failed; the family is left out", flush=True)
            continue
        chosen[family.name] = setting
        for seed in seeds[1:]:
            if runner(*setting, seed) is None:
                print(f"[{family.name}] seed {seed} failed at {setting}; the summary leaves it out", flush=True)
    return chosen


def summarise(out: Path = OUT) -> dict[str, dict]:
    """Per family: the runs that exist, the chosen setting, and the test metrics over the seeds run there."""
    summary = {}
    for family in FAMILIES.values():
        runs = {}
        for path in sorted(out.glob("*.json")):
            experiment, _, seed = path.stem.rpartition("_seed")
            experiment, _, lr = experiment.rpartition("_lr")
            if experiment in (family.experiment, *family.variants):
                runs.setdefault((experiment, float(lr)), {})[int(seed)] = json.loads(path.read_text())
        if not runs:
            continue
        settings = {key: seeds[SEEDS[0]] for key, seeds in runs.items() if SEEDS[0] in seeds}
        if not settings:  # the choice is made on seed 0's runs
            continue
        (experiment, lr) = max(settings, key=lambda key: selection_key(settings[key]))
        at_choice = [runs[experiment, lr][seed] for seed in sorted(runs[experiment, lr])]
        test = [accuracy(result, "test") for result in at_choice]
        info = [result["train_info"] for result in at_choice]
        summary[family.name] = {
            "experiment": experiment,
            "chosen lr": lr,
            "seeds": sorted(runs[experiment, lr]),
            "complete": len(at_choice) >= len(SEEDS),
            "test accuracy mean": statistics.fmean(test),
            "test accuracy spread": (max(test) - min(test)) / 2,  # half the range: mean +- spread covers the seeds
            "test accuracies": test,
            "forgetting mean": statistics.fmean(i["forgetting"] for i in info),
            "forgetting spread": (max(i["forgetting"] for i in info) - min(i["forgetting"] for i in info)) / 2,
            "trainable params": info[0]["num_trainable_params"],
            "train time mean": statistics.fmean(i["train_time"] for i in info),
            "peak RSS delta mean": statistics.fmean(max(0, i["cpu_rss_peak_delta"]) for i in info),
            "validation accuracy by setting": [  # [experiment, lr, validation exact match], the family's grid first
                [name, rate, accuracy(result, "validation")]
                for (name, rate), result in sorted(
                    settings.items(), key=lambda kv: (kv[0][0] != family.experiment, kv[0])
                )
            ],
            "family experiment": family.experiment,
        }
    return summary


def summary_table(summary: dict[str, dict]) -> str:
    """The markdown table of the tuned comparison, best mean test exact match first."""
    rows = [
        "| method | chosen (validation) | lr tried (validation EM) | test EM, mean ± spread | seeds | trainable "
        "| forgetting | train time | peak RSS Δ |",
        "|" + " --- |" * 9,
    ]
    for name, entry in sorted(summary.items(), key=lambda item: -item[1]["test accuracy mean"]):
        tried = ", ".join(f"{lr:g}: {value:.2f}" if name == entry["family experiment"] else f"{name} {lr:g}: {value:.2f}"
                          for name, lr, value in entry["validation accuracy by setting"])  # fmt: skip
        rows.append(
            f"| {name} | {entry['experiment']}, lr {entry['chosen lr']:g} | {tried} "
            f"| {entry['test accuracy mean']:.3f} ± {entry['test accuracy spread']:.3f} | {len(entry['seeds'])} "
            f"| {entry['trainable params'] / 1e6:.2f} M | {entry['forgetting mean']:+.3f} "
            f"| {entry['train time mean']:.0f} s | {entry['peak RSS delta mean'] / 2**20:.0f} MiB |"
        )
    return "\n".join(rows)


def plot_summary(summary: dict[str, dict], path: Path) -> Path:
    """Test exact match (mean, error bar = spread over the seeds) against trainable parameters and forgetting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for name, entry in summary.items():
        y, dy = entry["test accuracy mean"], entry["test accuracy spread"]
        for ax, x, dx in [
            (axes[0], entry["trainable params"] / 1e6, 0.0),
            (axes[1], entry["forgetting mean"], entry["forgetting spread"]),
        ]:
            ax.errorbar(x, y, yerr=dy, xerr=dx, fmt="o", capsize=3)
            ax.annotate(name, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    axes[0].set_xlabel("trainable parameters (M)")
    axes[1].set_xlabel("forgetting (rise of the general-text loss, nats)")
    axes[0].set_ylabel("test exact match at the validation-chosen lr")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(out: Path = OUT) -> dict[str, dict]:
    summary = summarise(out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if summary:
        plot_summary(summary, out / "tuned_accuracy.png")
    return summary


def subprocess_runner(args: argparse.Namespace) -> Runner:
    """Runs each (experiment, lr, seed) once in its own process; an existing result JSON is read instead."""

    def runner(experiment: str, lr: float, seed: int) -> dict | None:
        name = result_name(experiment, lr, seed)
        path = args.out / f"{name}.json"
        if path.exists():  # written atomically by the worker: complete
            return json.loads(path.read_text())
        run_args = copy.copy(args)
        run_args.lr, run_args.seed = lr, seed
        return run.run_in_subprocess(run_args, experiment, result_name=name)

    return runner


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="*", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=list(SEEDS),
        help=f"seeds at the chosen setting; the first makes the choice and must be {SEEDS[0]} (default: {SEEDS})",
    )
    parser.add_argument("--report", action="store_true", help="only summarise the runs that exist")
    parser.add_argument("--table", action="store_true", help="print the markdown table of the runs that exist")
    options = parser.parse_args(argv)
    if options.seeds[0] != SEEDS[0]:
        parser.error(f"--seeds must start with {SEEDS[0]}: the choice is made on seed {SEEDS[0]}'s runs")
    if options.table:
        print(summary_table(summarise(options.out)))
        return
    if not options.report:
        args = run.parse_args(["--tier", "real", "--validation", str(VALIDATION), "--out", str(options.out)])
        args.cache.mkdir(parents=True, exist_ok=True)
        sweep([FAMILIES[name] for name in options.families], subprocess_runner(args), tuple(options.seeds))
    write_report(options.out)
    print(summary_table(summarise(options.out)))


if __name__ == "__main__":
    main()
