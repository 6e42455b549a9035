"""Fixes for remote-code models that would otherwise fail at the very end of a long run.

LLaDA's and Dream's published remote code declares ``_tied_weights_keys`` as a list (the transformers 4.x
convention). transformers 5 expects a mapping and calls ``.keys()`` on it while saving, so ``save_pretrained``
raises ``AttributeError: 'list' object has no attribute 'keys'`` after calibration and pruning are done. The
modifier calls :func:`make_saveable` when it initializes, so the problem is fixed (and logged) before any
calibration time is spent.
"""

from __future__ import annotations

import torch
from loguru import logger


def _actually_tied(module: torch.nn.Module, names: list[str]) -> dict[str, str]:
    """The listed parameters that really share storage with another parameter, mapped to that parameter.

    Only those may be declared tied: saving drops declared tied weights from the checkpoint, so declaring an
    untied LM head (LLaDA unties by default) would silently lose it.
    """
    params = dict(module.named_parameters(remove_duplicate=False))
    owners: dict[int, str] = {}
    for name, param in params.items():
        owners.setdefault(param.data_ptr(), name)
    tied = {}
    for name in names:
        param = params.get(name)
        if param is not None and owners[param.data_ptr()] != name:
            tied[name] = owners[param.data_ptr()]
    return tied


def make_saveable(model: torch.nn.Module) -> None:
    """Turn list-style ``_tied_weights_keys`` into the mapping transformers 5 saves with."""
    for name, module in model.named_modules():
        keys = getattr(module, "_tied_weights_keys", None)
        if isinstance(keys, (list, tuple)):
            mapping = _actually_tied(module, list(keys))
            module._tied_weights_keys = mapping  # instance attribute: the class is left alone
            logger.warning(
                f"{type(module).__name__}{' (' + name + ')' if name else ''} declares _tied_weights_keys as a "
                f"list, which transformers 5 cannot save; using {mapping or '{}'} (the weights that really "
                "share storage) so the checkpoint can be written"
            )
