"""The real-model tier: SmolLM2-135M-Instruct adapted to the embedded arithmetic task.

New-task accuracy is greedy exact match on the first ``n_eval`` held-out questions ("What is 47 + 385?" -> "432");
forgetting is the rise of the mean per-token cross-entropy on ``general_text.jsonl`` (20 short general-English
paragraphs shipped with the benchmark), the offline stand-in for PEFT's Wikipedia-based forgetting metric.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from petuning.distillation import sample_teacher_rows
from petuning.recipe.task import SFTCollator, exact_match_accuracy, load_embedded_task, tokenize_for_sft

GENERAL_TEXT = Path(__file__).resolve().parent / "general_text.jsonl"
TEACHER_POOL, TEACHER_LENGTH = 512, 40  # texts sampled from the original for data-free distillation, tokens each


@torch.no_grad()
def general_text_loss(model, tokenizer) -> float:
    """Mean per-token cross-entropy of ``model`` (put in eval mode) on ``general_text.jsonl``."""
    model.eval()
    texts = [json.loads(line)["text"] for line in GENERAL_TEXT.read_text().splitlines() if line.strip()]
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    return float(model(**encoded, labels=labels).loss)


class RealTier:
    name = "real"
    default_steps, default_batch_size = 100, 16

    def __init__(self, args) -> None:
        from transformers import AutoTokenizer

        from petuning.recipe.smollm2 import smollm2_path

        self.path = smollm2_path()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.test = load_embedded_task("test")[: args.n_eval]
        train = load_embedded_task("train")
        cut = len(train) - args.validation
        self.train, self.validation = train[:cut], train[cut:]  # validation: the last questions, never trained on
        self.collate = SFTCollator(self.tokenizer.pad_token_id)
        self.model_info = {
            "name": "SmolLM2-135M-Instruct (real tier)",
            "path": str(self.path),
            "n_eval": len(self.test),
        }

    def load_base(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32)

    def teacher_rows(self, model, cache: Path, seed: int) -> list[dict]:
        """The pool of :data:`TEACHER_POOL` texts sampled from the original ``model`` (cached under ``cache``)."""
        settings = dict(num_rows=TEACHER_POOL, length=TEACHER_LENGTH, seed=seed, temperature=1.0, top_p=0.95)
        name = "_".join(f"{key}{value}" for key, value in settings.items())
        path = cache / f"teacher_rows_{self.path.name}_{name}_v2.json"  # v2: pure nucleus sampling, all stop ids
        if not path.exists():
            rows = sample_teacher_rows(model, self.tokenizer, **settings)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(rows))
        return json.loads(path.read_text())

    def batches(self, batch_size: int, seed: int, teacher_rows: list[dict] = (), per_batch: int = 0):
        """Batches of ``batch_size`` training questions, plus ``per_batch`` rows drawn from ``teacher_rows``."""
        features = [tokenize_for_sft(example, self.tokenizer) for example in self.train]
        rng, teacher_rng = random.Random(seed), random.Random(seed + 1)  # the task batches do not depend on per_batch
        while True:
            rows = rng.sample(features, batch_size)
            if per_batch:
                rows += teacher_rng.sample(teacher_rows, per_batch)
            yield self.collate(rows)

    def split_info(self) -> dict:
        return {
            "train": f"the first {len(self.train)} questions of the embedded train split",
            "validation": f"its last {len(self.validation)} questions" if self.validation else None,
            "test": f"the first {len(self.test)} questions of the embedded test split",
        }

    def new_task(self, model) -> dict[str, float]:
        """Exact match and loss on the test questions."""
        return self._score(model, self.test)

    def validation_task(self, model) -> dict[str, float]:
        """Exact match and loss on the held-out training questions (what a learning rate is chosen on)."""
        return self._score(model, self.validation)

    @torch.no_grad()
    def _score(self, model, examples: list[dict]) -> dict[str, float]:
        accuracy, _ = exact_match_accuracy(model, self.tokenizer, examples, max_new_tokens=8, batch_size=50)
        batch = self.collate([tokenize_for_sft(example, self.tokenizer) for example in examples])
        model.eval()
        return {"accuracy": accuracy, "loss": float(model(**batch).loss)}

    def retention(self, model) -> dict[str, float]:
        """Mean per-token cross-entropy on the general-text paragraphs (no accuracy: there is no answer)."""
        return {"loss": general_text_loss(model, self.tokenizer), "accuracy": None}

    def probe(self) -> torch.Tensor:
        return self.tokenizer(["What is 47 + 385?"], return_tensors="pt")["input_ids"]
