"""SORSA's orthonormal regularizer in training, through petuning's hook protocol.

Every expected gradient is computed here from an own float64 implementation of
L_reg = mean over layers of (||A Aᵀ - I||_F, ||Bᵀ B - I||_F), never from petuning's.
"""

from __future__ import annotations

import functools

import pytest
import torch
import toy_models
from peft import get_peft_model
from torch import nn

import petuning
from petuning import SorsaConfig
from petuning.testing import build_tiny_model, cpu_training_args

ADAPTER = "default"


# ------------------------------------------------------------------------------------------------ helpers
MLP = functools.partial(toy_models.MLP, widths=(12, 16, 6))


def sorsa_mlp(dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("r", 4)
    kwargs.setdefault("target_modules", ["lin1", "lin2"])
    return get_peft_model(MLP(dtype), SorsaConfig(**kwargs))


def regression_batch(dtype=torch.float64, n=32):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, 12, generator=g, dtype=dtype)
    y = 3 * torch.randn(n, 6, generator=g, dtype=dtype)
    return x, y


def named_factors(model) -> dict[str, torch.Tensor]:
    """sorsa_A / sorsa_B parameters by name, in module order (A, B, A, B, ...)."""
    return {n: p for n, p in model.named_parameters() if ".sorsa_A." in n or ".sorsa_B." in n}


def own_regularizer(mats: dict[str, torch.Tensor], squared: bool = False) -> torch.Tensor:
    terms = []
    for name, m in mats.items():
        m = m.to(torch.float64)
        gram = m @ m.T if ".sorsa_A." in name else m.T @ m
        diff = gram - torch.eye(gram.shape[0], dtype=torch.float64)
        sq = (diff * diff).sum()
        terms.append(sq if squared else sq.sqrt())
    return sum(terms) / len(terms)


def own_regularizer_grads(model, squared: bool = False) -> dict[str, torch.Tensor]:
    leaves = {n: p.detach().to(torch.float64).clone().requires_grad_(True) for n, p in named_factors(model).items()}
    grads = torch.autograd.grad(own_regularizer(leaves, squared), list(leaves.values()))
    return dict(zip(leaves, grads))


def own_orthonormality(model) -> float:
    with torch.no_grad():
        return own_regularizer(named_factors(model)).item()


def trainable(model) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def clone_grads(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}


def tiny_llama(**sorsa_kwargs):
    base = build_tiny_model("llama", seed=0)
    sorsa_kwargs.setdefault("r", 4)
    sorsa_kwargs.setdefault("target_modules", ["q_proj", "v_proj", "up_proj"])
    sorsa_kwargs.setdefault("init_weights", False)
    sorsa_kwargs.setdefault("task_type", "CAUSAL_LM")
    torch.manual_seed(0)
    return get_peft_model(base, SorsaConfig(**sorsa_kwargs))


def token_batch(n=4, length=16, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 128, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@pytest.fixture
def reset_accelerate():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


# ---------------------------------------------------------------------------------------------- official
def test_official_mode_gradient_after_clipping_with_peak_lr():
    gamma, peak_lr, max_norm = 0.02, 0.1, 0.05
    model = sorsa_mlp(gamma=gamma, ortho_mode="official", init_weights=False)
    params = trainable(model)
    assert set(params) == {
        f"base_model.model.{layer}.sorsa_{k}.default" for layer in ("lin1", "lin2") for k in ("A", "S", "B")
    }
    opt = torch.optim.SGD(params.values(), lr=peak_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)  # scheduled lr = peak/2; peak is initial_lr
    hooks = petuning.TrainingHooks(model, opt)
    seen = {}
    opt.register_step_pre_hook(lambda o, a, k: seen.update(clone_grads(params)))  # runs after petuning's
    x, y = regression_batch()
    for step in range(2):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params.values(), max_norm)
        assert norm > 2 * max_norm  # clipping was active, so the order (clip, then add) matters
        task = clone_grads(params)
        before = {n: p.detach().clone() for n, p in params.items()}
        reg = own_regularizer_grads(model)
        lr_now = opt.param_groups[0]["lr"]
        assert lr_now == pytest.approx(peak_lr / 2)
        opt.step()
        sched.step()
        opt.zero_grad()
        assert hooks.step == step + 1
        for n in params:
            if n in reg:
                expected = task[n] + (gamma / peak_lr) * reg[n]
                assert reg[n].abs().max() > 1e-3
            else:  # S is not regularized
                expected = task[n]
            torch.testing.assert_close(seen[n], expected, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(params[n].detach(), before[n] - lr_now * seen[n], rtol=1e-12, atol=1e-14)
    hooks.remove()
    # after remove(), the optimizer sees the plain task gradient
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    task = clone_grads(params)
    opt.step()
    for n in params:
        assert torch.equal(seen[n], task[n])


def test_official_mode_without_known_lr_raises():
    model = sorsa_mlp(gamma=0.01, ortho_mode="official")
    params = trainable(model)
    opt = torch.optim.SGD(params.values(), lr=0.0)
    petuning.TrainingHooks(model, opt)
    nn.functional.mse_loss(model(regression_batch()[0]), regression_batch()[1]).backward()
    with pytest.raises(ValueError, match="peak_lr"):
        opt.step()


def _train_mlp(gamma: float, steps: int = 30, lr: float = 0.05) -> tuple[float, float, dict]:
    model = sorsa_mlp(dtype=torch.float32, gamma=gamma, ortho_mode="official")
    params = trainable(model)
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    x, y = regression_batch(torch.float32, n=64)
    with petuning.TrainingHooks(model, opt) as hooks:
        first = nn.functional.mse_loss(model(x), y).item()
        for _ in range(steps):
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
            opt.step()
            opt.zero_grad()
        metrics = hooks.metrics()
    return own_orthonormality(model), first - loss.item(), metrics


def test_regularizer_keeps_factors_orthonormal():
    free, free_gain, _ = _train_mlp(gamma=0.0)
    kept, kept_gain, metrics = _train_mlp(gamma=0.02)
    assert free > 0.5  # a high lr drives unregularized factors well away from orthonormal
    assert kept < 0.5 * free
    assert free_gain > 0 and kept_gain > 0  # both runs actually learned
    assert metrics["sorsa_orthonormality"] == pytest.approx(kept, rel=1e-4)


# -------------------------------------------------------------------------------------------------- loss
@pytest.mark.parametrize("norm", ["fro", "fro2"])
def test_loss_mode_adds_gamma_reg_in_training_only(norm):
    gamma = 0.5
    model = tiny_llama(gamma=gamma, ortho_mode="loss", ortho_norm=norm)
    assert type(model).__name__ == "PeftModelForCausalLM"
    batch = token_batch()
    params = trainable(model)
    reg = own_regularizer(named_factors(model), squared=norm == "fro2").item()
    assert reg > 0.05

    model.eval()
    eval_loss = model(**batch).loss
    eval_loss.backward()
    task = clone_grads(params)
    model.zero_grad()

    model.train()
    train_loss = model(**batch).loss
    assert train_loss.item() - eval_loss.item() == pytest.approx(gamma * reg, rel=1e-4)
    train_loss.backward()
    reg_grads = own_regularizer_grads(model, squared=norm == "fro2")
    for n, p in params.items():
        expected = task[n] + gamma * reg_grads[n].float() if n in reg_grads else task[n]
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-6)
    model.zero_grad()

    # not under no_grad, not with gamma=0 / another mode, not with adapters disabled
    with torch.no_grad():
        assert model(**batch).loss.item() == pytest.approx(eval_loss.item(), abs=1e-6)
    with model.disable_adapter():
        base_train = model(**batch).loss.item()
        model.eval()
        base_eval = model(**batch).loss.item()
        model.train()
    assert base_train == pytest.approx(base_eval, abs=1e-6)
    for cfg in (dict(gamma=0.0), dict(ortho_mode="official")):
        for k, v in cfg.items():
            setattr(model.peft_config[ADAPTER], k, v)
        assert model(**batch).loss.item() == pytest.approx(eval_loss.item(), abs=1e-6)
        model.peft_config[ADAPTER].gamma, model.peft_config[ADAPTER].ortho_mode = gamma, "loss"


def test_loss_mode_without_task_type():
    model = tiny_llama(gamma=0.5, ortho_mode="loss", task_type=None)
    batch = token_batch()
    reg = own_regularizer(named_factors(model)).item()
    model.eval()
    eval_loss = model(**batch).loss.item()
    model.train()
    train_loss = model(**batch).loss.item()
    assert train_loss - eval_loss == pytest.approx(0.5 * reg, rel=1e-4)


# --------------------------------------------------------------------------------------------- decoupled
def test_decoupled_mode_step():
    gamma, lr, max_norm = 0.03, 0.1, 0.05
    model = sorsa_mlp(gamma=gamma, ortho_mode="decoupled", init_weights=False)
    params = trainable(model)
    opt = torch.optim.SGD(params.values(), lr=lr)
    seen = {}
    opt.register_step_pre_hook(lambda o, a, k: seen.update(clone_grads(params)))
    hooks = petuning.TrainingHooks(model, opt)
    x, y = regression_batch()
    for _ in range(2):
        nn.functional.mse_loss(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(params.values(), max_norm)
        task = clone_grads(params)
        before = {n: p.detach().clone() for n, p in params.items()}
        opt.step()
        opt.zero_grad()
        for n in params:
            assert torch.equal(seen[n], task[n])  # the optimizer saw the task gradient only
        # p_opt = p - lr * g ; then p' = p_opt - gamma * grad L_reg(p_opt)
        p_opt = {n: before[n] - lr * task[n] for n in params}
        leaves = {n: p_opt[n].clone().requires_grad_(True) for n in named_factors(model)}
        reg = dict(zip(leaves, torch.autograd.grad(own_regularizer(leaves), list(leaves.values()))))
        for n, p in params.items():
            expected = p_opt[n] - gamma * reg[n] if n in reg else p_opt[n]
            torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-14)
            if n in reg:
                assert (gamma * reg[n]).abs().max() > 1e-4
    assert hooks.step == 2


# ----------------------------------------------------------------------------------------------- Trainer
def test_trainer_with_callback(tmp_path, reset_accelerate):
    from transformers import Trainer, TrainerCallback

    gamma, lr, max_norm = 1e-3, 1e-2, 0.1
    model = tiny_llama(gamma=gamma, ortho_mode="official")
    data = [{k: v[0] for k, v in token_batch(seed=s).items()} for s in range(12)]
    records = []

    class Spy(TrainerCallback):
        def __init__(self, tag):
            self.tag = tag

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            entry = {"tag": self.tag, "step": state.global_step, "grads": clone_grads(trainable(model))}
            if self.tag == "after":
                entry["reg"] = own_regularizer_grads(model)
            records.append(entry)

    args = cpu_training_args(
        tmp_path,
        3,
        learning_rate=lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_grad_norm=max_norm,
        weight_decay=0.0,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=data, callbacks=[Spy("before"), petuning.PetuningCallback(), Spy("after")]
    )
    trainer.train()

    assert [r["tag"] for r in records] == ["before", "after"] * 3
    for before, after in zip(records[::2], records[1::2]):
        total = torch.sqrt(sum(g.double().square().sum() for g in before["grads"].values()))
        assert total <= max_norm * (1 + 1e-4)  # the callback ran after clipping
        for n, g in after["grads"].items():
            if n in after["reg"]:  # coefficient gamma / peak lr, although the scheduled lr has decayed
                expected = before["grads"][n] + (gamma / lr) * after["reg"][n].float()
                assert (g - before["grads"][n]).abs().max() > 1e-5
            else:
                expected = before["grads"][n]
            torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-7)

    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3
    assert all("sorsa_orthonormality" in entry for entry in logged)
    assert logged[-1]["sorsa_orthonormality"] == pytest.approx(own_orthonormality(model), rel=1e-4)


def test_loss_mode_under_trainer_gradient_accumulation(tmp_path, reset_accelerate):
    from transformers import Trainer, TrainerCallback

    gamma, accumulation = 0.5, 2
    model = tiny_llama(gamma=gamma, ortho_mode="loss")
    samples = [{k: v[0] for k, v in token_batch(seed=s).items()} for s in range(8)]
    # task gradient of the whole (equal-length, unpadded) batch, before any step
    full = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    model.eval()
    model(**full).loss.backward()
    task = clone_grads(trainable(model))
    reg = own_regularizer_grads(model)
    model.zero_grad()
    seen = {}

    class Spy(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            seen.update(clone_grads(trainable(model)))

    args = cpu_training_args(
        tmp_path,
        1,
        per_device_train_batch_size=len(samples) // accumulation,
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-3,
        max_grad_norm=1e9,
        logging_steps=500,  # transformers' defaults for these two, as this test ran before the helper
        seed=42,
    )
    Trainer(model=model, args=args, train_dataset=samples, callbacks=[Spy()]).train()
    name = "base_model.model.model.layers.0.self_attn.q_proj.sorsa_A.default"
    torch.testing.assert_close(seen[name], task[name] + gamma * reg[name].float(), rtol=1e-3, atol=1e-5)


# -------------------------------------------------------------------------------------------- accelerate
def test_hooks_once_per_real_step_under_accumulation(reset_accelerate):
    from accelerate import Accelerator

    accumulation, micro_batches = 3, 7
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    model = sorsa_mlp(gamma=0.01, ortho_mode="official", init_weights=False)
    opt = torch.optim.SGD(trainable(model).values(), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    tuner = model.base_model
    calls = []
    for hook in ("petuning_before_optimizer_step", "petuning_after_optimizer_step"):
        original = getattr(tuner, hook)

        def counting(ctx, _original=original, _hook=hook):
            calls.append((_hook, ctx.step, ctx.peak_lr))
            return _original(ctx)

        setattr(tuner, hook, counting)
    hooks = petuning.TrainingHooks(model, opt)
    a = named_factors(model)["base_model.model.lin1.sorsa_A.default"]
    snapshots = []
    x, y = regression_batch()
    for i in range(micro_batches):
        with accelerator.accumulate(model):
            loss = nn.functional.mse_loss(model(x[i * 4 : i * 4 + 4]), y[i * 4 : i * 4 + 4])
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
        snapshots.append(a.detach().clone())
    assert calls == [
        ("petuning_before_optimizer_step", 0, 0.1),
        ("petuning_after_optimizer_step", 0, 0.1),
        ("petuning_before_optimizer_step", 1, 0.1),
        ("petuning_after_optimizer_step", 1, 0.1),
    ]
    assert hooks.step == micro_batches // accumulation
    changed = [not torch.equal(snapshots[i], snapshots[i - 1]) for i in range(1, micro_batches)]
    assert changed == [False, True, False, False, True, False]  # parameters move only on real steps


# ---------------------------------------------------------------------------------------------- disabled
@pytest.mark.filterwarnings("ignore:Careful, disabling adapter layers with bias")
@pytest.mark.parametrize("mode", ["official", "decoupled"])
def test_disabled_adapter_gets_no_regularizer(mode):
    model = sorsa_mlp(gamma=0.05, ortho_mode=mode, init_weights=False, bias="all")
    params = trainable(model)
    assert "base_model.model.lin1.base_layer.bias" in params  # something trains while the adapter is off
    opt = torch.optim.SGD(params.values(), lr=0.1)
    hooks = petuning.TrainingHooks(model, opt)
    x, y = regression_batch()
    factors = named_factors(model)
    before = {n: p.detach().clone() for n, p in factors.items()}
    bias_before = params["base_model.model.lin1.base_layer.bias"].detach().clone()
    with model.disable_adapter():
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert hooks.step == 1
    assert not torch.equal(params["base_model.model.lin1.base_layer.bias"], bias_before)
    for n, p in factors.items():
        assert p.grad is None
        assert torch.equal(p.detach(), before[n]), n
    # control: enabled again, the same step moves the factors
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    assert all(not torch.equal(p.detach(), before[n]) for n, p in factors.items())


@pytest.mark.parametrize("mode", ["official", "decoupled"])
def test_gradient_writing_modes_refuse_deepspeed(monkeypatch, mode):
    model = get_peft_model(
        nn.Sequential(nn.Linear(8, 8)), petuning.SorsaConfig(r=2, target_modules=["0"], ortho_mode=mode)
    )
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with petuning.TrainingHooks(model, optimizer, peak_lr=0.1):
        model(torch.ones(2, 8)).sum().backward()
        with pytest.raises(RuntimeError, match="DeepSpeed.*ortho_mode='loss'"):
            optimizer.step()
