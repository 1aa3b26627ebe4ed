"""The environment petuning declares: tested ranges, the transformers/peft pair check, a quiet import, the lock."""

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
import warnings
from importlib.metadata import version
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from petuning.registry import (
    SUPPORTED_PEFT,
    TESTED_TRANSFORMERS,
    IncompatibleVersionsWarning,
    check_transformers_peft_pair,
)

ROOT = Path(__file__).resolve().parents[1]


def _dependencies() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    return {Requirement(d).name: Requirement(d) for d in declared}


def _lock() -> dict[str, str]:
    """The lock's pins; `make lock` points PETUNING_LOCK at the candidate lock it is testing."""
    pins = {}
    for line in (ROOT / os.environ.get("PETUNING_LOCK", "constraints.txt")).read_text().splitlines():
        requirement = line.split("#")[0].strip()
        if requirement:
            name, _, pinned = requirement.partition("==")
            pins[canonicalize_name(name)] = pinned.split(";")[0].strip()
    return pins


def test_the_known_bad_pair_warns_with_the_pin_that_fixes_it():
    with pytest.warns(IncompatibleVersionsWarning) as caught:
        message = check_transformers_peft_pair("5.24.0", "0.21.2", min_peft="0.22.0")
    assert message == str(caught[0].message)
    low, high = TESTED_TRANSFORMERS
    assert f'Fix: pip install "transformers>={low},<{high}"' in message
    assert "transformers 5.24.0 needs peft>=0.22.0" in message and "peft 0.21.2 is installed" in message


def test_the_installed_pair_and_a_good_simulated_pair_are_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_transformers_peft_pair() is None  # reads MIN_PEFT_VERSION from the installed transformers
        assert check_transformers_peft_pair("5.23.0", "0.21.2", min_peft="0.20.0") is None


def test_the_locked_pair_is_inside_the_tested_ranges_and_passes_the_check():
    lock = _lock()
    assert TESTED_TRANSFORMERS[0] <= Version(lock["transformers"]) < TESTED_TRANSFORMERS[1]
    assert SUPPORTED_PEFT[0] <= Version(lock["peft"]) < SUPPORTED_PEFT[1]
    # What this suite runs on is the lock (make test installs from it).
    for name in ("transformers", "peft", "accelerate", "bitsandbytes", "datasets"):
        assert Version(version(name)) == Version(lock[name]), name


def test_pyproject_declares_the_ranges_the_code_checks_and_the_lock_satisfies():
    declared = _dependencies()
    assert declared["peft"].specifier == f">={SUPPORTED_PEFT[0]},<{SUPPORTED_PEFT[1]}"
    low, high = TESTED_TRANSFORMERS
    assert declared["transformers"].specifier == f">={low},<{high}"
    lock = _lock()
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets"):
        spec = declared[name].specifier
        assert spec.contains(lock[name]), (name, spec, lock[name])


# Makes bitsandbytes believe the CPU has AVX512-BF16, the case in which it tries to fetch a kernel from the Hub
# at import and logs "Failed to load CPU gemm_4bit_forward from kernels-community ...".
_AVX512BF16 = textwrap.dedent(
    """
    import importlib.machinery, sys

    class _PretendAvx512Bf16:
        def find_spec(self, name, path, target=None):
            if name != "bitsandbytes.functional":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            run = spec.loader.exec_module
            def exec_module(module):
                run(module)
                module.has_avx512bf16 = lambda: True
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _PretendAvx512Bf16())
    """
)


@pytest.mark.parametrize("statement", ["import peft", "import petuning"])
def test_import_petuning_holds_back_the_bitsandbytes_kernel_warning(statement):
    pytest.importorskip("bitsandbytes")
    cpu_backend = importlib.util.find_spec("bitsandbytes.backends.cpu.ops")
    if cpu_backend is None or "kernels-community" not in Path(cpu_backend.origin).read_text():
        pytest.skip("this bitsandbytes does not fetch a CPU kernel from the Hub at import")
    script = _AVX512BF16 + statement + "\nimport bitsandbytes.backends.cpu.ops\n"
    script += "from petuning import import_noise; print('held back:', len(import_noise.held_back))\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    noisy = "Failed to load CPU gemm_4bit_forward" in result.stderr
    if statement == "import peft":  # the simulation reproduces the noise: without petuning first, it is printed
        assert noisy, result.stderr
    else:
        assert not noisy, result.stderr
        assert "held back: 1" in result.stdout
        assert re.search(r"(?i)warning", result.stderr) is None, result.stderr
