"""Absorbing-state (masked) DLMs: LLaDA, Dream, bidirectional Gemma with a mask token.

Noise level ``t_k = k / K`` (k = 1..K) masks each token independently with probability ``(1 - eps) t_k + eps``,
as the reference code does; positions holding a token the model never sees masked in training (its BOS and
padding, by default; recipe field ``never_mask_token_ids``) stay clean. The model's own sampler is LLaDA's
(one full forward per step, on the step's input).
"""

from __future__ import annotations

import weakref
from pathlib import Path

import torch
from loguru import logger

from sink_modifier import compat
from sink_modifier.families.base import (
    AttentionMeasurement,
    CalibrationLayout,
    CheckpointHooks,
    DenoisingState,
    Family,
    FamilyError,
    NoiseProcess,
    Scoring,
    no_cache_kwargs,
    noise_schedule,
)
from sink_modifier.families.registry import FamilyOptions, FamilySpec, register
from sink_modifier.families.structure import DREAM, widths_for
from sink_modifier.seeding import content_generator


class MaskedDiffusion(NoiseProcess, AttentionMeasurement, CalibrationLayout, CheckpointHooks, Scoring):
    measures_while_sampling = True
    likelihood = "elbo"
    generation = "masked"

    def __init__(self, mask_token_id: int, never_mask_token_ids: tuple[int, ...] = ()):
        self.mask_token_id = int(mask_token_id)
        self.never_mask_token_ids = tuple(int(t) for t in never_mask_token_ids)

    def forward_noise_states(self, tokens, *, levels, eps, seed):
        generator = content_generator(tokens, seed)
        valid = torch.ones_like(tokens, dtype=torch.bool)
        maskable = ~torch.isin(tokens, torch.tensor(self.never_mask_token_ids, dtype=tokens.dtype))
        states = []
        for k, t, p_mask in noise_schedule(levels, eps):
            masked = (torch.rand(tokens.shape, generator=generator) < p_mask) & maskable
            noisy = torch.where(masked, torch.full_like(tokens, self.mask_token_id), tokens)
            states.append(DenoisingState(noisy, valid, step=k - 1, noise_level=t))
        return states

    def sampler_states(self, model, tokens, *, steps, blocks, prompt_fraction, temperature, seed):
        from sink_modifier.families.sampling import masked_diffusion_sample

        length = tokens.numel()
        answer = length - max(1, round(prompt_fraction * length))
        answer -= answer % blocks  # every block equally long; the prompt takes the rest
        if answer < blocks:
            raise FamilyError(
                f"A {length}-token sample leaves no answer of at least {blocks} tokens after its prompt; "
                "use longer samples, a smaller prompt_fraction or fewer sampler_blocks"
            )
        steps = max(blocks, min(steps, answer) // blocks * blocks)  # more steps than tokens would repeat states
        prompt = tokens[: length - answer]
        result = masked_diffusion_sample(
            model, prompt, answer_length=answer, steps=steps, num_blocks=blocks,
            mask_token_id=self.mask_token_id, temperature=temperature,
            seed=content_generator(tokens, seed).initial_seed(), record_steps=True, logits=self.token_logits,
        )
        valid = torch.ones(length, dtype=torch.bool)
        masked_fraction = [float((state[-answer:] == self.mask_token_id).float().mean()) for state in result.steps]
        return [
            DenoisingState(state, valid, step=k, noise_level=level)
            for k, (state, level) in enumerate(zip(result.steps, masked_fraction, strict=True))
        ]


class Dream(MaskedDiffusion):
    """Dream-7B: a masked DLM whose logits at position ``i`` predict token ``i + 1`` (initialised from Qwen2.5,
    an AR model); its ``generation_utils.py`` shifts them by one position before sampling, and so do the sampler
    and every scorer here (``Scoring.logit_shift``)."""

    logit_shift = 1

    def prepare(self, model):
        """The mask adapter (below) for a Dream model loaded without ``sink_modifier.load_model``."""
        _install_dream_input_adapters(model)


def _padding_mask_as_sdpa_mask(module, args, kwargs):
    """Dream's published layers hand ``attention_mask`` to ``scaled_dot_product_attention`` as given: its own
    ``generate()`` builds a 4-D boolean mask, but llm-compressor and the scorers pass the usual 2-D 0/1 padding
    mask (``Expected attn_mask dtype to be bool or float``). A 2-D mask becomes the 4-D boolean key mask
    (all ones: no mask at all, which is the same attention)."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        kwargs["attention_mask"] = None if bool(mask.all()) else mask.bool()[:, None, None, :]
        return args, kwargs
    return None


_ADAPTED: weakref.WeakSet = weakref.WeakSet()  # Dream models whose layers already convert masks


def _install_dream_input_adapters(model: torch.nn.Module) -> None:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not is_dream(model) or model in _ADAPTED or layers is None:
        return
    for layer in layers:
        layer.register_forward_pre_hook(_padding_mask_as_sdpa_mask, with_kwargs=True)
    _ADAPTED.add(model)


def resolve_mask_token_id(model: torch.nn.Module, explicit: int | None) -> int | None:
    """The mask token id from the recipe, the model's config or generation config, or its tokenizer."""
    if explicit is not None:
        return explicit
    config = getattr(model, "config", None)
    for source in (config, getattr(model, "generation_config", None)):
        value = getattr(source, "mask_token_id", None)
        if value is not None:
            return int(value)
    name_or_path = compat.name_or_path(config)
    if name_or_path and Path(name_or_path).is_dir() and not _has_tokenizer_files(Path(name_or_path)):
        # transformers 5 builds a default tokenizer of the model's family when a directory has no tokenizer
        # files; its mask token would be a guess, not the model's.
        return None
    if name_or_path:
        try:
            from transformers import AutoTokenizer

            # never remote code here: without trust_remote_code=False transformers asks on the terminal
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True, trust_remote_code=False)
        except Exception as error:  # a missing tokenizer is reported below as a missing mask token
            logger.debug(f"No tokenizer at {name_or_path}: {error}")
            return None
        if tokenizer.mask_token_id is not None:
            return int(tokenizer.mask_token_id)
    return None


def _has_tokenizer_files(directory: Path) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
    return any((directory / name).exists() for name in names)


def default_never_masked(model: torch.nn.Module) -> tuple[int, ...]:
    """The special tokens a masked DLM's training never masks: its config's BOS (pretraining masks the text
    after it) and padding ids."""
    config = getattr(model, "config", None)
    ids = [getattr(config, name, None) for name in ("bos_token_id", "pad_token_id")]
    return tuple(sorted({int(i) for i in ids if isinstance(i, int)}))


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


def is_dream(model: torch.nn.Module) -> bool:
    return str(getattr(getattr(model, "config", None), "model_type", "")).lower().startswith("dream")


def _build(implementation: type[MaskedDiffusion], name: str, widths=widths_for):
    def build(model: torch.nn.Module, options: FamilyOptions, chosen_by_match: bool) -> Family:
        if not chosen_by_match and not attends_bidirectionally(model):
            raise FamilyError(
                f"{type(model).__name__} attends causally under eager attention (which llm-compressor forces "
                "during calibration), so it is not a masked diffusion LM. Load a bidirectional model (e.g. a "
                "Gemma-3 config with use_bidirectional_attention=True) or set family: autoregressive."
            )
        mask_id = resolve_mask_token_id(model, options.mask_token_id)
        if mask_id is None:
            raise FamilyError(
                "The masked forward process needs a mask token and none was found in the recipe, the model "
                "config (mask_token_id) or the tokenizer (mask_token). Set mask_token_id in the recipe."
            )
        vocab = getattr(model.config, "vocab_size", None)
        if vocab is not None and not 0 <= mask_id < vocab:
            raise FamilyError(f"mask_token_id {mask_id} is outside the vocabulary (size {vocab}).")
        never = options.never_mask_token_ids
        never = default_never_masked(model) if never is None else never
        return Family.of(name, implementation(mask_id, tuple(t for t in never if t != mask_id)), widths(model))

    return build


register(FamilySpec(
    "masked", _build(MaskedDiffusion, "masked"), matches=attends_bidirectionally, priority=10,
    description="absorbing-state DLMs that attend bidirectionally (LLaDA, Gemma with a mask token)",
))
register(FamilySpec(
    "dream", _build(Dream, "dream", lambda model: DREAM),
    matches=lambda m: is_dream(m) and attends_bidirectionally(m), priority=20,
    description="Dream-7B-style masked DLMs with shifted logits", on_load=_install_dream_input_adapters,
))


#: for families built on the masked one (LLaDA-MoE, LLaDA2): ``masked_builder(implementation_class, name)``
masked_builder = _build
