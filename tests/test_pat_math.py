"""PAT's math, checked against own float64 implementations of the formulas (never against petuning's own code):
the gate schedule, the HSM and LoRA layers, the mask and identity losses, the in-shape merge, and the errors."""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from petuning import PatConfig
from petuning.testing import build_tiny_model
from petuning.tuners.pat.layer import gate_values, mask_loss, schedule

HIDDEN, WIDTH, RANK, LORA = 64, 48, 8, 4


def pat_config(**overrides) -> PatConfig:
    kwargs = dict(
        target_width=WIDTH,
        hsm_rank=RANK,
        lora_r=LORA,
        lora_alpha=8.0,
        lora_dropout=0.0,
        schedule_steps=20,
        init_weights=False,
        task_type="CAUSAL_LM",
    )
    kwargs.update(overrides)
    return PatConfig(**kwargs)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pat-math") / "tiny-llama"
    build_tiny_model("llama", save_dir=path, seed=0, dtype=torch.float64)
    return path


def pat_model(path, dtype=torch.float64, seed=0, **overrides):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    torch.manual_seed(seed)
    return get_peft_model(base, pat_config(**overrides))


def tokens(n=2, length=10, seed=1):
    return torch.randint(4, 100, (n, length), generator=torch.Generator().manual_seed(seed))


def own_gate(m: torch.Tensor, t: int, total: int, width: int, hard_when_frozen: bool = False) -> torch.Tensor:
    """The paper's g_t in float64, written from the formulas (research notes §1.3); with ``hard_when_frozen`` the
    final 0/1 gate from 0.8 T on (petuning's default ``frozen_gate="hard"``)."""
    m = m.double()
    if t >= total or (hard_when_frozen and t >= 0.8 * total):
        g = torch.zeros_like(m)
        g[torch.argsort(-m, stable=True)[:width]] = 1.0
        return g
    t_tau = min(t, 0.8 * total)
    tau = 1.0 / (1.0 - math.log(max(t_tau, 1)) / math.log(total) + 1e-6)
    b = max(0.5 - t / total, 0.0) if t < 0.8 * total else 0.0
    return 1.0 / (1.0 + torch.exp(torch.clamp(-tau * m, max=10.0))) + b


# --------------------------------------------------------------------------------------------- schedule
def test_schedule_matches_the_paper_table():
    """Research notes §1.3 (T = 10k): τ 1 / 2 / 4 / 13.3 / 41.2 and b 0.5 / 0.49 / 0.4 / 0 at t = 0/100/1000/5000/7999;
    τ frozen at 41.27 from 0.8 T on; g for m = -0.5/0/+0.5 at t = 0: 0.88 / 1.0 / 1.12, at t = 5000: 0.001/0.5/0.999."""
    table = {0: (1.0, 0.5), 100: (2.0, 0.49), 1000: (4.0, 0.4), 5000: (13.3, 0.0), 7999: (41.2, 0.0)}
    for t, (tau, b) in table.items():
        got_tau, got_b = schedule(t, 10000)
        assert got_tau == pytest.approx(tau, abs=0.06) and got_b == pytest.approx(b, abs=1e-9)
    assert schedule(8000, 10000)[0] == pytest.approx(41.27, abs=0.01)
    assert schedule(8000, 10000) == schedule(20000, 10000)
    m = torch.tensor([-0.5, 0.0, 0.5])
    torch.testing.assert_close(gate_values(m, 0, 10000, 1), torch.tensor([0.88, 1.0, 1.12]), atol=6e-3, rtol=0)
    torch.testing.assert_close(gate_values(m, 5000, 10000, 1), torch.tensor([0.0013, 0.5, 0.9987]), atol=1e-3, rtol=0)
    assert gate_values(torch.zeros(5), 0, 10000, 2).eq(1.0).all(), "g_0 is exactly 1 at m = 0"


@pytest.mark.parametrize("hard_when_frozen", [False, True])
@pytest.mark.parametrize("t", [0, 3, 11, 15, 16, 19, 20, 35])
def test_gate_equals_own_formula_in_every_phase(t, hard_when_frozen):
    m = torch.randn(32, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
    m[5] = -100.0  # below the clamp: σ is floored at σ(-10)
    torch.testing.assert_close(
        gate_values(m, t, 20, 20, hard_when_frozen), own_gate(m, t, 20, 20, hard_when_frozen), rtol=1e-12, atol=1e-12
    )
    if hard_when_frozen and t >= 16:
        assert set(gate_values(m, t, 20, 20, True).tolist()) == {0.0, 1.0}, "binary from 0.8 T on"


def test_gate_gradient_per_phase():
    """The mask learns before 0.8 T; afterwards its gradient is an exact zero (not None, for DDP's reducer)."""
    for t, learns in ((3, True), (16, False), (25, False)):
        m = torch.randn(16, dtype=torch.float64).requires_grad_()
        (gate_values(m, t, 20, 6) * torch.arange(16.0, dtype=torch.float64)).sum().backward()
        assert m.grad is not None and bool(m.grad.abs().sum() > 0) == learns, t


def test_final_gate_keeps_exactly_the_largest_entries_ties_to_lower_index():
    m = torch.tensor([0.3, -0.2, 0.3, 0.9, 0.3, -1.0])
    g = gate_values(m, 20, 20, 3)
    assert g.tolist() == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]


# ------------------------------------------------------------------------------------------------ layers
def _dense_hsm(layer, name, y):
    """s ⊙ g ⊙ (I + W1 W0) y with the d x d matrix formed explicitly, float64."""
    w0, w1 = layer.pat_hsm_down[name].double(), layer.pat_hsm_up[name].double()
    t_mat = torch.eye(w0.shape[1], dtype=torch.float64) + w1 @ w0
    g = own_gate(
        layer.pat_gate.masks[name], layer.pat_gate.step(name), 20, WIDTH, layer.pat_gate.hard_when_frozen[name]
    )
    return (y.double() @ t_mat.T) * (layer.pat_hsm_scale[name].double() * g)


@pytest.mark.parametrize("step,frozen_gate", [(0, "hard"), (7, "hard"), (17, "hard"), (17, "soft"), (20, "soft")])
def test_layers_match_dense_float64_formulas(llama_dir, step, frozen_gate):
    model = pat_model(llama_dir, frozen_gate=frozen_gate)
    tuner = model.base_model
    tuner.pat_step["default"].fill_(step)
    layers = dict(model.base_model.model.named_modules())
    x_hidden = torch.randn(3, 5, HIDDEN, dtype=torch.float64)
    x_inter = torch.randn(3, 5, 128, dtype=torch.float64)
    scale = 8.0 / LORA
    with torch.no_grad():
        for key, x in (("model.layers.1.self_attn.o_proj", x_hidden), ("model.layers.0.mlp.down_proj", x_inter)):
            layer = layers[key]
            w = layer.base_layer.weight
            y = x @ w.T + scale * (x @ layer.pat_lora_A["default"].T) @ layer.pat_lora_B["default"].T
            torch.testing.assert_close(layer(x), _dense_hsm(layer, "default", y), rtol=1e-10, atol=1e-12)
        q = layers["model.layers.0.self_attn.q_proj"]
        expected = (
            x_hidden @ q.base_layer.weight.T
            + scale * (x_hidden @ q.pat_lora_A["default"].T) @ q.pat_lora_B["default"].T
        )
        torch.testing.assert_close(q(x_hidden), expected, rtol=1e-10, atol=1e-12)
        emb = layers["model.embed_tokens"]
        ids = tokens()
        expected = _dense_hsm(emb, "default", emb.base_layer.weight[ids])
        torch.testing.assert_close(emb(ids), expected, rtol=1e-10, atol=1e-12)


def test_one_mask_shared_by_all_hsms_and_saved_once(llama_dir, tmp_path):
    model = pat_model(llama_dir)
    tuner = model.base_model
    hsms = tuner.hsm_layers("default")
    assert len(hsms) == 1 + 2 * 2
    masks = [p for n, p in model.named_parameters() if "pat_mask" in n]
    assert len(masks) == 1 and masks[0].shape == (HIDDEN,)
    assert all(h.pat_gate.masks["default"] is masks[0] for h in hsms)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert [k for k in saved if "pat_mask" in k] == ["base_model.pat_mask"]
    assert [k for k in saved if "pat_step" in k] == ["base_model.pat_step"]
    assert sorted(k for k in saved if "pat_total" in k or "pat_channel_rms" in k) == [
        "base_model.pat_channel_rms",
        "base_model.pat_total",
    ]
    assert not [k for k in saved if "base_layer" in k], "base weights must not be saved"


# ------------------------------------------------------------------------------------------------ losses
def own_mask_loss(m: torch.Tensor, width: int, count_weight: float) -> float:
    m = m.double()
    count = float((m >= 0).sum())
    pos, neg = m[m > 0], m[m <= 0]
    polar = (((pos - 0.5) ** 2).mean().item() if len(pos) else 0.0) + (
        ((neg + 0.5) ** 2).mean().item() if len(neg) else 0.0
    )
    return count_weight * abs(count - width) / width + polar


def test_mask_loss_value_and_straight_through_gradient():
    m = torch.tensor([0.7, -0.1, 0.2, 0.0, -0.6, 0.4], dtype=torch.float64, requires_grad=True)
    loss = mask_loss(m, 2, 10.0)
    assert loss.item() == pytest.approx(own_mask_loss(m.detach(), 2, 10.0), rel=1e-12)
    loss.backward()
    # count = 4 (0 counts as kept) > 2: the STE passes +10/2 to every entry; polarization: 2(m -+ 1/2)/group size
    m0 = m.detach()
    positive = m0 > 0
    expected = 10.0 / 2 + torch.where(positive, 2 * (m0 - 0.5) / positive.sum(), 2 * (m0 + 0.5) / (~positive).sum())
    torch.testing.assert_close(m.grad, expected)


def test_mask_loss_is_finite_at_initialization():
    """The official code's loss is NaN at step 0 (mean over the empty set of positive entries)."""
    m = torch.zeros(8, requires_grad=True)
    loss = mask_loss(m, 6, 10.0)
    assert loss.item() == pytest.approx(10.0 * 2 / 6 + 0.25)
    loss.backward()
    assert torch.isfinite(m.grad).all()


def test_auxiliary_loss_is_mask_plus_identity_averaged_over_every_hsm(llama_dir):
    model = pat_model(llama_dir, mask_loss_weight=0.5, identity_loss_weight=2.0)
    tuner = model.base_model
    downs = [h.pat_hsm_down["default"] for h in tuner.hsm_layers("default")]
    own_identity = sum(((d @ d.T - torch.eye(RANK, dtype=d.dtype)) ** 2).sum() / RANK**2 for d in downs) / len(downs)
    expected = 0.5 * own_mask_loss(tuner.pat_mask["default"].detach(), WIDTH, 10.0) + 2.0 * own_identity.item()
    loss = tuner.petuning_auxiliary_loss()
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    loss.backward()
    # every HSM's W0 is constrained (the official code only reaches the embedding's and the last layer's)
    assert all(d.grad is not None and d.grad.abs().sum() > 0 for d in downs)

    with model.disable_adapter():
        assert tuner.petuning_auxiliary_loss() is None, "a disabled adapter does not train"


def test_auxiliary_loss_reaches_the_training_loss(llama_dir):
    model = pat_model(llama_dir)
    ids = tokens()
    model.eval()
    task = model(input_ids=ids, labels=ids).loss
    model.train()
    total = model(input_ids=ids, labels=ids).loss
    # petuning.training sums auxiliary terms in float32
    assert total.item() == pytest.approx(task.item() + model.base_model.petuning_auxiliary_loss().item(), rel=1e-6)
    assert total.item() - task.item() > 1e-3


# ------------------------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("step", [4, 20])
@pytest.mark.parametrize("tied", [False, True])
def test_merge_is_exact_unmerge_restores_the_base_bit_for_bit(tmp_path, step, tied):
    path = tmp_path / "base"
    build_tiny_model("llama", save_dir=path, dtype=torch.float64, tie_word_embeddings=tied)
    model = pat_model(path)
    model.base_model.pat_step["default"].fill_(step)
    base_state = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "pat_" not in k}
    ids = tokens()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        model.merge_adapter()
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-9, atol=1e-10)
        model.unmerge_adapter()
        state = model.get_base_model().state_dict()
        assert all(torch.equal(state[k], v) for k, v in base_state.items())
        if tied:
            base = model.get_base_model()
            assert base.lm_head.weight is base.model.embed_tokens.weight, "unmerge re-ties the embeddings"
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-9, atol=1e-10)


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target_width": 0}, "positive integer"),
        ({"target_width": 40.5}, "positive integer"),
        ({"target_width": True}, "positive integer"),
        ({"target_width": 32, "pruning_ratio": 0.25}, "not both"),
        ({"target_width": None, "pruning_ratio": 1.2}, r"\(0, 1\)"),
        ({"schedule_steps": 1}, ">= 2"),
        ({"hsm_rank": 0}, "hsm_rank"),
        ({"lora_target_modules": ["q_proj", "lm_head"]}, "lm_head"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pat_config(**kwargs)


def test_model_level_errors(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match=r"target_width=64 must be below the model's hidden size 64"):
        pat_model(llama_dir, target_width=64)
    with pytest.raises(ValueError, match="hsm_rank=65 exceeds the hidden size 64.*strict_rank=True"):
        pat_model(llama_dir, hsm_rank=65, strict_rank=True)
    with pytest.raises(ValueError, match="target_modules is derived"):
        pat_model(llama_dir, target_modules=["q_proj"])
    opt = tmp_path / "opt"
    build_tiny_model("opt", save_dir=opt)
    with pytest.raises(ValueError, match=r"Llama-family.*model_type 'opt'"):
        get_peft_model(AutoModelForCausalLM.from_pretrained(opt), pat_config())

    model = pat_model(llama_dir)
    with pytest.raises(ValueError, match="not final yet"):
        model.base_model.petuning_prune_and_unload()
    model.add_adapter("other", pat_config())
    with pytest.raises(ValueError, match="one adapter at a time"):
        model.base_model.set_adapter(["default", "other"])


def test_pruning_ratio_and_width_multiple(llama_dir):
    model = pat_model(llama_dir, target_width=None, pruning_ratio=0.3, width_multiple=8)
    assert model.base_model._pat_gate.widths["default"] == 40  # round(64 * 0.7) = 45 -> 40


def test_reload_keeps_mask_step_and_outputs(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = pat_model(llama_dir)
    model.base_model.pat_step["default"].fill_(13)
    ids = tokens()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float64), tmp_path)
    assert loaded.base_model.pat_schedule_step() == 13 and loaded.base_model.pat_mask_phase() == "learning"
    assert not loaded.base_model.pat_mask["default"].requires_grad
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)


def test_adapter_for_a_different_base_is_refused(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    pat_model(llama_dir).save_pretrained(tmp_path / "adapter")
    other = tmp_path / "wider"
    build_tiny_model("llama", save_dir=other, hidden_size=96)
    message = r"PAT adapter was made for a base model .*pat_hsm_down.*\(8, 64\) vs model \(8, 96\)"
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(other), tmp_path / "adapter")
