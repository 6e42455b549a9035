"""LLaDA2.x (``model_type: llada2_moe``; LLaDA2.0-mini / -flash, LLaDA2.1; remote code): block diffusion with
group-limited MoE routing.

* **Attention.** The published forward attends bidirectionally when the model was *built* for SDPA (its mask
  path is fixed at construction; llm-compressor's forced eager attention later does not change it) and causally
  when built for eager attention, where its own ``generate()`` also masks every key. A model that does not attend
  bidirectionally under eager attention is refused with the fix (load it with SDPA, the default).
* **Mask token.** The config has none; the recipe's, the tokenizer's, or else the default of the model's own
  ``generate()`` (``mask_id``, 156895 for the published tokenizer) is used.
* **MoE.** Every expert is calibrated on every token (``published_moe``); the router (``mlp.gate``, with its
  ``expert_bias``) is never pruned; expert pruning removes the same number of experts from every routing group
  (``n_group`` / ``topk_group``).
"""

from __future__ import annotations

import dataclasses
import inspect

import torch

from sink_modifier.families.base import FamilyError
from sink_modifier.families.llada_moe import PublishedMoeMasked, with_experts
from sink_modifier.families.masked import attends_bidirectionally, masked_builder, resolve_mask_token_id
from sink_modifier.families.published_moe import PublishedExperts
from sink_modifier.families.registry import FamilyOptions, FamilySpec, register

MODEL_TYPE = "llada2_moe"


def route(block: torch.nn.Module, gate_output) -> tuple[torch.Tensor, torch.Tensor]:
    """``LLaDA2MoeGate`` returns ``(topk_idx, topk_weight, logits)``: the routing the block applies."""
    return gate_output[0], gate_output[1]


class LLaDA2(PublishedMoeMasked):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # LLaDA2MoeGate.group_limited_topk scores each group by the sum of its two best experts
        self.experts_role = PublishedExperts(route, group_keys=("n_group", "topk_group"), min_per_group=2,
                                             expert_buffers=("expert_bias",))


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
