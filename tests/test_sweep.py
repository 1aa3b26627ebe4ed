"""The tuned comparison's sweep: the choice is made on validation, extends past a winning grid end, resumes."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "method_comparison"))

import sweep


def fake_result(validation: float, test: float, *, validation_loss: float = 1.0, pruned: bool = False) -> dict:
    info = {
        "validation accuracy": validation,
        "validation loss": validation_loss,
        "test accuracy": test,
        "forgetting": 0.1,
        "num_trainable_params": 1000,
        "train_time": 10.0,
        "cpu_rss_peak_delta": 2**20,
    }
    if pruned:  # PAT: the unpruned figures stay, the pruned ones are what counts
        info |= {"pruned validation accuracy": validation / 2, "pruned test accuracy": test / 2}
    return {"train_info": info}


class FakeRunner:
    """Validation exact match peaks at ``best_lr`` (log-distance); test exact match peaks elsewhere."""

    def __init__(self, best_lr: float, pruned: bool = False):
        self.best_lr, self.pruned, self.calls = best_lr, pruned, []

    def __call__(self, experiment: str, lr: float, seed: int) -> dict:
        self.calls.append((experiment, lr, seed))
        rung = sweep.LADDER.index(lr) - sweep.LADDER.index(self.best_lr)
        bonus = 0.05 if experiment.endswith("-s4") else 0.0
        return fake_result(0.9 - 0.1 * abs(rung) + bonus, 0.5 + 0.1 * rung, pruned=self.pruned)


def test_choice_uses_validation_and_the_other_seeds_run_at_it():
    family = sweep.Family("LoRA", "lora-r8", (3e-4, 1e-3, 3e-3))
    runner = FakeRunner(best_lr=1e-3)
    assert sweep.sweep([family], runner) == {"LoRA": ("lora-r8", 1e-3)}  # test accuracy would have picked 3e-3
    assert runner.calls == [("lora-r8", lr, 0) for lr in family.grid] + [("lora-r8", 1e-3, 1), ("lora-r8", 1e-3, 2)]


def test_seeds_choose_which_run_at_the_chosen_setting():
    family = sweep.Family("LoRA", "lora-r8", (3e-4, 1e-3, 3e-3))
    runner = FakeRunner(best_lr=1e-3)
    assert sweep.sweep([family], runner, seeds=(0, 3)) == {"LoRA": ("lora-r8", 1e-3)}
    assert runner.calls[3:] == [("lora-r8", 1e-3, 3)]
    with pytest.raises(SystemExit):
        sweep.main(["--report", "--seeds", "1", "2"])  # the choice is seed 0's


def test_grid_extends_past_a_winning_end_at_most_extend_limit_times():
    family = sweep.Family("LoRA", "lora-r8", (3e-4, 1e-3, 3e-3))
    runner = FakeRunner(best_lr=1e-2)  # one rung past the grid
    assert sweep.choose(family, runner) == ("lora-r8", 1e-2)
    assert [lr for _, lr, _ in runner.calls] == [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]  # 3e-2 shows 1e-2 is the peak
    far = FakeRunner(best_lr=1e-5)  # four rungs below: the grid grows by EXTEND_LIMIT only
    assert sweep.choose(family, far) == ("lora-r8", 3e-5)
    assert len(far.calls) == 3 + sweep.EXTEND_LIMIT


def test_variants_run_at_the_chosen_rate_and_can_win():
    family = sweep.Family("FLoRA", "flora-r8", (3e-4, 1e-3, 3e-3), variants=("flora-r8-s1", "flora-r8-s4"))
    runner = FakeRunner(best_lr=1e-3)
    assert sweep.choose(family, runner) == ("flora-r8-s4", 1e-3)
    assert runner.calls[3:] == [("flora-r8-s1", 1e-3, 0), ("flora-r8-s4", 1e-3, 0)]


def test_ties_go_to_the_lower_validation_loss():
    results = {1e-3: fake_result(0.8, 0.1, validation_loss=2.0), 3e-3: fake_result(0.8, 0.1, validation_loss=1.0)}
    family = sweep.Family("LoRA", "lora-r8", (3e-4, 1e-3, 3e-3))
    chosen = sweep.choose(family, lambda e, lr, s: results.get(lr, fake_result(0.1, 0.9)))
    assert chosen == ("lora-r8", 3e-3)


def test_a_failed_run_leaves_the_family_out():
    family = sweep.Family("LoRA", "lora-r8", (3e-4, 1e-3, 3e-3))
    assert sweep.sweep([family], lambda e, lr, s: None if lr == 1e-3 else fake_result(0.5, 0.5)) == {}


def test_runner_resumes_from_existing_json_and_summary_uses_pruned_accuracy(tmp_path):
    family = sweep.FAMILIES["PAT (pruned model)"]
    fake = FakeRunner(best_lr=1e-3, pruned=True)
    for lr in family.grid:  # a sweep that stopped after seed 0
        name = sweep.result_name(family.experiment, lr, 0)
        (tmp_path / f"{name}.json").write_text(json.dumps(fake(family.experiment, lr, 0)))
    args = sweep.run.parse_args(["--tier", "real", "--validation", "100", "--out", str(tmp_path)])
    runner = sweep.subprocess_runner(args)
    assert runner(family.experiment, 1e-3, 0) == fake(family.experiment, 1e-3, 0)  # read, not rerun
    partial = sweep.summarise(tmp_path)["PAT (pruned model)"]
    assert partial["chosen lr"] == 1e-3 and not partial["complete"] and partial["seeds"] == [0]
    for seed, test in ((1, 0.3), (2, 0.5)):
        assert not sweep.summarise(tmp_path)["PAT (pruned model)"]["complete"]
        result = json.dumps(fake_result(0.8, test, pruned=True))
        (tmp_path / f"{sweep.result_name(family.experiment, 1e-3, seed)}.json").write_text(result)
    entry = sweep.summarise(tmp_path)["PAT (pruned model)"]
    assert entry["complete"] and entry["test accuracies"] == [0.25, 0.15, 0.25]  # the pruned model's
    assert entry["test accuracy mean"] == pytest.approx(0.65 / 3) and entry["test accuracy spread"] == pytest.approx(
        0.05
    )
    table = sweep.summary_table(sweep.summarise(tmp_path)).splitlines()
    assert table[2].startswith(
        "| PAT (pruned model) | pat-prune25-r8, lr 0.001 | 0.0003: 0.40, 0.001: 0.45, 0.003: 0.40"
    )
    assert "| 0.217 ± 0.050 | 3 |" in table[2]
