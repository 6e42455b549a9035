"""The autoregressive control: an AR model "denoises" left to right, so state k is the prefix decoded after k
steps.

With causal attention a query never sees later keys, so every prefix's attention is exactly the full sequence's
attention restricted to the prefix rows. States therefore keep the whole sequence as input and mark the prefix as
``valid``: one batched forward measures all K prefixes, and in calibration the rows past the prefix get weight 0.
"""

from __future__ import annotations

import math

import torch

from sink_modifier.families.base import (
    AttentionMeasurement,
    CalibrationLayout,
    CheckpointHooks,
    DenoisingState,
    Family,
    NoiseProcess,
)
from sink_modifier.families.registry import FamilyOptions, FamilySpec, register


def prefix_states(tokens: torch.Tensor, decoded: list[int]) -> list[DenoisingState]:
    """One state per entry of ``decoded`` (tokens known so far); noise level = share still to decode."""
    length = tokens.shape[0]
    positions = torch.arange(length)
    return [DenoisingState(tokens, positions < known, step=k, noise_level=1 - known / length)
            for k, known in enumerate(decoded)]


class AutoregressiveControl(NoiseProcess, AttentionMeasurement, CalibrationLayout, CheckpointHooks):
    is_diffusion = False

    def forward_noise_states(self, tokens, *, levels, eps, seed):
        length = tokens.shape[0]
        return prefix_states(tokens, [max(1, math.ceil(k * length / levels)) for k in range(1, levels + 1)])

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
        decoded = [prompt.numel() + math.ceil(k * answer / steps) for k in range(1, steps + 1)]
        return prefix_states(generated, decoded)

    def query_mask(self, states):
        return torch.stack([s.valid for s in states])


def _build(model: torch.nn.Module, options: FamilyOptions, chosen_by_match: bool) -> Family:
    return Family.of("autoregressive", AutoregressiveControl())


register(FamilySpec("autoregressive", _build, matches=lambda model: True, priority=0,
                    description="causal LMs, driven left to right as a control"))
