"""The modifier computes what the paper's reference code computes, and nothing else.

Expected values here are computed by hand from eager attention probabilities and the formulas, not through the
package's own code path.
"""

from __future__ import annotations

import math

import pytest
import torch
from llmcompressor import oneshot
from llmcompressor.core import active_session
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

from conftest import calibration_dataset, load_model
from sink_modifier import SinkAwarePruningModifier
from sink_modifier.calibration.handoff import SinkCalibration
from sink_modifier.calibration.scales import StateScales
from sink_modifier.calibration.trajectory import TrajectorySettings, run_trajectory
from sink_modifier.families import Family
from sink_modifier.families.masked import MaskedDiffusion
from sink_modifier.modifiers.engines import ENGINES
from tests.toy import MASK_ID

ALPHA, K = 5.0, 2.0
MASKED = Family.of("masked", MaskedDiffusion(MASK_ID))


def wired_engine(modifier, method: str, linear, scales: torch.Tensor):
    """llm-compressor's engine, fed through the modifier's row weighting with ``scales`` [B, G, T] as batch 0."""
    session = active_session()
    session.reset()
    modifier._module_names[linear] = "down_proj"
    modifier._calibration = SinkCalibration(MASKED, TrajectorySettings(), StateScales([{None: scales}]))
    engine = ENGINES[method](sparsity=0.5)
    engine.weigh_rows_with(modifier._weighted_rows)
    session.state.current_batch_idx = 0
    return engine


@torch.no_grad()
def hand_row_scales(model, states) -> torch.Tensor:
    """Reference: layer-summed column mass of eager attention, sigmoid(alpha (m - mean - k std)), 1 - s."""
    model.config._attn_implementation = "eager"
    scales = []
    for state in states:
        out = model(input_ids=state.input_ids[None], output_attentions=True, use_cache=False)
        mass = sum(a[0].sum(dim=(0, 1)) for a in out.attentions).double()  # heads, queries, then layers
        mean = mass.mean()
        std = math.sqrt(((mass - mean) ** 2).mean())  # population std, as numpy's default in the reference
        scales.append(1 - torch.sigmoid(ALPHA * (mass - (mean + K * std))))
    return torch.stack(scales)


def test_trajectory_matches_hand_computed_reference(dlm_path):
    model = load_model(dlm_path)
    tokens = torch.tensor([2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 1])
    settings = TrajectorySettings(noise_levels=4, sink_sharpness=ALPHA, sink_threshold_std=K, query_chunk_size=5)
    (sample,) = run_trajectory(model, MASKED, [tokens], settings, progress=False).samples
    expected = hand_row_scales(model, sample.states)
    assert sample.row_scales.shape == (4, 1, tokens.numel())
    torch.testing.assert_close(sample.row_scales[:, 0].double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(sample.mean_row_scales[0].double(), expected.mean(0), atol=1e-5, rtol=0)
    # the forward process: level k masks with probability (1 - eps) k/K + eps; the last level masks nearly all
    assert [s.noise_level for s in sample.states] == [0.25, 0.5, 0.75, 1.0]
    assert (sample.states[-1].input_ids == MASK_ID).float().mean() > 0.8


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_rows_are_weighted_by_their_row_scale(dlm_path, method):
    """Wanda accumulates sum (r x)^2 / n per column; SparseGPT accumulates (2/n) sum (r x)(r x)^T."""
    model = load_model(dlm_path)
    layer = model.model.layers[0]
    linear = layer.mlp.down_proj
    modifier = SinkAwarePruningModifier(method=method, targets=["Gemma3DecoderLayer"])
    torch.manual_seed(0)
    x = torch.randn(1, 6, linear.in_features)
    r = torch.tensor([[[1.0, 0.5, 0.0, 0.25, 1.0, 0.75]]])  # [B, G, T]
    engine = wired_engine(modifier, method, linear, r)
    engine.calibrate_module(linear, (x,), None)
    weighted = (x[0] * r[0, 0, :, None]).double()
    if method == "wanda":
        torch.testing.assert_close(engine._row_scalars[linear].double(), (weighted**2).sum(0),
                                   atol=1e-6, rtol=1e-5)
    else:
        torch.testing.assert_close(engine._hessians[linear].double(), 2 * weighted.T @ weighted,
                                   atol=1e-4, rtol=1e-5)


def _pruned_weights(path, recipe):
    model = load_model(path)
    oneshot(model=model, dataset=calibration_dataset(path), recipe=recipe, shuffle_calibration_samples=False)
    return {n: p.detach().clone() for n, p in model.named_parameters() if "layers" in n}


@pytest.mark.parametrize(
    "method, mask_structure, baseline",
    [("wanda", "2:4", WandaPruningModifier), ("wanda", "0:0", WandaPruningModifier),
     ("sparsegpt", "0:0", SparseGPTModifier), ("sparsegpt", "2:4", SparseGPTModifier)],
)
def test_unit_weights_reproduce_llm_compressor_exactly(dlm_path, method, mask_structure, baseline):
    """Row scales of exactly 1 (no sink is unstable enough) give llm-compressor's own result, bit for bit."""
    ours = SinkAwarePruningModifier(
        sparsity=0.5, mask_structure=mask_structure, method=method,
        sink_selection="unstable", unstable_variance=1.0,  # score variance is at most 0.25
    )
    theirs = baseline(sparsity=0.5, mask_structure=mask_structure, targets=["Gemma3DecoderLayer"])
    a, b = _pruned_weights(dlm_path, [ours]), _pruned_weights(dlm_path, [theirs])
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert (a["model.layers.0.mlp.up_proj.weight"] == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_sink_weights_change_the_masks(dlm_path):
    ours = SinkAwarePruningModifier(sparsity=0.5, method="wanda", sink_score="zscore", sink_threshold_std=1.0)
    theirs = WandaPruningModifier(sparsity=0.5, targets=["Gemma3DecoderLayer"])
    a, b = _pruned_weights(dlm_path, [ours]), _pruned_weights(dlm_path, [theirs])
    assert any(not torch.equal(a[n] == 0, b[n] == 0) for n in a)


def test_two_dimensional_rows_need_the_all_experts_flag(dlm_path):
    """Expert Linears see [tokens, d] rows in token order only under llm-compressor's all-experts flag."""
    from llmcompressor.modeling.moe.context import moe_calibration_context

    model = load_model(dlm_path)
    linear = model.model.layers[0].mlp.down_proj
    modifier = SinkAwarePruningModifier(targets=["Gemma3DecoderLayer"])
    r = torch.tensor([[[1.0, 0.5, 0.0, 0.25, 1.0, 0.75]]])
    engine = wired_engine(modifier, "wanda", linear, r)
    rows = torch.randn(6, linear.in_features)
    with pytest.raises(ValueError, match="moe_calibrate_all_experts=True"):
        engine.calibrate_module(linear, (rows,), None)
    with moe_calibration_context():
        engine.calibrate_module(linear, (rows,), None)
    weighted = (rows * r[0, 0, :, None]).double()
    torch.testing.assert_close(engine._row_scalars[linear].double(), (weighted**2).sum(0),
                               atol=1e-6, rtol=1e-5)
