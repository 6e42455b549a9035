"""What a structured pruning run will remove, and every refusal that can be made before calibration.

A pruned checkpoint is only loadable if its config describes every layer, so the widths are planned once for
all layers (uniform) and refused, in one line each, when they cannot be: a rounding multiple larger than what
is kept, KV groups that do not divide, a quantization group that does not divide the kept width, a config that
cannot say the new shape, or a recipe that calibrates another modifier on the dense widths of layers this one
shrinks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from llmcompressor.modifiers.quantization import QuantizationMixin, QuantizationModifier

from sink_modifier.compat import SparsityModifierBase
from sink_modifier.errors import UserError
from sink_modifier.families.base import LayerWidths, PrunableUnits
from sink_modifier.modifiers.unit_scores import kept_count
from sink_modifier.modifiers.weight_pruning import SinkAwarePruningModifier

#: the rounding multiple when neither the recipe (round_to) nor a quantization group size gives one
DEFAULT_MULTIPLE = 8
_NAME = "SinkAwareStructuredPruningModifier"


@dataclass
class Plan:
    """The widths every decoder layer goes from and to."""

    structure: LayerWidths
    config: object
    channels: int
    heads: int
    kv_heads: int
    kept_channels: int
    kept_kv_groups: int
    multiple: int

    @property
    def prunes_channels(self) -> bool:
        return self.kept_channels < self.channels

    @property
    def prunes_heads(self) -> bool:
        return self.kept_kv_groups < self.kv_heads

    @property
    def kept_heads(self) -> int:
        return self.kept_kv_groups * (self.heads // self.kv_heads) if self.kv_heads else self.heads

    def widths(self) -> dict:
        return {"channels": [self.channels, self.kept_channels], "heads": [self.heads, self.kept_heads],
                "kv_heads": [self.kv_heads, self.kept_kv_groups], "round_to": self.multiple}

    def describe(self) -> str:
        return (f"Structured pruning: MLP channels {self.channels} -> {self.kept_channels} (multiple of "
                f"{self.multiple}), heads {self.heads} -> {self.kept_heads}, KV heads {self.kv_heads} -> "
                f"{self.kept_kv_groups} in every layer")

    def units(
        self, layers: dict[str, torch.nn.Module], all_layers: dict[str, torch.nn.Module],
        in_scope: dict[torch.nn.Module, str],
    ) -> dict[str, tuple[PrunableUnits | None, PrunableUnits | None]]:
        """Each target layer's channels and KV groups, refusing a scope that would leave the layers unequal."""
        missing = sorted(set(all_layers) - set(layers))
        if missing:
            raise UserError(f"{_NAME} must shrink every decoder layer alike (the config has one width for all), "
                            f"but targets leave out {missing[0]} and {len(missing) - 1} more; leave targets unset")
        found = {}
        for name, layer in layers.items():
            channels = self.structure.channels(layer) if self.prunes_channels else None
            groups = self.structure.kv_groups(layer, self.config) if self.prunes_heads else None
            for units, count, what in ((channels, self.channels, "MLP channels"),
                                       (groups, self.kv_heads, "KV heads")):
                if units is None:
                    continue
                if units.count != count:
                    raise UserError(f"{name} has {units.count} {what} but the config says {count}; "
                                    "structured pruning needs layers of the width the config describes")
                for linear, _ in units.rows + units.columns:
                    if linear not in in_scope:
                        raise UserError(f"{_NAME}: a Linear of {name} is excluded by ignore, but removing {what} "
                                        "changes it too; remove the pattern from ignore")
            found[name] = (channels, groups)
        return found

    def rewrite_config(self, config) -> dict:
        return self.structure.rewrite_config(config, channels=self.kept_channels, heads=self.kept_heads,
                                      kv_heads=self.kept_kv_groups)


def plan_widths(model: torch.nn.Module, structure: LayerWidths, modifier, modifiers: list) -> Plan:
    """The uniform widths ``modifier`` asks for on ``model``, or a one-line refusal."""
    sparsity, head_sparsity = modifier.sparsity, modifier.head_sparsity
    if sparsity == 0 and head_sparsity == 0:
        raise UserError(f"{_NAME}: sparsity and head_sparsity are both 0, so nothing would be removed")
    config = model.config
    structure.check(config, channels=sparsity > 0, heads=head_sparsity > 0)
    channels, heads, kv_heads = structure.sizes(config)
    group = quantization_group_size(modifiers)
    multiple = modifier.round_to or group or DEFAULT_MULTIPLE
    kept_channels = channels
    if sparsity > 0:
        kept_channels = kept_count(channels, sparsity, multiple)
        if kept_channels < multiple:
            raise UserError(f"sparsity {sparsity} keeps {channels * (1 - sparsity):.0f} of {channels} MLP "
                            f"channels, fewer than the rounding multiple {multiple}; lower sparsity or round_to")
    kept_kv = kv_heads
    if head_sparsity > 0:
        removed = kv_heads * head_sparsity
        if abs(removed - round(removed)) > 1e-6 or round(removed) == 0:
            raise UserError(f"head_sparsity {head_sparsity} of {kv_heads} KV-head groups is {removed:g} groups; "
                            f"use a multiple of 1/{kv_heads}")
        if round(removed) >= kv_heads:
            raise UserError(f"head_sparsity {head_sparsity} would remove all {kv_heads} KV-head groups; "
                            "keep at least one")
        kept_kv = kv_heads - round(removed)
    plan = Plan(structure, config, channels, heads, kv_heads, kept_channels, kept_kv, multiple)
    if group:
        head_dim = getattr(config, "head_dim", None) or 0
        widths = ((plan.kept_channels, "kept MLP width"), (plan.kept_heads * head_dim, "kept attention width"))
        for width, what in widths:
            if width and width % group:
                raise UserError(f"The recipe quantizes in groups of {group}, which does not divide the {what} "
                                f"{width}; set round_to: {group} or change sparsity / head_sparsity")
    return plan


def quantization_group_size(modifiers: list) -> int | None:
    """The largest weight group size of the recipe's quantization modifiers (None: no grouped quantization)."""
    sizes = []
    for modifier in modifiers:
        if isinstance(modifier, QuantizationMixin) and modifier.has_config():
            for scheme in modifier.resolved_config.config_groups.values():
                if scheme.weights is not None and scheme.weights.group_size:
                    sizes.append(int(scheme.weights.group_size))
    return max(sizes) if sizes else None


def check_recipe(modifier, modifiers: list) -> None:
    """Refuse modifiers that would see the dense widths of layers this one shrinks: only the ones after it
    in the recipe calibrate on the smaller layers."""
    index = next((i for i, other in enumerate(modifiers) if other is modifier), None)
    for position, other in enumerate(modifiers):
        if other is modifier:
            continue
        if type(other) is type(modifier):
            raise UserError(f"The recipe has two {_NAME}s; give one the sparsity and head_sparsity of both")
        if index is not None and position < index and _calibrates_widths(other):
            raise UserError(f"{type(other).__name__} comes before {_NAME} in the recipe, so it would calibrate "
                            "the dense layers the structured modifier then shrinks; put the structured one first")


def check_same_pass(modifier, running: list) -> None:
    """Refuse other modifiers with layer statistics in the calibration pass that shrinks the layers.

    llm-compressor's ``sequential`` and ``diffusion`` pipelines calibrate every modifier in one pass; at a
    layer's epoch end the structured modifier shrinks it first, so a modifier that accumulated statistics on
    the dense layer (Wanda, SparseGPT, GPTQ, AWQ) would apply them to the wrong widths. A plain
    ``QuantizationModifier`` observes weights after the shrink and composes; the default ``independent``
    pipeline runs modifiers one after another, so the later ones calibrate on the smaller layers.
    """
    for other in running:
        if other is modifier or type(other) is QuantizationModifier or not _calibrates_widths(other):
            continue
        raise UserError(f"{type(other).__name__} calibrates in the same pass as {_NAME} (this pipeline runs all "
                        "modifiers layer by layer together) and would see the dense widths; use the default "
                        "pipeline ('independent'), or run the two in separate oneshot calls")


def _calibrates_widths(modifier) -> bool:
    """Pruning and quantization modifiers: they hook Linears or give them parameters of the dense shape."""
    return isinstance(modifier, SparsityModifierBase | SinkAwarePruningModifier | QuantizationMixin)
