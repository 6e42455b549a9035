"""Load-time repairs of a checkpoint's own modeling code (remote code) for transformers 5 (5.0-5.17).

``sink_modifier.compat``'s docstring lists what breaks and why; these functions change only the classes and
modules transformers loaded from the checkpoint (they belong to it), never a library's globals, and are
idempotent. ``sink_modifier.loading.checkpoints`` applies them before it builds the model.
"""

from __future__ import annotations

import functools
import inspect
import sys

import torch
from loguru import logger


def _default_rope_parameters(config=None, device=None, seq_len=None, **rope_kwargs):
    """transformers 4.46's ``_compute_default_rope_parameters`` (the RoPE of the original paper): inverse
    frequencies ``1 / base^(2i / dim)`` and attention scaling 1, from the config or from 4.x's keyword form."""
    if rope_kwargs:
        base, dim = rope_kwargs["base"], int(rope_kwargs["dim"])
    else:
        base = getattr(config, "rope_theta", None)
        if base is None:  # transformers 5 keeps it in rope_parameters
            base = (getattr(config, "rope_parameters", None) or {})["rope_theta"]
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(head_dim * getattr(config, "partial_rotary_factor", 1.0))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float().to(device) / dim))
    return inv_freq, 1.0


def remote_modules(cls: type) -> list:
    """The modules transformers loaded from the same checkpoint folder as ``cls`` (its package)."""
    if cls.__module__.split(".")[0] in ("transformers", "torch"):
        return []  # library code is never edited
    package = cls.__module__.rpartition(".")[0]
    if not package.startswith("transformers_modules"):
        return [sys.modules[cls.__module__]] if cls.__module__ in sys.modules else []
    return [m for name, m in list(sys.modules.items()) if name.rpartition(".")[0] == package and m is not None]


def _library_base_method(cls: type, name: str):
    """The method ``name`` of the nearest transformers base class of ``cls`` (None: not a transformers hook)."""
    for base in cls.__mro__[1:]:
        if base.__module__.startswith("transformers.") and name in base.__dict__:
            return base.__dict__[name]
    return None


def _keyword_names(function) -> tuple[set[str], bool]:
    parameters = inspect.signature(function).parameters.values()
    return ({p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)},
            any(p.kind is p.VAR_KEYWORD for p in parameters))


def _optional_keywords(function) -> set[str]:
    parameters = inspect.signature(function).parameters.values()
    return {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.default is not p.empty}


def _adapt_override(owner: type, name: str, override, base) -> bool:
    """Let ``owner.name`` accept (and ignore) the optional keywords transformers' ``base`` method takes and it
    does not (renamed required parameters are left alone: callers pass those by position)."""
    if getattr(override, "_sink_adapted", False) or not callable(override) or not callable(base):
        return False
    try:
        own, takes_any = _keyword_names(override)
        expected = _optional_keywords(base)
    except (TypeError, ValueError):
        return False
    missing = expected - own
    if takes_any or not missing:
        return False

    @functools.wraps(override)
    def adapted(*args, **kwargs):
        return override(*args, **{k: v for k, v in kwargs.items() if k not in missing})

    adapted._sink_adapted = True
    setattr(owner, name, adapted)
    logger.info(f"{owner.__name__}.{name} predates transformers 5 (takes no {', '.join(sorted(missing))}); "
                "ignoring those arguments")
    return True


def _generation_config_from_model_config(cls, model_config):
    """``GenerationConfig.from_model_config`` for a remote subclass that adds its own fields.

    transformers 5.17's version compares every field of the new config with a plain ``GenerationConfig()``,
    which lacks the subclass's fields (Dream's ``DreamGenerationConfig``: ``AttributeError: 'GenerationConfig'
    object has no attribute 'eps'``); that comparison only fills fields from a decoder sub-config, which these
    single-config models do not have, so the config is built from the model config's non-None values as before.
    """
    config_dict = {k: v for k, v in model_config.to_dict().items() if v is not None}
    config_dict.pop("_from_model_config", None)
    generation_config = cls.from_dict(config_dict, return_unused_kwargs=False, _from_model_config=True)
    generation_config._original_object_hash = hash(generation_config)
    return generation_config


def _repair_generation_config(owner: type) -> None:
    from transformers import GenerationConfig

    if issubclass(owner, GenerationConfig) and owner is not GenerationConfig \
            and "from_model_config" not in vars(owner):
        owner.from_model_config = classmethod(_generation_config_from_model_config)


def repair_remote_code(cls: type) -> None:
    """Adapt the checkpoint's own modules (those of ``cls``) to transformers 5, in place (see the module
    docstring): overrides of transformers methods whose signatures predate 5.x, and the missing ``"default"``
    RoPE initialiser. Only classes and modules loaded from the checkpoint are changed."""
    for module in remote_modules(cls):
        table = module.__dict__.get("ROPE_INIT_FUNCTIONS")
        # Always the module's own copy with 4.46's computation, even where another library has put a "default"
        # into transformers' table (auto_round does, at import): the code must not depend on other imports.
        if isinstance(table, dict) and table.get("default") is not _default_rope_parameters:
            module.ROPE_INIT_FUNCTIONS = {**table, "default": _default_rope_parameters}
            logger.info(f"{module.__name__.rpartition('.')[2]} looks up the 'default' RoPE that transformers 5 "
                        "removed; giving it transformers 4.46's computation")
        for owner in list(vars(module).values()):
            if not isinstance(owner, type) or owner.__module__ != module.__name__:
                continue
            _repair_generation_config(owner)
            for name, override in list(vars(owner).items()):
                if inspect.isfunction(override) and not name.startswith("__"):
                    base = _library_base_method(owner, name)
                    if base is not None:
                        _adapt_override(owner, name, override, getattr(base, "__func__", base))


def restore_generation_keys(config, saved: dict) -> list[str]:
    """Give a remote config back the generation keys (``use_cache``, ...) that transformers 5's
    ``PreTrainedConfig.__init__`` pops from the keywords a 4.x config class passes up (LLaDA's then fails at its
    first forward: ``'LLaDAConfig' object has no attribute 'use_cache'``): the value in ``config.json``, else the
    config class's own default for it. Returns the keys restored."""
    from transformers import GenerationConfig

    try:
        defaults = inspect.signature(type(config).__init__).parameters
    except (TypeError, ValueError):
        defaults = {}
    restored = []
    for key in GenerationConfig._get_default_generation_params():
        if key in vars(config) or hasattr(type(config), key):
            continue
        if key in saved:
            value = saved[key]
        elif key in defaults and defaults[key].default is not inspect.Parameter.empty:
            value = defaults[key].default
        else:
            continue
        setattr(config, key, value)
        restored.append(key)
    if restored:
        logger.info(f"{type(config).__name__}: restored {', '.join(restored)} (transformers 5 drops generation "
                    "keys that 4.x config classes pass to PreTrainedConfig)")
    return restored
