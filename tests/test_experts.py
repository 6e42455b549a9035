"""Sink-aware expert pruning: the saliency against a hand computation on a tiny MoE layer, the removal of the least
salient experts, and the routing limits that are refused before calibration."""

from __future__ import annotations

import contextlib

import pytest
import torch
from llmcompressor.core import active_session
from llmcompressor.modeling.moe.context import moe_calibration_context
from llmcompressor.modeling.moe.linear_experts import LinearExperts2D
from llmcompressor.modifiers.pruning.reap.utils import REAPSaliencyTracker
from transformers import DiffusionGemmaTextConfig
from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaTextExperts

from sink_modifier import SinkAwareExpertPruningModifier
from sink_modifier.calibration.handoff import SinkCalibration
from sink_modifier.calibration.scales import StateScales
from sink_modifier.calibration.trajectory import TrajectorySettings
from sink_modifier.errors import UserError
from sink_modifier.families import Family
from sink_modifier.families.moe import ExpertLayout, MoeBlock, RoutingLimits
from sink_modifier.modifiers.experts import SinkWeightedSaliency

EXPERTS, TOP_K, TOKENS = 6, 2, 7


class TinyMoe(torch.nn.Module):
    """One MoE layer laid out as REAP expects: ``experts`` (LinearExperts2D) and a router Linear."""

    def __init__(self):
        super().__init__()
        config = DiffusionGemmaTextConfig(hidden_size=8, moe_intermediate_size=4, num_experts=EXPERTS,
                                          top_k_experts=TOP_K)
        fused = DiffusionGemmaTextExperts(config)
        torch.nn.init.normal_(fused.gate_up_proj)
        torch.nn.init.normal_(fused.down_proj)
        self.experts = LinearExperts2D.get_linear_experts_cls(type(fused)).from_experts_module(fused, config)
        self.router = torch.nn.Linear(8, EXPERTS, bias=False)


def routed_inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(TOKENS, 8, generator=generator)
    top_k_index = torch.stack([torch.randperm(EXPERTS, generator=generator)[:TOP_K] for _ in range(TOKENS)])
    top_k_weights = torch.rand(TOKENS, TOP_K, generator=generator)
    token_weights = torch.rand(TOKENS, generator=generator)
    token_weights[2] = 0.0  # a sink row that counts for nothing
    return hidden, top_k_index, top_k_weights, token_weights


@torch.no_grad()
def hand_saliency(layer: TinyMoe, hidden, top_k_index, top_k_weights, token_weights) -> torch.Tensor:
    """S_j = sum_t w_t g_tj ||f_j(x_t)|| / sum_t w_t over the tokens t routed to j (0 if none weigh anything)."""
    saliency = torch.zeros(EXPERTS, dtype=torch.float64)
    for j in range(EXPERTS):
        total = weight = 0.0
        for t in range(TOKENS):
            for slot in range(TOP_K):
                if top_k_index[t, slot] == j:
                    norm = float(layer.experts[j](hidden[t : t + 1]).double().norm())
                    total += float(token_weights[t]) * float(top_k_weights[t, slot]) * norm
                    weight += float(token_weights[t])
        saliency[j] = total / weight if weight > 0 else 0.0
    return saliency


@contextlib.contextmanager
def calibrating(modifier: SinkAwareExpertPruningModifier, layer: TinyMoe, token_weights: torch.Tensor):
    """The modifier hooked on ``layer`` as on_calibration_start leaves it, fed one state's row scales."""
    modifier._family = Family("tiny", None, None, None, None, experts=ExpertLayout())
    modifier._limits = RoutingLimits(EXPERTS, TOP_K)
    modifier._drop = modifier._limits.experts_to_drop(modifier.sparsity)
    modifier._blocks = {"": MoeBlock("", layer.experts, 0)}
    scales = StateScales([{None: token_weights.reshape(1, 1, TOKENS)}])
    state = active_session().state
    previous = getattr(state, "current_batch_idx", None)
    state.current_batch_idx = 0
    try:
        modifier.receive_calibration(SinkCalibration(None, TrajectorySettings(), scales))
        modifier.on_calibration_start(state, None)
        yield
    finally:
        modifier.remove_hooks()
        state.current_batch_idx = previous


@pytest.mark.parametrize("all_experts", [False, True], ids=["routed-tokens", "all-experts"])
def test_saliency_is_the_sink_weighted_mean_of_router_weight_times_output_norm(all_experts):
    torch.manual_seed(0)
    layer = TinyMoe()
    hidden, top_k_index, top_k_weights, token_weights = routed_inputs()
    modifier = SinkAwareExpertPruningModifier(sparsity=0.5)
    with calibrating(modifier, layer, token_weights), \
            (moe_calibration_context() if all_experts else contextlib.nullcontext()), torch.no_grad():
        layer.experts(hidden, top_k_index, top_k_weights)
        saliency = modifier._trackers[""].mean_saliency
    expected = hand_saliency(layer, hidden, top_k_index, top_k_weights, token_weights)
    torch.testing.assert_close(saliency, expected, rtol=1e-6, atol=1e-9)


def test_with_every_token_weighing_one_it_is_reaps_saliency():
    torch.manual_seed(1)
    layer = TinyMoe()
    hidden, top_k_index, top_k_weights, _ = routed_inputs(seed=3)
    with torch.no_grad():
        outputs = {j: layer.experts[j](hidden) for j in range(EXPERTS)}
    routed = {j: (top_k_index == j).any(-1).nonzero().squeeze(-1) for j in range(EXPERTS)}
    ours, reap = SinkWeightedSaliency(EXPERTS), REAPSaliencyTracker(EXPERTS)
    ours.add(top_k_index, top_k_weights, {j: (routed[j], outputs[j][routed[j]]) for j in range(EXPERTS)},
             torch.ones(TOKENS))
    with moe_calibration_context():
        reap.update(top_k_index, top_k_weights, {j: outputs[j].norm(dim=-1) for j in range(EXPERTS)})
    torch.testing.assert_close(ours.mean_saliency, reap.mean_saliency, rtol=1e-12, atol=0)


def test_the_least_salient_experts_go_and_the_router_follows():
    torch.manual_seed(2)
    layer = TinyMoe()
    dense_router = layer.router.weight.detach().clone()
    experts = [layer.experts[j] for j in range(EXPERTS)]
    hidden, top_k_index, top_k_weights, token_weights = routed_inputs(seed=5)
    modifier = SinkAwareExpertPruningModifier(sparsity=0.5)
    with calibrating(modifier, layer, token_weights), torch.no_grad():
        layer.experts(hidden, top_k_index, top_k_weights)
        saliency = modifier._trackers[""].mean_saliency
        modifier.on_sequential_epoch_end(type("State", (), {"model": layer})(), None)
    dropped = set(torch.argsort(saliency)[: EXPERTS // 2].tolist())
    retained = modifier.pruned_experts[""]["retained"]
    assert retained == [j for j in range(EXPERTS) if j not in dropped]
    assert all(saliency[j] >= saliency[d] for j in retained for d in dropped)
    # experts renumbered in order, the router's rows follow them, counts updated
    assert [layer.experts[i] for i in range(len(retained))] == [experts[j] for j in retained]
    assert torch.equal(layer.router.weight, dense_router[retained])
    assert layer.router.out_features == layer.experts.num_experts == len(retained) == EXPERTS // 2
    assert hasattr(layer.experts, "act_fn")


@pytest.mark.parametrize("limits, sparsity, message", [
    (RoutingLimits(8, 2), 0.1, "removes no expert"),
    (RoutingLimits(8, 2), 0.9, "fewer than the 2"),
    (RoutingLimits(16, 4, n_group=4, topk_group=2), 0.125, "routing groups uneven"),
    (RoutingLimits(16, 4, n_group=4, topk_group=1), 0.25, "fewer than the 4"),
])
def test_routing_that_pruning_would_break_is_refused_in_one_line(limits, sparsity, message):
    with pytest.raises(UserError, match=message) as error:
        limits.experts_to_drop(sparsity)
    assert "\n" not in str(error.value)


def test_group_limited_routing_keeps_groups_even():
    assert RoutingLimits(16, 4, n_group=4, topk_group=2).experts_to_drop(0.25) == 4
    assert RoutingLimits(256, 8, n_group=8, topk_group=4).experts_to_drop(0.5) == 128


@pytest.mark.parametrize("value", [0.0, 1.0, -0.2])
def test_sparsity_is_a_share_of_experts(value):
    with pytest.raises(ValueError):
        SinkAwareExpertPruningModifier(sparsity=value)
