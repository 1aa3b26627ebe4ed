"""PAT's pruned export: a smaller stock transformers model that computes what the masked, tuned model computes.

With the final (hard) gate, every write into the residual stream goes through the same mask, so the d - d' pruned
channels of the residual stream are exactly 0 in every layer. Removing them changes nothing, provided that:

- producers absorb their HSM and lose the pruned output rows. With ``M_k = diag(s_k ⊙ g)(I + W1_k W0_k)``:
  ``W_o' = (M W_o)[keep, :]``, ``W_down' = (M W_down)[keep, :]`` (biases likewise), embedding
  ``E' = (E Mᵀ)[:, keep]``. LoRA updates are folded into the weights first (``W + ΔW``);
- consumers lose the pruned input columns: ``W' = (W + ΔW)[:, keep]`` for q/k/v/gate/up and ``lm_head``;
- RMSNorm sees d' instead of d channels: mean(x²) over d' is d/d' times the mean over d (the extra channels are
  zeros), so ``w' = w[keep] * sqrt(d/d')`` and ``eps' = eps * d/d'`` give exactly the same output;
- the config says ``hidden_size = d'`` and keeps the attention width through an explicit ``head_dim``.

Tied embeddings. When the base model's LM head is the embedding and the embedding's HSM is scale-only
(``M_0 = diag(c)``, ``c = s_0 ⊙ g``; the default on tied models), the pruned model stays tied:
``E' = (E diag(c))[:, keep]`` is both the embedding and the head, and the final norm absorbs ``1/c``:
``w_final' = w_final[keep] * sqrt(d/d') / c[keep]``. The logits are unchanged, because the head computes
``E' (w_final' ⊙ x̂) = E[:, keep] (w_final[keep] sqrt(d/d') ⊙ x̂)``. Otherwise (an HSM with a low-rank branch on a
tied embedding, or an untied base) the pruned model has its own head ``H[:, keep]``.

Everything is computed in float64 and rounded once to the model's dtype. The official code's merge leaves out the
per-HSM scale s_k; here it is folded in, which is what makes the export exact.
"""

from __future__ import annotations

import copy
import math

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import PreTrainedModel

from .config import CONSUMERS
from .layer import Embedding, Linear, PatLayer


def prune_and_unload(tuner, adapter_name: str) -> PreTrainedModel:
    """Build the pruned model of ``tuner``'s adapter ``adapter_name`` (a :class:`~petuning.tuners.pat.PatModel`).

    Returns a new model of the base model's class, in eval mode and in the base model's dtype, with hidden size d',
    tied like the base where the embedding's HSM allows it (see the module docstring); ``save_pretrained`` writes a checkpoint that ``AutoModelForCausalLM.from_pretrained``
    loads without petuning. The tuned model is left unchanged.
    """
    gate = tuner._pat_gate
    total, step = gate.total(adapter_name), gate.step(adapter_name)
    if gate.phase(adapter_name) != "final":
        raise ValueError(
            f"The PAT mask of adapter {adapter_name!r} is not final yet (schedule step {step} of {total}): its gate "
            "is still soft, so pruning would change the model. Train for schedule_steps optimizer steps with "
            "petuning.PetuningCallback / petuning.TrainingHooks, or call model.base_model.finalize_pat_mask() to "
            "binarize it now (keeping the d' largest mask entries)."
        )
    model = tuner.model
    if not isinstance(model, PreTrainedModel) or model.get_output_embeddings() is None:
        raise ValueError(
            f"Pruned export needs a transformers causal LM with an output head; got {type(model).__name__}."
        )
    if any(isinstance(m, PatLayer) and m.merged for m in model.modules()):
        raise ValueError("The PAT adapter is merged into the base weights; call unmerge_adapter() before pruning.")

    config = model.config
    hidden = config.hidden_size
    keep = gate.kept(adapter_name).cpu()
    width = len(keep)
    new_config = copy.deepcopy(config)
    new_config.head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    new_config.hidden_size = width
    new_config.rms_norm_eps = config.rms_norm_eps * hidden / width
    embedding = _active_module(model.get_input_embeddings(), adapter_name)
    tied = ties_embedding(model) and not embedding.has_low_rank(adapter_name)
    new_config.tie_word_embeddings = tied
    # c = s_0 ⊙ g on the kept channels: what a tied final norm divides by
    absorbed = embedding.hsm_factors(adapter_name)[0][keep.to(embedding.weight.device)] if tied else None
    if absorbed is not None and bool((absorbed.abs() < 1e-12).any()):
        raise ValueError(
            "The embedding HSM's scale s is 0 on a kept channel, so a tied pruned model cannot absorb it into the "
            "final norm; train further or re-create the adapter with embedding_low_rank=True (untied export)."
        )

    dtype = model.get_input_embeddings().weight.dtype
    with init_empty_weights():
        pruned = type(model)(new_config)
    output_key = _module_key(model, model.get_output_embeddings())
    final_norm_key = _module_key(model, model.get_decoder().norm)
    state = {}
    for key, target in pruned.state_dict().items():
        path, _, leaf = key.rpartition(".")
        if tied and path == output_key:
            continue  # the head is the pruned embedding (tie_weights below)
        tensor = _pruned_tensor(model, path, leaf, keep, adapter_name, hidden / width, path == output_key)
        if tied and path == final_norm_key:
            tensor = tensor / absorbed
        if tensor.shape != target.shape:
            raise ValueError(f"PAT pruning produced {tuple(tensor.shape)} for {key}, expected {tuple(target.shape)}.")
        state[key] = tensor.to(dtype).contiguous()
    result = pruned.load_state_dict(state, strict=False, assign=True)
    missing = set(result.missing_keys) - ({f"{output_key}.weight"} if tied else set())
    if missing or result.unexpected_keys:
        raise ValueError(f"PAT pruning left {sorted(missing)} unset and produced {result.unexpected_keys}.")
    if tied:
        pruned.tie_weights()
        if pruned.get_output_embeddings().weight is not pruned.get_input_embeddings().weight:
            raise ValueError(f"{type(pruned).__name__} did not tie its LM head to the pruned embedding.")
    pruned.generation_config = copy.deepcopy(model.generation_config)
    return pruned.eval()


def ties_embedding(model: nn.Module) -> bool:
    """Whether the model's LM head shares its weight with the (base) token embedding."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embedding = model.get_input_embeddings()
    base = embedding.get_base_layer() if hasattr(embedding, "get_base_layer") else embedding
    return head is not None and getattr(head, "weight", None) is base.weight


def _pruned_tensor(
    model: nn.Module, path: str, leaf: str, keep: torch.Tensor, adapter: str, ratio: float, is_head: bool
) -> torch.Tensor:
    """The pruned value of parameter ``leaf`` of module ``path``, in float64."""
    module = _active_module(model.get_submodule(path), adapter)
    name = path.rpartition(".")[2]
    device_keep = keep.to(module.weight.device)
    if isinstance(module, Embedding) and module.has_hsm(adapter):
        return module.merged_weight(adapter)[:, device_keep]
    if isinstance(module, Linear) and module.has_hsm(adapter):
        weight, bias = module.merged_weight(adapter)
        return (weight if leaf == "weight" else bias)[device_keep]
    if name in CONSUMERS or is_head:
        if isinstance(module, Linear):
            weight, bias = module.merged_weight(adapter)
        else:
            weight, bias = module.weight.double(), None if module.bias is None else module.bias.double()
        return weight[:, device_keep] if leaf == "weight" else bias
    if hasattr(module, "variance_epsilon") and leaf == "weight":
        return module.weight.double()[device_keep] * math.sqrt(ratio)
    raise ValueError(
        f"PAT pruning does not know how to prune {path}.{leaf} ({type(module).__name__}); the model has a part that "
        "Llama-family blocks do not have."
    )


def _active_module(module: nn.Module, adapter: str) -> nn.Module:
    """Look through PEFT's ``modules_to_save`` wrappers: the copy trained for ``adapter``, else the original."""
    copies = getattr(module, "modules_to_save", None)
    if isinstance(copies, nn.ModuleDict):
        return copies[adapter] if adapter in copies else module.original_module  # noqa: SIM401 (ModuleDict has no get)
    return module


def _module_key(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)
