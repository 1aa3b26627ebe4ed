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


def _count_svds(monkeypatch):
    """Count calls of the SVD that SORSA's layers run (the cache wraps the same function)."""
    import petuning.linalg as linalg

    calls = []
    original = linalg.top_singular_triplets

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(linalg, "top_singular_triplets", counting)
    return calls


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_loading_for_inference_skips_the_svd(tmp_path, monkeypatch, low_cpu_mem_usage):
    config = petuning.SorsaConfig(r=4, target_modules=["0", "2"], init_weights=False)
    torch.manual_seed(1)
    model = get_peft_model(_mlp(16), config)
    model.save_pretrained(tmp_path)
    calls = _count_svds(monkeypatch)
    loaded = PeftModel.from_pretrained(_mlp(16), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    assert calls == []  # the saved factors replace the start, so no SVD is needed
    x = torch.randn(3, 8)
    assert torch.equal(loaded(x), model(x))
    trainable = PeftModel.from_pretrained(_mlp(16), tmp_path, is_trainable=True)
    assert len(calls) == 2  # training from a loaded adapter still initializes (then loads over it)
    assert torch.equal(trainable(x), model(x))


def test_svd_cache_reuses_and_survives_a_corrupt_entry(tmp_path, monkeypatch):
    calls = _count_svds(monkeypatch)
    cache = tmp_path / "svd"
    config = dict(r=4, target_modules=["0", "2"], svd_cache_dir=str(cache))
    first = get_peft_model(_mlp(16), petuning.SorsaConfig(**config))
    assert len(calls) == 2 and len(list(cache.glob("*.safetensors"))) == 2
    second = get_peft_model(_mlp(16), petuning.SorsaConfig(**config))
    assert len(calls) == 2  # both layers read back from the cache
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))

    other_rank = get_peft_model(_mlp(16), petuning.SorsaConfig(**{**config, "r": 3}))
    assert len(calls) == 4 and other_rank.base_model.model[0].sorsa_A["default"].shape == (3, 8)

    for entry in cache.glob("*.safetensors"):
        entry.write_bytes(entry.read_bytes()[:20])  # truncated files
    with pytest.warns(UserWarning, match="unreadable SVD cache entry"):
        third = get_peft_model(_mlp(16), petuning.SorsaConfig(**config))
    assert len(calls) == 6
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), third.state_dict().values()))
    assert not list(cache.glob("*.tmp"))
