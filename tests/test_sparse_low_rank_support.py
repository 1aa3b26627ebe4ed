"""Sparse-plus-low-rank supports (random / magnitude / gradient), persistence of the exact support, the
nuclear-norm regularizer's gradient, quantized bases and the errors for bad input."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
import toy_models
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

import petuning
from petuning import SparseLowRankConfig
from petuning.testing import build_tiny_model, cpu_training_args
from petuning.training import auxiliary_loss
from petuning.tuners.sparse_low_rank import SparseLowRankLayer, select_support_from_gradients

ADAPTER = "default"


MLP = functools.partial(toy_models.MLP, widths=(12, 16, 16, 5))


def layers(model) -> dict[str, SparseLowRankLayer]:
    prefix = "base_model.model."
    return {n.removeprefix(prefix): m for n, m in model.named_modules() if isinstance(m, SparseLowRankLayer)}


def support_set(layer: SparseLowRankLayer) -> set[int]:
    return set(layer.sparse_low_rank_indices[ADAPTER].tolist())


def assert_top_scores(scores: np.ndarray, chosen: set[int], largest: bool, rtol: float = 0.0) -> None:
    """``chosen`` holds the entries with the largest (or smallest) ``scores``: every chosen score is at least (at
    most) every other score, up to ``rtol`` for round-off between two ways of computing the scores."""
    flat = scores.ravel()
    mask = np.zeros(flat.size, dtype=bool)
    mask[list(chosen)] = True
    inside, outside = flat[mask], flat[~mask]
    if largest:
        assert inside.min() >= outside.max() * (1 - rtol), (inside.min(), outside.max())
    else:
        assert inside.max() <= outside.min() * (1 + rtol), (inside.max(), outside.min())


def make(model, **kwargs):
    kwargs.setdefault("target_modules", ["lin1", "lin2", "lin3"])
    kwargs.setdefault("r", 2)
    kwargs.setdefault("density", 0.1)
    return get_peft_model(model, SparseLowRankConfig(**kwargs))


def batches(n=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(6, 12, generator=g, dtype=dtype), torch.randn(6, 5, generator=g, dtype=dtype)) for _ in range(n)
    ]


def mse(model, batch):
    x, y = batch
    return (model(x) - y).pow(2).mean()


# -------------------------------------------------------------------------------------------- random
def test_random_support_is_seeded_per_layer_and_uniform():
    torch.manual_seed(0)
    first = layers(make(MLP(), seed=3))
    again = layers(make(MLP(), seed=3))
    other_seed = layers(make(MLP(), seed=4))
    assert all(support_set(first[n]) == support_set(again[n]) for n in first)  # reproducible
    assert all(support_set(first[n]) != support_set(other_seed[n]) for n in first)
    # two layers of the same shape under one seed get different supports (the module name enters the seed)
    square = make(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)), target_modules=["0", "1"], density=0.25)
    assert support_set(layers(square)["0"]) != support_set(layers(square)["1"])

    big = make(nn.Sequential(nn.Linear(200, 100)), target_modules=["0"], density=0.2, r=1)
    idx = layers(big)["0"].sparse_low_rank_indices[ADAPTER].long()
    rows, cols = idx // 200, idx % 200
    # 4000 draws without replacement: each half of the rows/columns holds about half of them (sd ~ 28)
    for coordinate, size in ((rows, 100), (cols, 200)):
        assert abs(int((coordinate < size // 2).sum()) - 2000) < 200


# ----------------------------------------------------------------------------------------- magnitude
@pytest.mark.parametrize("net", ["linear", "conv1d"])
def test_magnitude_support_is_the_smallest_weights(net):
    torch.manual_seed(1)
    if net == "linear":
        model = make(MLP(), support="magnitude", density=0.3)
    else:
        model = make(nn.Sequential(Conv1D(nf=9, nx=14)), target_modules=["0"], support="magnitude", density=0.3)
    for layer in layers(model).values():
        w = layer.get_base_layer().weight.detach().double().numpy()
        w_out_in = w.T if net == "conv1d" else w  # indices address the (out, in) layout
        assert_top_scores(np.abs(w_out_in), support_set(layer), largest=False)


# ------------------------------------------------------------------------------------------ gradient
def reference_fisher(model_fn, data, dtype) -> dict[str, np.ndarray]:
    """Σ over batches of (dL/dW)² for every linear weight of a plain (un-adapted) copy, via autograd."""
    plain = model_fn()
    scores = {n: np.zeros(tuple(m.weight.shape)) for n, m in plain.named_children()}
    for batch in data:
        plain.zero_grad()
        mse(plain, batch).backward()
        for n, m in plain.named_children():
            scores[n] += m.weight.grad.to(torch.float64).numpy() ** 2
    return scores


def test_gradient_support_from_one_call_helper():
    torch.manual_seed(2)
    base = MLP(torch.float64)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = make(base, support="gradient")
    assert all(layer.support_pending(ADAPTER) for layer in layers(model).values())
    grads_before = {n: p.grad for n, p in model.named_parameters()}
    data = batches(3, dtype=torch.float64)

    assert select_support_from_gradients(model, data, loss_fn=mse) == 3

    def fresh():
        plain = MLP(torch.float64)
        plain.load_state_dict(state)
        return plain

    want = reference_fisher(fresh, data, torch.float64)
    for name, layer in layers(model).items():
        assert not layer.support_pending(ADAPTER)
        assert_top_scores(want[name], support_set(layer), largest=True, rtol=1e-9)
        assert not layer.sparse_low_rank_scores  # the dense scores are freed
    assert all(p.grad is grads_before[n] for n, p in model.named_parameters()), "helper left gradients behind"


def test_gradient_support_through_training_hooks():
    """With gradient_warmup_steps=2, the hooks collect squared weight gradients in the first two optimizer steps
    (the low-rank part trains meanwhile) and fix the support after the second."""
    torch.manual_seed(3)
    model = make(MLP(), support="gradient", gradient_warmup_steps=2)
    model.train()
    bases = {n: layer.get_base_layer().weight for n, layer in layers(model).items()}
    for w in bases.values():
        w.requires_grad_(True)  # only to compute the reference dL/dW0 alongside
    want = {n: np.zeros(tuple(w.shape)) for n, w in bases.items()}
    adapter_params = [p for n, p in model.named_parameters() if "sparse_low_rank_" in n]
    optimizer = torch.optim.AdamW(adapter_params, lr=1e-2)
    a_before = layers(model)["lin1"].sparse_low_rank_A[ADAPTER].detach().clone()
    with petuning.TrainingHooks(model, optimizer) as hooks:
        for step, batch in enumerate(batches(3)):
            mse(model, batch).backward()
            if step < 2:
                for n, w in bases.items():
                    want[n] += w.grad.double().numpy() ** 2
            for w in bases.values():
                w.grad = None
            optimizer.step()
            optimizer.zero_grad()
            pending = [layer.support_pending(ADAPTER) for layer in layers(model).values()]
            assert all(pending) if step == 0 else not any(pending)
            if step == 0:
                assert hooks.metrics()["sparse_low_rank_pending_supports"] == 3.0
    assert not torch.equal(layers(model)["lin1"].sparse_low_rank_A[ADAPTER], a_before)  # low rank trained in warm-up
    for name, layer in layers(model).items():
        assert_top_scores(want[name], support_set(layer), largest=True, rtol=1e-5)


def test_gradient_warmup_under_trainer_with_callback(tmp_path):
    """RoSA's schedule under transformers.Trainer + PetuningCallback: the support is pending through the warm-up
    steps (logged), chosen after step 2, and the sparse values train from step 3 on."""
    from accelerate.state import AcceleratorState, GradientState
    from transformers import Trainer

    torch.manual_seed(7)
    base = build_tiny_model("llama", seed=0)
    config = SparseLowRankConfig(
        r=2,
        density=0.05,
        support="gradient",
        gradient_warmup_steps=2,
        target_modules=["q_proj", "up_proj"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(12):
        ids = torch.randint(4, 100, (12,), generator=g)
        data.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    args = cpu_training_args(tmp_path, 3)
    try:
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[petuning.PetuningCallback()])
        trainer.train()
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    pending = [log["sparse_low_rank_pending_supports"] for log in trainer.state.log_history if "loss" in log]
    assert pending == [4.0, 0.0, 0.0]  # 2 layers x 2 decoder blocks, chosen after the second optimizer step
    for layer in layers(model).values():
        assert not layer.support_pending(ADAPTER) and not layer.sparse_low_rank_scores
        assert layer.sparse_low_rank_values[ADAPTER].abs().sum() > 0  # trained in step 3 (zero at init)


def test_gradient_support_needs_data():
    model = make(MLP(), support="gradient")
    model.train()
    x, _ = batches(1)[0]
    with pytest.raises(ValueError, match="needs data, but none was given.*select_support_from_gradients"):
        model(x).sum().backward()
    model.eval()
    with torch.no_grad():  # evaluation before the support exists uses the low-rank part only
        model(x)
    with pytest.raises(ValueError, match="not been chosen yet"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="at least one batch"):
        select_support_from_gradients(model, [], loss_fn=mse)
    with pytest.raises(TypeError, match="loss_fn"):
        select_support_from_gradients(model, batches(1))
    select_support_from_gradients(model, batches(1), loss_fn=mse)
    with pytest.raises(ValueError, match="no support left to choose"):
        select_support_from_gradients(model, batches(1), loss_fn=mse)


# ----------------------------------------------------------------------------------------- persistence
def test_save_and_load_keep_the_exact_support(tmp_path):
    """Supports are read from the adapter file, never re-derived: a gradient-chosen support (not re-derivable) and a
    random one whose config seed was edited after saving both come back exactly."""
    torch.manual_seed(4)
    base_state = MLP().state_dict()

    def base():
        m = MLP()
        m.load_state_dict(base_state)
        return m

    x = batches(1, seed=9)[0][0]
    for support, path in (("gradient", tmp_path / "grad"), ("random", tmp_path / "rand")):
        model = make(base(), support=support, init_weights=False)
        if support == "gradient":
            select_support_from_gradients(model, batches(2), loss_fn=mse)
        expected = model(x)
        model.save_pretrained(path)
        if support == "random":
            config = json.loads((path / "adapter_config.json").read_text())
            config["seed"] += 1
            (path / "adapter_config.json").write_text(json.dumps(config))
        loaded = PeftModel.from_pretrained(base(), path)
        for name, layer in layers(loaded).items():
            saved = layers(model)[name].sparse_low_rank_indices[ADAPTER]
            assert torch.equal(layer.sparse_low_rank_indices[ADAPTER], saved)
        assert torch.equal(loaded(x), expected)


def test_corrupt_support_in_file_is_refused(tmp_path):
    model = make(MLP(), init_weights=False)
    model.save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    state = load_file(file)
    key = next(k for k in state if k.endswith("lin2.sparse_low_rank_indices"))
    state[key] = state[key].flip(0).contiguous()  # unsorted
    save_file(state, file)
    loaded = PeftModel.from_pretrained(MLP(), tmp_path)
    with pytest.raises(ValueError, match=r"sparse support \(layer 'lin2'\) is not a sorted set.*corrupt"):
        loaded(batches(1)[0][0])


# ---------------------------------------------------------------------------------------- nuclear norm
def test_nuclear_norm_gradient_reaches_the_trainable_values():
    """λ Σ ||ΔW||_* through the hook protocol: its value and its gradient with respect to the sparse values, A and
    B equal the closed form d||M||_*/dM = U Vᵀ (float64, distinct singular values) pulled back through ΔW."""
    torch.manual_seed(5)
    lam = 0.3
    model = make(MLP(torch.float64), init_weights=False, nuclear_norm_weight=lam, nuclear_norm_layers=0, density=0.3)
    model.train()
    loss = auxiliary_loss(model)
    loss.backward()
    total = 0.0
    for layer in layers(model).values():
        s = layer.sparse_low_rank_scaling[ADAPTER]
        a, b = (layer.sparse_low_rank_A[ADAPTER], layer.sparse_low_rank_B[ADAPTER])
        v, idx = layer.sparse_low_rank_values[ADAPTER], layer.sparse_low_rank_indices[ADAPTER].long().numpy()
        dense = np.zeros(layer.out_features * layer.in_features)
        dense[idx] = v.detach().numpy()
        delta = dense.reshape(layer.out_features, layer.in_features) + s * b.detach().numpy() @ a.detach().numpy()
        u, sv, vh = np.linalg.svd(delta, full_matrices=False)
        total += sv.sum()
        g = lam * u @ vh  # dL/dΔW
        np.testing.assert_allclose(v.grad.numpy(), g.ravel()[idx], rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(b.grad.numpy(), s * g @ a.detach().numpy().T, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(a.grad.numpy(), s * b.detach().numpy().T @ g, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(loss.item(), lam * total, rtol=1e-6)  # the protocol sums the terms in float32


def test_nuclear_norm_reaches_values_through_the_model_loss(tmp_path):
    """On a causal LM the term is part of ``outputs.loss`` in training mode, one sampled layer per forward, and it
    changes the sparse values' gradient (SaRA's official code loses it)."""
    base_path = tmp_path / "llama"
    build_tiny_model("llama", save_dir=base_path, seed=0)

    ids = torch.randint(4, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    grads, losses = [], []
    for lam in (0.0, 0.5):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(base_path)
        model = make(base, target_modules=["q_proj", "v_proj"], init_weights=False, nuclear_norm_weight=lam, r=2)
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if "sparse_low_rank_values" in n})
    assert losses[1] > losses[0]
    changed = [n for n in grads[0] if not torch.allclose(grads[0][n], grads[1][n])]
    assert len(changed) == 1, changed  # exactly the one sampled layer's values got the regularizer's gradient


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("density", [0.0, 1.0, -0.01, 1.5])
def test_density_outside_open_unit_interval_is_refused(density):
    with pytest.raises(ValueError, match=r"density must lie strictly between 0 and 1"):
        SparseLowRankConfig(density=density)


def test_rank_larger_than_layer_and_empty_support_are_refused_with_strict_rank():
    too_large = r"rank 6 for layer 'lin3' is larger than 5: the low-rank part of a 5x16 update has rank at most 5"
    with pytest.raises(ValueError, match=too_large):
        make(MLP(), r=6, strict_rank=True)
    with pytest.raises(ValueError, match=r"selects no entry of the 16x12 weight \(layer 'lin1'\)"):
        make(MLP(), density=0.001, strict_rank=True)
    with pytest.raises(ValueError, match="r must be an integer >= 0"):
        SparseLowRankConfig(r=-1)
    with pytest.raises(ValueError, match="only applies to support='gradient'"):
        SparseLowRankConfig(gradient_warmup_steps=3)
    with pytest.raises(TypeError, match="cannot adapt 'conv' of type Conv2d"):
        get_peft_model(_conv(), SparseLowRankConfig(target_modules=["conv"]))


def _conv():
    model = nn.Module()
    model.conv = nn.Conv2d(2, 2, 1)
    return model


# ------------------------------------------------------------------------------------------- quantized
def test_bitsandbytes_4bit_base():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(6)
    try:
        q = bnb.nn.Linear4bit(32, 16, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(torch.randn(16, 32), requires_grad=False, quant_type="nf4")
        q = q.to("cpu")
        q(torch.randn(2, 32))
        assert q.weight.quant_state is not None
    except Exception as exc:
        pytest.skip(f"bitsandbytes 4-bit does not work on CPU here: {exc!r}")
    model = nn.Sequential(q)
    peft_model = get_peft_model(model, SparseLowRankConfig(r=2, density=0.1, support="magnitude", target_modules=["0"]))
    (layer,) = layers(peft_model).values()
    assert "bnb 4bit" in repr(layer)
    dequantized = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).double().numpy()
    assert_top_scores(np.abs(dequantized), support_set(layer), largest=False)
    x = torch.randn(3, 32)
    base_out = layer.base_layer(x)
    assert torch.equal(peft_model(x), base_out)  # identity at init
    peft_model(x).pow(2).sum().backward()
    assert layer.sparse_low_rank_values[ADAPTER].grad.abs().sum() > 0
    with torch.no_grad():
        layer.sparse_low_rank_values[ADAPTER].normal_()
    expected = peft_model(x)
    with pytest.warns(UserWarning, match="re-quantizes the weight"):
        peft_model.merge_adapter()
    # 4-bit re-quantization error, not a wrong update: well below the update's size
    change = (expected - base_out).abs().max()
    assert (peft_model(x) - expected).abs().max() < 0.5 * change
