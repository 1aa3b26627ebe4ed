"""Data-free distillation rows: text sampled from the original model, for the KL terms on unscored positions.

PAT's ``distill_weight`` distils the unpruned original into the pruned model on every position the attention mask
keeps and the task loss does not score. On a task dataset those are only the prompts, which are narrow (the embedded
task's prompts are 36 tokens of arithmetic), so the general language modelling that pruning damages is not
restored. Rows whose labels are all ``-100`` are distilled on every position; :func:`sample_teacher_rows` makes such
rows from the original itself, by sampling from its BOS token, so no general-text corpus is needed (the data-free
route of the pruning literature). Mix them into the training batches, e.g. a few rows per batch next to the task's.
"""

from __future__ import annotations

import contextlib

import torch

from petuning.data import IGNORE_INDEX


@torch.no_grad()
def sample_teacher_rows(
    model,
    tokenizer,
    num_rows: int,
    length: int = 40,
    *,
    batch_size: int = 32,
    seed: int = 0,
    temperature: float = 1.0,
    top_p: float = 0.95,
) -> list[dict]:
    """Sample ``num_rows`` texts of at most ``length`` tokens from ``model``, each started at the BOS token.

    ``model`` is the original: a transformers model, or a ``PeftModel`` whose adapters are bypassed for the call
    (``disable_adapter``). Sampling is nucleus sampling at ``temperature`` / ``top_p`` under ``torch.manual_seed(seed)``
    (the global RNG is restored afterwards), in eval mode (the training flag is restored). Each row holds the sampled
    tokens after the start token, up to and including the first EOS: ``{"input_ids": [...], "attention_mask": [1, ...],
    "labels": [-100, ...]}`` (the features :class:`petuning.data.SFTCollator` pads), so a task loss ignores them and a
    distillation term covers every position.
    """
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError(
            "sample_teacher_rows starts every text at the tokenizer's BOS (or EOS) token, and this "
            "tokenizer has neither. Set tokenizer.bos_token to the token its texts start with."
        )
    if num_rows < 1 or length < 1:
        raise ValueError(f"sample_teacher_rows needs num_rows >= 1 and length >= 1, got {num_rows} and {length}.")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    bypass = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    rows = []
    try:
        devices = [model.device] if model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), bypass:
            torch.manual_seed(seed)
            for first in range(0, num_rows, batch_size):
                count = min(batch_size, num_rows - first)
                input_ids = torch.full((count, 1), start, dtype=torch.long, device=model.device)
                output = model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    do_sample=True,
                    temperature=temperature,
                    top_p=top_p,
                    max_new_tokens=length,
                    pad_token_id=pad,
                )
                for sampled in output[:, 1:].tolist():
                    if eos is not None and eos in sampled:
                        sampled = sampled[: sampled.index(eos) + 1]
                    rows.append(
                        {
                            "input_ids": sampled,
                            "attention_mask": [1] * len(sampled),
                            "labels": [IGNORE_INDEX] * len(sampled),
                        }
                    )
    finally:
        model.train(was_training)
    return rows
