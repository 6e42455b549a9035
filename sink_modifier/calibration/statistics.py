"""Attention-sink statistics for sink-aware pruning of diffusion language models.

Pure tensor code (no model) following "Sink-Aware Pruning for Diffusion Language Models"
(arXiv 2602.17664). Everything works on ONE calibration sample:

* ``mass`` ``[S, L, T]``: attention probability mass received by key position ``i`` in layer
  ``l`` at denoising state ``s`` (summed over heads and queries).
* ``valid`` ``[S, T]`` bool: ``False`` marks padding or a position absent from that state.
  Invalid entries never enter a mean/std/variance (their values may be garbage, even NaN/inf),
  and they get score 0 and row scale 0 so they contribute nothing to pruning statistics.

After :func:`scope_mass` the middle axis is a *group* axis ``G`` (1 for the paper's global
scope, ``L`` for per-layer scores). All functions return new tensors and never modify inputs.
Computation happens in float64 when the input is float64 and in float32 otherwise; all
variances/stds are population (``ddof=0``) statistics, as in the paper.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

ScoreKind = Literal["raw", "zscore"]
Scope = Literal["global", "layer"]
Selection = Literal["all", "unstable", "random", "none"]

__all__ = [
    "ScoreKind",
    "Scope",
    "Selection",
    "SinkSummary",
    "aggregate",
    "centroid_temporal_variance",
    "dominant_sink_variance",
    "mean_row_scales",
    "permute_valid",
    "row_scales",
    "scope_mass",
    "sink_scores",
    "sink_sets",
    "spatial_variance",
    "summarize",
    "temporal_stats",
]

# Absolute floor for the std in z-scores; a relative floor (see ``_sd_floor``) is added so that
# rounding noise in an all-equal row is not blown up into spurious z-scores.
ZSCORE_EPS = 1e-12


# --------------------------------------------------------------------------- helpers


def _work_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64 (exact tests / diagnostics); everything else is promoted to float32
    so half-precision attention dumps do not lose the small differences the scores rely on."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _as_float(x: Tensor) -> Tensor:
    return x.to(_work_dtype(x))


def _check(x: Tensor, valid: Tensor, name: str = "mass") -> None:
    """Fail loudly on shape mistakes: silent broadcasting of [S, T] against [S, G, T] is the most
    likely bug when wiring attention hooks."""
    if x.dim() != 3:
        raise ValueError(f"{name} must be [S, G, T], got shape {tuple(x.shape)}")
    if valid.dim() != 2:
        raise ValueError(f"valid must be [S, T], got shape {tuple(valid.shape)}")
    if valid.dtype != torch.bool:
        raise TypeError(f"valid must be a bool tensor, got {valid.dtype}")
    if (x.shape[0], x.shape[2]) != tuple(valid.shape):
        raise ValueError(
            f"{name} {tuple(x.shape)} and valid {tuple(valid.shape)} disagree on [S, T]"
        )


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    """Zero invalid entries via ``where`` (not multiplication) so NaN/inf padding cannot leak."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _masked_mean_var(x: Tensor, mask: Tensor, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, population variance and count of ``x`` over ``dim`` restricted to ``mask``.

    Two-pass (centred) variance for accuracy; empty reductions give mean 0, var 0, count 0.
    Reduced dim is kept so results broadcast back against ``x``.
    """
    w = mask.to(x.dtype)
    n = w.sum(dim=dim, keepdim=True)
    denom = n.clamp_min(1.0)
    xm = _masked(x, mask)
    mean = xm.sum(dim=dim, keepdim=True) / denom
    var = (_masked(x - mean, mask) ** 2).sum(dim=dim, keepdim=True) / denom
    return mean, var, n


def _state_stats(mass: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Float mass, its [S, G, T] mask, and per (state, group) mean / population std / valid count
    over positions (the last three keep a trailing singleton dim)."""
    m = _as_float(mass)
    mask = valid.unsqueeze(1).expand_as(m)
    mu, var, n = _masked_mean_var(m, mask, dim=-1)
    return m, mask, mu, var.sqrt(), n


def _sd_floor(m: Tensor, mask: Tensor) -> Tensor:
    """Std floor for z-scores: ZSCORE_EPS plus a few ulps of the row's magnitude, so an
    all-equal row gives z = 0 instead of rounding noise divided by ~0."""
    absmax = _masked(m.abs(), mask).amax(dim=-1, keepdim=True)
    return ZSCORE_EPS + 16.0 * torch.finfo(m.dtype).eps * absmax


# --------------------------------------------------------------------------- scores


def scope_mass(mass: Tensor, scope: Scope) -> Tensor:
    """Group layers for scoring.

    ``global`` sums over layers -> ``[S, 1, T]`` (the paper sums attention mass over all layers,
    so one sink set is shared by every layer); ``layer`` keeps ``[S, L, T]`` unchanged (a copy is
    not made; callers must not mutate it).
    """
    if mass.dim() != 3:
        raise ValueError(f"mass must be [S, L, T], got shape {tuple(mass.shape)}")
    if scope == "global":
        return mass.sum(dim=1, keepdim=True)
    if scope == "layer":
        return mass
    raise ValueError(f"unknown scope {scope!r}; expected 'global' or 'layer'")


def sink_scores(
    mass: Tensor,
    valid: Tensor,
    *,
    threshold_std: float = 2.0,
    sharpness: float = 5.0,
    kind: ScoreKind = "raw",
) -> Tensor:
    """Soft sink score in [0, 1] per (state, group, position) -> ``[S, G, T]``.

    Per (state, group) over valid positions: ``mu`` = mean, ``sd`` = population std.

    * ``raw`` (paper-faithful): ``sigmoid(sharpness * (m - (mu + threshold_std * sd)))``.
      Not scale-free: the sigmoid acts on raw mass units, so the same mass pattern gives
      harder scores for longer sequences / more layers.
    * ``zscore``: ``sigmoid(sharpness * ((m - mu) / max(sd, eps) - threshold_std))``; invariant
      to rescaling the mass (sequence length, number of layers summed).

    Invalid positions score 0. A state with fewer than 2 valid positions has no meaningful
    spread, so every position of that state scores 0 (nothing is treated as a sink there).
    """
    _check(mass, valid)
    m, mask, mu, sd, n = _state_stats(mass, valid)
    if kind == "raw":
        logits = sharpness * (m - (mu + threshold_std * sd))
    elif kind == "zscore":
        z = (m - mu) / torch.maximum(sd, _sd_floor(m, mask))
        logits = sharpness * (z - threshold_std)
    else:
        raise ValueError(f"unknown score kind {kind!r}; expected 'raw' or 'zscore'")
    keep = mask & (n >= 2)
    return _masked(torch.sigmoid(logits), keep)


def sink_sets(mass: Tensor, valid: Tensor, threshold_std: float = 2.0) -> Tensor:
    """Hard sink membership ``m > mu + threshold_std * sd`` per (state, group) -> bool
    ``[S, G, T]``. Same statistics and conventions as :func:`sink_scores` (invalid positions and
    states with < 2 valid positions are never sinks)."""
    _check(mass, valid)
    m, mask, mu, sd, n = _state_stats(mass, valid)
    return (m > mu + threshold_std * sd) & mask & (n >= 2)


def temporal_stats(scores: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and population variance of each position's score across the states where it is
    valid -> (``[G, T]``, ``[G, T]``). Large variance = the sink moves across denoising states.
    Positions valid in no state get 0, 0."""
    _check(scores, valid, "scores")
    s = _as_float(scores)
    mask = valid.unsqueeze(1).expand_as(s)
    mean, var, _ = _masked_mean_var(s, mask, dim=0)
    return mean.squeeze(0), var.squeeze(0)


def row_scales(
    scores: Tensor,
    valid: Tensor,
    *,
    selection: Selection = "all",
    unstable_variance: float = 0.02,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-token input-row multiplier for every Linear before Wanda/SparseGPT accumulate their
    statistics -> ``[S, G, T]``.

    The reference code multiplies inputs by ``1 - s``, so quadratic statistics (``X^T X``,
    ``||X||^2``) are weighted by ``(1 - s)^2``; sinks thus stop dominating the importance
    estimate.

    * ``all`` (paper): ``1 - s``.
    * ``unstable``: ``1 - s * u`` with ``u[g, i] = 1`` iff the temporal variance of position
      ``i``'s score exceeds ``unstable_variance``: stable sinks keep full weight, only sinks that
      move across denoising states are down-weighted.

    Two controls run through the same code path, so that only the weights differ:

    * ``random``: the ``all`` scales of each state permuted over that state's valid positions (one permutation
      per state, shared by its groups, drawn from ``generator``): the same amount of down-weighting, on random
      tokens instead of the sinks.
    * ``none``: validity alone (1 on valid positions): plain Wanda / SparseGPT on the same states and rows.

    Invalid positions get 0 (padding must not contribute to the statistics).
    """
    _check(scores, valid, "scores")
    s = _as_float(scores)
    mask = valid.unsqueeze(1).expand_as(s)
    s = _masked(s, mask)
    if selection in ("all", "random"):
        scale = 1.0 - s
        if selection == "random":
            scale = permute_valid(scale, valid, generator)
    elif selection == "unstable":
        _, var = temporal_stats(s, valid)
        u = (var > unstable_variance).to(s.dtype)
        scale = 1.0 - s * u.unsqueeze(0)
    elif selection == "none":
        scale = torch.ones_like(s)
    else:
        raise ValueError(f"unknown selection {selection!r}; expected 'all', 'unstable', 'random' or 'none'")
    return _masked(scale, mask)


def permute_valid(x: Tensor, valid: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``x`` ``[S, G, T]`` with each state's values at its valid positions permuted among those positions (one
    permutation per state, the same for every group); invalid positions are left as they are."""
    _check(x, valid, "x")
    out = x.clone()
    for state in range(x.shape[0]):
        positions = torch.nonzero(valid[state]).flatten()
        order = positions[torch.randperm(positions.numel(), generator=generator).to(positions.device)]
        out[state][:, positions] = x[state][:, order]
    return out


def mean_row_scales(scales: Tensor, valid: Tensor) -> Tensor:
    """Timestep-averaged multiplier per position over the states where it is valid -> ``[G, T]``.

    For the reference SparseGPT variant, which averages scores over noise levels and calibrates
    on clean text: ``1 - mean_t s_t == mean_t (1 - s_t)``. Positions valid in no state get 0.
    """
    mean, _ = temporal_stats(scales, valid)
    return mean


# --------------------------------------------------------------------------- diagnostics


def spatial_variance(mass: Tensor, valid: Tensor) -> Tensor:
    """Paper's spatial variance ``Var_i(mean_t m_t(i))`` per group -> ``[G]``.

    The time-mean uses only states where ``i`` is valid; the variance (population) runs over
    positions valid in at least one state. A moving sink averages out over time and lowers this
    number, which is why it is reported next to the temporal diagnostics.
    """
    _check(mass, valid)
    m = _as_float(mass)
    mask = valid.unsqueeze(1).expand_as(m)
    mbar, _, n_t = _masked_mean_var(m, mask, dim=0)  # [1, G, T], counts [1, G, T]
    _, var, _ = _masked_mean_var(mbar.squeeze(0), n_t.squeeze(0) > 0, dim=-1)
    return var.squeeze(-1)


def _population_var_over_states(x: Tensor, keep: Tensor) -> Tensor:
    """Population variance over dim 0 of ``x`` ``[S, G]`` restricted to ``keep``; < 2 kept -> 0."""
    _, var, n = _masked_mean_var(x, keep, dim=0)
    return torch.where(n >= 2, var, torch.zeros_like(var)).squeeze(0)


def centroid_temporal_variance(mass: Tensor, valid: Tensor, threshold_std: float = 2.0) -> Tensor:
    """Temporal variance of the mass-weighted sink centroid per group -> ``[G]``.

    ``c_t = sum_{i in S_t} m_t(i) * i / sum_{i in S_t} m_t(i)`` with ``S_t`` the hard sink set
    (:func:`sink_sets`) and ``i`` the absolute position index; ``Var_t(c_t)`` (population) over
    states with a non-empty sink set. Fewer than 2 such states -> 0. Large values mean the sink
    moves between denoising states.
    """
    sets = sink_sets(mass, valid, threshold_std)
    m = _masked(_as_float(mass), sets)
    pos = torch.arange(m.shape[-1], dtype=m.dtype, device=m.device)
    total = m.sum(dim=-1)  # [S, G]
    has = sets.any(dim=-1)
    centroid = (m * pos).sum(dim=-1) / torch.where(has, total, torch.ones_like(total))
    return _population_var_over_states(centroid, has)


def dominant_sink_variance(mass: Tensor, valid: Tensor) -> Tensor:
    """Population variance across states of ``argmax_i m_t(i)`` (over valid ``i``; ties -> first
    index) per group -> ``[G]``. States with no valid position are skipped; < 2 states -> 0."""
    _check(mass, valid)
    m = _as_float(mass)
    mask = valid.unsqueeze(1).expand_as(m)
    neg_inf = torch.full((), -math.inf, dtype=m.dtype, device=m.device)
    # NaN mass at a valid position would win argmax; treat it as -inf instead.
    filled = torch.where(mask & ~torch.isnan(m), m, neg_inf)
    arg = filled.argmax(dim=-1).to(m.dtype)  # [S, G]
    has = mask.any(dim=-1)
    return _population_var_over_states(arg, has)


# --------------------------------------------------------------------------- summaries


@dataclass
class SinkSummary:
    """Per-sample sink diagnostics as plain python values (JSON-serialisable via ``to_dict``).

    All list fields are per group (1 group for global scope, L for layer scope).
    ``sinks[g]`` are positions whose time-mean score > 0.5; ``unstable_sinks[g]`` is the subset
    whose score variance across states exceeds ``unstable_variance``.
    """

    spatial_variance: list[float]
    centroid_temporal_variance: list[float]
    dominant_sink_variance: list[float]
    mean_num_sinks: list[float]
    sinks: list[list[int]]
    unstable_sinks: list[list[int]]
    threshold_std: float = 2.0
    unstable_variance: float = 0.02
    num_states: int = 0
    num_positions: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def num_groups(self) -> int:
        return len(self.spatial_variance)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SinkSummary:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def summarize(
    mass: Tensor,
    valid: Tensor,
    scores: Tensor,
    *,
    threshold_std: float,
    unstable_variance: float,
) -> SinkSummary:
    """Bundle the diagnostics for one sample. ``mass`` and ``scores`` are both ``[S, G, T]``
    (i.e. ``mass`` already passed through :func:`scope_mass`). ``mean_num_sinks`` counts hard
    sinks per state, averaged over states that have at least one valid position."""
    _check(mass, valid)
    _check(scores, valid, "scores")
    if scores.shape != mass.shape:
        raise ValueError(
            f"scores {tuple(scores.shape)} and mass {tuple(mass.shape)} must have the same shape"
        )
    sets = sink_sets(mass, valid, threshold_std)  # [S, G, T]
    counts = sets.sum(dim=-1).to(torch.float64)  # [S, G]
    state_has = valid.any(dim=-1)  # [S]
    n_states = int(state_has.sum())
    if n_states > 0:
        mean_num = counts[state_has].mean(dim=0)
    else:
        mean_num = torch.zeros(mass.shape[1], dtype=torch.float64)

    mean, var = temporal_stats(scores, valid)
    is_sink = mean > 0.5
    is_unstable = is_sink & (var > unstable_variance)
    return SinkSummary(
        spatial_variance=spatial_variance(mass, valid).tolist(),
        centroid_temporal_variance=centroid_temporal_variance(mass, valid, threshold_std).tolist(),
        dominant_sink_variance=dominant_sink_variance(mass, valid).tolist(),
        mean_num_sinks=mean_num.tolist(),
        sinks=[torch.nonzero(row).flatten().tolist() for row in is_sink],
        unstable_sinks=[torch.nonzero(row).flatten().tolist() for row in is_unstable],
        threshold_std=float(threshold_std),
        unstable_variance=float(unstable_variance),
        num_states=int(mass.shape[0]),
        num_positions=int(mass.shape[2]),
    )


_AGG_FIELDS = (
    "spatial_variance",
    "centroid_temporal_variance",
    "dominant_sink_variance",
    "mean_num_sinks",
)


def aggregate(summaries: list[SinkSummary]) -> dict:
    """Combine per-sample summaries into a JSON-ready report: for each per-group diagnostic the
    mean and population std over samples (``{"mean": [G], "std": [G]}``), plus per-group counts
    of sinks / unstable sinks (``num_sinks``, ``num_unstable_sinks``) treated the same way.
    Population std keeps a single-sample report well defined (std 0)."""
    if not summaries:
        raise ValueError("aggregate() needs at least one SinkSummary")
    groups = summaries[0].num_groups
    for s in summaries:
        if s.num_groups != groups:
            raise ValueError("all summaries must have the same number of groups (same scope)")

    per_field: dict[str, list[list[float]]] = {
        name: [list(map(float, getattr(s, name))) for s in summaries] for name in _AGG_FIELDS
    }
    per_field["num_sinks"] = [[float(len(g)) for g in s.sinks] for s in summaries]
    per_field["num_unstable_sinks"] = [[float(len(g)) for g in s.unstable_sinks] for s in summaries]

    report: dict = {"num_samples": len(summaries), "num_groups": groups}
    for name, rows in per_field.items():
        t = torch.tensor(rows, dtype=torch.float64)  # [N, G]
        report[name] = {
            "mean": t.mean(dim=0).tolist(),
            "std": t.std(dim=0, correction=0).tolist(),
        }
    return report
