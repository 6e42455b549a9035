"""DiffusionGemma's routed experts for expert pruning.

After ``SharedWeights.prepare`` every decoder layer holds llm-compressor's ``LinearExperts2D`` and the encoder
layer calls the same module, as it calls the same router, so removing an expert from the decoder's modules
removes it from both streams: the encoder/decoder tie holds by construction. The router is a module of its own
(``router.proj`` Linear plus a ``per_expert_scale`` vector), which REAP's router surgery does not know.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sink_modifier.families.diffusion_gemma_checkpoint import _text_layers
from sink_modifier.families.moe import (
    ExpertLayout,
    MoeBlock,
    RoutingLimits,
    keep_expert_rows,
    keep_experts,
    set_expert_count,
)


class DiffusionGemmaExperts(ExpertLayout):
    def moe_blocks(self, model: torch.nn.Module) -> list[MoeBlock]:
        _, decoder_layers = _text_layers(model)
        named = {id(module): name for name, module in model.named_modules()}
        return [MoeBlock(named[id(layer)], layer.experts, index) for index, layer in enumerate(decoder_layers)]

    def routing_limits(self, model: torch.nn.Module) -> RoutingLimits:
        text = model.config.get_text_config()
        return RoutingLimits(int(text.num_experts), int(text.top_k_experts))

    def remove_experts(self, model: torch.nn.Module, block: MoeBlock, retained: Sequence[int]) -> None:
        layer = model.get_submodule(block.name)
        keep_experts(layer.experts, retained)
        keep_expert_rows(layer.router.proj, ("weight",), retained)
        keep_expert_rows(layer.router, ("per_expert_scale",), retained)
        set_expert_count((layer.experts,), len(retained))

    def rewrite_config(self, model: torch.nn.Module, num_experts: int) -> None:
        model.config.get_text_config().num_experts = num_experts
