"""The toy tier's model and tasks: a tiny Llama that first learns task A, then gets adapted to task B.

Task A ("pretraining"): ``"47+85="`` -> the sum's three digits reversed, ``"231"``.
Task B (adaptation):    ``"47#85="`` -> the same sum in the usual digit order, ``"132"``.

Task B reuses what the base knows (adding) but needs a new output format behind a new operator, so a method can
learn it without destroying task A (which keeps its own operator): the benchmark sees both how well a method adapts
and how much it forgets.

Operands are two zero-padded digits, so every prompt has 6 characters and every answer a fixed length: batches
need no padding and greedy decoding is a few argmax steps. Accuracy is exact match of the whole answer;
forgetting is the rise of task A's per-token cross-entropy (on its answers) after adapting to B, the toy twin of
PEFT's method_comparison metric.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from petuning.testing import build_tiny_model, build_tiny_tokenizer

MODEL_SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4)


@dataclass(frozen=True)
class Task:
    name: str
    operator: str
    answer_length: int

    def answer(self, a: int, b: int) -> str:
        total = f"{a + b:03d}"
        return total[::-1] if self.operator == "+" else total

    def split(self, which: str) -> list[tuple[int, int]]:
        """All 10 000 operand pairs, shuffled once (seed 0): the first 1 000 are the test split."""
        pairs = [(a, b) for a in range(100) for b in range(100)]
        random.Random(0).shuffle(pairs)
        return pairs[:1000] if which == "test" else pairs[1000:]


TASK_A = Task("A (reversed sum)", "+", 3)
TASK_B = Task("B (sum, usual digit order)", "#", 3)


class Encoder:
    """Char-level ids with petuning's tiny tokenizer: ``<bos> prompt answer <eos>``."""

    def __init__(self) -> None:
        self.tokenizer = build_tiny_tokenizer()

    def ids(self, text: str) -> list[int]:
        return self.tokenizer.convert_tokens_to_ids(list(text))

    def batch(self, task: Task, pairs: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """input_ids (n, 8 + answer_length) and labels with -100 on the prompt."""
        tok = self.tokenizer
        rows = [
            [tok.bos_token_id] + self.ids(f"{a:02d}{task.operator}{b:02d}=" + task.answer(a, b)) + [tok.eos_token_id]
            for a, b in pairs
        ]
        ids = torch.tensor(rows)
        labels = ids.clone()
        labels[:, :7] = -100  # <bos> and the 6 prompt characters
        return {"input_ids": ids, "labels": labels}


def sample_batches(encoder: Encoder, task: Task, batch_size: int, seed: int):
    """An endless stream of random training batches of ``task``."""
    pairs = task.split("train")
    rng = random.Random(seed)
    while True:
        yield encoder.batch(task, rng.sample(pairs, batch_size))


@torch.no_grad()
def evaluate(model, encoder: Encoder, task: Task) -> dict[str, float]:
    """Exact-match accuracy (greedy) and mean answer cross-entropy on the 1 000 test questions."""
    model.eval()
    batch = encoder.batch(task, task.split("test"))
    logits = model(input_ids=batch["input_ids"]).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    generated = batch["input_ids"][:, :7]
    for _ in range(task.answer_length):
        step = model(input_ids=generated).logits[:, -1].argmax(-1, keepdim=True)
        generated = torch.cat([generated, step], dim=1)
    target = batch["input_ids"][:, 7 : 7 + task.answer_length]
    accuracy = (generated[:, 7:] == target).all(dim=1).float().mean()
    return {"accuracy": float(accuracy), "loss": float(loss)}


def pretrained_base(cache: Path, steps: int = 2000, seed: int = 0) -> Path:
    """A tiny Llama fully trained on task A (AdamW, one-cycle lr 3e-3, batch 64), cached at ``cache``."""
    path = cache / f"toy-base-{steps}-{seed}"
    if (path / "config.json").exists():
        return path
    model = build_tiny_model("llama", seed=seed, **MODEL_SHAPE).train()
    encoder = Encoder()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    for _, batch in zip(range(steps), sample_batches(encoder, TASK_A, 64, seed)):
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    tmp = path.with_name(path.name + ".tmp")
    model.eval().save_pretrained(tmp)
    tmp.rename(path)
    return path


class ToyTier:
    """The toy tier in the interface ``run.py`` drives: the task-A base, task-B batches, new-task and retention
    metrics (task A), and a probe batch for the merge check."""

    name = "toy"
    default_steps, default_batch_size = 1500, 64

    def __init__(self, args) -> None:
        self.encoder = Encoder()
        self.base_path = pretrained_base(args.cache, args.base_steps, args.seed)
        self.model_info = {"name": "tiny-llama (toy tier)", "path": str(self.base_path), "base_steps": args.base_steps}

    def load_base(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.base_path, dtype=torch.float32)

    def teacher_rows(self, model, cache, seed):
        raise SystemExit(
            "teacher rows (data-free distillation) are sampled from SmolLM2: run that experiment with --tier real."
        )

    def batches(self, batch_size: int, seed: int, teacher_rows=(), per_batch: int = 0):
        return sample_batches(self.encoder, TASK_B, batch_size, seed)

    def split_info(self) -> dict:
        return {"train": "9 000 task-B operand pairs", "validation": None, "test": "the other 1 000 task-B pairs"}

    def new_task(self, model) -> dict[str, float]:
        return evaluate(model, self.encoder, TASK_B)

    def retention(self, model) -> dict[str, float]:
        return evaluate(model, self.encoder, TASK_A)

    def probe(self) -> torch.Tensor:
        return self.encoder.batch(TASK_B, TASK_B.split("test")[:64])["input_ids"]
