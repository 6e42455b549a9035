"""The mask-decision diagnostic: exact on hand-made statistics, large with a planted massive-activation sink,
small on the bundled DLM (whose sinks carry no massive activations)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sink_modifier import families
from sink_modifier.calibration.statistics import SinkSummary
from sink_modifier.calibration.trajectory import (
    SampleTrajectory,
    TrajectoryResult,
    TrajectorySettings,
    run_trajectory,
)
from sink_modifier.cli.diagnostics import diagnose, moved_decisions, verdict
from sink_modifier.families import DenoisingState


def test_moved_decisions_by_hand():
    linear = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 3.0, 2.0, 1.0]]))
    same = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert moved_decisions(linear, same, same * 7, sparsity=0.5) == 0.0  # the scale of a statistic is irrelevant
    # row 0: |W| sqrt(S) orders by S: prune {0,1} vs {2,3} -> 4 moved; row 1: 4,2.8,1.7,1 vs 8,5.2,2.8,1 -> same
    assert moved_decisions(linear, same, same.flip(0), sparsity=0.5) == pytest.approx(4 / 8)
    # 2:4 picks per group of four: the same decisions here
    assert moved_decisions(linear, same, same.flip(0), sparsity=0.5, prune_n=2, prune_m=4) == pytest.approx(4 / 8)


class Planted(nn.Module):
    """Embedding -> two Linear "decoder layers"; token 7's embedding is 300x the others (a massive activation)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(16, 32)
        with torch.no_grad():
            self.embed.weight[7] *= 300
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 32)) for _ in range(2))

    def forward(self, input_ids, **kwargs):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = x + layer(x)
        return x


def planted_result(sink_position: int, length: int = 12, states: int = 3) -> TrajectoryResult:
    tokens = torch.tensor([t for t in range(1, 16) if t != 7][:length])
    tokens[2] = 7  # the only massive-activation token
    scores = torch.zeros(states, 1, length)
    scores[:, 0, sink_position] = 0.99
    sample = SampleTrajectory(
        tokens=tokens, states=[DenoisingState(tokens, torch.ones(length, dtype=torch.bool), k, k / states)
                               for k in range(states)],
        scores=scores, row_scales=1 - scores, mean_row_scales=(1 - scores).mean(0),
        summary=SinkSummary.__new__(SinkSummary))
    return TrajectoryResult(samples=[sample])


def test_a_planted_massive_activation_sink_moves_many_decisions():
    model = Planted()
    layers = {f"layers.{i}": layer for i, layer in enumerate(model.layers)}
    found = diagnose(model, planted_result(sink_position=2), layers, sparsity=0.5)
    first = found["layers"][0]
    assert first["sink_input_share"] > 0.9  # the sink row holds nearly all of the input energy
    assert first["sink_norm_ratio"] > 10
    assert found["moved_decisions"] > 0.05 and "noticeably" in found["verdict"]
    # the same model with the sink weight on an ordinary token: the massive row keeps dominating both statistics
    quiet = diagnose(model, planted_result(sink_position=5), layers, sparsity=0.5)
    assert quiet["layers"][0]["sink_input_share"] < 0.05
    assert quiet["moved_decisions"] < found["moved_decisions"]


@pytest.mark.slow
def test_bundled_dlm_moves_few_decisions():
    from sink_modifier.bundled import bundled_model_path, load_eval_slice
    from sink_modifier.loading.checkpoints import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(bundled_model_path("dlm"), dtype="float32")
    texts = load_eval_slice()[:4]
    samples = [torch.tensor(tokenizer(t, truncation=True, max_length=96)["input_ids"]) for t in texts]
    settings = TrajectorySettings(noise_levels=4)
    result = run_trajectory(model, families.resolve(model), samples, settings, progress=False)
    layers = {f"model.layers.{i}": layer for i, layer in enumerate(model.model.layers)}
    found = diagnose(model, result, layers, sparsity=0.5)
    assert 0 < found["moved_decisions"] < 0.02, found["moved_decisions"]
    assert found["verdict"] == verdict(found["moved_decisions"])
    assert all(layer["sink_norm_ratio"] is None or layer["sink_norm_ratio"] < 3 for layer in found["layers"])
