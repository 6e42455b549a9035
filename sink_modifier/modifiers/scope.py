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
#: MoE routers named ``gate`` (LLaDA-MoE's ``mlp.gate`` Linear, Mixtral's and Qwen-MoE's): the whole name ends
#: there, so ``gate_proj`` is not matched
ROUTER_GATE = r"re:.*\.gate$"


def never_pruned_ignore(*fragments: str) -> list[str]:
    """``ignore`` patterns for ``fragments`` (default: all of ``NEVER_PRUNED`` and routers named ``gate``)."""
    return [f"re:.*{fragment}.*" for fragment in fragments or NEVER_PRUNED] + ([] if fragments else [ROUTER_GATE])


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


def protect_output_head(model: torch.nn.Module, head: str | None, modifiers) -> list[str]:
    """Add the LM head ``head`` (a module name, from the family) to the ``ignore`` of every modifier whose
    ``targets`` match it and whose ``ignore`` misses it, with a warning; returns the modifiers' names changed.

    Quantization recipes ignore ``re:.*lm_head``, which misses heads named otherwise (LLaDA's
    ``model.transformer.ff_out``; a pattern ``re:.*ff_out`` would also match every block's MLP). Quantizing the
    head costs far more quality than it saves memory, and no shipped recipe means to, so it is added rather
    than refused; a recipe that does want the head quantized cannot ask for it through these commands.
    """
    from loguru import logger

    module = dict(model.named_modules()).get(head) if head else None
    if module is None:
        return []
    changed = []
    for modifier in modifiers:
        targets, ignore = getattr(modifier, "targets", None), getattr(modifier, "ignore", None)
        if not targets or not isinstance(ignore, list):
            continue
        targets = [targets] if isinstance(targets, str) else list(targets)
        if match_targets(head, module, targets) and not match_targets(head, module, ignore):
            ignore.append(head)
            # llm-compressor 0.14's quantization modifiers resolve their config (with its own copy of ignore)
            # when they are built, and apply that config; both must name the head.
            resolved = getattr(modifier, "resolved_config", None)
            if isinstance(getattr(resolved, "ignore", None), list) and head not in resolved.ignore:
                resolved.ignore.append(head)
            changed.append(type(modifier).__name__)
            logger.warning(f"{type(modifier).__name__}: ignore {modifier.ignore[:-1]} does not cover the LM head "
                           f"{head}; adding it (no recipe here prunes or quantizes the LM head)")
    return changed
