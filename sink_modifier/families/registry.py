"""The registry of model families: each family registers a predicate and a builder; nothing else in the
package knows a family by name.

Families are tried by priority. A family that *claims* its models (DiffusionGemma, by its config's
``model_type``) is the only one those models may use; the others are chosen by behaviour when the recipe says
``family: auto`` (a masked DLM attends bidirectionally, anything else is driven as the autoregressive control).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from loguru import logger

from sink_modifier.families.base import Family, FamilyError


@dataclass(frozen=True)
class FamilyOptions:
    """What a recipe can tell a family (``family`` itself picks the family)."""

    mask_token_id: int | None = None
    # None: the family's default (its special tokens); [] masks every position
    never_mask_token_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class FamilySpec:
    name: str
    #: builds the family for ``model``; ``chosen_by_match`` says whether ``matches`` already accepted it
    build: Callable[[torch.nn.Module, FamilyOptions, bool], Family]
    matches: Callable[[torch.nn.Module], bool] = field(default=lambda model: False)
    priority: int = 0
    claims: bool = False
    #: one line for users: which models this family is for
    description: str = ""


_SPECS: dict[str, FamilySpec] = {}


def register(spec: FamilySpec) -> FamilySpec:
    """Add (or replace) a family; recipes can name it as ``family: <name>`` from then on."""
    if spec.name == "auto":
        raise ValueError("'auto' is reserved for choosing a family by the model")
    _SPECS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    _SPECS.pop(name, None)


def names() -> list[str]:
    return sorted(_SPECS)


def _by_priority() -> list[FamilySpec]:
    return sorted(_SPECS.values(), key=lambda spec: -spec.priority)


def claiming_family(model: torch.nn.Module) -> FamilySpec | None:
    """The family that owns ``model`` outright, if any."""
    return next((spec for spec in _by_priority() if spec.claims and spec.matches(model)), None)


def resolve(model: torch.nn.Module, family: str = "auto", options: FamilyOptions | None = None) -> Family:
    """The family that drives ``model``: ``family`` by name, or ``auto`` to decide by the model itself."""
    options = options or FamilyOptions()
    if family != "auto" and family not in _SPECS:
        raise FamilyError(f"Unknown family {family!r}; known: auto, {', '.join(names())}")
    owner = claiming_family(model)
    if owner is not None:
        if family not in ("auto", owner.name):
            raise FamilyError(f"{type(model).__name__} is a {owner.name} model ({owner.description}); "
                              f"set family: auto or {owner.name}, not {family!r}")
        return owner.build(model, options, True)
    if family != "auto":
        spec = _SPECS[family]
        if spec.claims:
            raise FamilyError(f"family: {family} is for {spec.description}, not {type(model).__name__}")
        return spec.build(model, options, False)
    for spec in _by_priority():
        if not spec.claims and spec.matches(model):
            logger.debug(f"Sink-aware pruning: {type(model).__name__} is driven as the {spec.name!r} family")
            return spec.build(model, options, True)
    raise FamilyError(f"No registered family accepts {type(model).__name__}; known: {', '.join(names())}")
