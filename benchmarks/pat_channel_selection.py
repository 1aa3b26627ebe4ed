"""PAT: what each way of choosing the kept channels costs SmolLM2 before any training.

Usage::

    python benchmarks/pat_channel_selection.py      # about 1 minute

Results are printed and written to ``benchmarks/results/pat_channel_selection.json``.

Method
------
SmolLM2-135M-Instruct (float32) keeps 432 of its 576 residual channels: every write into the residual stream (the
token embedding and each layer's ``o_proj`` and ``down_proj``) is multiplied by a 0/1 channel gate, which is what
PAT's final hard gate does. The general-text loss (the real tier's 20 shipped paragraphs, the forgetting metric) is
measured with all channels and with each choice; the choices are ranked from one no-grad forward over 64 prompts of
the embedded task's *training* split (never the paragraphs), padding excluded:

* ``residual_rms``: the RMS of every residual state h_k (k = 0..2L; PAT's ``mask_init="activation"`` statistic);
* ``normalized_input``: Σ over the 2L + 1 RMSNorms of the mean square of their outputs γ ⊙ h / rms(h), i.e. what the
  consumers of the stream read;
* ``consumer_weighted``: the same, each norm's term times the squared column norms of the layers it feeds
  (q/k/v, gate/up, the LM head), a Wanda/FLAP-style importance;
* ``mean_abs_input``: the mean |h| at the norms' inputs.
"""

from __future__ import annotations

import random
import time

import torch
from _common import RESULTS_DIR, machine_info, write_json  # also makes petuning importable from a checkout
from method_comparison.real import general_text_loss

from petuning.recipe.smollm2 import load_smollm2
from petuning.recipe.task import SFTCollator, load_embedded_task, tokenize_for_sft

KEEP, CALIBRATION_PROMPTS = 432, 64
RESULTS = RESULTS_DIR / "pat_channel_selection.json"


def channel_scores(model, batch) -> dict[str, torch.Tensor]:
    """The four rankings (d,) from one forward over ``batch``, at the positions its attention mask keeps."""
    decoder, d = model.model, model.config.hidden_size
    keep = batch["attention_mask"].bool().reshape(-1)
    scores = {
        name: torch.zeros(d, dtype=torch.float64)
        for name in ("residual_rms", "normalized_input", "consumer_weighted", "mean_abs_input")
    }

    def rows(tensor):
        return tensor.detach().double().reshape(-1, d)[keep]

    def norm_hook(consumers):
        column_norms = sum(c.weight.detach().double().square().sum(0) for c in consumers)

        def hook(_module, args, output):
            state, normalized = rows(args[0]), rows(output)
            scores["residual_rms"] += state.square().mean(0)  # the norms' inputs are exactly the states h_k
            scores["normalized_input"] += normalized.square().mean(0)
            scores["consumer_weighted"] += normalized.square().mean(0) * column_norms
            scores["mean_abs_input"] += state.abs().mean(0)

        return hook

    hooks = []
    for layer in decoder.layers:
        attention, mlp = layer.self_attn, layer.mlp
        hooks.append(
            layer.input_layernorm.register_forward_hook(
                norm_hook([attention.q_proj, attention.k_proj, attention.v_proj])
            )
        )
        hooks.append(layer.post_attention_layernorm.register_forward_hook(norm_hook([mlp.gate_proj, mlp.up_proj])))
    hooks.append(decoder.norm.register_forward_hook(norm_hook([model.lm_head])))
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for hook in hooks:
        hook.remove()
    scores["residual_rms"] = scores["residual_rms"].sqrt()
    return scores


def main() -> None:
    started = time.perf_counter()
    model, tokenizer = load_smollm2()
    model.eval()
    prompts = random.Random(0).sample(load_embedded_task("train"), CALIBRATION_PROMPTS)
    batch = SFTCollator(tokenizer.pad_token_id)([tokenize_for_sft(example, tokenizer) for example in prompts])
    scores = channel_scores(model, batch)

    gate = torch.ones(model.config.hidden_size)
    writers = [model.model.embed_tokens] + [
        m for layer in model.model.layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)
    ]
    hooks = [w.register_forward_hook(lambda _m, _a, output: output * gate) for w in writers]
    base = general_text_loss(model, tokenizer)
    rows = {}
    for name, score in scores.items():
        kept = score.topk(KEEP).indices
        gate.zero_()
        gate[kept] = 1.0
        rise = general_text_loss(model, tokenizer) - base
        rows[name] = {"general_text_loss_rise": rise, "keeps_channel_507": bool((kept == 507).any())}
        print(f"{name:18s} general-text loss rise {rise:+.3f}  (channel 507 kept: {rows[name]['keeps_channel_507']})")
    for hook in hooks:
        hook.remove()
    write_json(
        RESULTS,
        {
            "command": "python benchmarks/pat_channel_selection.py",
            "machine": machine_info(),
            "kept_channels": KEEP,
            "calibration_prompts": CALIBRATION_PROMPTS,
            "general_text_loss_all_channels": base,
            "selections": rows,
            "seconds": time.perf_counter() - started,
        },
    )
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
