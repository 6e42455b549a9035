"""Importance of MLP channels and KV-head groups, and how many of them a layer keeps.

Structured Wanda (the baseline of structured LLM pruning papers, e.g. FLAP's and Wanda's structured variant):
a unit's importance is the Wanda score of the input columns it owns in the layer that consumes it,

    I(u) = sum_{c in u} ||W[:, c]||_1 * sqrt(E_w[x_c^2]),

with ``W`` the down projection (a channel owns one column) or the attention output projection (a KV group owns
its query heads' columns) and ``E_w[x_c^2]`` the second moment of column ``c``'s input over the calibration
tokens, each token's row scaled by its sink row scale first, i.e. weighted by its square (docs/method.md).
The second moments are accumulated by llm-compressor's own Wanda accumulator (``accumulate_row_scalars``) on the
rows the sink-aware modifiers already weight, so unstructured and structured pruning see the same statistics.
``magnitude`` is the same score with every second moment 1.
"""

from __future__ import annotations

import math

import torch

from sink_modifier.compat import accumulate_row_scalars, make_empty_row_scalars
from sink_modifier.families.base import PrunableUnits

__all__ = ["ColumnMoments", "kept_count", "kept_units", "unit_importance"]


class ColumnMoments:
    """Running mean over calibration samples of every input column's (already weighted) squared norm."""

    def __init__(self, linear: torch.nn.Linear):
        self.values = make_empty_row_scalars(linear)
        self.samples = 0

    def add(self, linear: torch.nn.Linear, weighted_rows: torch.Tensor) -> None:
        self.values, self.samples = accumulate_row_scalars(weighted_rows, linear, self.values, self.samples)

    def reduce_across_ranks(self) -> None:
        """The all-data mean ``sum_r n_r mean_r / sum_r n_r`` when every rank calibrated on its own shard, so
        every rank keeps the same units (llm-compressor's Wanda never reduces; ``compat`` does it for it)."""
        import torch.distributed as dist

        count = torch.tensor(float(self.samples), device=self.values.device)
        total, weighted = count.clone(), self.values * count
        dist.all_reduce(weighted, op=dist.ReduceOp.SUM)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        self.values, self.samples = weighted / total, int(total.item())


def unit_importance(units: PrunableUnits, moments: dict[torch.nn.Linear, ColumnMoments] | None) -> torch.Tensor:
    """I(u) for every unit [count] (float32); ``moments`` None: weight magnitude only."""
    total = torch.zeros(units.count, dtype=torch.float32)
    for linear, span in units.columns:
        scores = linear.weight.detach().float().abs().sum(dim=0)  # ||W[:, c]||_1
        if moments is not None:
            scores = scores * moments[linear].values.to(scores.device).sqrt()
        total += scores.reshape(units.count, span).sum(dim=1).cpu()
    return total


def kept_units(importance: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` most important units, in their original order (ties: the earlier unit)."""
    order = torch.argsort(-importance, stable=True)
    return order[:keep].sort().values


def kept_count(total: int, sparsity: float, multiple: int = 1) -> int:
    """Units kept when ``sparsity`` of ``total`` go, rounded down to a multiple of ``multiple`` (so at least the
    asked share is removed)."""
    return math.floor(total * (1.0 - sparsity) / multiple + 1e-9) * multiple
