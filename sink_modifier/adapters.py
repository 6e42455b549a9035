"""Diffusion adapters: everything that differs between model families lives here, and only here.

An adapter knows how a family's denoising trajectory looks: which noise it uses (an absorbing mask token for
masked DLMs, nothing for an autoregressive control) and how to turn one calibration sample into the sequence of
states the model visits. The trajectory runner, the modifier and the pipeline only see ``DenoisingState``s.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from loguru import logger

from sink_modifier import compat
from sink_modifier.errors import UserError

AdapterName = Literal["auto", "masked", "autoregressive", "diffusion_gemma"]


class AdapterError(UserError):
    """The model cannot be driven the way the recipe asks; the message says what to change."""


@dataclass(frozen=True)
class DenoisingState:
    """One forward of the trajectory: the tokens the model sees and which positions count.

    ``valid`` marks the positions that are part of this state (as queries and as keys): padding is never valid,
    and the autoregressive control marks only the prefix decoded so far.
    """

    input_ids: torch.Tensor  # [T] long
    valid: torch.Tensor  # [T] bool
    step: int
    noise_level: float


def sample_generator(tokens: torch.Tensor, seed: int) -> torch.Generator:
    """A generator seeded by the sample's own tokens and the recipe seed.

    Keying the noise on the content (not on the sample's index) keeps masks identical whatever order
    llm-compressor's shuffling, batching or rank partitioning presents the samples in.
    """
    digest = hashlib.blake2b(tokens.to(torch.int64).cpu().numpy().tobytes(), digest_size=8)
    digest.update(int(seed).to_bytes(8, "little", signed=True))
    return torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") & (2**63 - 1))


class DiffusionAdapter(ABC):
    name: ClassVar[str]

    @abstractmethod
    def forward_noise_states(
        self, tokens: torch.Tensor, *, levels: int, eps: float, seed: int
    ) -> list[DenoisingState]:
        """The states of the forward process for one clean, unpadded sample ``tokens`` [T]."""

    @abstractmethod
    def sampler_states(
        self, model: torch.nn.Module, tokens: torch.Tensor, *, steps: int, blocks: int,
        prompt_fraction: float, temperature: float, seed: int,
    ) -> list[DenoisingState]:
        """The states the model's own sampler visits when it completes the sample's prompt.

        The first ``prompt_fraction`` of the sample is the prompt; the sampler writes the rest (same length).
        """

    def query_mask(self, states: list[DenoisingState]) -> torch.Tensor | None:
        """Which query rows count when measuring attention mass (None: all)."""
        return None

    # ---- hooks a family overrides when its forward is not ``model(input_ids=...)`` -----------------

    #: whether the trajectory phase can measure attention in the sampler's own forwards
    #: (``measure_while_sampling``) instead of a second forward per state
    measures_while_sampling: ClassVar[bool] = False
    #: the token streams whose rows a calibration forward feeds through shared weights (None: one stream)
    streams: ClassVar[tuple[str | None, ...]] = (None,)
    current_stream: str | None = None

    def prepare(self, model: torch.nn.Module) -> None:  # noqa: B027 (optional hook)
        """Bring the model into the form calibration needs (before targets are resolved)."""

    def saving(self, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        """Context around ``save_pretrained``."""
        return contextlib.nullcontext()

    def finish_checkpoint(self, model: torch.nn.Module, directory) -> None:  # noqa: B027 (optional hook)
        """Last edits to a saved (still staged) checkpoint directory."""

    def calibrating(
        self, model: torch.nn.Module, states: list[DenoisingState]
    ) -> contextlib.AbstractContextManager:
        """Context around the calibration pipeline's forwards over ``states``."""
        return contextlib.nullcontext()

    def check_scope(self, names: list[str]) -> None:  # noqa: B027 (optional hook)
        """Refuse modules of this family that must never be pruned."""

    def layer_targets(self, model: torch.nn.Module) -> list[str] | None:
        """The layers that hold each prunable weight once (None: llm-compressor's sequential targets)."""
        return None

    def attention_modules(self, model: torch.nn.Module) -> dict[str, torch.nn.Module] | None:
        """The attention modules to probe, in order (None: every module named "*Attention")."""
        return None

    @staticmethod
    def split_layers(names: list[str]) -> tuple[list[str], list[str]]:
        """(attention layers whose sinks weight the rows, layers only reported)."""
        return list(names), []

    def calibration_batches(self, states: list[DenoisingState]) -> list[dict]:
        # States are never padded; an all-ones attention mask would only make transformers build an
        # explicit (slow, vmap-based) mask for every batch.
        return [{"input_ids": state.input_ids.unsqueeze(0)} for state in states]

    @staticmethod
    def stream_scales(state: DenoisingState, scales: torch.Tensor) -> dict[str | None, torch.Tensor]:
        """A state's row scales [G, T] keyed by stream."""
        return {None: scales}

    def measure_while_sampling(
        self, model: torch.nn.Module, probe, sample: Callable[[], list[DenoisingState]],
    ) -> tuple[list[DenoisingState], dict[str | None, torch.Tensor]]:
        """Run ``sample()`` under the probe and keep each forward's masses: for samplers that make exactly one
        full forward per recorded state, on that state's tokens."""
        masses = []
        handle = model.register_forward_hook(lambda *_: masses.append(probe.pop_masses()))
        try:
            states = sample()
        finally:
            handle.remove()
        if len(masses) != len(states):
            raise RuntimeError(f"the sampler made {len(masses)} forwards for {len(states)} recorded states")
        return states, {None: torch.cat(masses)}

    @torch.no_grad()
    def measure(
        self, model: torch.nn.Module, probe, states: list[DenoisingState], batch_size: int, device: torch.device,
    ) -> dict[str | None, torch.Tensor]:
        """Attention mass [S, L, T] of one sample's states (equal lengths, so batched without padding)."""
        backbone = base_model(model)
        no_cache = no_cache_kwargs(backbone)
        masses = []
        for start in range(0, len(states), batch_size):
            batch = states[start : start + batch_size]
            input_ids = torch.stack([s.input_ids for s in batch]).to(device)
            query_mask = self.query_mask(batch)
            probe.query_mask = None if query_mask is None else query_mask.to(device)
            with probe.stopping_after_last_layer():
                backbone(input_ids=input_ids, **no_cache)
            masses.append(probe.pop_masses())
        probe.query_mask = None
        return {None: torch.cat(masses)}


class MaskedDiffusionAdapter(DiffusionAdapter):
    """Absorbing-state (masked) DLMs: LLaDA, Dream, bidirectional Gemma with a mask token.

    Noise level ``t_k = k / K`` (k = 1..K) masks each token independently with probability
    ``(1 - eps) t_k + eps``, as the reference code does.
    """

    name = "masked"
    measures_while_sampling = True  # LLaDA's sampler: one full forward per step, on the step's input

    def __init__(self, mask_token_id: int, never_mask_token_ids: tuple[int, ...] | list[int] = ()):
        self.mask_token_id = int(mask_token_id)
        #: token ids the forward process leaves clean (the family never masks them in training: BOS, padding)
        self.never_mask_token_ids = tuple(int(i) for i in never_mask_token_ids)

    def forward_noise_states(self, tokens, *, levels, eps, seed):
        generator = sample_generator(tokens, seed)
        valid = torch.ones_like(tokens, dtype=torch.bool)
        protected = torch.isin(tokens, torch.tensor(self.never_mask_token_ids, dtype=tokens.dtype))
        states = []
        for k in range(1, levels + 1):
            t = k / levels
            p_mask = (1.0 - eps) * t + eps
            masked = (torch.rand(tokens.shape, generator=generator) < p_mask) & ~protected
            noisy = torch.where(masked, torch.full_like(tokens, self.mask_token_id), tokens)
            states.append(DenoisingState(noisy, valid, step=k - 1, noise_level=t))
        return states


    def sampler_states(self, model, tokens, *, steps, blocks, prompt_fraction, temperature, seed):
        from sink_modifier.sampling import masked_diffusion_sample

        if str(getattr(model.config, "model_type", "")).lower().startswith("dream"):  # Dream-7B: "Dream"
            raise AdapterError(
                "Dream predicts each token from the previous position (its sampler shifts logits), which this "
                "sampler does not do; use trajectory: forward_noise for Dream"
            )
        length = tokens.numel()
        answer = length - max(1, round(prompt_fraction * length))
        answer -= answer % blocks  # every block equally long; the prompt takes the rest
        if answer < blocks:
            raise AdapterError(
                f"A {length}-token sample leaves no answer of at least {blocks} tokens after its prompt; "
                "use longer samples, a smaller prompt_fraction or fewer sampler_blocks"
            )
        steps = max(blocks, min(steps, answer) // blocks * blocks)  # more steps than tokens would repeat states
        prompt = tokens[: length - answer]
        result = masked_diffusion_sample(
            model, prompt, answer_length=answer, steps=steps, num_blocks=blocks,
            mask_token_id=self.mask_token_id, temperature=temperature,
            seed=sample_generator(tokens, seed).initial_seed(), record_steps=True,
        )
        valid = torch.ones(length, dtype=torch.bool)
        masked_fraction = [float((state[-answer:] == self.mask_token_id).float().mean()) for state in result.steps]
        return [
            DenoisingState(state, valid, step=k, noise_level=level)
            for k, (state, level) in enumerate(zip(result.steps, masked_fraction, strict=True))
        ]


class AutoregressiveAdapter(DiffusionAdapter):
    """The control: an AR model "denoises" left to right, so state k is the prefix decoded after k steps.

    With causal attention a query never sees later keys, so every prefix's attention is exactly the full
    sequence's attention restricted to the prefix rows. States therefore keep the whole sequence as input and
    mark the prefix as ``valid``: one batched forward measures all K prefixes, and in calibration the rows past
    the prefix get weight 0.
    """

    name = "autoregressive"

    def forward_noise_states(self, tokens, *, levels, eps, seed):
        length = tokens.shape[0]
        positions = torch.arange(length)
        states = []
        for k in range(1, levels + 1):
            prefix = max(1, math.ceil(k * length / levels))
            states.append(DenoisingState(tokens, positions < prefix, step=k - 1, noise_level=k / levels))
        return states

    @torch.no_grad()
    def sampler_states(self, model, tokens, *, steps, blocks, prompt_fraction, temperature, seed):
        """Greedy decoding of the answer, then one state per decoding step (prefixes, as above)."""
        length = tokens.numel()
        prompt = tokens[: max(1, round(prompt_fraction * length))]
        answer = length - prompt.numel()
        device = next(model.parameters()).device
        generated = model.generate(
            input_ids=prompt[None].to(device), max_new_tokens=answer, min_new_tokens=answer, do_sample=False,
            pad_token_id=getattr(model.config, "pad_token_id", None) or 0,
        )[0].cpu()
        positions = torch.arange(length)
        states = []
        for k in range(1, steps + 1):
            decoded = prompt.numel() + math.ceil(k * answer / steps)
            states.append(DenoisingState(generated, positions < decoded, step=k - 1, noise_level=1 - k / steps))
        return states

    def query_mask(self, states):
        return torch.stack([s.valid for s in states])


def resolve_mask_token_id(model: torch.nn.Module, explicit: int | None) -> int | None:
    """The mask token id from the recipe, the model's config or generation config, or its tokenizer."""
    if explicit is not None:
        return explicit
    config = getattr(model, "config", None)
    for source in (config, getattr(model, "generation_config", None)):
        value = getattr(source, "mask_token_id", None)
        if value is not None:
            return int(value)
    name_or_path = getattr(config, "_name_or_path", None)
    if name_or_path and Path(name_or_path).is_dir() and not _has_tokenizer_files(Path(name_or_path)):
        # transformers 5 builds a default tokenizer of the model's family when a directory has no tokenizer
        # files; its mask token would be a guess, not the model's.
        return None
    if name_or_path:
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
        except Exception as error:  # a missing tokenizer is reported below as a missing mask token
            logger.debug(f"No tokenizer at {name_or_path}: {error}")
            return None
        if tokenizer.mask_token_id is not None:
            return int(tokenizer.mask_token_id)
    return None


def _has_tokenizer_files(directory: Path) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
    return any((directory / name).exists() for name in names)


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The backbone without the LM head: its logits are not needed to measure attention."""
    base = getattr(model, "base_model", model)
    return base if isinstance(base, torch.nn.Module) else model


def no_cache_kwargs(module: torch.nn.Module) -> dict:
    """``use_cache=False`` where the forward takes it: a trajectory forward never needs a KV cache."""
    parameters = inspect.signature(module.forward).parameters
    takes = "use_cache" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    return {"use_cache": False} if takes else {}


@torch.no_grad()
def attends_bidirectionally(model: torch.nn.Module) -> bool:
    """Whether changing the last token changes the first position's output under eager attention.

    llm-compressor calibrates with eager attention forced, so that is the mode that must be bidirectional
    (Gemma 1/2 with ``use_bidirectional_attention`` are bidirectional only under SDPA, for instance).
    """
    config = model.config
    vocab = int(getattr(config, "vocab_size", 8))
    first = torch.tensor([[1 % vocab, 2 % vocab, 3 % vocab, 4 % vocab]])
    second = first.clone()
    second[0, -1] = 5 % vocab
    device = next(model.parameters()).device
    previous = compat.attention_implementation(config)
    try:
        if previous is not None:
            compat.use_attention_implementation(config, "eager")
        kwargs = no_cache_kwargs(model)
        outputs = [model(input_ids=x.to(device), **kwargs).logits[0, 0] for x in (first, second)]
    finally:
        if previous is not None:
            compat.use_attention_implementation(config, previous)
    return not torch.equal(outputs[0], outputs[1])


def default_never_mask_token_ids(model: torch.nn.Module) -> tuple[int, ...]:
    """The special tokens a masked DLM is taken never to mask: its config's BOS and padding ids."""
    config = getattr(model, "config", None)
    ids = [getattr(config, name, None) for name in ("bos_token_id", "pad_token_id")]
    return tuple(sorted({int(i) for i in ids if isinstance(i, int)}))


def adapter_for(
    model: torch.nn.Module, *, family: AdapterName = "auto", mask_token_id: int | None = None,
    never_mask_token_ids: list[int] | None = None,
) -> DiffusionAdapter:
    """Pick the adapter for ``model``; ``auto`` decides by whether the model attends bidirectionally.

    ``never_mask_token_ids`` (masked family): token ids the forward process never masks; None means
    :func:`default_never_mask_token_ids`, an empty list masks every token."""
    from sink_modifier.diffusion_gemma import DiffusionGemmaAdapter, is_diffusion_gemma

    if is_diffusion_gemma(model):
        if family not in ("auto", DiffusionGemmaAdapter.name):
            raise AdapterError(f"DiffusionGemma uses uniform-token noise; set adapter: auto, not {family!r}")
        return DiffusionGemmaAdapter(model)
    if family == DiffusionGemmaAdapter.name:
        raise AdapterError(f"adapter: diffusion_gemma needs a DiffusionGemma model, not {type(model).__name__}")
    if family == "auto":
        family = "masked" if attends_bidirectionally(model) else "autoregressive"
        logger.info(f"Sink-aware pruning: {type(model).__name__} gets the {family!r} adapter")
    elif family == "masked" and not attends_bidirectionally(model):
        raise AdapterError(
            f"{type(model).__name__} attends causally under eager attention (which llm-compressor forces "
            "during calibration), so it is not a masked diffusion LM. Load a bidirectional model (e.g. a "
            "Gemma-3 config with use_bidirectional_attention=True) or set adapter: autoregressive."
        )
    if family == "autoregressive":
        return AutoregressiveAdapter()
    mask_id = resolve_mask_token_id(model, mask_token_id)
    if mask_id is None:
        raise AdapterError(
            "The masked forward process needs a mask token and none was found in the recipe, the model "
            "config (mask_token_id) or the tokenizer (mask_token). Set mask_token_id in the recipe."
        )
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and not 0 <= mask_id < vocab:
        raise AdapterError(f"mask_token_id {mask_id} is outside the vocabulary (size {vocab}).")
    protected = default_never_mask_token_ids(model) if never_mask_token_ids is None else never_mask_token_ids
    return MaskedDiffusionAdapter(mask_id, [i for i in protected if i != mask_id])
