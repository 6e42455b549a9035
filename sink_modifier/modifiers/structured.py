"""``SinkAwareStructuredPruningModifier``: remove whole MLP channels and KV-head groups, sink-aware.

Unstructured and 2:4 zeros make no runtime faster (compressed-tensors stores them densely); removing channels
and heads gives a smaller dense model every runtime runs faster. The modifier follows llm-compressor's
structural precedent, ``REAPPruningModifier``: statistics by hooks in each layer's calibration pass, the layer
shrunk when its sequential epoch ends (so the propagate pass already runs the smaller layer), the config
rewritten at finalize. The sink lifecycle and the weighted rows are the unstructured modifier's (``sink_rows``);
the importance math is in ``unit_scores``, which Linears form a unit in the family's ``LayerWidths``, and the
recipe checks in ``structured_checks``.
"""

from __future__ import annotations

from typing import Literal

import torch
from compressed_tensors.offload.dist_utils import is_distributed
from compressed_tensors.utils import match_named_modules
from llmcompressor.core import Event, State, active_session
from llmcompressor.modifiers import Modifier
from loguru import logger
from pydantic import Field, PrivateAttr

from sink_modifier.families.base import PrunableUnits
from sink_modifier.modifiers.sink_rows import SinkRowWeighting
from sink_modifier.modifiers.slicing import keep_units
from sink_modifier.modifiers.structured_checks import Plan, check_recipe, check_same_pass, plan_widths
from sink_modifier.modifiers.unit_scores import ColumnMoments, kept_units, unit_importance

__all__ = ["SinkAwareStructuredPruningModifier"]


class SinkAwareStructuredPruningModifier(Modifier, SinkRowWeighting):
    """Shrink every decoder layer by whole MLP channels and KV-head groups, ranked by sink-weighted statistics.

    ```yaml
    structured_stage:
      pruning_modifiers:
        SinkAwareStructuredPruningModifier:
          sparsity: 0.5        # MLP channels removed in every layer
          head_sparsity: 0.5   # KV-head groups removed in every layer, each with its query heads
          method: wanda
    ```
    Every field is documented in docs/recipes.md.
    """

    requires_calibration_data: bool = True
    sparsity: float = Field(0.5, ge=0.0, lt=1.0)
    head_sparsity: float = Field(0.0, ge=0.0, lt=1.0)
    method: Literal["wanda", "magnitude"] = "wanda"
    # kept channels are a multiple of this (None: the recipe's largest quantization group size, else 8)
    round_to: int | None = Field(None, ge=1)

    _plan: Plan | None = PrivateAttr(None)
    _pending: dict[str, tuple[PrunableUnits | None, PrunableUnits | None]] = PrivateAttr(default_factory=dict)
    _moments: dict[torch.nn.Linear, ColumnMoments] = PrivateAttr(default_factory=dict)
    _kept: dict[str, dict[str, list[int]]] = PrivateAttr(default_factory=dict)

    # ---- lifecycle ----

    def on_initialize(self, state: State, **kwargs) -> bool:
        model = state.model
        layers = self._resolve_scope(state, **kwargs)
        all_layers = dict(match_named_modules(
            model, self._family.calibration.layer_targets(model) or self._sequential_targets))
        modifiers = active_session().lifecycle.recipe.modifiers
        self._plan = plan_widths(model, self._family.structure, self, modifiers)
        check_recipe(self, modifiers)
        self._pending = self._plan.units(layers, all_layers, self._module_names)
        logger.info(self._plan.describe())
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        check_same_pass(self, active_session().lifecycle.recipe.modifiers)
        if self.method == "magnitude":
            return  # weights only: no rows to weigh
        self._start_sink_calibration(state)
        for channels, groups in self._pending.values():
            for units in (channels, groups):
                for linear, _ in units.columns if units is not None else ():
                    self._moments[linear] = ColumnMoments(linear)
                    self.register_hook(linear, self._accumulate, "forward")

    def on_sequential_epoch_end(self, state: State, event: Event, **kwargs):
        if self.method == "wanda":
            self._verify_rows()
        done = set(kwargs.get("modules") or ())
        for name in [name for name, units in self._pending.items() if _calibrated(units, done)]:
            self._shrink(name)

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        self.remove_hooks()
        for name in list(self._pending):  # pipelines without sequential epochs (basic)
            self._shrink(name)

    def on_finalize(self, state: State, **kwargs) -> bool:
        if self._pending:
            raise RuntimeError(f"{len(self._pending)} layers were never calibrated: {sorted(self._pending)[:3]}")
        if self._kept:
            self._save.config_fields.update(self._plan.rewrite_config(state.model.config))
        self._finish_sink_calibration()
        if self._save is not None and self._save.report is not None:
            self._save.report = {**self._save.report, "structured": self.summary()}
        self._moments = {}
        return True

    def summary(self) -> dict:
        """Widths before and after, and the units each layer kept (in the sink report)."""
        return {**self._plan.widths(), "method": self.method, "kept": dict(self._kept)}

    # ---- statistics and shrinking ----

    def _accumulate(self, module: torch.nn.Linear, args: tuple, _output):
        self._moments[module].add(module, self._weighted_rows(module, args[0]))

    @torch.no_grad()
    def _shrink(self, name: str) -> None:
        channels, groups = self._pending.pop(name)
        kept = {}
        for key, units, keep in (("channels", channels, self._plan.kept_channels),
                                 ("kv_groups", groups, self._plan.kept_kv_groups)):
            if units is None:
                continue
            moments = None if self.method == "magnitude" else {
                linear: self._moments.pop(linear) for linear, _ in units.columns}
            if moments is not None and is_distributed():  # every rank saw its own shard
                for moment in moments.values():
                    moment.reduce_across_ranks()
            if moments is not None and not all(m.samples for m in moments.values()):
                raise RuntimeError(f"{name} received no calibration rows, so its units cannot be ranked")
            chosen = kept_units(unit_importance(units, moments), keep)
            keep_units(units, chosen)
            kept[key] = chosen.tolist()
        self._kept[name] = kept


def _calibrated(units: tuple, done: set) -> bool:
    """Whether a layer's sequential epoch just ended (its Linears were in the epoch's subgraph)."""
    linears = [linear for group in units if group is not None for linear, _ in group.columns]
    return any(linear in done for linear in linears)
