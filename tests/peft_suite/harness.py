"""Runs peft's own generic tests (its ``tests/testing_common.py`` through ``test_custom_models.py`` and
``test_decoder_models.py``) on petuning's methods.

peft ships its tests only in its source distribution; ``scripts/fetch_peft_tests.py`` (run by ``make``) extracts
them to ``<venv>/peft_tests``. A peft test is one method of peft's tester classes, parametrized in peft over peft's
own configs; here the same method is called with petuning's configs instead, every other parametrization of the
test (dtypes, flags) expanded as peft expands it.

A skip is accepted only when peft also skips the same test for LoRA on the same model, or when petuning names a
reason in ``tests/peft_suite/skips.py``; any other skip fails.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import itertools
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from _pytest.mark.structures import ParameterSet

PEFT_TESTS = Path(sys.prefix) / "peft_tests"


def load_peft_tests() -> tuple[types.ModuleType, types.ModuleType]:
    """peft's ``test_custom_models`` and ``test_decoder_models`` modules (skips the calling module if absent)."""
    if not (PEFT_TESTS / "testing_common.py").is_file():
        pytest.skip(
            f"peft's tests are not at {PEFT_TESTS}; run `python scripts/fetch_peft_tests.py` (make does)",
            allow_module_level=True,
        )
    if str(PEFT_TESTS.parent) not in sys.path:
        sys.path.insert(0, str(PEFT_TESTS.parent))
    if importlib.util.find_spec("diffusers") is None:  # imported by testing_common for its Stable Diffusion tests only
        sys.modules["diffusers"] = types.SimpleNamespace(
            StableDiffusionPipeline=type("StableDiffusionPipeline", (), {})
        )
    from peft_tests import test_custom_models, test_decoder_models, testing_common

    _treat_conv1d_like_lora(testing_common, "_skip_if_conv1d_not_supported")
    _treat_conv1d_like_lora(test_decoder_models, "_skip_if_not_conv1d_supported")
    return test_custom_models, test_decoder_models


CONV1D_CONFIGS: tuple[type, ...] = ()
"""petuning configs whose methods adapt transformers' Conv1D (GPT-2) as LoRA does; set by the test module."""


def _treat_conv1d_like_lora(module: types.ModuleType, name: str) -> None:
    """peft skips its GPT-2 (Conv1D) cases for methods it knows lack Conv1D support; petuning's methods that support
    Conv1D run them, as LoRA does."""
    skip = getattr(module, name)

    def skip_unless_conv1d_supported(model_id, config_cls, *args):
        if not issubclass(config_cls, CONV1D_CONFIGS):
            skip(model_id, config_cls, *args)

    setattr(module, name, skip_unless_conv1d_supported)


@dataclass(frozen=True)
class PeftTest:
    """One call of a peft test method: ``args`` are its case arguments, ``extra`` the other parametrizations."""

    tester: type
    name: str
    args: tuple
    model_id: str
    extra: dict = field(default_factory=dict)
    marks: tuple = ()

    def keys(self) -> list[str]:
        """The names under which ``skips.NOT_APPLICABLE`` may list this call (see :func:`run_or_explain_skip`)."""
        targets = self.args[-1].get("target_modules")
        return [
            self.name,
            *(f"{self.name}[{k}={v}]" for k, v in self.extra.items()),
            f"{self.name}@{self.model_id}",
            f"{self.name}@{self.model_id}:{targets}",
        ]

    def run(self, tmp_path: Path) -> None:
        method = getattr(self.tester(), self.name)
        kwargs = dict(self.extra)
        if "tmp_path" in inspect.signature(method).parameters:
            kwargs["tmp_path"] = tmp_path
        for mark in self.marks:  # a skipif on one of peft's parameter values
            if mark.name == "skipif" and mark.args and mark.args[0]:
                pytest.skip(mark.kwargs.get("reason", "skipped by peft"))
        method(*copy.deepcopy(self.args), **kwargs)


def case_tests(tester: type, case_argnames: set[str]) -> list[tuple[str, list[dict]]]:
    """The test methods of ``tester`` that peft parametrizes over its cases (argnames ⊇ ``case_argnames``), each
    with the list of its other parametrizations (one dict of argument values per combination)."""
    found = []
    for name, function in inspect.getmembers(tester, inspect.isfunction):
        if not name.startswith("test_"):
            continue
        marks = [m for m in getattr(function, "pytestmark", []) if m.name == "parametrize"]
        if not set().union(*(_argnames(m) for m in marks)) >= case_argnames:
            continue
        grids = [
            [_values(_argnames(m), value) for value in m.args[1]]
            for m in marks
            if not set(_argnames(m)) & case_argnames
        ]
        found.append((name, [_merge(combo) for combo in itertools.product(*grids)]))
    return found


def _argnames(mark) -> list[str]:
    names = mark.args[0]
    return [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)


def _values(argnames: list[str], value: Any) -> dict:
    marks = ()
    if isinstance(value, ParameterSet):
        value, marks = value.values, value.marks
        value = value if len(argnames) > 1 else value[0]
    values = dict(zip(argnames, value)) if len(argnames) > 1 else {argnames[0]: value}
    return {"values": values, "marks": tuple(marks)}


def _merge(combo: tuple[dict, ...]) -> dict:
    values, marks = {}, ()
    for part in combo:
        values.update(part["values"])
        marks += part["marks"]
    return {"values": values, "marks": marks}


def run_or_explain_skip(
    test: PeftTest,
    reference: Callable[[], PeftTest],
    allowed: dict[str, str],
    not_applicable: dict[str, str],
    tmp_path: Path,
):
    """Run ``test``, unless ``not_applicable`` names it with a reason: by peft test name, ``name[arg=value]`` for one of
    its parametrizations, ``name@model_id`` or ``name@model_id:targets`` for one case. If it skips, the skip stands
    only if ``allowed`` names a reason for it (by the test's name or the start of peft's skip message) or the same
    peft test also skips for LoRA (``reference()``); otherwise the test fails."""
    for key in test.keys():  # noqa: SIM118 (PeftTest.keys() is a method, not a dict's)
        if key in not_applicable:
            pytest.skip(not_applicable[key])
    try:
        test.run(tmp_path)
        return
    except pytest.skip.Exception as skip:
        message = str(skip.msg) if hasattr(skip, "msg") else str(skip)
    for start, reason in allowed.items():
        if message.startswith(start) or start == test.name:
            pytest.skip(f"{reason} (peft: {message})")
    try:
        reference().run(tmp_path / "lora")
    except pytest.skip.Exception:
        pytest.skip(f"peft skips this for LoRA as well: {message}")
    pytest.fail(f"peft skips this for the petuning method ({message}) but runs it for LoRA")
