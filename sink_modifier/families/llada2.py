"""LLaDA2.x (``model_type: llada2_moe``; LLaDA2.0-mini / -flash, LLaDA2.1; remote code): block diffusion with
group-limited MoE routing.

* **Attention.** The published forward attends bidirectionally when the model was *built* for SDPA (its mask
  path is fixed at construction; llm-compressor's forced eager attention later does not change it) and causally
  when built for eager attention, where its own ``generate()`` also masks every key. A model that does not attend
  bidirectionally under eager attention is refused with the fix (load it with SDPA, the default).
* **Mask token.** The config has none; the recipe's, the tokenizer's, or else the default of the model's own
  ``generate()`` (``mask_id``, 156895 for the published tokenizer) is used.
* **Sampler.** ``trajectory: sampler`` records the model's own ``generate()``: block by block, each step one
  forward over the prompt and the blocks so far, attending block-causally (bidirectionally inside the current
  block). Each step is a state at its own length (``BlockCausalState``); measurement, row scales and calibration
  use that length and that mask.
* **MoE.** Every expert is calibrated on every token (``published_moe``); the router (``mlp.gate``, with its
  ``expert_bias``) is never pruned; expert pruning removes the same number of experts from every routing group
  (``n_group`` / ``topk_group``).
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import torch

from sink_modifier.families.base import DenoisingState, FamilyError, base_model
from sink_modifier.families.llada_moe import PublishedMoeMasked, with_experts
from sink_modifier.families.masked import attends_bidirectionally, masked_builder, resolve_mask_token_id
from sink_modifier.families.published_moe import PublishedExperts
from sink_modifier.families.registry import FamilyOptions, FamilySpec, register
from sink_modifier.hooks import removing
from sink_modifier.seeding import content_generator

MODEL_TYPE = "llada2_moe"


def route(block: torch.nn.Module, gate_output) -> tuple[torch.Tensor, torch.Tensor]:
    """``LLaDA2MoeGate`` returns ``(topk_idx, topk_weight, logits)``: the routing the block applies."""
    return gate_output[0], gate_output[1]


@dataclasses.dataclass(frozen=True)
class BlockCausalState(DenoisingState):
    """One step of ``generate()``: ``input_ids`` padded to the sample's full length, the first ``length``
    positions (``valid``) the forward's input, attending block-causally in blocks of ``block_length``."""

    length: int = 0
    block_length: int = 0

    def attention_mask(self) -> torch.Tensor:
        """[1, 1, L, L] bool, True where a query may attend: its own block and every block before it."""
        block = torch.arange(self.length) // self.block_length
        return (block[None, :] <= block[:, None])[None, None]


class LLaDA2(PublishedMoeMasked):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # LLaDA2MoeGate.group_limited_topk scores each group by the sum of its two best experts
        self.experts_role = PublishedExperts(route, group_keys=("n_group", "topk_group"), min_per_group=2,
                                             expert_buffers=("expert_bias",))

    @torch.no_grad()
    def sampler_states(self, model, tokens, *, steps, blocks, prompt_fraction, temperature, seed):
        """The states of the model's own ``generate()`` completing the sample's prompt: ``blocks`` blocks (of
        ``ceil(answer / blocks)`` tokens) with ``steps / blocks`` denoising steps each."""
        prompt = tokens[: max(1, round(prompt_fraction * tokens.numel()))]
        answer = tokens.numel() - prompt.numel()
        block_length = max(1, math.ceil(answer / blocks))
        total = math.ceil((prompt.numel() + answer) / block_length) * block_length
        records: list[torch.Tensor] = []

        def record(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            records.append(ids[0].detach().cpu().clone())
            mask = kwargs.get("attention_mask")
            dtype = next(module.parameters()).dtype
            if isinstance(mask, torch.Tensor) and mask.is_floating_point() and mask.dtype != dtype:
                # generate() builds its additive mask in bfloat16; SDPA needs the model's dtype
                kwargs["attention_mask"] = mask.to(dtype)
                return args, kwargs
            return None

        device = next(model.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                removing(base_model(model).register_forward_pre_hook(record, with_kwargs=True)):
            torch.manual_seed(content_generator(tokens, seed).initial_seed())
            model.generate(prompt[None].to(device), temperature=temperature, block_length=block_length,
                           steps=max(1, steps // blocks), gen_length=answer, mask_id=self.mask_token_id)
        if not records:
            raise FamilyError("LLaDA2's generate() ran no denoising step; use a longer sample or prompt_fraction")
        states = []
        for index, ids in enumerate(records):
            padded = torch.full((total,), self.mask_token_id, dtype=torch.long)
            padded[: ids.numel()] = ids
            generated = padded[prompt.numel() : prompt.numel() + answer]
            states.append(BlockCausalState(
                padded, torch.arange(total) < ids.numel(), step=index,
                noise_level=float((generated == self.mask_token_id).float().mean()),
                length=ids.numel(), block_length=block_length))
        return states

    def measure_while_sampling(self, model, probe, sample):
        """``generate()``'s own forwards, one per state, each at its own length (placed at the start)."""
        masses = []
        # generate() calls self.forward, not the module: the backbone's hooks see every step
        with removing(base_model(model).register_forward_hook(lambda *_: masses.append(probe.pop_masses()))):
            states = sample()
        if len(masses) != len(states):
            raise RuntimeError(f"generate() made {len(masses)} forwards for {len(states)} recorded states")
        total = states[0].input_ids.numel()
        placed = torch.zeros(len(states), masses[0].shape[1], total)
        for index, mass in enumerate(masses):
            placed[index, :, : mass.shape[-1]] = mass[0]
        return states, {None: placed}

    def calibration_batches(self, states):
        """Forward-noise states as they are; a sampler step at its length, with its block-causal mask."""
        batches = []
        for state in states:
            if isinstance(state, BlockCausalState):
                batches.append({"input_ids": state.input_ids[: state.length][None],
                                "attention_mask": state.attention_mask()})
            else:
                batches.append({"input_ids": state.input_ids[None]})
        return batches

    @staticmethod
    def stream_scales(state, scales):
        return {None: scales[:, : state.length] if isinstance(state, BlockCausalState) else scales}


def is_llada2(model: torch.nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == MODEL_TYPE


def generate_mask_id(model: torch.nn.Module) -> int | None:
    """The ``mask_id`` default of the model's own ``generate()``."""
    parameter = inspect.signature(model.generate).parameters.get("mask_id")
    default = None if parameter is None else parameter.default
    return default if isinstance(default, int) else None


_masked_build = with_experts(masked_builder(LLaDA2, "llada2"))


def _build(model: torch.nn.Module, options: FamilyOptions, chosen_by_match: bool):
    if not attends_bidirectionally(model):
        raise FamilyError(f"{type(model).__name__} was loaded with eager attention, where its published code "
                          "attends causally (and its generate() masks every key); load it with "
                          "attn_implementation='sdpa' (the default)")
    if resolve_mask_token_id(model, options.mask_token_id) is None:
        fallback = generate_mask_id(model)
        vocab = getattr(model.config, "vocab_size", 0)
        if fallback is not None and fallback < vocab:
            options = dataclasses.replace(options, mask_token_id=fallback)
    return _masked_build(model, options, True)


register(FamilySpec(
    "llada2", _build, matches=is_llada2, priority=60, claims=True,
    description="LLaDA2.x (block diffusion, group-limited MoE routing)",
))
