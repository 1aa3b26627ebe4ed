"""llama.cpp itself against transformers: greedy answers of an exported GGUF file on the embedded task.

    petuning train recipes/configs/sorsa_smollm2.yaml --output_dir out/sorsa_smollm2
    python benchmarks/gguf_llama_cpp.py out/sorsa_smollm2/adapter [--llama-python PYTHON] [--questions 20]
    python benchmarks/gguf_llama_cpp.py out/pat_smollm2/adapter --prune --out benchmarks/results/gguf_llama_cpp_pat.json

The adapter is exported with ``petuning export --format gguf`` (f16; ``--prune``: PAT's pruned model), the merged
(or pruned) model is built in transformers from the same adapter, and both answer the first ``--questions`` test questions of the embedded task greedily from
the same prompt token ids (one prompt at a time, no padding). llama.cpp runs through ``llama-cpp-python`` in
``--llama-python``, an interpreter that has it (default: this one); build it from source with
``pip install llama-cpp-python==0.3.36`` (cmake, g++ and ninja). Writes ``results/gguf_llama_cpp.json``: both
answer lists, how many agree, and each side's exact match.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "gguf_llama_cpp.json"

# Runs in the llama-cpp-python interpreter: greedy continuations of token-id prompts, special tokens not decoded.
_LLAMA_CPP_CHILD = """
import json, sys
from llama_cpp import Llama
request = json.load(sys.stdin)
llm = Llama(model_path=request["model"], n_ctx=512, n_threads=2, verbose=False, seed=0)
answers = []
for prompt in request["prompts"]:
    llm.reset()
    tokens = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        if token == llm.token_eos() or len(tokens) == request["max_new_tokens"]:
            break
        tokens.append(token)
    answers.append(llm.detokenize(tokens, special=False).decode("utf-8", errors="replace").strip())
json.dump({"answers": answers, "llama_cpp_python": __import__("llama_cpp").__version__}, sys.stdout)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter", type=Path, help="a SmolLM2 adapter folder (model.save_pretrained)")
    parser.add_argument("--llama-python", default=sys.executable, help="a Python interpreter with llama_cpp")
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--prune", action="store_true", help="PAT: export and compare the pruned, narrower model")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import torch

    from petuning.export import export_adapter, load_adapter_model, merge
    from petuning.recipe.task import generate_from_ids, load_embedded_task

    examples = load_embedded_task("test")[: args.questions]
    references = [ex["messages"][-1]["content"].strip() for ex in examples]
    merged = merge(load_adapter_model(args.adapter, None, "float32"), prune=args.prune).eval()
    tokenizer = load_tokenizer_for(args.adapter, merged)
    prompts = [
        tokenizer.apply_chat_template(ex["messages"][:-1], add_generation_prompt=True, tokenize=True, return_dict=False)
        for ex in examples
    ]
    with torch.no_grad():
        transformers_answers = generate_from_ids(merged, tokenizer, prompts, args.max_new_tokens, batch_size=1)

    with tempfile.TemporaryDirectory() as scratch:
        export = export_adapter(args.adapter, Path(scratch) / "gguf", format="gguf", gguf_type="f16", prune=args.prune)
        (gguf_file,) = [name for name in export.files if name.endswith(".gguf")]
        request = {"model": str(export.folder / gguf_file), "prompts": prompts, "max_new_tokens": args.max_new_tokens}
        child = subprocess.run(
            [args.llama_python, "-c", _LLAMA_CPP_CHILD],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            check=False,
        )
    if child.returncode != 0:
        sys.exit(f"llama-cpp-python failed in {args.llama_python}:\n{child.stderr[-2000:]}")
    reply = json.loads(child.stdout)
    llama_answers = reply["answers"]

    agree = sum(a == b for a, b in zip(transformers_answers, llama_answers))
    result = {
        "command": "python benchmarks/gguf_llama_cpp.py " + " ".join(sys.argv[1:]),
        "adapter": str(args.adapter),
        "gguf_type": "f16",
        "pruned": args.prune,
        "hidden_size": merged.config.hidden_size,
        "parameters": sum(p.numel() for p in merged.parameters()),
        "llama_cpp_python": reply["llama_cpp_python"],
        "questions": len(examples),
        "same_answers": agree,
        "exact_match_transformers": sum(a == r for a, r in zip(transformers_answers, references)) / len(examples),
        "exact_match_llama_cpp": sum(a == r for a, r in zip(llama_answers, references)) / len(examples),
        "answers": [
            {"reference": r, "transformers": a, "llama_cpp": b}
            for r, a, b in zip(references, transformers_answers, llama_answers)
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"llama.cpp and transformers agree on {agree}/{len(examples)} greedy answers; exact match "
        f"{result['exact_match_llama_cpp']:.2f} (llama.cpp) vs {result['exact_match_transformers']:.2f} "
        f"(transformers). Wrote {args.out}"
    )


def load_tokenizer_for(adapter: Path, model):
    """The tokenizer saved with the adapter, else the base model's."""
    from transformers import AutoTokenizer

    for source in (adapter, model.name_or_path):
        try:
            return AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError):
            continue
    sys.exit(f"no tokenizer next to {adapter} or in its base {model.name_or_path}")


if __name__ == "__main__":
    main()
