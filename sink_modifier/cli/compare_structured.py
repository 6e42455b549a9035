"""The cells of ``sink-prune compare --structured``: structured pruning against its ablations.

The same design as the unstructured comparison (``sink_modifier.cli.compare``), with whole MLP channels and KV-head
groups removed by ``SinkAwareStructuredPruningModifier``:

* ``structured-magnitude``: channels / groups ranked by the L1 norm of their down_proj / o_proj columns (no
  data, run once);
* ``structured-wanda``: structured Wanda on the clean samples, rows unweighted (default pipeline);
* ``structured-wanda_noised`` (the ablation): the noised states with validity weights only
  (``sink_selection: none``, ``pipeline="diffusion"``);
* ``sink_structured-wanda_all`` / ``_unstable``: the sink-aware runs on the same states;
* ``sink_structured-wanda_random``: the random-row control.

A structured sparsity is ``C`` (share of MLP channels removed) or ``C/H`` (and share of KV-head groups).
The method names and default sparsities are ``compare.STRUCTURED_METHODS`` / ``STRUCTURED_SPARSITIES`` (the
CLI reads them for ``--help`` without importing anything heavy).
"""

from __future__ import annotations

__all__ = ["label", "recipe", "widths"]


def widths(sparsity: str) -> tuple[float, float]:
    """(channel sparsity, KV-group sparsity) of a structured sparsity string."""
    channels, _, heads = sparsity.partition("/")
    return float(channels), float(heads or 0.0)


def label(sparsity: str) -> str:
    channels, heads = widths(sparsity)
    return f"{channels:.0%} ch" + (f" + {heads:.0%} KV" if heads else "")


def _clean_structured_wanda():
    from sink_modifier.modifiers.structured import SinkAwareStructuredPruningModifier

    class CleanStructuredWanda(SinkAwareStructuredPruningModifier):
        """Structured Wanda on the clean calibration rows as they are: no trajectory, every row weight 1."""

        def _start_sink_calibration(self, state) -> None:
            pass

        def _verify_rows(self) -> None:
            pass

        def _weighted_rows(self, module, inp):
            return inp.float()

    return CleanStructuredWanda


def recipe(method: str, sparsity: str, targets: list[str], *, seed: int = 0, noise_levels: int = 10):
    """(modifiers, pipeline) of one structured cell."""
    from sink_modifier.modifiers.structured import SinkAwareStructuredPruningModifier

    channels, heads = widths(sparsity)
    common = dict(sparsity=channels, head_sparsity=heads, targets=targets, seed=seed, noise_levels=noise_levels)
    if method == "structured-magnitude":
        return [SinkAwareStructuredPruningModifier(method="magnitude", **common)], "independent"
    if method == "structured-wanda":
        return [_clean_structured_wanda()(**common)], "independent"
    selection = "none" if method.endswith("_noised") else method.rsplit("_", 1)[1]
    return [SinkAwareStructuredPruningModifier(sink_selection=selection, **common)], "diffusion"
