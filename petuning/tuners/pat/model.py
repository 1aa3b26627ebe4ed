"""PAT tuner: places the HSMs on a Llama-family decoder, owns the shared mask, and drives schedule and losses."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import nullcontext
from typing import ClassVar, Optional

import torch
from accelerate import init_empty_weights
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from petuning.training import (
    ForwardContext,
    StepContext,
    TrainingHooksMixin,
    predicted_labels,
    refuse_gradient_edits_under_deepspeed,
)
from petuning.tuners.base import PetuningTuner
from petuning.tuners.common import base_of, eval_logits, forward_logits, full_tensor, kl_to_reference, like_parameter

from .calibration import ResidualStatistics, calibrated_mask
from .config import PRODUCERS, PatConfig
from .layer import (
    Embedding,
    Linear,
    PatGate,
    PatLayer,
    gate_values,
    identity_loss,
    mask_loss,
    mask_phase,
    polarization_gap,
    protected_channels,
    schedule,
)
from .prune import prune_and_unload, ties_embedding

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
"""transformers ``model_type`` values with the block shape PAT needs (RMSNorm -> attention -> o_proj -> residual,
RMSNorm -> gated MLP -> down_proj -> residual, plain token embedding). SmolLM/SmolLM2 are ``llama``."""
UNPOLARIZED_GAP = 0.2
"""Mean distance of the soft from the hard gate above which the frozen mask counts as not polarized."""


class PatModel(TrainingHooksMixin, PetuningTuner):
    """Adds PAT to a Llama-family causal LM. Created by ``peft.get_peft_model(model, PatConfig(...))``.

    Layout: one HSM after the token embedding and after every ``o_proj`` and ``down_proj`` (1 + 2L HSMs; the
    embedding's is scale-only on a tied model), optional LoRA on the decoder linears, and, stored once on this tuner
    and saved with the adapter: the mask ``pat_mask[adapter]`` (d,), the step counter ``pat_step[adapter]``, the
    schedule length ``pat_total[adapter]`` (0 until ``schedule_steps="auto"`` is resolved) and the calibration
    statistic ``pat_channel_rms[adapter]`` (d,; 0 until calibrated). Several adapters may be loaded, one is active.

    Calibration (``mask_init="activation"``): the training forwards before the first optimizer step (or
    :meth:`calibrate_pat_mask`) measure the residual stream's per-channel RMS; right before that step the mask is set
    to ±1/2 by it and every HSM scale to 1/g_0, so the model is unchanged, and the mask skips that one update.

    Training hooks (``petuning.PetuningCallback`` / ``petuning.TrainingHooks``): the mask loss and the identity loss
    (averaged over all HSMs) join the task loss; the schedule advances by one after every optimizer step; once the
    mask has stopped learning (0.8 T) its gradient is dropped before the optimizer step, so neither momentum nor
    weight decay moves it. Logged: ``pat_step``, ``pat_tau``, ``pat_kept`` (channels with m >= 0), ``pat_final``,
    ``pat_mask_loss``, ``pat_identity_loss`` (and ``pat_distill_loss`` with ``distill_weight > 0``: see
    :meth:`_distillation`).

    Once the mask is final (step >= T, or :meth:`finalize_pat_mask`), :meth:`petuning_prune_and_unload` builds the
    smaller model. ``merge_and_unload()`` folds everything into the unpruned model (same shapes, exact).

    ``inject_adapter_in_model`` and transformers' ``load_adapter`` cannot host PAT: the shared mask lives on the
    tuner, which those paths discard. Use ``get_peft_model`` / ``PeftModel.from_pretrained``.
    """

    method_label = "PAT"
    prefix: str = "pat_"
    tuner_layer_cls = PatLayer
    target_module_mapping: ClassVar[dict] = {}
    uses_shared_state = True

    # ------------------------------------------------------------------------------------ injection
    def _pre_injection_hook(self, model: nn.Module, config: PatConfig, adapter_name: str) -> None:
        super()._pre_injection_hook(model, config, adapter_name)
        self.pat_mask = nn.ParameterDict({})
        self.pat_step = BufferDict({}, persistent=True)
        self.pat_total = BufferDict({}, persistent=True)
        self.pat_channel_rms = BufferDict({}, persistent=True)
        self._pat_gate = PatGate(self.pat_mask, self.pat_step, self.pat_total, self.pat_channel_rms)
        self._hsm_ranks: dict[str, int] = {}
        self._embedding_low_rank: dict[str, bool] = {}
        self._distill_term: Optional[torch.Tensor] = None  # this training forward's, until the loss takes it
        self._distill_value: Optional[torch.Tensor] = None  # the last one's value (no graph), for the logs

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        """Create the adapter's mask and step counter on the tuner, then let PEFT place the layers."""
        config = self.peft_config[adapter_name]
        hidden, embedding = _check_architecture(model)
        width = config.kept_width(hidden)
        if config.hsm_rank > hidden:
            message = (
                f"PatConfig.hsm_rank={config.hsm_rank} exceeds the hidden size {hidden} of {type(model).__name__}: W0 "
                f"(r, d) cannot have more than d orthonormal rows."
            )
            if config.strict_rank:
                raise ValueError(f"{message} Use hsm_rank <= {hidden} (strict_rank=True).")
            warnings.warn(
                f"{message} Using hsm_rank={hidden}; pass strict_rank=True to refuse instead.",
                UserWarning,
                stacklevel=2,
            )
        self._hsm_ranks[adapter_name] = min(config.hsm_rank, hidden)
        weight = embedding.weight
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        mask = torch.zeros(hidden, dtype=dtype)
        if not config.init_weights:  # seeded by the global RNG, like PEFT's other tuners
            mask = 0.5 * torch.randn(hidden, dtype=dtype)
        with init_empty_weights() if low_cpu_mem_usage else nullcontext():
            self.pat_mask[adapter_name] = nn.Parameter(mask.to(weight.device), requires_grad=False)
        self.pat_step[adapter_name] = torch.zeros((), dtype=torch.long, device=weight.device)
        total = 0 if config.schedule_steps == "auto" else config.schedule_steps
        self.pat_total[adapter_name] = torch.tensor(total, dtype=torch.long, device=weight.device)
        self.pat_channel_rms[adapter_name] = torch.zeros(hidden, dtype=dtype, device=weight.device)
        self._pat_gate.widths[adapter_name] = width
        self._pat_gate.hard_when_frozen[adapter_name] = config.frozen_gate == "hard"
        self._pat_gate.protect_ratios[adapter_name] = config.protect_ratio
        if config.mask_init != "zeros" and config.init_weights:
            self._pat_gate.collectors[adapter_name] = self._collector(config)
        low_rank = config.embedding_low_rank
        self._embedding_low_rank[adapter_name] = not ties_embedding(model) if low_rank is None else low_rank
        try:
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, state_dict)
        except Exception:
            self._drop_shared_state(adapter_name)
            raise
        self._sync_mask_grad()

    def _prepare_adapter_config(self, peft_config: PatConfig, model_config: dict) -> PatConfig:
        """Derive ``target_modules`` from the method: the embedding, the producers and the LoRA targets. The
        embedding is named by its full path: PEFT would save the whole embedding table with every adapter if a
        bare embedding name (``embed_tokens``) were among the targets, and PAT never changes that table."""
        targets = {_embedding_key(self.model), *PRODUCERS, *peft_config.lora_targets()}
        given = peft_config.target_modules
        if given is not None and (isinstance(given, str) or set(given) != targets):
            raise ValueError(
                f"PatConfig.target_modules is derived from the architecture ({sorted(targets)}), but {given!r} was "
                "given. Leave target_modules unset; choose the LoRA layers with lora_target_modules."
            )
        peft_config.target_modules = targets
        return peft_config

    def _check_tied_modules(self, model: nn.Module, peft_config: PatConfig) -> None:
        """PAT never writes a tied embedding while attached; merging unties it on purpose (the folded embedding
        differs from the LM head), and pruning writes an untied model. Nothing to warn about."""

    def _get_tied_target_modules(self, model: nn.Module) -> list[str]:
        return []

    def _layer_kwargs(
        self, config: PatConfig, adapter_name: str, key: str, target_name: str, target: nn.Module
    ) -> dict:
        embedding = isinstance(base_of(target), nn.Embedding)
        return {
            "hsm_rank": self._hsm_ranks[adapter_name] if not embedding or self._embedding_low_rank[adapter_name] else 0,
            "hsm": embedding or target_name in PRODUCERS,
            "lora_r": config.lora_r if target_name in config.lora_targets() else 0,
            "lora_alpha": config.lora_alpha,
            "lora_dropout": config.lora_dropout,
            "init_weights": config.init_weights,
            "inference_mode": config.inference_mode,
        }

    def _create_new_module(self, config: PatConfig, adapter_name: str, target: nn.Module, key: str, **kwargs):
        base = base_of(target)
        if isinstance(base, nn.Embedding):
            return Embedding(base, adapter_name, self._pat_gate, **kwargs)
        if type(base) is nn.Linear:
            return Linear(base, adapter_name, self._pat_gate, **kwargs)
        raise TypeError(
            f"PAT cannot adapt {key!r} of type {type(base).__name__}: it supports torch.nn.Linear and "
            "torch.nn.Embedding (quantized bases are not supported; load the model in 16/32-bit)."
        )

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """The layers follow the dtype rule; so does the shared mask, which lives on the tuner."""
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        mask = self.pat_mask.get(adapter_name)
        dtype = _check_architecture(self.model)[1].weight.dtype
        if mask is not None and not autocast_adapter_dtype and dtype.is_floating_point:
            mask.data = mask.data.to(dtype)

    # ----------------------------------------------------------------------------- adapter management
    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) > 1:
            raise ValueError(
                f"PAT runs one adapter at a time, got {names}: each adapter has its own mask over the same hidden "
                "channels, so two active adapters would gate the residual stream twice. Activate one of them."
            )
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._sync_mask_grad()

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        self._sync_mask_grad()

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad)
        self._sync_mask_grad()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._drop_shared_state(adapter_name)
        self._sync_mask_grad()

    def _drop_shared_state(self, adapter_name: str) -> None:
        for container in (
            self.pat_mask,
            self.pat_step,
            self.pat_total,
            self.pat_channel_rms,
            self._pat_gate.widths,
            self._pat_gate.hard_when_frozen,
            self._pat_gate.protect_ratios,
            self._pat_gate.collectors,
            self._hsm_ranks,
            self._embedding_low_rank,
        ):
            if adapter_name in container:
                del container[adapter_name]

    def _sync_mask_grad(self) -> None:
        """An adapter's mask trains exactly when its layers do (PEFT sets requires_grad on the layers)."""
        for name, mask in self.pat_mask.items():
            mask.requires_grad_(any(p.requires_grad for p in self._layer_parameters(name)))

    def _layer_parameters(self, adapter_name: str) -> Iterator[nn.Parameter]:
        for layer in self.model.modules():
            if isinstance(layer, PatLayer):
                for attr in layer.adapter_layer_names:
                    container = getattr(layer, attr)
                    if adapter_name in container:
                        yield container[adapter_name]

    def _active_pat_adapter(self) -> Optional[str]:
        return next((n for n in self.active_adapters if n in self.pat_mask), None)

    # ----------------------------------------------------------------------------------- mask access
    def pat_schedule_step(self, adapter_name: Optional[str] = None) -> int:
        """Optimizer steps the adapter's mask schedule has taken."""
        return self._pat_gate.step(self._resolve(adapter_name))

    def pat_mask_phase(self, adapter_name: Optional[str] = None) -> str:
        """'learning' (t < 0.8 T), 'frozen' (0.8 T <= t < T) or 'final' (t >= T: hard 0/1 gate)."""
        return self._pat_gate.phase(self._resolve(adapter_name))

    def pat_kept_channels(self, adapter_name: Optional[str] = None) -> torch.Tensor:
        """Indices (ascending) of the d' hidden channels the final mask keeps: the d' largest entries of m."""
        return self._pat_gate.kept(self._resolve(adapter_name))

    def pat_gate(self, adapter_name: Optional[str] = None) -> torch.Tensor:
        """The current gate g_t (d,), detached."""
        with torch.no_grad():
            return self._pat_gate(self._resolve(adapter_name))

    def pat_protected_channels(self, adapter_name: Optional[str] = None) -> Optional[torch.Tensor]:
        """Indices (ascending) of the channels that are never pruned, or None before calibration / without
        ``protect_ratio``."""
        protected = self._pat_gate.protected(self._resolve(adapter_name))
        return None if protected is None else protected.nonzero().flatten().cpu()

    def finalize_pat_mask(self, adapter_name: Optional[str] = None) -> None:
        """End the schedule now: set the step to T, so the gate becomes the hard mask over the d' largest entries
        of m (what training for T steps ends with) and the model can be pruned."""
        name = self._resolve(adapter_name)
        if self._calibration_pending(name):
            raise ValueError(
                f"PAT adapter {name!r} has mask_init='activation' but its mask was never calibrated, so every channel "
                "is tied and the kept ones would be arbitrary. Train it, or call "
                "model.base_model.calibrate_pat_mask(batches) first."
            )
        step = self._pat_gate.step(name)
        if self._pat_gate.total(name) is None:
            self.pat_total[name].fill_(max(step, 1))
        self.pat_step[name].fill_(max(step, self._pat_gate.total(name)))

    @torch.no_grad()
    def calibrate_pat_mask(self, batches, adapter_name: Optional[str] = None) -> torch.Tensor:
        """Calibrate the channel mask now, from the model's forwards over ``batches`` (dicts of model inputs, e.g.
        a few batches of the training data), instead of from the first training step; see ``PatConfig.mask_init``.
        Every rank of an initialized process group must call it (the statistic is summed over ranks). Returns the
        per-channel RMS (d,)."""
        name = self._resolve(adapter_name)
        if self._pat_gate.step(name) != 0:
            raise ValueError(
                f"PAT adapter {name!r} has already trained {self._pat_gate.step(name)} steps; the mask is calibrated "
                "only before training."
            )
        collector = self._pat_gate.collectors[name] = self._collector(self.peft_config[name], explicit=True)
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in batches:
                self.model(**batch)
                collector.close(batch.get("attention_mask"))
        finally:
            self.model.train(was_training)
        self._apply_calibration(name)
        return self.pat_channel_rms[name].detach().cpu()

    def _collector(self, config: PatConfig, explicit: bool = False) -> ResidualStatistics:
        """A calibration collector for ``config.mask_init``; with "norm_output" it reads the decoder's RMSNorms."""
        norms = self._norm_readers if config.mask_init == "norm_output" else None
        return ResidualStatistics(explicit=explicit, norms=norms)

    def _norm_readers(self) -> list[tuple[torch.Tensor, float]]:
        """(γ, eps) of the RMSNorm that reads each residual state h_0..h_2L, in order: each layer's input_layernorm
        and post_attention_layernorm, then the final norm (full weights under FSDP2)."""
        decoder = self.model.get_decoder()
        norms = [n for layer in decoder.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        return [(full_tensor(n.weight).detach(), n.variance_epsilon) for n in (*norms, decoder.norm)]

    def _apply_calibration(self, name: str) -> None:
        """Set m to ±1/2 by the collected statistic and rescale every HSM's s by g_0(old m) / g_0(new m), so s ⊙ g_0
        and hence the model are unchanged (s = 1/g_0 after the first calibration); the collector is dropped."""
        collector = self._pat_gate.collectors.pop(name)
        rms = collector.rms()
        score = rms if collector.norms is None else collector.norm_output_score()
        before = self._step0_gate(name)
        self.pat_channel_rms[name].copy_(rms.to(self.pat_channel_rms[name]))
        width = self._pat_gate.widths[name]
        protected = protected_channels(rms, self._pat_gate.protect_ratios[name], width)
        _assign(self.pat_mask[name], calibrated_mask(score, width, protected))
        ratio = before / self._step0_gate(name)
        for layer in self.hsm_layers(name):
            scale = layer.pat_hsm_scale[name]
            full = full_tensor(scale).detach()
            _assign(scale, full * ratio.to(full))

    def _step0_gate(self, name: str) -> torch.Tensor:
        """g_0 (d,) of the current mask and protection, in float64 on the CPU."""
        protected = self._pat_gate.protected(name)
        mask = full_tensor(self.pat_mask[name]).detach().double().cpu()
        return gate_values(
            mask, 0, None, self._pat_gate.widths[name], protected=None if protected is None else protected.cpu()
        )

    def petuning_prune_and_unload(self, adapter_name: Optional[str] = None):
        """A new, smaller transformers model (hidden size d') that computes the logits of this model with its final
        mask; see :func:`petuning.tuners.pat.prune.prune_and_unload`. This model is left unchanged."""
        return prune_and_unload(self, self._resolve(adapter_name))

    def _resolve(self, adapter_name: Optional[str]) -> str:
        name = adapter_name or self._active_pat_adapter()
        if name is None or name not in self.pat_mask:
            raise ValueError(f"No PAT adapter named {adapter_name!r}; loaded: {list(self.pat_mask)}.")
        return name

    def hsm_layers(self, adapter_name: str) -> list[PatLayer]:
        """The layers holding an HSM of ``adapter_name``, in module order (embedding first)."""
        return [m for m in self.model.modules() if isinstance(m, PatLayer) and m.has_hsm(adapter_name)]

    # ------------------------------------------------------------------------------ training hooks
    def _training_adapter(self) -> Optional[str]:
        """The active adapter if it trains (its mask requires grad), else None."""
        name = self._active_pat_adapter()
        return name if name is not None and self.pat_mask[name].requires_grad else None

    def _losses(self, name: str) -> dict[str, torch.Tensor]:
        config: PatConfig = self.peft_config[name]
        losses = {}
        calibrating = self._calibration_pending(name)  # the mask is about to be overwritten: no loss on it
        if config.mask_loss_weight > 0 and self._pat_gate.phase(name) == "learning" and not calibrating:
            mask = full_tensor(self.pat_mask[name])
            losses["mask"] = config.mask_loss_weight * mask_loss(
                mask, self._pat_gate.widths[name], config.count_loss_weight
            )
        downs = [full_tensor(layer.pat_hsm_down[name]) for layer in self.hsm_layers(name) if layer.has_low_rank(name)]
        if config.identity_loss_weight > 0 and any(d.requires_grad for d in downs):
            losses["identity"] = config.identity_loss_weight * identity_loss(downs)
        return losses

    def petuning_auxiliary_loss(self) -> Optional[torch.Tensor]:
        name = self._training_adapter()
        if name is None:
            return None
        losses = list(self._losses(name).values())
        term, self._distill_term = self._distill_term, None  # taken once: the tuner keeps no graph (deepcopy-safe)
        if term is not None:
            losses.append(self.peft_config[name].distill_weight * term)
        return torch.stack(losses).sum() if losses else None

    def petuning_training_forward(self, ctx: ForwardContext) -> None:
        for collector in self._pat_gate.collectors.values():
            collector.close(ctx.kwargs.get("attention_mask"))
        name = self._training_adapter()
        distill = name is not None and self.peft_config[name].distill_weight > 0
        self._distill_term = self._distillation(ctx) if distill else None
        self._distill_value = None if self._distill_term is None else self._distill_term.detach()

    def _distillation(self, ctx: ForwardContext) -> Optional[torch.Tensor]:
        """``mean_p KL(teacher_p || model_p)`` over the positions p the attention mask keeps and the task loss does
        not score, where teacher_p is the next-token distribution of the same forward with every PAT layer bypassed
        (the unpruned original, in eval mode, without gradients). None if there is no such position; an error if the
        output has no logits."""
        logits = forward_logits(
            ctx,
            "PAT's self-distillation (distill_weight > 0)",
            "Set distill_weight=0, or train with transformers' Trainer or petuning.TrainingHooks.",
        )
        positions = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
        attention_mask = ctx.kwargs.get("attention_mask")
        if isinstance(attention_mask, torch.Tensor) and attention_mask.shape == positions.shape:
            positions &= attention_mask.to(positions.device).bool()
        scored = predicted_labels(ctx.model, ctx.kwargs)
        if scored is not None and scored.shape == positions.shape:
            positions &= ~scored.to(positions.device)
        if not bool(positions.any()):
            return None
        layers = [m for m in self.model.modules() if isinstance(m, PatLayer)]
        teacher = eval_logits(ctx.model, ctx.args, ctx.kwargs, disabled=layers)  # no gradients
        return kl_to_reference(logits, teacher, positions)

    def petuning_before_optimizer_step(self, ctx: StepContext) -> None:
        name = self._training_adapter()
        if name is not None:
            refuse_gradient_edits_under_deepspeed(
                "PAT (which drops the channel mask's gradient once the mask stops learning)",
                "Train PAT with DDP or FSDP.",
            )
            self._start_schedule(name, ctx)
        for name, mask in self.pat_mask.items():
            if mask.grad is not None and self._pat_gate.phase(name) != "learning":
                mask.grad = None  # the mask has stopped learning: no update, no momentum, no weight decay

    def _start_schedule(self, name: str, ctx: StepContext) -> None:
        """At the first optimizer step: resolve ``schedule_steps="auto"`` from the driver's max_steps, and calibrate
        the mask from the forwards just seen (skipping the mask's update this step: its gradient is for the old m)."""
        if self._pat_gate.total(name) is None:
            if not ctx.max_steps or ctx.max_steps < 2:
                raise ValueError(
                    f"PatConfig(schedule_steps='auto') takes the run's length from the driver, which does not know it "
                    f"(max_steps={ctx.max_steps!r}). Give petuning.TrainingHooks(model, optimizer, max_steps=N), set "
                    "max_steps (or num_train_epochs with a sized dataset) in the Trainer, or set "
                    "PatConfig(schedule_steps=N)."
                )
            self.pat_total[name].fill_(ctx.max_steps)
        if self._calibration_pending(name):
            self._apply_calibration(name)
            self.pat_mask[name].grad = None

    def _calibration_pending(self, name: str) -> bool:
        """Whether the mask still waits for its calibration. A collector outlives it only in an adapter that was
        loaded (calibrated, or past step 0): it is dropped here."""
        if name not in self._pat_gate.collectors:
            return False
        if self._pat_gate.step(name) == 0 and not bool((self.pat_channel_rms[name] > 0).any()):
            return True
        del self._pat_gate.collectors[name]
        return False

    def petuning_after_optimizer_step(self, ctx: StepContext) -> None:
        name = self._training_adapter()
        if name is None:
            return
        self.pat_step[name].add_(1)
        step, total = self._pat_gate.step(name), self._pat_gate.total(name)
        if mask_phase(step, total) == "frozen" and mask_phase(step - 1, total) == "learning":
            self._warn_if_unpolarized(name, step, total)

    def _warn_if_unpolarized(self, name: str, step: int, total: int) -> None:
        """The mask has just stopped learning: warn if its soft gate is still far from the hard gate."""
        gap = polarization_gap(
            full_tensor(self.pat_mask[name]), step, total, self._pat_gate.widths[name], self._pat_gate.protected(name)
        )
        if gap <= UNPOLARIZED_GAP:
            return
        soft = self.peft_config[name].frozen_gate == "soft"
        warnings.warn(
            f"PAT's channel mask stopped learning at step {step} (0.8 x schedule_steps={total}) without polarizing: "
            f"its soft gate is on average {gap:.2f} away from the 0/1 gate of the pruned model, so which channels "
            "are pruned was decided by small differences, and switching to the hard gate "
            + (
                "at the end of the schedule will change the model abruptly (use frozen_gate='hard' to train through "
                "it). "
                if soft
                else "now is a large change the remaining steps must repair. "
            )
            + "The mask moves about one learning rate per Adam step and needs to reach about ±0.5 (paper: lr 5e-5 "
            "over 10000 steps): use a longer schedule (schedule_steps) and training run, or give the mask "
            f"(model.base_model.pat_mask[{name!r}]) a larger learning rate in its own optimizer parameter group.",
            UserWarning,
            stacklevel=2,
        )

    def petuning_metrics(self) -> dict[str, float]:
        name = self._active_pat_adapter()
        if name is None:
            return {}
        step, total = self._pat_gate.step(name), self._pat_gate.total(name)
        mask = full_tensor(self.pat_mask[name]).detach()
        metrics = {
            "pat_step": float(step),
            "pat_gate_gap": polarization_gap(
                mask, step, total, self._pat_gate.widths[name], self._pat_gate.protected(name)
            ),
            "pat_tau": schedule(step, total)[0],
            "pat_kept": float((mask >= 0).sum()),
            "pat_final": float(self._pat_gate.phase(name) == "final"),
        }
        metrics.update({f"pat_{key}_loss": float(value) for key, value in self._losses(name).items()})
        if self._distill_value is not None:
            metrics["pat_distill_loss"] = self.peft_config[name].distill_weight * float(self._distill_value)
        return metrics


def _assign(parameter: torch.Tensor, value: torch.Tensor) -> None:
    """Write the full ``value`` into ``parameter`` (this rank's shard of it under FSDP2)."""
    with torch.no_grad():
        local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
        parameter.copy_(like_parameter(value.to(dtype=parameter.dtype, device=local.device), parameter))


def _embedding_key(model: nn.Module) -> str:
    embedding = model.get_input_embeddings()
    return next(name for name, module in model.named_modules() if module is embedding)


def _check_architecture(model: nn.Module) -> tuple[int, nn.Embedding]:
    """Hidden size and (base) token embedding of a supported model; a clear error for anything else."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES or not hasattr(model, "get_input_embeddings"):
        raise ValueError(
            f"PAT prunes the hidden width of Llama-family decoders (transformers model_type {SUPPORTED_MODEL_TYPES}: "
            f"Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2, ...). {type(model).__name__} has model_type {model_type!r}, "
            "whose blocks PAT does not know how to prune. Use a supported architecture."
        )
    embedding = model.get_input_embeddings()
    if isinstance(embedding, BaseTunerLayer):
        embedding = embedding.get_base_layer()
    if type(embedding) is not nn.Embedding:
        raise ValueError(
            f"PAT needs a plain torch.nn.Embedding as the token embedding, found {type(embedding).__name__} in "
            f"{type(model).__name__} (scaled or custom embeddings would change the pruning math)."
        )
    return config.hidden_size, embedding
