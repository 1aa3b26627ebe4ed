"""One rank of a two-process training run under a distributed engine, started by tests/test_engines.py as
``accelerate launch --config_file recipes/accelerate/<engine>.yaml --num_processes 2 tests/engine_worker.py ...``,
so the environment is the one accelerate derives from the recipes' own configs.

For each method named on the command line: a tiny Llama (loaded after the TrainingArguments exist, so ZeRO-3
partitions it at load), a petuning adapter, a few training steps, the adapter saved, and ``OUT/<method>/rank<r>.pt``
with the world size, the losses, the full (gathered) adapter parameters and the logits on a fixed batch, or the
error the method raised.

- DeepSpeed (ZeRO-2/3): ``transformers.Trainer`` with ``PetuningCallback``, saved by ``trainer.save_model``.
- FSDP2: accelerate hands FSDP only to GPU device types, so on a CPU machine this worker applies what accelerate's
  FSDP2 preparation applies for the YAML's settings (``fully_shard`` on every ``_no_split_modules`` block, then on
  the root, ``reshard_after_forward`` as configured) and trains with ``TrainingHooks``; the adapter is saved from the
  full state dict (``FULL_STATE_DICT``), as accelerate saves it. On a GPU machine the Trainer path runs.

    accelerate launch --config_file CONFIG.yaml --num_processes 2 tests/engine_worker.py MODEL_DIR OUT_DIR METHOD...
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import petuning

STEPS = 6
METHODS = {
    # ortho_mode="loss": SORSA's gradient-writing modes refuse DeepSpeed and sharded FSDP factors (tested separately)
    "sorsa": lambda: petuning.SorsaConfig(r=4, target_modules="all-linear", ortho_mode="loss", gamma=0.1),
    "flora": lambda: petuning.FloraConfig(r=4, target_modules="all-linear"),
    "sparse_low_rank": lambda: petuning.SparseLowRankConfig(r=4, density=0.05, target_modules="all-linear"),
    "mask_tuning": lambda: petuning.MaskTuningConfig(
        target_modules=["q_proj", "v_proj"], mask_share=0.25, masked_budget=0.05, save_scores=True
    ),  # 5%: the 0.1% default masks a handful of entries of these 64 x 64 weights
    "pat": lambda: petuning.PatConfig(hsm_rank=8, lora_r=4, lora_dropout=0.0, schedule_steps=STEPS),
    "sorsa_official": lambda: petuning.SorsaConfig(r=4, target_modules="all-linear"),  # must refuse where it cannot act
}


def batches(n: int = 16, length: int = 12) -> list[dict]:
    """Four sequences, repeated: a loss that must go down in a few steps."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 120, (4, length), generator=generator).repeat(n // 4, 1)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]


def probe() -> torch.Tensor:
    return torch.randint(4, 120, (2, 10), generator=torch.Generator().manual_seed(1))


def gathered(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full copies of the trainable parameters: FSDP2 DTensors are all-gathered, ZeRO-3 partitions gathered."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    context = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params.values()):
        import deepspeed

        context = deepspeed.zero.GatheredParameters(list(params.values()))
    with context:
        return {
            n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone().cpu() for n, p in params.items()
        }


def manual_fsdp2() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP") == "true" and not torch.cuda.is_available()


def run_fsdp2(method: str, model_dir: str, out: Path) -> dict:
    """FSDP2 on CPU: the wrapping and the full-state-dict save accelerate does on GPUs, in a plain loop."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    assert os.environ["FSDP_VERSION"] == "2" and os.environ["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert os.environ["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
    reshard = os.environ["FSDP_RESHARD_AFTER_FORWARD"] == "true"
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), METHODS[method]())
    blocks = set(model.get_base_model()._no_split_modules)
    for module in list(model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module, reshard_after_forward=reshard)
    fully_shard(model, reshard_after_forward=reshard)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    hooks = petuning.TrainingHooks(model, optimizer, max_steps=STEPS)
    rank, world = dist.get_rank(), dist.get_world_size()
    data = batches()
    losses = []
    model.train()
    for step in range(STEPS):  # per rank: its share of a global batch of 4, as a distributed sampler gives it
        rows = data[(4 * step) % len(data) :][:4][rank::world]
        batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss, op=dist.ReduceOp.AVG)
        losses.append(float(global_loss))
    hooks.remove()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(str(out / "adapter"), state_dict=state)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=probe()).logits.detach().cpu()
    return {"losses": losses, "params": gathered(model), "logits": logits}


def run(method: str, model_dir: str, out: Path) -> dict:
    if manual_fsdp2():
        return run_fsdp2(method, model_dir, out)
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        dataloader_num_workers=0,
        ddp_backend=None if torch.cuda.is_available() else "gloo",  # the CPU stand-in for NCCL
    )
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    partitioned = all(hasattr(p, "ds_id") for p in base.parameters())  # ZeRO-3 with zero3_init_flag
    model = get_peft_model(base, METHODS[method]())
    singular_values = {n: b.detach().clone() for n, b in model.named_buffers() if "sorsa_S0" in n}  # SORSA's SVD
    trainer = Trainer(model=model, args=args, train_dataset=batches(), callbacks=[petuning.PetuningCallback()])
    trainer.train()
    trainer.save_model(str(out / "adapter"))
    wrapped = trainer.model_wrapped
    wrapped.eval()
    with torch.no_grad():
        logits = wrapped(input_ids=probe()).logits.detach().cpu()
    return {
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "params": gathered(trainer.model),
        "logits": logits,
        "partitioned_at_load": partitioned,
        "singular_values": singular_values,
    }


def main() -> None:
    model_dir, out_dir, *methods = sys.argv[1:]
    torch.set_num_threads(1)  # two ranks share the cores
    for method in methods:
        out = Path(out_dir) / method
        out.mkdir(parents=True, exist_ok=True)
        try:
            result = run(method, model_dir, out)
        except Exception as error:  # a refusal is a result too; the test checks its message
            result = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        result["world_size"] = dist.get_world_size() if dist.is_initialized() else 1
        torch.save(result, out / f"rank{dist.get_rank() if dist.is_initialized() else 0}.pt")
        if dist.is_initialized():
            dist.barrier()


if __name__ == "__main__":
    main()
