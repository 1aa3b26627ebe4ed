"""The method-comparison benchmark: toy tasks, every experiment end to end for a few steps, Pareto front."""

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "method_comparison"
sys.path.insert(0, str(BENCH))

import run  # noqa: E402
from methods import for_tier  # noqa: E402
from plots import pareto_front  # noqa: E402
from toy import TASK_A, TASK_B, Encoder  # noqa: E402


def test_toy_tasks_answers_and_splits():
    assert TASK_A.answer(47, 85) == "231" and TASK_A.answer(0, 5) == "500"
    assert TASK_B.answer(47, 85) == "132" and TASK_B.answer(9, 9) == "018"
    test, train = set(TASK_A.split("test")), set(TASK_A.split("train"))
    assert len(test) == 1000 and len(train) == 9000 and not test & train
    batch = Encoder().batch(TASK_A, [(47, 85)])
    tokens = Encoder().tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    assert "".join(tokens[1:-1]) == "47+85=231"
    assert (batch["labels"][0, :7] == -100).all() and torch.equal(batch["labels"][0, 7:], batch["input_ids"][0, 7:])


def test_pareto_front():
    points = {"a": (1.0, 0.5), "b": (2.0, 0.9), "c": (2.0, 0.4), "d": (0.5, 0.1), "e": (3.0, 0.9)}
    assert pareto_front(points) == ["d", "a", "b"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("toy-cache")


@pytest.mark.parametrize("name", for_tier("toy"))
def test_every_experiment_runs_and_writes_peft_shaped_json(name, cache, tmp_path):
    run.main(
        [
            "--worker",
            name,
            "--steps",
            "3",
            "--base-steps",
            "3",
            "--batch-size",
            "8",
            "--out",
            str(tmp_path),
            "--cache",
            str(cache),
        ]
    )
    result = json.loads((tmp_path / f"{name}.json").read_text())
    assert set(result) == {"run_info", "train_info", "meta_info"}
    info = result["train_info"]
    assert info["status"] == "success" and info["steps"] == 3 and len(info["metrics"]) == 3
    assert 0 <= info["test accuracy"] <= 1 and info["num_trainable_params"] > 0 and info["file_size"] > 0
    assert info["num_trainable_params"] < info["num_total_params"] / 5  # parameter-efficient
    merge_error = info["merge max abs logit diff"]
    assert isinstance(merge_error, str) or merge_error < 1e-3
    assert result["run_info"]["peft_config"]["peft_type"]
    if name.startswith("pat-"):  # the schedule ends with the run, so the mask is final and the model prunes
        assert info["pruned hidden size"] == 96 and info["pruned num params"] < info["num_total_params"]


def test_results_table_orders_by_accuracy_and_reports_pruned(tmp_path):
    from plots import results_table

    def result(accuracy, **extra):
        info = {
            "test accuracy": accuracy,
            "num_trainable_params": 1000,
            "file_size": 2048,
            "forgetting": 0.5,
            "original task accuracy after": 0.25,
            "train_time": 3.0,
            "cpu_rss_peak_delta": 2**21,
            "merge max abs logit diff": 1e-6,
            **extra,
        }
        return {"train_info": info}

    table = results_table({"a": result(0.1), "b": result(0.9, **{"pruned test accuracy": 0.8})}).splitlines()
    assert table[2].startswith("| b | 1,000 | 2 KiB | 0.900 (pruned: 0.800) | 0.250 | +0.50 | 3 s | 2 MiB | 1.0e-06 |")
    assert table[3].startswith("| a |")


def test_real_tier_runs_on_smollm2_and_measures_forgetting_on_general_text(tmp_path):
    run.main(
        [
            "--worker",
            "lora-r8",
            "--tier",
            "real",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--n-eval",
            "4",
            "--validation",
            "3",
            "--lr",
            "3e-4",
            "--seed",
            "2",
            "--result-name",
            "lora_lr3e-4_seed2",
            "--out",
            str(tmp_path),
        ]
    )
    result = json.loads((tmp_path / "lora_lr3e-4_seed2.json").read_text())
    info = result["train_info"]
    assert result["run_info"]["experiment_name"] == "real/lora-r8" and result["run_info"]["seed"] == 2
    assert result["run_info"]["split"]["train"] == "the first 1997 questions of the embedded train split"
    assert result["run_info"]["split"]["validation"] == "its last 3 questions"
    assert 0 <= info["validation accuracy"] <= 1 and info["validation loss"] > 0
    assert result["meta_info"]["model"]["n_eval"] == 4 and "SmolLM2" in result["meta_info"]["model"]["name"]
    assert info["steps"] == 2 and info["lr"] == 3e-4 and info["original task accuracy before"] is None
    assert isinstance(info["forgetting"], float) and info["forgetting"] != 0.0  # two steps move the general-text loss
    assert 0 <= info["test accuracy"] <= 1 and info["merge max abs logit diff"] < 1e-3


def test_validation_split_is_refused_outside_the_real_tier():
    with pytest.raises(SystemExit):
        run.parse_args(["--validation", "10"])


def test_parameter_groups_give_named_parameters_their_own_rate():
    model = torch.nn.ModuleDict({"body": torch.nn.Linear(3, 3), "pat_mask_holder": torch.nn.Linear(3, 1)})
    model["body"].bias.requires_grad_(False)
    groups = run.parameter_groups(model, 1e-3, {"pat_mask": 1e-2})
    assert [g["lr"] for g in groups] == [1e-3, 1e-2]
    assert groups[0]["params"] == [model["body"].weight]
    assert groups[1]["params"] == [model["pat_mask_holder"].weight, model["pat_mask_holder"].bias]
    assert [g["lr"] for g in run.parameter_groups(model, 1e-3, {})] == [1e-3]
