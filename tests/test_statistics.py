"""Hand-computed checks for sink_modifier.calibration.statistics (tiny tensors, CPU only)."""

from __future__ import annotations

import json
import math
import statistics as st

import pytest
import torch

from sink_modifier.calibration.statistics import (
    SinkSummary,
    aggregate,
    centroid_temporal_variance,
    dominant_sink_variance,
    mean_row_scales,
    row_scales,
    scope_mass,
    sink_scores,
    sink_sets,
    spatial_variance,
    summarize,
    temporal_stats,
)

F64 = torch.float64


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def one_state(values: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    mass = torch.tensor(values, dtype=F64).view(1, 1, -1)
    return mass, torch.ones(1, len(values), dtype=torch.bool)


def pattern(states: int, length: int, sinks_per_state, *, sink: float = 20.0, base: float = 1.0):
    """mass [S, 1, T] of `base` everywhere plus `sink` at the listed positions of each state."""
    mass = torch.full((states, 1, length), base, dtype=F64)
    for s in range(states):
        for pos in sinks_per_state(s):
            mass[s, 0, pos] = sink
    return mass, torch.ones(states, length, dtype=torch.bool)


# --------------------------------------------------------------------------- scores


def test_raw_score_hand_vector_population_std():
    mass, valid = one_state([10, 1, 1, 1, 1, 1])
    # mu = 15/6 = 2.5; population var = (7.5^2 + 5 * 1.5^2) / 6 = 11.25 (sample var would be 13.5)
    mu, sd = 2.5, math.sqrt(11.25)
    thr = mu + 2.0 * sd
    got = sink_scores(mass, valid, threshold_std=2.0, sharpness=5.0, kind="raw")
    assert got.shape == (1, 1, 6)
    assert got[0, 0, 0].item() == pytest.approx(sig(5.0 * (10 - thr)), rel=1e-12)
    assert got[0, 0, 0].item() == pytest.approx(0.98127, abs=1e-5)  # 7.5 - 3*sqrt(5)
    for i in range(1, 6):
        assert got[0, 0, i].item() == pytest.approx(sig(5.0 * (1 - thr)), rel=1e-9)


def test_raw_score_midrange_vector_against_statistics_module():
    vals = [0.5, 2.0, 1.0, 3.5]
    mass, valid = one_state(vals)
    mu, sd = st.fmean(vals), st.pstdev(vals)
    got = sink_scores(mass, valid, threshold_std=1.0, sharpness=0.5, kind="raw")[0, 0]
    want = [sig(0.5 * (m - (mu + 1.0 * sd))) for m in vals]
    assert got.tolist() == pytest.approx(want, rel=1e-12)
    assert 0.2 < min(want) and max(want) < 0.6  # genuinely soft values, not saturated 0/1


def test_zscore_hand_vector():
    vals = [10, 1, 1, 1, 1, 1]
    mass, valid = one_state(vals)
    sd = math.sqrt(11.25)
    got = sink_scores(mass, valid, threshold_std=2.0, sharpness=5.0, kind="zscore")[0, 0]
    assert got[0].item() == pytest.approx(sig(5.0 * (7.5 / sd - 2.0)), rel=1e-12)
    assert got[0].item() == pytest.approx(0.76501, abs=1e-5)  # z = sqrt(5)
    assert got[1].item() == pytest.approx(sig(5.0 * (-1.5 / sd - 2.0)), rel=1e-9)


def test_zscore_is_scale_invariant_raw_is_not():
    mass, valid = one_state([0.5, 2.0, 1.0, 3.5, 0.2])
    z1 = sink_scores(mass, valid, kind="zscore")
    z7 = sink_scores(mass * 7.0, valid, kind="zscore")
    torch.testing.assert_close(z1, z7)
    r1 = sink_scores(mass, valid, kind="raw")
    r7 = sink_scores(mass * 7.0, valid, kind="raw")
    assert not torch.allclose(r1, r7)


def test_zscore_constant_row_gives_floor_value_not_noise():
    mass = torch.full((1, 1, 7), 0.1, dtype=torch.float32)
    valid = torch.ones(1, 7, dtype=torch.bool)
    got = sink_scores(mass, valid, threshold_std=2.0, sharpness=5.0, kind="zscore")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.full_like(got, sig(-10.0)))


def test_invalid_positions_score_zero_and_do_not_change_mu_sd():
    vals = [10.0, 1.0, 2.0, 1.0, 3.0, 1.0]
    padded = torch.tensor(vals + [1e6, float("nan"), float("inf")], dtype=F64).view(1, 1, -1)
    valid = torch.tensor([[True] * 6 + [False] * 3])
    trunc, tvalid = one_state(vals)
    for kind in ("raw", "zscore"):
        got = sink_scores(padded, valid, kind=kind)
        ref = sink_scores(trunc, tvalid, kind=kind)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got[..., :6], ref)
        assert got[..., 6:].eq(0).all()
    # hard sink sets obey the same rule
    torch.testing.assert_close(sink_sets(padded, valid)[..., :6], sink_sets(trunc, tvalid))
    assert not sink_sets(padded, valid)[..., 6:].any()


def test_per_state_validity_is_respected():
    # state 0 uses positions 0..4, state 1 uses positions 2..6 (absent positions hold garbage)
    a, b = [9.0, 1.0, 2.0, 1.0, 1.5], [1.0, 8.0, 1.0, 2.0, 1.0]
    mass = torch.tensor([[a + [99.0, 99.0]], [[-5.0, -5.0] + b]], dtype=F64)
    valid = torch.tensor([[True] * 5 + [False] * 2, [False] * 2 + [True] * 5])
    got = sink_scores(mass, valid, kind="zscore")
    torch.testing.assert_close(got[0, :, :5], sink_scores(*one_state(a), kind="zscore")[0])
    torch.testing.assert_close(got[1, :, 2:], sink_scores(*one_state(b), kind="zscore")[0])
    assert got[0, 0, 5:].eq(0).all() and got[1, 0, :2].eq(0).all()


def test_state_with_fewer_than_two_valid_positions_scores_zero():
    mass = torch.tensor([[[5.0, 1.0, 1.0]], [[5.0, 1.0, 1.0]]], dtype=F64)
    valid = torch.tensor([[True, False, False], [False, False, False]])
    for kind in ("raw", "zscore"):
        assert sink_scores(mass, valid, kind=kind).eq(0).all()
    assert not sink_sets(mass, valid).any()


def test_shapes_and_errors():
    mass = torch.rand(3, 4, 6, dtype=F64)
    valid = torch.ones(3, 6, dtype=torch.bool)
    assert sink_scores(mass, valid).shape == (3, 4, 6)
    assert sink_scores(scope_mass(mass, "global"), valid).shape == (3, 1, 6)
    with pytest.raises(ValueError):
        sink_scores(mass, torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(TypeError):
        sink_scores(mass, torch.ones(3, 6))
    with pytest.raises(ValueError):
        sink_scores(mass, valid, kind="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        scope_mass(mass, "bogus")  # type: ignore[arg-type]


def test_inputs_are_not_modified():
    mass = torch.rand(3, 2, 6, dtype=F64)
    valid = torch.ones(3, 6, dtype=torch.bool)
    valid[0, 5] = False
    m0, v0 = mass.clone(), valid.clone()
    s = sink_scores(mass, valid)
    s0 = s.clone()
    row_scales(s, valid, selection="unstable")
    summarize(mass, valid, s, threshold_std=2.0, unstable_variance=0.02)
    assert torch.equal(mass, m0) and torch.equal(valid, v0) and torch.equal(s, s0)


# --------------------------------------------------------------------------- scope


def test_scope_global_sums_layers_layer_keeps_them():
    mass = torch.tensor([[[1.0, 2.0], [10.0, 20.0], [100.0, 200.0]]], dtype=F64)  # [1, 3, 2]
    g = scope_mass(mass, "global")
    assert g.shape == (1, 1, 2)
    assert g[0, 0].tolist() == [111.0, 222.0]
    assert torch.equal(scope_mass(mass, "layer"), mass)


# --------------------------------------------------------------------------- row scales


def moving_and_stable_scores():
    # S=4, T=16: position 0 is a sink in every state, 3 at even states, 7 at odd states.
    # per state: mu = 54/16, sd ~ 6.28, threshold ~ 15.9 < 20, so both sinks score ~1, others ~0.
    mass, valid = pattern(4, 16, lambda s: [0, 3 if s % 2 == 0 else 7])
    return sink_scores(mass, valid), valid


def test_row_scales_all_is_one_minus_score():
    scores = torch.tensor([[[0.9, 0.1, 0.5]], [[0.2, 0.3, 0.7]]], dtype=F64)
    valid = torch.tensor([[True, True, False], [True, True, True]])
    got = row_scales(scores, valid, selection="all")
    want = torch.tensor([[[0.1, 0.9, 0.0]], [[0.8, 0.7, 0.3]]], dtype=F64)
    torch.testing.assert_close(got, want)


def test_row_scales_unstable_downweights_only_moving_sinks():
    scores, valid = moving_and_stable_scores()
    assert scores[:, 0, 0].gt(0.999).all()  # stable sink
    assert scores[0::2, 0, 3].gt(0.999).all() and scores[1::2, 0, 3].lt(1e-6).all()
    assert scores[1::2, 0, 7].gt(0.999).all() and scores[0::2, 0, 7].lt(1e-6).all()

    uns = row_scales(scores, valid, selection="unstable", unstable_variance=0.02)
    assert uns.shape == (4, 1, 16)
    assert uns[:, 0, 0].eq(1.0).all()  # stable sink keeps full weight exactly
    assert uns[0::2, 0, 3].lt(1e-3).all() and uns[1::2, 0, 3].gt(0.999).all()
    assert uns[1::2, 0, 7].lt(1e-3).all() and uns[0::2, 0, 7].gt(0.999).all()
    others = [i for i in range(16) if i not in (0, 3, 7)]
    assert uns[:, 0, others].eq(1.0).all()

    alls = row_scales(scores, valid, selection="all")
    assert alls[:, 0, 0].lt(1e-3).all()  # paper variant also down-weights the stable sink
    assert alls[0::2, 0, 3].lt(1e-3).all() and alls[1::2, 0, 7].lt(1e-3).all()
    assert alls[:, 0, others].gt(0.999).all()


def test_row_scales_invalid_are_zero():
    scores = torch.full((2, 1, 3), 0.25, dtype=F64)
    valid = torch.tensor([[True, False, True], [False, True, True]])
    for sel, kept in (("all", 0.75), ("unstable", 1.0)):  # constant score -> not unstable
        got = row_scales(scores, valid, selection=sel)
        assert got[0, 0, 1] == 0 and got[1, 0, 0] == 0
        assert got[0, 0, 0].item() == pytest.approx(kept)


def test_temporal_stats_hand():
    scores = torch.tensor([[[1.0, 0.2]], [[0.0, 0.4]], [[1.0, 9.0]]], dtype=F64)
    valid = torch.tensor([[True, True], [True, True], [True, False]])
    mean, var = temporal_stats(scores, valid)
    assert mean.shape == var.shape == (1, 2)
    assert mean[0].tolist() == pytest.approx([2 / 3, 0.3])
    assert var[0].tolist() == pytest.approx([2 / 9, 0.01])  # population variances
    never = torch.zeros(3, 2, dtype=torch.bool)
    m0, v0 = temporal_stats(scores, never)
    assert m0.eq(0).all() and v0.eq(0).all()


def test_mean_row_scales_is_one_minus_mean_score_over_valid_states():
    scores = torch.tensor([[[0.8, 0.1, 0.3]], [[0.2, 0.5, 0.4]], [[0.5, 0.9, 0.6]]], dtype=F64)
    valid = torch.tensor([[True, True, False], [True, False, False], [True, True, False]])
    scales = row_scales(scores, valid, selection="all")
    got = mean_row_scales(scales, valid)
    assert got.shape == (1, 3)
    want = [1 - (0.8 + 0.2 + 0.5) / 3, 1 - (0.1 + 0.9) / 2, 0.0]
    assert got[0].tolist() == pytest.approx(want)


# --------------------------------------------------------------------------- diagnostics


def test_spatial_variance_hand():
    mass = torch.tensor([[[3.0, 1.0, 1.0, 1.0]], [[3.0, 1.0, 1.0, 1.0]]], dtype=F64)
    valid = torch.ones(2, 4, dtype=torch.bool)
    assert spatial_variance(mass, valid).tolist() == pytest.approx([0.75])
    # position 3 absent everywhere -> variance of [3, 1, 1] = 8/9
    valid2 = valid.clone()
    valid2[:, 3] = False
    assert spatial_variance(mass, valid2).tolist() == pytest.approx([8 / 9])
    # a sink swapping between two positions averages out: time means are all 2
    moving = torch.tensor([[[4.0, 0.0, 2.0, 2.0]], [[0.0, 4.0, 2.0, 2.0]]], dtype=F64)
    assert spatial_variance(moving, valid).tolist() == pytest.approx([0.0])
    # per-group output
    two = torch.cat([mass, moving], dim=1)
    assert spatial_variance(two, valid).tolist() == pytest.approx([0.75, 0.0])


def test_centroid_temporal_variance_moving_single_sink_is_four():
    mass, valid = pattern(4, 16, lambda s: [3 if s % 2 == 0 else 7])
    sets = sink_sets(mass, valid)
    assert [torch.nonzero(sets[s, 0]).flatten().tolist() for s in range(4)] == [[3], [7], [3], [7]]
    # centroids 3, 7, 3, 7 -> population variance 4
    assert centroid_temporal_variance(mass, valid).tolist() == pytest.approx([4.0])


def test_centroid_temporal_variance_with_stable_sink():
    # sinks {0, 3} at even states, {0, 7} at odd states, equal mass 20 -> centroids 1.5 / 3.5
    mass, valid = pattern(4, 32, lambda s: [0, 3 if s % 2 == 0 else 7])
    assert centroid_temporal_variance(mass, valid).tolist() == pytest.approx([1.0])
    stable, valid = pattern(4, 32, lambda s: [5])
    assert centroid_temporal_variance(stable, valid).tolist() == pytest.approx([0.0])


def test_centroid_temporal_variance_needs_two_states_with_sinks():
    mass, valid = pattern(3, 16, lambda s: [3] if s == 0 else [])
    assert centroid_temporal_variance(mass, valid).tolist() == [0.0]


def test_dominant_sink_variance_hand():
    stable, valid = pattern(4, 16, lambda s: [0, 3 if s % 2 == 0 else 7])
    stable[:, 0, 0] = 30.0  # position 0 always the argmax
    assert dominant_sink_variance(stable, valid).tolist() == pytest.approx([0.0])
    moving, valid = pattern(4, 16, lambda s: [3 if s % 2 == 0 else 7])
    assert dominant_sink_variance(moving, valid).tolist() == pytest.approx([4.0])
    # an invalid position with huge mass never becomes the argmax
    padded = stable.clone()
    padded[1, 0, 9] = 1e9
    pvalid = valid.clone()
    pvalid[1, 9] = False
    assert dominant_sink_variance(padded, pvalid).tolist() == pytest.approx([0.0])


# --------------------------------------------------------------------------- summaries


def test_summarize_hand():
    # T=32: position 0 always a sink (30); position 3 a sink at states 0-2, position 7 at state 3
    mass, valid = pattern(4, 32, lambda s: [3] if s < 3 else [7])
    mass[:, 0, 0] = 30.0
    scores = sink_scores(mass, valid)
    summ = summarize(mass, valid, scores, threshold_std=2.0, unstable_variance=0.02)
    assert summ.sinks == [[0, 3]]  # 7 has mean score ~0.25 < 0.5
    assert summ.unstable_sinks == [[3]]  # score variance ~3/16
    assert summ.mean_num_sinks == pytest.approx([2.0])
    assert summ.dominant_sink_variance == pytest.approx([0.0])
    # centroids (20*3)/50 = 1.2 (x3) and (20*7)/50 = 2.8 -> population variance 0.48
    assert summ.centroid_temporal_variance == pytest.approx([0.48])
    time_means = [30.0, 1.0, 1.0, 15.25, 1.0, 1.0, 1.0, 5.75] + [1.0] * 24
    assert summ.spatial_variance == pytest.approx([st.pvariance(time_means)])
    d = json.loads(json.dumps(summ.to_dict()))
    assert d["sinks"] == [[0, 3]] and d["num_states"] == 4 and d["num_positions"] == 32
    assert SinkSummary.from_dict(d) == summ


def make_summary(sv, ctv, dsv, nsinks, sinks, unstable) -> SinkSummary:
    return SinkSummary(
        spatial_variance=sv,
        centroid_temporal_variance=ctv,
        dominant_sink_variance=dsv,
        mean_num_sinks=nsinks,
        sinks=sinks,
        unstable_sinks=unstable,
    )


def test_aggregate_mean_and_std_over_samples():
    a = make_summary([1.0, 3.0], [0.0, 4.0], [2.0, 2.0], [1.0, 2.0], [[0], [0, 3]], [[], [3]])
    b = make_summary([3.0, 5.0], [4.0, 4.0], [2.0, 6.0], [3.0, 2.0], [[0, 5, 9], [0]], [[5], []])
    rep = aggregate([a, b])
    assert rep["num_samples"] == 2 and rep["num_groups"] == 2
    assert rep["spatial_variance"] == {"mean": [2.0, 4.0], "std": [1.0, 1.0]}
    assert rep["centroid_temporal_variance"] == {"mean": [2.0, 4.0], "std": [2.0, 0.0]}
    assert rep["dominant_sink_variance"] == {"mean": [2.0, 4.0], "std": [0.0, 2.0]}
    assert rep["mean_num_sinks"] == {"mean": [2.0, 2.0], "std": [1.0, 0.0]}
    assert rep["num_sinks"] == {"mean": [2.0, 1.5], "std": [1.0, 0.5]}
    assert rep["num_unstable_sinks"] == {"mean": [0.5, 0.5], "std": [0.5, 0.5]}
    json.dumps(rep)
    single = aggregate([a])
    assert single["spatial_variance"] == {"mean": [1.0, 3.0], "std": [0.0, 0.0]}
    with pytest.raises(ValueError):
        aggregate([])
    with pytest.raises(ValueError):
        aggregate([a, make_summary([1.0], [0.0], [0.0], [1.0], [[0]], [[]])])
