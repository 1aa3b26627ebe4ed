"""Registration of petuning's methods with PEFT: enum extension, idempotence, version guard, loading."""

import subprocess
import sys
import textwrap

import pytest
from peft import LoraConfig, PeftType
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

import petuning
from petuning.registry import add_peft_type, check_peft_version, register_method
from petuning.tuners.sorsa import SorsaConfig, SorsaModel


def test_sorsa_is_a_peft_type_with_its_prefix():
    assert PeftType.SORSA.value == "SORSA" and PeftType("SORSA") is PeftType.SORSA
    assert PeftType.SORSA == "SORSA"  # JSON strings from adapter_config.json resolve
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SORSA] is SorsaConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.SORSA] is SorsaModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.SORSA] == "sorsa_" == PeftType.SORSA.value.lower() + "_"
    assert SorsaConfig().peft_type is PeftType.SORSA


def test_registration_is_idempotent():
    n_members = len(PeftType)
    assert add_peft_type("SORSA") is PeftType.SORSA
    assert register_method("sorsa", SorsaConfig, SorsaModel) is PeftType.SORSA
    assert len(PeftType) == n_members
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SORSA] is SorsaConfig


def test_a_name_taken_by_peft_is_refused_without_harm():
    with pytest.raises(ValueError, match="already registered by peft"):
        register_method("lora", SorsaConfig, SorsaModel)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.LORA] is LoraConfig


def test_peft_version_guard_names_the_fix():
    check_peft_version("0.21.2")
    for bad in ("0.20.1", "0.22.0"):
        with pytest.raises(ImportError, match=r'pip install "peft>=0.21.0,<0.22.0"'):
            check_peft_version(bad)


def test_loading_needs_petuning_imported(tmp_path):
    """Documented contract: without `import petuning`, PEFT cannot resolve the adapter type."""
    script = textwrap.dedent(
        f"""
        import torch
        from torch import nn
        from peft import PeftModel, get_peft_model

        def base():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))

        try:
            PeftModel.from_pretrained(base(), {str(tmp_path)!r})
        except KeyError as error:
            print("without import:", error)
        import petuning
        model = PeftModel.from_pretrained(base(), {str(tmp_path)!r})
        print("with import:", type(model.base_model).__name__)
        """
    )
    import torch
    from peft import get_peft_model
    from torch import nn

    torch.manual_seed(0)
    model = get_peft_model(
        nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), petuning.SorsaConfig(r=2, target_modules=["0", "2"])
    )
    model.save_pretrained(tmp_path)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "without import: 'SORSA'" in result.stdout
    assert "with import: SorsaModel" in result.stdout
