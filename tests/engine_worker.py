"""One rank of a two-process training run under a distributed engine (launched by tests/test_engines.py through
torchrun, with the environment ``accelerate launch`` derives from a ``recipes/accelerate/*.yaml`` config).

For each method named on the command line: a tiny Llama (loaded after the TrainingArguments exist, so ZeRO-3
partitions it at load), a petuning adapter, a few ``transformers.Trainer`` steps with ``PetuningCallback``, the
adapter saved by ``trainer.save_model``. Each rank writes ``OUT/<method>/rank<r>.pt``: world size, losses, the full
(gathered) adapter parameters and the logits on a fixed batch, or the error the method raised.

    python -m torch.distributed.run --nproc_per_node 2 tests/engine_worker.py MODEL_DIR OUT_DIR METHOD [METHOD ...]
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import petuning

STEPS = 4
METHODS = {
    # ortho_mode="loss": SORSA's gradient-writing modes refuse DeepSpeed and sharded FSDP factors (tested separately)
    "sorsa": lambda: petuning.SorsaConfig(r=4, target_modules="all-linear", ortho_mode="loss", gamma=0.1),
    "flora": lambda: petuning.FloraConfig(r=4, target_modules="all-linear"),
    "sparse_low_rank": lambda: petuning.SparseLowRankConfig(r=4, density=0.05, target_modules="all-linear"),
    "mask_tuning": lambda: petuning.MaskTuningConfig(target_modules=["q_proj", "v_proj"], mask_share=0.25, save_scores=True),
    "pat": lambda: petuning.PatConfig(hsm_rank=8, lora_r=4, lora_dropout=0.0, schedule_steps=STEPS),
    "sorsa_official": lambda: petuning.SorsaConfig(r=4, target_modules=["q_proj"]),  # must refuse where it cannot act
}


def batches(n: int = 16, length: int = 12) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 120, (n, length), generator=generator)
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
        return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone().cpu() for n, p in params.items()}


def run(method: str, model_dir: str, out: Path) -> dict:
    args = TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=1,
        report_to=[], save_strategy="no", seed=0, data_seed=0, disable_tqdm=True, lr_scheduler_type="constant",
        max_grad_norm=1.0, dataloader_num_workers=0,
    )
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), METHODS[method]())
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
            result = {"error": f"{type(error).__name__}: {error}"}
        result["world_size"] = dist.get_world_size() if dist.is_initialized() else 1
        torch.save(result, out / f"rank{dist.get_rank() if dist.is_initialized() else 0}.pt")
        if dist.is_initialized():
            dist.barrier()
        from accelerate.state import AcceleratorState, PartialState

        AcceleratorState._reset_state()  # the next method builds its own Accelerator
        PartialState._reset_state()


if __name__ == "__main__":
    main()
