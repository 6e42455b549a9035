"""DiffusionGemma: block diffusion with uniform-token noise (its states, measurement and calibration layout;
the checkpoint side is ``diffusion_gemma_checkpoint``).

DiffusionGemma (``transformers.models.diffusion_gemma``) differs from masked DLMs in ways that matter here:

* **Two streams over one set of weights.** A causal *encoder* writes the prefix (prompt and finished canvases)
  into a KV cache; a bidirectional *decoder* denoises a ``canvas_length``-token canvas against that cache.
  Every weight is shared (``diffusion_gemma_checkpoint.SharedWeights`` keeps one module per weight), so each
  calibration forward feeds two streams of rows through the same Linears.
* **Uniform noise and self-conditioning.** There is no mask token: noise is uniformly random tokens, and every
  step feeds the previous step's (temperature-scaled) logits back in. A recorded state keeps the exact
  self-conditioning *signal* (``softmax(logits) @ E``, ``[canvas, hidden]``) instead of the logits
  (``[canvas, vocab]``, 93x larger for the 26B model), and :func:`feeding_self_conditioning` puts it back in.
* **Sink positions in two streams.** The decoder's keys are ``[visible prefix ; canvas]``; sliding-window
  layers see only the last ``window - 1`` prefix keys, so every record is placed at absolute positions. The
  sink scores of the decoder's attention weight the rows of both streams: prefix positions are the encoder's
  rows, canvas positions the decoder's. The encoder's own (causal) attention is recorded and reported
  separately.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from sink_modifier.families.base import (
    AttentionMeasurement,
    CalibrationLayout,
    DenoisingState,
    Family,
    FamilyError,
    NoiseProcess,
    Scoring,
    noise_schedule,
)
from sink_modifier.families.diffusion_gemma_checkpoint import (
    DECODER,
    ENCODER,
    MODEL_TYPE,
    SharedWeights,
    _text_layers,
    is_diffusion_gemma,
    register_checkpoint_conversion,
)
from sink_modifier.families.diffusion_gemma_experts import DiffusionGemmaExperts
from sink_modifier.families.registry import FamilyOptions, FamilySpec, register
from sink_modifier.families.structure import Unsupported
from sink_modifier.hooks import removing
from sink_modifier.seeding import content_generator


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


def feeding_self_conditioning(
    model: torch.nn.Module, signal: Callable[[], torch.Tensor | None]
) -> contextlib.AbstractContextManager:
    """Replace the decoder's self-conditioning signal with a recorded one while the block runs.

    ``signal`` returns the signal for the current forward (or ``None``: keep the model's zeros).
    """

    def replace(module, args):
        recorded = signal()
        if recorded is None:
            return None
        inputs_embeds, current = args
        if current.shape[-2:] != recorded.shape[-2:]:
            raise FamilyError(
                f"Recorded self-conditioning signal {tuple(recorded.shape)} does not fit the canvas "
                f"{tuple(current.shape)}; the calibration states and the model disagree"
            )
        return inputs_embeds, recorded.to(current.device, current.dtype).expand_as(current)

    return removing(model.model.decoder.self_conditioning.register_forward_pre_hook(replace))


@contextlib.contextmanager
def tracking_streams(model: torch.nn.Module) -> Iterator[Callable[[], str | None]]:
    """Yield a function that says, during a forward, whether the encoder or the decoder is running (their
    modules are shared, so a Linear's hook cannot tell by itself)."""
    current: list[str | None] = [None]

    def entering(stream):
        return lambda *_: current.__setitem__(0, stream)

    backbone = model.model
    with removing(backbone.encoder.register_forward_pre_hook(entering(ENCODER)),
                  backbone.decoder.register_forward_pre_hook(entering(DECODER))):
        yield lambda: current[0]


class DiffusionGemma(NoiseProcess, AttentionMeasurement, CalibrationLayout):
    """Block diffusion with uniform-token noise."""

    streams = (ENCODER, DECODER)
    measures_while_sampling = True

    def __init__(self, model: torch.nn.Module):
        self.canvas_length = int(model.config.canvas_length)
        self.vocab_size = int(model.config.get_text_config().vocab_size)

    # ---- states ----------------------------------------------------------------------------------

    def forward_noise_states(self, tokens, *, levels, eps, seed):
        """The sample's last ``canvas_length`` tokens are the canvas, the rest the prefix; noise level
        ``t_k = k / K`` replaces each canvas token by a uniformly random one with probability
        ``(1 - eps) t_k + eps`` (DiffusionGemma's forward process). No self-conditioning (a first step)."""
        canvas = self.canvas_length
        if tokens.numel() <= canvas:
            raise FamilyError(
                f"A {tokens.numel()}-token sample has no prefix before a {canvas}-token canvas; DiffusionGemma "
                f"calibration samples need more than canvas_length ({canvas}) tokens"
            )
        generator = content_generator(tokens, seed)
        prefix, clean = tokens[:-canvas], tokens[-canvas:]
        valid = torch.ones_like(tokens, dtype=torch.bool)
        states = []
        for k, t, p_noise in noise_schedule(levels, eps):
            noisy = torch.rand(clean.shape, generator=generator) < p_noise
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
        with torch.random.fork_rng(devices=devices), recorder.recording():
            torch.manual_seed(content_generator(tokens, seed).initial_seed())
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
        with feeding_self_conditioning(model, lambda: current[0]):
            for index, state in enumerate(states):
                current[0] = state.self_conditioning
                backbone(**self.model_inputs(state, device))
                records = probe.pop_records()
                prefix, end = state.prefix_length, state.prefix_length + state.canvas_length
                for layer, name in enumerate(decoder_names):
                    mass = records[name][0][0]
                    visible_prefix = mass.numel() - state.canvas_length
                    if not 0 <= visible_prefix <= prefix:
                        raise FamilyError(f"{name} attended {mass.numel()} keys; expected at most {end}")
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
        with removing(backbone.encoder.register_forward_hook(after_encoder, with_kwargs=True),
                      backbone.decoder.register_forward_hook(after_decoder, with_kwargs=True)):
            states = sample()
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

    @contextlib.contextmanager
    def calibrating(
        self, model: torch.nn.Module, states: list[BlockDiffusionState]
    ) -> Iterator[Callable[[], str | None]]:
        """While llm-compressor's pipeline runs the states: feed each batch its self-conditioning signal and
        yield the function that tells the modifier which stream each forward belongs to."""
        from llmcompressor.core import active_session

        def signal():
            return states[active_session().state.current_batch_idx].self_conditioning

        with tracking_streams(model) as current_stream, feeding_self_conditioning(model, signal):
            yield current_stream


class _GenerationRecorder:
    """Forward pre-hooks on encoder and decoder that turn a ``generate()`` call into decoder states."""

    def __init__(self, model: torch.nn.Module, prompt: torch.Tensor):
        self.model = model
        self.prefix = prompt.new_empty(0)
        self.records: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def _encoder(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or ids.shape[0] != 1:
            raise FamilyError("DiffusionGemma calibration generates one sample at a time (batch size 1)")
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

    def recording(self) -> contextlib.AbstractContextManager:
        backbone = self.model.model
        return removing(backbone.encoder.register_forward_pre_hook(self._encoder, with_kwargs=True),
                        backbone.decoder.register_forward_pre_hook(self._decoder, with_kwargs=True))

    def states(self, sequence: torch.Tensor, canvas_length: int) -> list[BlockDiffusionState]:
        """Every recorded step at absolute positions; noise level = share of canvas tokens that differ from
        the block's final output."""
        if not self.records:
            raise FamilyError("generate() ran no denoising step; check max_new_tokens and the prompt")
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


class BlockDiffusionScoring(Scoring):
    """DiffusionGemma generates with its own ``generate()`` (whole canvases); uniform-token block diffusion has
    no likelihood estimator here."""

    likelihood = None
    generation = "own"

    @property
    def refusal(self) -> str:
        return ("DiffusionGemma (uniform-token block diffusion) has no likelihood estimator here; evaluate it on "
                "generation tasks (sink-prune eval --tasks, e.g. gsm8k)")

    def canvas_length(self, model: torch.nn.Module) -> int | None:
        return int(model.config.canvas_length)


def _build(model: torch.nn.Module, options: FamilyOptions, chosen_by_match: bool) -> Family:
    implementation = DiffusionGemma(model)
    return Family("diffusion_gemma", implementation, implementation, implementation, SharedWeights(),
                  scoring=BlockDiffusionScoring(), experts=DiffusionGemmaExperts(), structure=Unsupported(
        "DiffusionGemma: structured pruning does not yet remove channels of its experts and tied encoder/decoder "
        "MLPs; use SinkAwarePruningModifier (unstructured or 2:4) with quantization for this model"))


def _model_class(config) -> type | None:
    if getattr(config, "model_type", None) != MODEL_TYPE:
        return None
    from transformers import DiffusionGemmaForBlockDiffusion

    return DiffusionGemmaForBlockDiffusion


def _before_load(config) -> None:
    """Per-expert keys (what llm-compressor saves for quantized experts) load fused only with the conversion."""
    if getattr(config, "model_type", None) == MODEL_TYPE:
        register_checkpoint_conversion()


register(FamilySpec(
    "diffusion_gemma", _build, matches=is_diffusion_gemma, priority=100, claims=True,
    description="block diffusion with uniform-token noise; DiffusionGemma", model_class=_model_class,
    probe_inputs=lambda model, ids: {"input_ids": ids, "decoder_input_ids": ids.flip(-1)},
    before_load=_before_load,
    reload_call=lambda model: ("import sink_modifier; sink_modifier.load_model({path!r})"
                               if is_diffusion_gemma(model) else None),
))
