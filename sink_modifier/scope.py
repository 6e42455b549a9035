"""Which Linears a recipe prunes, and what is never pruned whatever the recipe says.

The selection is llm-compressor's own (the modules its Wanda / SparseGPT hook: target layers, minus
``ignore``, minus embeddings); it is computed here too so that impossible scopes fail before the trajectory
phase spends any time.
"""

from __future__ import annotations

import torch
from compressed_tensors.utils import match_named_modules, match_targets

from sink_modifier import compat
from sink_modifier.errors import UserError

#: Name fragments of modules no recipe should prune: the LM head and embeddings (out of scope for Wanda and
#: SparseGPT), MoE routers (they pick experts) and vision towers (never run on text calibration data).
NEVER_PRUNED = ("lm_head", "embed", "router", "vision")


def never_pruned_ignore(*fragments: str) -> list[str]:
    """``ignore`` patterns for ``fragments`` (default: all of ``NEVER_PRUNED``)."""
    return [f"re:.*{fragment}.*" for fragment in fragments or NEVER_PRUNED]


def planned_modules(target_layers: dict[str, torch.nn.Module], ignore: list[str]) -> dict[torch.nn.Module, str]:
    """The Linears llm-compressor's pruning modifiers will hook, by module, with their full names."""
    planned = {}
    for layer_name, layer in target_layers.items():
        for name, module in match_named_modules(layer, compat.PRUNABLE_LAYER_TYPES):
            name = f"{layer_name}.{name}"
            if not match_targets(name, module, ignore) and not isinstance(module, torch.nn.Embedding):
                planned.setdefault(module, name)
    return planned


def check_in_scope(model: torch.nn.Module, modules: dict[torch.nn.Module, str]) -> None:
    """Refuse to prune the model's LM head or an embedding."""
    output_embeddings = model.get_output_embeddings()
    for module, name in modules.items():
        if module is output_embeddings or isinstance(module, torch.nn.Embedding):
            raise UserError(
                f"The recipe would prune {name}, the model's LM head or an embedding; narrow targets to "
                "the decoder layers or add a matching pattern (e.g. 're:.*lm_head.*') to ignore"
            )
