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
    #: the class that loads a checkpoint of this family from its config (None: transformers' Auto classes)
    model_class: Callable[[object], type | None] = field(default=lambda config: None)
    #: the inputs of one check forward of a claimed model, from token ids [1, T] (None: ``input_ids`` only)
    probe_inputs: Callable[[torch.nn.Module, torch.Tensor], dict] | None = None
    #: called with every config the loader reads, before ``from_pretrained``; acts on this family's configs only
    #: (e.g. registers the weight conversion transformers needs to load its checkpoints)
    before_load: Callable[[object], None] | None = None
    #: called on every model the loader loads, before its check forward; acts on this family's models only
    #: (e.g. installs hooks that let its published code take the inputs llm-compressor gives it)
    on_load: Callable[[torch.nn.Module], None] | None = None
    #: how the checkpoint a recipe writes is loaded again, as a Python call with ``{path}`` (None: the default)
    reload_call: Callable[[torch.nn.Module], str | None] = field(default=lambda model: None)


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


def model_class(config) -> type | None:
    """The class a family loads ``config``'s checkpoint with, if a family names one."""
    return next((cls for spec in _by_priority() if (cls := spec.model_class(config)) is not None), None)


def probe_inputs(model: torch.nn.Module, input_ids: torch.Tensor) -> dict:
    """The inputs of a check forward of ``model`` (its claiming family's, else ``input_ids``)."""
    owner = claiming_family(model)
    if owner is not None and owner.probe_inputs is not None:
        return owner.probe_inputs(model, input_ids)
    return {"input_ids": input_ids}


def prepare_to_load(config) -> None:
    """Every family's ``before_load`` for a checkpoint about to be loaded."""
    for spec in _by_priority():
        if spec.before_load is not None:
            spec.before_load(config)


def prepare_loaded(model: torch.nn.Module) -> None:
    """Every family's ``on_load`` for a freshly loaded model."""
    for spec in _by_priority():
        if spec.on_load is not None:
            spec.on_load(model)


def reload_call(model: torch.nn.Module, path: str) -> str:
    """The Python call that loads ``model``'s saved checkpoint at ``path`` again.

    A family may name its own; otherwise, remote code (which transformers 5 cannot run unrepaired: see
    ``sink_modifier.compat``) is loaded through ``sink_modifier.load_model`` and a transformers model through the
    Auto class that maps its config."""
    for spec in _by_priority():
        call = spec.reload_call(model)
        if call is not None:
            return call.format(path=path)
    if not type(model).__module__.startswith("transformers."):
        return f"sink_modifier.load_model({path!r}, trust_remote_code=True)"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    auto = "AutoModelForCausalLM" if type(model.config) in MODEL_FOR_CAUSAL_LM_MAPPING else "AutoModel"
    return f"transformers.{auto}.from_pretrained({path!r})"


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
