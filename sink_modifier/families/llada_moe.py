"""LLaDA-MoE (``model_type: lladamoe``; LLaDA-MoE-7B-A1B, remote code): a masked DLM with mixture-of-experts MLPs.

Its attention is bidirectional under every implementation, and its forward process and sampler are LLaDA's, so
noise, measurement and scoring are the masked family's. What differs is the MoE: every expert is calibrated on
every token (``published_moe``), the router ``mlp.gate`` (a Linear) is never pruned, and expert pruning knows
how the block routes. Its config has no ``mask_token_id``: the tokenizer's mask token (or the recipe's) is used.
"""

from __future__ import annotations

import dataclasses

import torch

from sink_modifier.families.base import Family, FamilyError
from sink_modifier.families.masked import MaskedDiffusion, masked_builder
from sink_modifier.families.published_moe import PublishedExperts
from sink_modifier.families.registry import FamilyOptions, FamilySpec, register

MODEL_TYPE = "lladamoe"


def route(block: torch.nn.Module, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing ``LLaDAMoESparseMoeBlock.forward`` computes from its gate's logits (softmax, the optional
    expert bias added to the probabilities, top-k, renormalised only if the block says so); written out here
    because the published block computes it inline."""
    weights = torch.softmax(logits, dim=1, dtype=torch.float)
    if getattr(block, "expert_bias", None) is not None:
        weights = weights + block.expert_bias
    weights, index = torch.topk(weights, block.top_k, dim=-1)
    if block.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return index, weights.to(logits.dtype)


class PublishedMoeMasked(MaskedDiffusion):
    """A masked DLM whose published MoE blocks are calibrated on every token (LLaDA-MoE, LLaDA2)."""

    experts_role: PublishedExperts

    def prepare(self, model: torch.nn.Module) -> None:
        self.experts_role.install(model)

    def check_scope(self, names: list[str]) -> None:
        routers = [n for n in names if n.endswith(".gate")]
        if routers:
            raise FamilyError(f"The recipe would prune the MoE router {routers[0]}; routers pick the experts and "
                              "are never pruned: add 're:.*\\.gate$' to ignore")


class LLaDAMoE(PublishedMoeMasked):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.experts_role = PublishedExperts(route, expert_buffers=("expert_bias",))


def is_llada_moe(model: torch.nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == MODEL_TYPE


def with_experts(build):
    """A masked family's builder whose family also carries its implementation's experts role."""
    def built(model: torch.nn.Module, options: FamilyOptions, chosen_by_match: bool) -> Family:
        family = build(model, options, chosen_by_match)
        return dataclasses.replace(family, experts=family.checkpoint.experts_role)
    return built


register(FamilySpec(
    "llada_moe", with_experts(masked_builder(LLaDAMoE, "llada_moe")), matches=is_llada_moe, priority=60,
    claims=True, description="LLaDA-MoE (masked diffusion, published MoE blocks)",
))
