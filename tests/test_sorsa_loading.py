"""Loading a SORSA adapter on the wrong base fails with a clear error and leaves the model usable."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import petuning


def _mlp(hidden: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 4))


def test_error_names_the_mismatching_tensor(tmp_path):
    model = get_peft_model(_mlp(16), petuning.SorsaConfig(r=4, target_modules=["0", "2"]))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError) as error:
        PeftModel.from_pretrained(_mlp(32), tmp_path)
    message = str(error.value)
    assert "sorsa_" in message and "adapter (" in message and "vs model (" in message
    assert "Load it on the base model it was made for" in message
    retry = PeftModel.from_pretrained(_mlp(16), tmp_path)  # the right base still loads afterwards
    assert torch.equal(retry(torch.ones(2, 8)), model(torch.ones(2, 8)))
