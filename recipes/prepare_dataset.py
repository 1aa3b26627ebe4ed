"""Turn the 7B recipes' Hub datasets into TRL's prompt/completion layout with a held-out split, saved to disk.

    python recipes/prepare_dataset.py metamathqa      --out data/metamathqa       # MetaMathQA: 100K + 1K held out
    python recipes/prepare_dataset.py commonsense170k --source commonsense_170k.json --out data/commonsense_170k
    python recipes/prepare_dataset.py lamini          --out data/lamini           # LaMini-instruction, 2K held out

Each record becomes ``{"prompt": <Alpaca prompt built from the instruction>, "completion": <the answer>}``, the
format the papers' scripts train on; the ``*_llama2_7b.yaml`` configs read the saved folder (train and test splits).
Needs the Hub (or ``--source`` for a local JSON file).
"""

import argparse
import random

from datasets import DatasetDict, load_dataset

ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:"
)
# name -> (Hub id, instruction column, answer column, training records (None: all but the held out), held out,
#          separator after the prompt)
DATASETS = {
    "metamathqa": ("meta-math/MetaMathQA", "query", "response", 100_000, 1_000, ""),
    "commonsense170k": (None, "instruction", "output", None, 1_000, "\n"),
    "lamini": ("MBZUAI/LaMini-instruction", "instruction", "response", None, 2_000, "\n"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(DATASETS))
    parser.add_argument("--source", help="a local JSON file instead of the Hub (commonsense170k has no Hub id)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    hub_id, instruction, answer, n_train, n_test, separator = DATASETS[args.name]
    if args.source is None and hub_id is None:
        parser.error(f"{args.name} has no Hub id: pass --source FILE.json")
    records = load_dataset("json", data_files=args.source)["train"] if args.source else load_dataset(hub_id)["train"]
    records = records.map(
        lambda r: {"prompt": ALPACA.format(instruction=r[instruction]) + separator, "completion": r[answer]},
        remove_columns=records.column_names,
    )
    # Training records: the first n_train (the papers' "first 100K"), else all but the held-out ones; held out: a
    # seeded sample of the records that are not trained on.
    first = n_train if n_train is not None else 0
    rest = list(range(first, len(records)))
    if len(rest) <= n_test:
        raise SystemExit(f"{args.name} has {len(records)} records, too few to hold out {n_test}")
    random.Random(args.seed).shuffle(rest)
    held_out_ids = sorted(rest[:n_test])
    train_ids = list(range(first)) if n_train is not None else sorted(rest[n_test:])
    held_out, train = records.select(held_out_ids), records.select(train_ids)
    DatasetDict({"train": train, "test": held_out}).save_to_disk(args.out)
    print(f"wrote {args.out}: {len(train)} training and {len(held_out)} held-out records")


if __name__ == "__main__":
    main()
