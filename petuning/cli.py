"""The ``petuning`` console script.

    petuning train CONFIG.yaml [--flag value ...]     the SFT recipe on TRL (petuning train --help)
    petuning export ADAPTER_DIR --out DIR [--format merged|lora|adapter|gguf] [--prune] [--base PATH_OR_ID]
                    [--base-model-id ORG/NAME] [--dtype auto|float32|bfloat16|float16] [--max-shard-size 5GB]
                    [--lora-rank R] [--gguf-type f16|bf16|q8_0] [--llama-cpp DIR] [--training-summary FILE.json]
                    [--overwrite] [--push-to-hub REPO_ID [--private]]
    petuning push FOLDER REPO_ID [--private]
    petuning analyze BASE TUNED --out DIR [--top-k 10] [--threshold 0.5] [--modules REGEX] [--include-embeddings]
                     [--no-plots]

Errors are printed as one ``error:`` paragraph (no traceback) and exit with status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="petuning", description="petuning command-line tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("train", help="fine-tune with a petuning method on TRL's SFTTrainer (petuning train --help)")

    export = commands.add_parser(
        "export",
        help="merge an adapter into its base (or convert it to LoRA) and write a Hub-ready folder",
        description="Load the base model named in the adapter config (or --base), apply the adapter and write a "
        "plain transformers checkpoint (default), a standard peft LoRA adapter (--format lora), the native "
        "adapter (--format adapter) or a GGUF file for llama.cpp (--format gguf), with tokenizer and model card. "
        "The folder is written atomically.",
    )
    export.add_argument("adapter_dir", type=Path, help="folder written by model.save_pretrained()")
    export.add_argument("--out", type=Path, required=True, help="output folder (must not exist, unless --overwrite)")
    export.add_argument("--format", choices=("merged", "lora", "adapter", "gguf"), default="merged")
    export.add_argument("--prune", action="store_true", help="PAT only: remove pruned hidden channels while merging")
    export.add_argument("--base", help="base model folder or Hub id (default: the one in adapter_config.json)")
    export.add_argument("--base-model-id", help="Hub id of the base for the model card, when --base is a local folder")
    export.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    export.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    export.add_argument("--lora-rank", type=int, help="--format lora: LoRA rank (default: exact, rank of each update)")
    export.add_argument("--gguf-type", choices=("f16", "bf16", "q8_0"), default="f16", help="--format gguf: precision")
    export.add_argument(
        "--llama-cpp",
        type=Path,
        help="--format gguf: llama.cpp checkout holding convert_hf_to_gguf.py (default: $LLAMA_CPP_DIR, else the copy "
        "`python -m petuning.export.llama_cpp` fetches)",
    )
    export.add_argument("--training-summary", type=Path, help="JSON file of key/values for the card's training summary")
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    export.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the folder to this Hub model repo")
    export.add_argument("--private", action="store_true", help="create the Hub repo as private")

    push = commands.add_parser("push", help="upload an exported folder to the Hub (e.g. to retry a failed push)")
    push.add_argument("folder", type=Path)
    push.add_argument("repo_id")
    push.add_argument("--private", action="store_true")

    analyze = commands.add_parser(
        "analyze",
        help="per-layer spectral comparison of a tuned model against its base (JSON summary + plots)",
        description="Compare every changed 2-D weight of TUNED (a model folder, or an adapter folder merged into "
        "BASE) with BASE: singular spectra, intruder dimensions (new top singular vectors with cosine similarity "
        "below --threshold to every base singular vector) and principal-subspace drift.",
    )
    analyze.add_argument("base", type=Path, help="base model folder (safetensors)")
    analyze.add_argument("tuned", type=Path, help="tuned model folder, or an adapter folder trained on BASE")
    analyze.add_argument("--out", type=Path, required=True, help="folder for summary.json and the PNG plots")
    analyze.add_argument("--top-k", type=int, default=10, help="singular directions examined per layer")
    analyze.add_argument("--threshold", type=float, default=0.5, help="intruder cosine-similarity threshold")
    analyze.add_argument("--modules", help="only weights whose name matches this regular expression")
    analyze.add_argument("--include-embeddings", action="store_true", help="also compare embeddings/output heads")
    analyze.add_argument("--no-plots", action="store_true", help="write summary.json only (no matplotlib needed)")
    return parser


def _export(args: argparse.Namespace) -> None:
    from petuning.export import export_adapter

    if args.private and not args.push_to_hub:
        raise ValueError("--private only applies with --push-to-hub.")
    summary = None
    if args.training_summary is not None:
        summary = json.loads(args.training_summary.read_text())
        if not isinstance(summary, dict):
            raise ValueError(f"{args.training_summary} must hold a JSON object of key/values.")
    result = export_adapter(
        args.adapter_dir,
        args.out,
        format=args.format,
        base=args.base,
        base_model_id=args.base_model_id,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        prune=args.prune,
        lora_rank=args.lora_rank,
        gguf_type=args.gguf_type,
        llama_cpp=args.llama_cpp,
        summary=summary,
        overwrite=args.overwrite,
        push_to_hub=args.push_to_hub,
        private=args.private,
    )
    if result.conversion is not None:
        print(result.conversion.report())
    print(f"wrote {result.folder} ({result.format}): {', '.join(result.files)}")
    if result.url:
        print(f"pushed to {args.push_to_hub}: {result.url}")


def _push(args: argparse.Namespace) -> None:
    from petuning.export import push_folder

    url = push_folder(args.folder, args.repo_id, private=args.private)
    print(f"pushed {args.folder} to {args.repo_id}: {url}")


def _analyze(args: argparse.Namespace) -> None:
    from petuning.analysis import analyze

    summary = analyze(
        args.base,
        args.tuned,
        args.out,
        top_k=args.top_k,
        threshold=args.threshold,
        modules=args.modules,
        include_embeddings=args.include_embeddings,
        plots=not args.no_plots,
    )
    print(
        f"{summary['layers_compared']} layers compared: {summary['intruders_total']} intruder dimensions in "
        f"{summary['layers_with_intruders']} layers; mean left-subspace drift {summary['mean_left_subspace_drift']:.3f}; "
        f"mean relative update {summary['mean_relative_update']:.2e}. Wrote {args.out}/summary.json"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # its own parser (TRL's), which reads the recipe's YAML and flags
        from petuning.recipe import train_main

        try:
            return train_main(argv[1:])
        except (ValueError, OSError) as error:  # bad input: one paragraph, like the other commands
            print(f"error: {error}", file=sys.stderr)
            return 1
    args = _parser().parse_args(argv)
    try:
        {"export": _export, "push": _push, "analyze": _analyze}[args.command](args)
    except (ValueError, TypeError, OSError, RuntimeError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
