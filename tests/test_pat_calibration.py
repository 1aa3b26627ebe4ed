"""PAT's calibrated start on real-model-like inputs: the residual-stream statistic against a direct computation, the
mask it gives, protected (massive-activation) channels, ``schedule_steps="auto"``, the first steps' loss, and
identical statistics on every DDP rank."""

from __future__ import annotations

import pytest
import torch
from ddp_utils import run_two_ranks
from peft import get_peft_model
from torch.nn.parallel import DistributedDataParallel

import petuning
from petuning import PatConfig
from petuning.testing import build_tiny_model, cpu_training_args

WIDTH, MASSIVE = 48, 5  # kept channels of 64; the residual channel given a massive activation


def massive_base(dtype=torch.float64):
    """A tiny Llama whose embedding writes a near-constant, huge value into channel MASSIVE (as SmolLM2's 507)."""
    base = build_tiny_model("llama", seed=0, dtype=dtype)
    with torch.no_grad():
        base.model.embed_tokens.weight[:, MASSIVE] = 300.0
    return base


def pat(base, **overrides):
    kwargs = dict(target_width=WIDTH, hsm_rank=8, lora_r=4, lora_dropout=0.0, task_type="CAUSAL_LM")
    torch.manual_seed(0)
    return get_peft_model(base, PatConfig(**{**kwargs, **overrides}))


def padded_batches(seed=1):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        ids = torch.randint(4, 100, (3, 12), generator=generator)
        attention = torch.ones_like(ids)
        attention[0, 8:] = 0  # right padding: these positions must not count
        out.append({"input_ids": ids, "attention_mask": attention})
    return out


def direct_norm_statistics(base, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Read where the decoder consumes the 2L + 1 residual states, at every input_layernorm and
    post_attention_layernorm and the final norm (no PAT involved): the per-channel RMS of the norms' inputs (the
    states) and the mean square of their outputs, over the positions the attention mask keeps."""
    inputs, outputs = [], []

    def record(_module, args, output):
        inputs.append(args[0].detach())
        outputs.append(output.detach())

    norms = [n for layer in base.model.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    hooks = [n.register_forward_hook(record) for n in (*norms, base.model.norm)]
    totals, count = [0.0, 0.0], 0
    with torch.no_grad():
        for batch in batches:
            inputs.clear(), outputs.clear()
            base(**batch)
            keep = batch["attention_mask"].bool()
            for index, values in enumerate((inputs, outputs)):
                stacked = torch.stack(values)[:, keep]  # (2L + 1, positions, d)
                totals[index] = totals[index] + stacked.double().square().sum(dim=(0, 1))
            count += stacked.shape[0] * stacked.shape[1]
    for hook in hooks:
        hook.remove()
    return (totals[0] / count).sqrt(), totals[1] / count


def direct_rms(base, batches) -> torch.Tensor:
    return direct_norm_statistics(base, batches)[0]


def test_calibration_statistic_matches_a_direct_computation_and_keeps_the_model_unchanged():
    base = massive_base()
    expected = direct_rms(base, padded_batches())
    ids = padded_batches(seed=5)[0]
    with torch.no_grad():
        reference = base(**ids).logits
    model = pat(base)
    rms = model.base_model.calibrate_pat_mask(padded_batches())
    torch.testing.assert_close(rms, expected, rtol=1e-10, atol=0)
    mask = model.base_model.pat_mask["default"].detach()
    top = torch.topk(expected, WIDTH).indices
    assert set(mask.unique().tolist()) == {-0.5, 0.5} and int((mask > 0).sum()) == WIDTH
    assert bool((mask[top] == 0.5).all()), "the d' channels with the largest RMS start kept"
    model.eval()
    with torch.no_grad():  # s = 1/g_0 on every HSM: the adapter is still the identity
        torch.testing.assert_close(model(**ids).logits, reference, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="only before training"):
        model.base_model.pat_step["default"].fill_(1)
        model.base_model.calibrate_pat_mask(padded_batches())


def test_norm_output_ranking_matches_a_direct_computation_and_still_protects_massive_channels():
    base = massive_base()
    with torch.no_grad():  # every norm reads the massive channel with a tiny weight: it ranks last by what is read
        for layer in base.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(0))
            layer.input_layernorm.weight[MASSIVE] = 1e-6
            layer.post_attention_layernorm.weight[MASSIVE] = 1e-6
        base.model.norm.weight[MASSIVE] = 1e-6
    expected_rms, expected_score = direct_norm_statistics(base, padded_batches())
    ids = padded_batches(seed=5)[0]
    with torch.no_grad():
        reference = base(**ids).logits
    model = pat(base, mask_init="norm_output")
    rms = model.base_model.calibrate_pat_mask(padded_batches())
    torch.testing.assert_close(rms, expected_rms, rtol=1e-10, atol=0)  # protection still follows the RMS
    assert model.base_model.pat_protected_channels().tolist() == [MASSIVE]
    assert int(expected_score.argsort()[0]) == MASSIVE
    mask = model.base_model.pat_mask["default"].detach()
    others = [i for i in torch.topk(expected_score, 64).indices.tolist() if i != MASSIVE][: WIDTH - 1]
    assert int((mask > 0).sum()) == WIDTH and mask[MASSIVE] == 0.5, "the protected channel starts kept"
    assert bool((mask[others] == 0.5).all()), "then the largest norm-output scores"
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, reference, rtol=1e-10, atol=1e-10)
    trained = pat(massive_base(torch.float32), mask_init="norm_output")
    _train(trained, 4)  # calibrated from the first training step's forwards
    assert trained.base_model.pat_protected_channels().tolist() == [MASSIVE]


def test_massive_channels_are_protected_and_never_pruned():
    model = pat(massive_base(torch.float32))
    model.base_model.calibrate_pat_mask(padded_batches())
    assert model.base_model.pat_protected_channels().tolist() == [MASSIVE]
    mask = model.base_model.pat_mask["default"]
    with torch.no_grad():
        mask[MASSIVE] = -10.0  # whatever m learns, the channel stays
    assert float(model.base_model.pat_gate()[MASSIVE]) > 1.0, "the soft gate sees max(m, 1/2)"
    model.base_model.finalize_pat_mask()
    assert MASSIVE in model.base_model.pat_kept_channels().tolist()
    assert float(model.base_model.pat_gate()[MASSIVE]) == 1.0
    pruned = model.base_model.petuning_prune_and_unload()
    kept = model.base_model.pat_kept_channels().tolist().index(MASSIVE)
    assert bool((pruned.model.embed_tokens.weight[:, kept].abs() > 100).all()), "the massive column survives"
    unprotected = pat(massive_base(torch.float32), protect_ratio=None)
    unprotected.base_model.calibrate_pat_mask(padded_batches())
    assert unprotected.base_model.pat_protected_channels() is None


def _train(model, steps, max_steps="same", lr=1e-2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    hooks = petuning.TrainingHooks(model, optimizer, max_steps=steps if max_steps == "same" else max_steps)
    batches = padded_batches()
    model.train()
    losses, mask_losses = [], []
    for step in range(steps):
        batch = {**batches[step % 2], "labels": batches[step % 2]["input_ids"]}
        loss = model(**batch).loss
        losses.append(float(loss.detach()))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mask_losses.append(hooks.metrics().get("pat_mask_loss", 0.0))
    hooks.remove()
    return losses, mask_losses


def test_auto_schedule_takes_max_steps_and_calibrates_from_the_first_step():
    model = pat(massive_base(torch.float32))
    tuner = model.base_model
    assert tuner.pat_total["default"].item() == 0 and tuner.pat_mask_phase() == "learning"
    _train(model, 10)
    assert tuner.pat_total["default"].item() == 10 and tuner.pat_mask_phase() == "final"
    assert tuner.pat_protected_channels().tolist() == [MASSIVE]
    assert MASSIVE in tuner.pat_kept_channels().tolist()
    with torch.no_grad():
        expected = direct_rms(massive_base(torch.float32), padded_batches()[:1])
    torch.testing.assert_close(tuner.pat_channel_rms["default"].double(), expected, rtol=1e-5, atol=0)


def test_auto_schedule_without_a_known_length_is_refused():
    model = pat(massive_base(torch.float32))
    with pytest.raises(ValueError, match="max_steps"):
        _train(model, 1, max_steps=None)
    assert model.base_model.pat_schedule_step() == 0


def test_trainer_resolves_auto_from_its_max_steps(tmp_path):
    from transformers import Trainer

    model = pat(massive_base(torch.float32))
    samples = [
        {k: v[i] for k, v in b.items()} | {"labels": b["input_ids"][i]} for b in padded_batches() for i in range(3)
    ]
    args = cpu_training_args(tmp_path, 5, per_device_train_batch_size=2)
    Trainer(model=model, args=args, train_dataset=samples, callbacks=[petuning.PetuningCallback()]).train()
    assert model.base_model.pat_total["default"].item() == 5 and model.base_model.pat_mask_phase() == "final"


def test_first_steps_carry_no_mask_loss_after_calibration():
    """The paper's m = 0 starts with count(m >= 0) = d against a target d': a count loss of 10 (d - d') / d' joins
    the task loss from step 1, and m moving in lockstep flips the count between d and 0 (on SmolLM2 the logged loss
    went 7.1 -> 12.6 at steps 1-2 while the task loss fell). The calibrated start has no mask loss at all."""
    steps, total = 6, 30
    calibrated, paper = pat(massive_base(torch.float32)), pat(massive_base(torch.float32), mask_init="zeros")
    task = pat(massive_base(torch.float32), mask_loss_weight=0.0, identity_loss_weight=0.0, mask_init="zeros")
    (with_calibration, calibrated_mask_loss), (zero_init, paper_mask_loss) = (
        _train(calibrated, steps, total),
        _train(paper, steps, total),
    )
    task_only, _ = _train(task, steps, total)
    assert zero_init[0] - task_only[0] > 10 * (64 - WIDTH) / WIDTH, "the paper's start adds the count loss"
    assert abs(with_calibration[0] - task_only[0]) < 0.1, "only the (small) identity loss is added at step 1"
    assert max(calibrated_mask_loss) < 0.01 and min(paper_mask_loss) > 1.0
    assert max(with_calibration) < max(zero_init) - 1.0


DDP_STEPS = 3


def _ddp_worker(rank: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    module = pat(massive_base(torch.float32))
    model = DistributedDataParallel(module)
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1)
    hooks = petuning.TrainingHooks(model, optimizer, max_steps=DDP_STEPS)
    module.train()
    batch = padded_batches(seed=10 + rank)[0]  # different data on each rank
    for _ in range(DDP_STEPS):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    hooks.remove()
    tuner = module.base_model
    return {"rms": tuner.pat_channel_rms["default"].clone(), "mask": tuner.pat_mask["default"].detach().clone()}


@pytest.mark.slow
def test_ddp_ranks_calibrate_on_the_same_statistics(tmp_path):
    rank0, rank1 = run_two_ranks(_ddp_worker, tmp_path)
    assert torch.equal(rank0["rms"], rank1["rms"]) and torch.equal(rank0["mask"], rank1["mask"])
    both = padded_batches(seed=10)[:1] + padded_batches(seed=11)[:1]
    expected = direct_rms(massive_base(torch.float32), both)
    torch.testing.assert_close(rank0["rms"].double(), expected, rtol=1e-5, atol=0)


def test_calibrating_twice_keeps_the_model_unchanged():
    base = massive_base()
    ids = padded_batches(seed=5)[0]
    with torch.no_grad():
        reference = base(**ids).logits
    model = pat(base)
    model.base_model.calibrate_pat_mask(padded_batches(seed=1))
    model.base_model.calibrate_pat_mask(padded_batches(seed=2))  # another statistic, another mask
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, reference, rtol=1e-10, atol=1e-10)
