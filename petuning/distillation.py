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
    """Sample ``num_rows`` texts of at most ``length`` new tokens from ``model``, each started at the BOS token.

    ``model`` is the original: a transformers model without adapters, or a ``PeftModel``, whose adapters are
    bypassed for the call (``disable_adapter``); a model with adapters it cannot bypass is refused. Sampling is pure
    nucleus sampling at ``temperature`` / ``top_p`` (an explicit ``GenerationConfig``: no top-k, no repetition
    penalty from the model's defaults) under ``torch.manual_seed(seed)``, with every RNG restored afterwards, in eval
    mode (the training flag is restored). A row ends at its first stop token (the tokenizer's EOS or any of the
    generation config's), which it keeps. Rows keep the start token only if the tokenizer itself starts encoded
    text with it (Llama's does, SmolLM2's does not), so they look like the text the model is evaluated on.

    Returns ``{"input_ids": [...], "attention_mask": [1, ...], "labels": [-100, ...]}`` per row (the features
    :class:`petuning.recipe.task.SFTCollator` pads): a task loss ignores them and a distillation term covers every
    position.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import GenerationConfig

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError(
            "sample_teacher_rows starts every text at the tokenizer's BOS (or EOS) token, and this "
            "tokenizer has neither. Set tokenizer.bos_token to the token its texts start with."
        )
    if num_rows < 1 or length < 1:
        raise ValueError(f"sample_teacher_rows needs num_rows >= 1 and length >= 1, got {num_rows} and {length}.")
    bypassable = hasattr(model, "disable_adapter")
    if not bypassable and any(isinstance(module, BaseTunerLayer) for module in model.modules()):
        raise ValueError(
            "sample_teacher_rows samples the original model, and this one carries adapters it cannot bypass (added "
            "with add_adapter / load_adapter, or the inner model of a PeftModel). Pass the PeftModel itself, or the "
            "base model before the adapter is attached."
        )
    stops = _stop_ids(tokenizer, model)
    keep_start = tokenizer("a").input_ids[:1] == [start]
    config = GenerationConfig(
        do_sample=True, temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=length,
        eos_token_id=sorted(stops) or None,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start,
    )  # fmt: skip
    bypass = model.disable_adapter() if bypassable else contextlib.nullcontext()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    was_training = model.training
    model.eval()
    rows = []
    try:
        with torch.random.fork_rng(devices=devices), bypass:
            torch.manual_seed(seed)
            for first in range(0, num_rows, batch_size):
                count = min(batch_size, num_rows - first)
                input_ids = torch.full((count, 1), start, dtype=torch.long, device=model.device)
                output = model.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config
                )
                for sampled in output[:, 1:].tolist():
                    end = next((i for i, token in enumerate(sampled) if token in stops), None)
                    sampled = sampled if end is None else sampled[: end + 1]
                    ids = [start, *sampled] if keep_start else sampled
                    rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(ids)})
    finally:
        model.train(was_training)
    return rows


def _stop_ids(tokenizer, model) -> set[int]:
    """The tokenizer's EOS and every EOS id of the model's generation config."""
    stops = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        stops |= set(configured) if isinstance(configured, (list, tuple)) else {configured}
    return stops
