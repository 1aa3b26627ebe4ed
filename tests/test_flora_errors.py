"""FLoRA configuration: per-module ranks and scales, and clear errors for input that cannot work."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import petuning
from petuning import FloraConfig


class Net(nn.Module):
    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, hidden)
        self.lin = nn.Linear(hidden, 6)
        self.conv = nn.Conv2d(6, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.norm = nn.LayerNorm(8)
        self.up = nn.ConvTranspose2d(8, 4, 2)

    def forward(self, ids):
        h = self.lin(self.emb(ids)).transpose(1, 2).reshape(ids.shape[0], 6, 4, 4)
        return self.up(self.norm(self.depthwise(self.conv(h)).transpose(1, 3)).transpose(1, 3))


def _layer(model, name):
    return model.base_model.model.get_submodule(name)


def test_rank_pattern_and_scale_pattern_apply_per_module():
    config = FloraConfig(
        r=2,
        r_kernel=1,
        scale=3.0,
        target_modules=["emb", "lin", "conv", "depthwise"],
        rank_pattern={"lin": 4, "depthwise": [1, 5, 2, 3], "conv": (3, 2, 3, 1)},
        scale_pattern={"emb": 0.5},
    )
    model = get_peft_model(Net(), config)
    ranks = {n: _layer(model, n).flora_r["default"] for n in ("emb", "lin", "conv", "depthwise")}
    assert ranks == {"emb": (2, 2), "lin": (4, 4), "conv": (3, 2, 3, 1), "depthwise": (1, 5, 2, 3)}
    scales = {n: _layer(model, n).flora_scale["default"] for n in ("emb", "lin")}
    assert scales == {"emb": 0.5, "lin": 3.0}
    conv = _layer(model, "conv")
    assert conv.flora_G["default"].shape == (3, 2, 3, 1)
    assert [tuple(u.shape) for u in conv.flora_U["default"]] == [(6, 3), (8, 2), (3, 3), (3, 1)]
    assert config.to_dict()["rank_pattern"]["conv"] == [3, 2, 3, 1]  # tuples become JSON lists


def test_int_rank_keeps_kernel_modes_full_unless_r_kernel_is_set():
    model = get_peft_model(Net(), FloraConfig(r=2, target_modules=["conv"]))
    assert _layer(model, "conv").flora_r["default"] == (2, 2, 3, 3)
    model = get_peft_model(Net(), FloraConfig(r=2, r_kernel=2, target_modules=["conv"]))
    assert _layer(model, "conv").flora_r["default"] == (2, 2, 2, 2)


def test_unsupported_layer_is_named():
    with pytest.raises(TypeError, match=r"FLoRA cannot adapt 'up' of type ConvTranspose2d: supported layers are"):
        get_peft_model(Net(), FloraConfig(target_modules=["up"]))
    with pytest.raises(TypeError, match=r"'norm' of type LayerNorm"):
        get_peft_model(Net(), FloraConfig(r=2, target_modules=["lin", "norm"]))


def test_strict_rank_names_the_mode_and_a_fix():
    with pytest.raises(ValueError, match=r"rank 9 for layer 'lin' is larger than 8: its 'in' mode has size 8"):
        get_peft_model(Net(), FloraConfig(r=9, target_modules=["lin"], strict_rank=True))
    with pytest.raises(
        ValueError, match=r"layer 'depthwise' .* its 'in/groups \(8/8\)' mode has size 1.*\[1, 2, 3, 3\]"
    ):
        get_peft_model(Net(), FloraConfig(r=2, target_modules=["depthwise"], strict_rank=True))
    with pytest.raises(ValueError, match=r"rank 4 for layer 'conv' is larger than 3: its 'kernel_w' mode has size 3"):
        get_peft_model(Net(), FloraConfig(r=[2, 2, 3, 4], target_modules=["conv"], strict_rank=True))
    with pytest.raises(ValueError, match=r"'kernel_h' mode"):
        get_peft_model(Net(), FloraConfig(r=2, r_kernel=4, target_modules=["conv"], strict_rank=True))


def test_ranks_larger_than_a_mode_are_capped_per_mode():
    with pytest.warns(UserWarning, match=r"depthwise \(rank 2 -> 1: its 'in/groups \(8/8\)' mode has size 1\)"):
        model = get_peft_model(Net(), FloraConfig(r=2, target_modules=["depthwise", "conv"]))
    assert model.base_model.model.depthwise.flora_r["default"] == (1, 2, 3, 3)
    assert model.base_model.model.conv.flora_r["default"] == (2, 2, 3, 3)


def test_rank_list_of_the_wrong_length_names_the_modes():
    message = r"got 2 ranks \[2, 2\] for layer 'conv', whose weight has 4 modes \[in=6, out=8, kernel_h=3, kernel_w=3\]"
    with pytest.raises(ValueError, match=message):
        get_peft_model(Net(), FloraConfig(r=[2, 2], target_modules=["conv"]))
    with pytest.raises(ValueError, match=r"got 4 ranks .* layer 'lin', whose weight has 2 modes"):
        get_peft_model(Net(), FloraConfig(r=[2, 2, 1, 1], target_modules=["lin", "conv"]))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"r": 0}, ValueError, r"FloraConfig.r must be a positive int or a list"),
        ({"r": [2, -1]}, ValueError, r"FloraConfig.r must be"),
        ({"r": []}, ValueError, r"FloraConfig.r must be"),
        ({"r": "8"}, ValueError, r"FloraConfig.r must be"),
        ({"r": True}, ValueError, r"FloraConfig.r must be"),
        ({"r_kernel": [2, 2]}, ValueError, r"FloraConfig.r_kernel must be a positive int"),
        ({"rank_pattern": {"lin": 0}}, ValueError, r"rank_pattern\['lin'\] must be"),
        ({"scale": "2"}, TypeError, r"FloraConfig.scale must be a number"),
        ({"scale_pattern": {"lin": None}}, TypeError, r"scale_pattern\['lin'\] must be a number"),
        ({"dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\)"),
        ({"bias": "lora_only"}, ValueError, r"bias='lora_only' is not one of"),
        ({"layers_pattern": "layers"}, ValueError, r"layers_pattern` needs `layers_to_transform"),
    ],
)
def test_bad_config_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        FloraConfig(target_modules=["lin"], **kwargs)


def test_embedding_with_max_norm_is_refused():
    model = Net()
    model.emb.max_norm = 1.0
    with pytest.raises(ValueError, match=r"max_norm=1.0 \('emb'\).*not linear"):
        get_peft_model(model, FloraConfig(r=2, target_modules=["emb"]))


def test_adapter_for_a_different_base_is_refused(tmp_path):
    torch.manual_seed(0)
    get_peft_model(Net(hidden=8), FloraConfig(r=2, target_modules=["lin"], init_weights=False)).save_pretrained(
        tmp_path
    )
    with pytest.raises(ValueError, match=r"FLoRA adapter was made for .* different layer shapes .*lin\.flora_U"):
        PeftModel.from_pretrained(Net(hidden=10), tmp_path)


def test_registered_names():
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType

    assert PeftType.FLORA == "FLORA" and FloraConfig().peft_type is PeftType.FLORA
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.FLORA] == "flora_"
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.FLORA] is petuning.FloraModel
