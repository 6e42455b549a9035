"""DiffusionGemma: every DiffusionGemma-specific piece of the pruner lives in this module.

DiffusionGemma (``transformers.models.diffusion_gemma``) differs from masked DLMs in four ways that matter here:

* **Two streams over one set of weights.** A causal *encoder* writes the prefix (prompt and finished canvases)
  into a KV cache; a bidirectional *decoder* denoises a ``canvas_length``-token canvas against that cache.
  Encoder and decoder layers share every weight. llm-compressor's ``linearize_moe`` breaks that tie for the
  routed experts and would prune encoder and decoder copies with different masks, so :meth:`prepare` makes the
  encoder *call the decoder's modules* (attention projections, MLP, router, experts, norms). Each weight is
  then one module: its hooks see both streams, it is pruned once, and ``save_pretrained`` keeps one copy.
* **Uniform noise and self-conditioning.** There is no mask token: noise is uniformly random tokens, and every
  step feeds the previous step's (temperature-scaled) logits back in. A recorded state keeps the exact
  self-conditioning *signal* (``softmax(logits) @ E``, ``[canvas, hidden]``) instead of the logits
  (``[canvas, vocab]``, 93x larger for the 26B model), and :class:`SelfConditioningFeed` puts it back in.
* **Sink positions in two streams.** The decoder's keys are ``[visible prefix ; canvas]``; sliding-window
  layers see only the last ``window - 1`` prefix keys, so every record is placed at absolute positions. The
  sink scores of the decoder's attention weight the rows of both streams: prefix positions are the encoder's
  rows, canvas positions the decoder's. The encoder's own (causal) attention is recorded and reported
  separately.
* **Fused 3-D experts.** Saved checkpoints keep llm-compressor's per-expert 2-D keys (the compressed-tensors
  / vLLM MoE layout); :func:`register_checkpoint_conversion` teaches transformers to merge them back into
  ``experts.gate_up_proj`` / ``experts.down_proj`` on ``from_pretrained`` (dequantizing FP8 experts through
  transformers' compressed-tensors ``DecompressExperts``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger

from sink_modifier import compat
from sink_modifier.adapters import AdapterError, DenoisingState, DiffusionAdapter, sample_generator
from sink_modifier.errors import UserError

MODEL_TYPE = "diffusion_gemma"
ENCODER, DECODER = "encoder", "decoder"
# Modules the pruner must never touch (the router picks experts; the vision tower and LM head are out of scope).
PROTECTED = ("router", "vision", "lm_head", "embed")

__all__ = [
    "BlockDiffusionState",
    "prepare_model",
    "DiffusionGemmaAdapter",
    "is_diffusion_gemma",
    "register_checkpoint_conversion",
]


def is_diffusion_gemma(model: torch.nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == MODEL_TYPE


def register_checkpoint_conversion() -> None:
    """Let ``from_pretrained`` fuse per-expert 2-D keys (``experts.{e}.gate_proj.weight``) back into experts.

    transformers 5.17 ships no conversion mapping for ``diffusion_gemma``, so a checkpoint written by
    llm-compressor (per-expert keys) reloads with *randomly initialised* experts. The mapping mirrors
    transformers' own ``qwen2_moe`` one. Checkpoints with fused keys (the published bf16 release) match none
    of its patterns and load as before.
    """
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter, WeightRenaming

    class FuseExpertsOnLoad(WeightConverter):
        """Load-only. transformers reverts a model's load conversions when it saves, which would rewrite every
        DiffusionGemma saved in this process (published fused checkpoints included) with per-expert keys.
        Reversed, this is the identity, so a fused model is saved fused: its native layout."""

        def reverse_transform(self):
            targets = list(self._original_target_patterns)
            identity = WeightRenaming(source_patterns=targets, target_patterns=targets)
            identity.scope_prefix, identity.base_model_prefix = self.scope_prefix, self.base_model_prefix
            return identity

    existing = get_checkpoint_conversion_mapping(MODEL_TYPE) or []
    if any(type(c).__name__ == FuseExpertsOnLoad.__name__ for c in existing):
        return
    mapping = [
        *existing,
        FuseExpertsOnLoad(
            source_patterns=["experts.*.gate_proj.weight", "experts.*.up_proj.weight"],
            target_patterns="experts.gate_up_proj",
            operations=[MergeModulelist(dim=0), Concatenate(dim=1)],
        ),
        FuseExpertsOnLoad(
            source_patterns="experts.*.down_proj.weight",
            target_patterns="experts.down_proj",
            operations=[MergeModulelist(dim=0)],
        ),
    ]
    register_checkpoint_conversion_mapping(MODEL_TYPE, mapping, overwrite=True)


@dataclass(frozen=True)
class BlockDiffusionState(DenoisingState):
    """One decoder step: ``input_ids`` holds ``[prefix ; canvas]`` at absolute positions (padded to the
    sample's longest state, ``valid`` marks the real part); ``self_conditioning`` is the signal the step
    received (``None`` on a block's first step, where the model uses zeros)."""

    prefix_length: int = 0
    canvas_length: int = 0
    self_conditioning: torch.Tensor | None = None  # [canvas, hidden] on CPU
    # Generation encodes a prefix once per block while the decoder runs every step; each of the block's S
    # recorded states re-encodes it, so its prefix rows count 1/S (see ``stream_scales``).
    prefix_weight: float = 1.0

    @property
    def prefix(self) -> torch.Tensor:
        return self.input_ids[: self.prefix_length]

    @property
    def canvas(self) -> torch.Tensor:
        return self.input_ids[self.prefix_length : self.prefix_length + self.canvas_length]


def _text_layers(model: torch.nn.Module) -> tuple[torch.nn.ModuleList, torch.nn.ModuleList]:
    backbone = model.model
    return backbone.encoder.language_model.layers, backbone.decoder.layers


# compressed-tensors' per-module quantization parameters (FP8, INT4/INT8, NVFP4 layouts).
_QUANTIZATION_PARAMETERS = frozenset({
    "weight_scale", "weight_zero_point", "weight_g_idx", "weight_global_scale", "weight_shape", "weight_packed",
    "input_scale", "input_zero_point", "input_global_scale", "output_scale", "output_zero_point",
})


def _module_path(model: torch.nn.Module, module: torch.nn.Module) -> str:
    for name, candidate in model.named_modules(remove_duplicate=False):
        if candidate is module:
            return name
    raise AdapterError(f"{type(module).__name__} is not part of the model")


def _shared_children(decoder_layer: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """(path, module) of every decoder-layer child the encoder layer has a twin of (all but attention)."""
    for name, child in decoder_layer.named_children():
        if name == "self_attn":  # the attention modules differ (the encoder's writes the cache)
            for sub, grandchild in child.named_children():
                yield f"self_attn.{sub}", grandchild
        else:
            yield name, child


class SelfConditioningFeed:
    """Replaces the decoder's self-conditioning signal with a recorded one while installed.

    ``signal`` returns the signal for the current forward (or ``None``: keep the model's zeros).
    """

    def __init__(self, model: torch.nn.Module, signal: Callable[[], torch.Tensor | None]):
        self.module = model.model.decoder.self_conditioning
        self.signal = signal
        self._handle = None

    def _replace(self, module, args):
        recorded = self.signal()
        if recorded is None:
            return None
        inputs_embeds, current = args
        if current.shape[-2:] != recorded.shape[-2:]:
            raise AdapterError(
                f"Recorded self-conditioning signal {tuple(recorded.shape)} does not fit the canvas "
                f"{tuple(current.shape)}; the calibration states and the model disagree"
            )
        return inputs_embeds, recorded.to(current.device, current.dtype).expand_as(current)

    def __enter__(self):
        self._handle = self.module.register_forward_pre_hook(self._replace)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


class StreamTracker:
    """Knows, during a forward, whether the encoder or the decoder is running (their modules are shared)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.current: str | None = None
        self._handles = []

    def _set(self, stream, *_):
        self.current = stream

    def __enter__(self):
        backbone = self.model.model
        self._handles = [
            backbone.encoder.register_forward_pre_hook(lambda *a: self._set(ENCODER)),
            backbone.decoder.register_forward_pre_hook(lambda *a: self._set(DECODER)),
        ]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self.current = None


class DiffusionGemmaAdapter(DiffusionAdapter):
    """Block diffusion with uniform-token noise (DiffusionGemma)."""

    name = "diffusion_gemma"
    streams = (ENCODER, DECODER)
    measures_while_sampling = True

    def __init__(self, model: torch.nn.Module):
        self.canvas_length = int(model.config.canvas_length)
        self.vocab_size = int(model.config.get_text_config().vocab_size)
        self.stream_tracker: StreamTracker | None = None

    # ---- model preparation and saving -------------------------------------------------------------

    @staticmethod
    def prepare(model: torch.nn.Module) -> None:
        """Make every encoder weight *the* decoder module, with the experts linearized (idempotent).

        Layer by layer, the decoder's fused experts become llm-compressor's per-expert Linears and the encoder
        is pointed at them at once, so the model never holds two 2-D copies (llm-compressor's own
        ``linearize_moe`` would linearize the tied encoder and decoder experts separately: +45.7 GB at peak
        for the 26B model; call :func:`sink_modifier.prepare_model` before ``oneshot`` to avoid it). The
        backbone's children are reordered decoder-first so that llm-compressor names each shared module by
        its decoder path (``model.decoder.layers.0.experts.3.down_proj``): the name the checkpoint keeps.
        """
        from llmcompressor.modeling.moe.linear_experts import LinearExperts2D

        backbone = model.model
        compat.move_child_first(backbone, DECODER)
        encoder_layers, decoder_layers = _text_layers(model)
        shared = 0
        for encoder_layer, decoder_layer in zip(encoder_layers, decoder_layers, strict=True):
            experts = decoder_layer.experts
            if not isinstance(experts, LinearExperts2D):
                config = getattr(experts, "config", model.config.get_text_config())
                linear = LinearExperts2D.get_linear_experts_cls(type(experts)).from_experts_module(experts, config)
                decoder_layer.experts = linear
            for path, module in _shared_children(decoder_layer):
                if encoder_layer.get_submodule(path) is not module:
                    encoder_layer.set_submodule(path, module)
                    shared += 1
        if shared:
            logger.info(f"DiffusionGemma: encoder layers now call the decoder's modules ({shared} ties restored)")

    @staticmethod
    @contextlib.contextmanager
    def saving(model: torch.nn.Module) -> Iterator[None]:
        """Save each shared weight once, under its decoder name, in a checkpoint transformers reloads.

        * The encoder's shared modules are detached while saving: compressed-tensors refuses a module reachable
          under two names ("Attempted to offload a module twice"), and the published checkpoints store the
          decoder's copy only; ``from_pretrained`` ties the encoder's weights to it.
        * transformers ties only the parameters a model has when it is built, not the ``weight_scale`` (and
          other quantization parameters) its compressed-tensors loader adds, so the encoder's copies of those
          small tensors are written too; without them the encoder's quantized Linears reload with random
          scales.
        """
        encoder_layers, decoder_layers = _text_layers(model)
        encoder_prefix = _module_path(model, encoder_layers)
        decoder_prefix = _module_path(model, decoder_layers)
        detached = []
        for encoder_layer, decoder_layer in zip(encoder_layers, decoder_layers, strict=True):
            for path, module in _shared_children(decoder_layer):
                parent_path, _, leaf = path.rpartition(".")
                parent = encoder_layer.get_submodule(parent_path) if parent_path else encoder_layer
                if getattr(parent, leaf, None) is module:
                    delattr(parent, leaf)
                    detached.append((parent, leaf, module))

        def add_encoder_qparams(module, state_dict, prefix, local_metadata):
            for key in list(state_dict):
                name = key[len(prefix):]
                if not name.startswith(f"{decoder_prefix}.") or ".experts." in name:
                    continue
                if name.rpartition(".")[2] not in _QUANTIZATION_PARAMETERS:
                    continue
                twin = f"{prefix}{encoder_prefix}.{name[len(decoder_prefix) + 1:]}"
                state_dict[twin] = state_dict[key].clone()  # own storage: not dropped as a tied duplicate

        handle = model.register_state_dict_post_hook(add_encoder_qparams)
        try:
            yield
        finally:
            handle.remove()
            for parent, leaf, module in detached:
                setattr(parent, leaf, module)

    @staticmethod
    def finish_checkpoint(model: torch.nn.Module, directory) -> None:
        """Mirror the quantization config's ``ignore`` entries for the encoder's twins (e.g. its routers).

        compressed-tensors lists the modules it left unquantized by name, and each shared module has only its
        decoder name while saving; on reload the encoder's modules are separate and must be ignored too.
        """
        config_path = Path(directory) / "config.json"
        config = json.loads(config_path.read_text())
        quantization = config.get("quantization_config")
        if not quantization or not quantization.get("ignore"):
            return
        encoder_layers, decoder_layers = _text_layers(model)
        encoder_prefix, decoder_prefix = _module_path(model, encoder_layers), _module_path(model, decoder_layers)
        ignore = list(quantization["ignore"])
        for name in quantization["ignore"]:
            if name.startswith(f"{decoder_prefix}."):
                twin = f"{encoder_prefix}.{name[len(decoder_prefix) + 1:]}"
                if twin not in ignore:
                    ignore.append(twin)
        quantization["ignore"] = ignore
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def check_scope(self, names: list[str]) -> None:
        bad = [n for n in names if any(part in n for part in PROTECTED)]
        if bad:
            raise UserError(
                f"The recipe would prune {bad[:3]}{'...' if len(bad) > 3 else ''}: DiffusionGemma's router, "
                "vision tower, embeddings and LM head are never pruned; add 're:.*router.*' (and the others) "
                "to ignore"
            )

    # ---- states ----------------------------------------------------------------------------------

    def forward_noise_states(self, tokens, *, levels, eps, seed):
        """The sample's last ``canvas_length`` tokens are the canvas, the rest the prefix; noise level
        ``t_k = k / K`` replaces each canvas token by a uniformly random one with probability
        ``(1 - eps) t_k + eps`` (DiffusionGemma's forward process). No self-conditioning (a first step)."""
        canvas = self.canvas_length
        if tokens.numel() <= canvas:
            raise AdapterError(
                f"A {tokens.numel()}-token sample has no prefix before a {canvas}-token canvas; DiffusionGemma "
                f"calibration samples need more than canvas_length ({canvas}) tokens"
            )
        generator = sample_generator(tokens, seed)
        prefix, clean = tokens[:-canvas], tokens[-canvas:]
        valid = torch.ones_like(tokens, dtype=torch.bool)
        states = []
        for k in range(1, levels + 1):
            t = k / levels
            noisy = torch.rand(clean.shape, generator=generator) < (1.0 - eps) * t + eps
            random_tokens = torch.randint(0, self.vocab_size, clean.shape, generator=generator)
            ids = torch.cat([prefix, torch.where(noisy, random_tokens, clean)])
            states.append(BlockDiffusionState(ids, valid, step=k - 1, noise_level=t, prefix_length=prefix.numel(),
                                              canvas_length=canvas, prefix_weight=1.0 / levels))
        return states

    @torch.no_grad()
    def sampler_states(self, model, tokens, *, steps, blocks, prompt_fraction, temperature, seed):
        """Run DiffusionGemma's own ``generate()`` on the sample's prompt and record every decoder step.

        ``blocks`` canvases of up to ``steps / blocks`` denoising steps each, as for masked DLMs (the
        entropy-bound sampler, its temperature schedule and its early stop are the model's; ``temperature`` is
        for masked DLMs only).
        The global RNG is forked and seeded from the sample, so the trajectory is reproducible.
        """
        prompt = tokens[: max(1, round(prompt_fraction * tokens.numel()))]
        device = next(model.parameters()).device
        recorder = _GenerationRecorder(model, prompt)
        devices = [device] if device.type == "cuda" else []
        # No torch.compile around the recording hooks (generate compiles with a static cache).
        with torch.random.fork_rng(devices=devices), recorder:
            torch.manual_seed(sample_generator(tokens, seed).initial_seed())
            output = model.generate(
                prompt[None].to(device), max_new_tokens=blocks * self.canvas_length,
                max_denoising_steps=steps // blocks,
                disable_compile=True,
            )
        sequence = output.sequences[0].cpu() if hasattr(output, "sequences") else output[0].cpu()
        return recorder.states(sequence, self.canvas_length)

    # ---- measurement and calibration ---------------------------------------------------------------

    def layer_targets(self, model: torch.nn.Module) -> list[str]:
        """The decoder layers: after :meth:`prepare` they hold every text weight, each once."""
        return [type(_text_layers(model)[1][0]).__name__]

    def attention_modules(self, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """Decoder then encoder text attention; the vision tower never runs on text calibration data."""
        encoder_layers, decoder_layers = _text_layers(model)
        named = {id(m): n for n, m in model.named_modules()}
        layers = [*decoder_layers, *encoder_layers]
        return {named[id(layer.self_attn)]: layer.self_attn for layer in layers}

    @staticmethod
    def split_layers(names: list[str]) -> tuple[list[str], list[str]]:
        """(decoder attention layers, encoder attention layers): sinks are the decoder's; the encoder's are
        reported separately."""
        decoder = [n for n in names if ".decoder." in f".{n}."]
        return decoder, [n for n in names if n not in decoder]

    def model_inputs(self, state: BlockDiffusionState, device: torch.device) -> dict:
        return {"input_ids": state.prefix[None].to(device), "decoder_input_ids": state.canvas[None].to(device)}

    @torch.no_grad()
    def measure(self, model, probe, states, batch_size, device) -> dict[str, torch.Tensor]:
        """Attention mass at absolute positions: ``decoder`` [S, Ld, T] and ``encoder`` [S, Le, T].

        One state per forward: states of a sample differ in prefix length once a block is finished.
        """
        decoder_names, encoder_names = self.split_layers(probe.layer_names)
        length = states[0].input_ids.numel()
        decoder_mass = torch.zeros(len(states), len(decoder_names), length)
        encoder_mass = torch.zeros(len(states), len(encoder_names), length)
        current: list[torch.Tensor | None] = [None]
        backbone = model.model
        with SelfConditioningFeed(model, lambda: current[0]):
            for index, state in enumerate(states):
                current[0] = state.self_conditioning
                backbone(**self.model_inputs(state, device))
                records = probe.pop_records()
                prefix, end = state.prefix_length, state.prefix_length + state.canvas_length
                for layer, name in enumerate(decoder_names):
                    mass = records[name][0][0]
                    visible_prefix = mass.numel() - state.canvas_length
                    if not 0 <= visible_prefix <= prefix:
                        raise AdapterError(f"{name} attended {mass.numel()} keys; expected at most {end}")
                    decoder_mass[index, layer, end - mass.numel() : end] = mass
                for layer, name in enumerate(encoder_names):
                    mass = records[name][0][0]
                    encoder_mass[index, layer, prefix - mass.numel() : prefix] = mass
        return {DECODER: decoder_mass, ENCODER: encoder_mass}

    @torch.no_grad()
    def measure_while_sampling(self, model, probe, sample) -> tuple[list, dict[str, torch.Tensor]]:
        """Measure ``generate()``'s own forwards: each decoder step is one state; the encoder runs once per
        canvas on the new tokens only, attending to the cached prefix.

        Causal attention makes the chunked prefill exact: a query's probabilities depend only on the keys
        before it, which the cache holds, so summing every chunk's key masses gives the masses a single
        prefill of the whole prefix would (what :meth:`measure` records per state), at absolute positions.
        """
        decoder_names, encoder_names = self.split_layers(probe.layer_names)
        encoder_running = torch.zeros(len(encoder_names), 0)
        prefix = [0]
        decoder_records: list[list[torch.Tensor]] = []
        encoder_snapshots: list[torch.Tensor] = []

        def after_encoder(module, args, kwargs, output):
            nonlocal encoder_running
            ids = kwargs.get("input_ids", args[0] if args else None)
            prefix[0] += ids.shape[1]
            records = probe.pop_records(encoder_names)
            grown = torch.zeros(len(encoder_names), prefix[0])
            grown[:, : encoder_running.shape[1]] = encoder_running
            for layer, name in enumerate(encoder_names):
                mass = records[name][0][0]
                grown[layer, prefix[0] - mass.numel() : prefix[0]] += mass
            encoder_running = grown

        def after_decoder(module, args, kwargs, output):
            records = probe.pop_records(decoder_names)
            decoder_records.append([records[name][0][0] for name in decoder_names])
            encoder_snapshots.append(encoder_running.clone())

        backbone = model.model
        handles = [backbone.encoder.register_forward_hook(after_encoder, with_kwargs=True),
                   backbone.decoder.register_forward_hook(after_decoder, with_kwargs=True)]
        try:
            states = sample()
        finally:
            for handle in handles:
                handle.remove()
        if len(decoder_records) != len(states):
            raise RuntimeError(f"generate() made {len(decoder_records)} decoder steps for {len(states)} states")
        length = states[0].input_ids.numel()
        decoder_mass = torch.zeros(len(states), len(decoder_names), length)
        encoder_mass = torch.zeros(len(states), len(encoder_names), length)
        for index, (state, masses, encoder) in enumerate(zip(states, decoder_records, encoder_snapshots,
                                                              strict=True)):
            end = state.prefix_length + state.canvas_length
            for layer, mass in enumerate(masses):
                decoder_mass[index, layer, end - mass.numel() : end] = mass
            encoder_mass[index, :, : encoder.shape[1]] = encoder
        return states, {DECODER: decoder_mass, ENCODER: encoder_mass}

    def calibration_batches(self, states: list[BlockDiffusionState]) -> list[dict]:
        return [{k: v.cpu() for k, v in self.model_inputs(s, torch.device("cpu")).items()} for s in states]

    @staticmethod
    def stream_scales(state: BlockDiffusionState, scales: torch.Tensor) -> dict[str, torch.Tensor]:
        """A state's row scales [G, T] split into each stream's rows: prefix -> encoder, canvas -> decoder.

        Both streams are weighted by the sinks of this state's decoder attention (prefix tokens are sinks of
        the denoiser too). Prefix rows are further scaled by ``sqrt(prefix_weight)``: statistics are sums of
        squared rows, so a block's prefix then counts once, as often as generation encodes it.
        """
        prefix, end = state.prefix_length, state.prefix_length + state.canvas_length
        return {ENCODER: scales[:, :prefix] * state.prefix_weight**0.5, DECODER: scales[:, prefix:end]}

    @property
    def current_stream(self) -> str | None:
        return None if self.stream_tracker is None else self.stream_tracker.current

    @contextlib.contextmanager
    def calibrating(self, model: torch.nn.Module, states: list[BlockDiffusionState]) -> Iterator[None]:
        """While llm-compressor's pipeline runs the states: feed each batch its self-conditioning signal and
        tell the modifier which stream each forward belongs to."""
        from llmcompressor.core import active_session

        def signal():
            return states[active_session().state.current_batch_idx].self_conditioning

        self.stream_tracker = StreamTracker(model)
        try:
            with self.stream_tracker, SelfConditioningFeed(model, signal):
                yield
        finally:
            self.stream_tracker = None


class _GenerationRecorder:
    """Forward pre-hooks on encoder and decoder that turn a ``generate()`` call into decoder states."""

    def __init__(self, model: torch.nn.Module, prompt: torch.Tensor):
        self.model = model
        self.prefix = prompt.new_empty(0)
        self.records: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self._handles = []

    def _encoder(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or ids.shape[0] != 1:
            raise AdapterError("DiffusionGemma calibration generates one sample at a time (batch size 1)")
        self.prefix = torch.cat([self.prefix, ids[0].cpu()])

    def _decoder(self, module, args, kwargs):
        canvas = kwargs["decoder_input_ids"][0].cpu()
        logits = kwargs.get("self_conditioning_logits")
        signal = None
        if logits is not None:  # exactly what the decoder computes from them
            embed = module.embed_tokens
            probs = logits.softmax(dim=-1, dtype=torch.float32).to(embed.weight.dtype)
            signal = (torch.matmul(probs, embed.weight) * embed.embed_scale.to(embed.weight.dtype))[0].cpu()
        self.records.append((self.prefix.clone(), canvas, signal))

    def __enter__(self):
        backbone = self.model.model
        self._handles = [
            backbone.encoder.register_forward_pre_hook(self._encoder, with_kwargs=True),
            backbone.decoder.register_forward_pre_hook(self._decoder, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()

    def states(self, sequence: torch.Tensor, canvas_length: int) -> list[BlockDiffusionState]:
        """Every recorded step at absolute positions; noise level = share of canvas tokens that differ from
        the block's final output."""
        if not self.records:
            raise AdapterError("generate() ran no denoising step; check max_new_tokens and the prompt")
        length = max(prefix.numel() + canvas_length for prefix, *_ in self.records)
        steps_per_prefix: dict[int, int] = {}
        for prefix, *_ in self.records:
            steps_per_prefix[prefix.numel()] = steps_per_prefix.get(prefix.numel(), 0) + 1
        states = []
        for index, (prefix, canvas, signal) in enumerate(self.records):
            end = prefix.numel() + canvas_length
            ids = torch.zeros(length, dtype=torch.long)
            ids[: prefix.numel()], ids[prefix.numel() : end] = prefix, canvas
            valid = torch.arange(length) < end
            final = sequence[prefix.numel() : end]
            noise = float((canvas[: final.numel()] != final).float().mean()) if final.numel() else 1.0
            states.append(BlockDiffusionState(
                ids, valid, step=index, noise_level=noise, prefix_length=prefix.numel(),
                canvas_length=canvas_length, self_conditioning=signal,
                prefix_weight=1.0 / steps_per_prefix[prefix.numel()],
            ))
        return states


def prepare_model(model: torch.nn.Module) -> torch.nn.Module:
    """Prepare a DiffusionGemma model for ``oneshot`` before calling it (other models are returned as they are).

    oneshot linearizes MoE experts itself when it finds them fused, which for DiffusionGemma means separate
    2-D copies for the tied encoder and decoder experts until the modifier re-ties them; preparing first keeps
    one copy throughout. The modifier prepares the model anyway, so this only saves memory.
    """
    if is_diffusion_gemma(model):
        DiffusionGemmaAdapter.prepare(model)
    return model
