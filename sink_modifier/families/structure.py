"""Which Linears form an MLP channel or a KV-head group, per architecture (``LayerWidths`` implementations).

Structured pruning removes whole units and writes a smaller dense checkpoint whose config must describe it, so
every architecture says where its units live and which config keys carry their counts:

* ``NamedWidths``: transformers' decoder layout (Gemma 1-3, Llama, Qwen2, Mistral): ``mlp.{gate,up,down}_proj``,
  ``self_attn.{q,k,v,o}_proj`` (biases and per-head-dim q/k norms ride along), ``intermediate_size``,
  ``num_attention_heads``, ``num_key_value_heads``. Heads can go only where the config fixes ``head_dim``.
* ``LLADA``: LLaDA's remote code (``ff_proj`` is the gate, ``up_proj``, ``ff_out`` the down projection;
  ``mlp_hidden_size``). Its code derives the head width from ``d_model // n_heads`` and sizes ``q_proj`` and
  ``attn_out`` as ``d_model``, so no config can describe fewer heads: heads are refused.
* ``DREAM``: Qwen2 names, but its code derives ``head_dim = hidden_size // num_attention_heads``: heads refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sink_modifier.families.base import FamilyError, LayerWidths, PrunableUnits


@dataclass(frozen=True)
class NamedWidths(LayerWidths):
    """Units found by module names inside each decoder layer, counts kept under config keys."""

    gate_up: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    down: str = "mlp.down_proj"
    attention: tuple[str, str, str, str] | None = (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    channels_key: str = "intermediate_size"
    heads_key: str = "num_attention_heads"
    kv_heads_key: str = "num_key_value_heads"
    #: why this architecture's KV groups cannot be removed (None: they can, where ``head_dim`` is in the config)
    heads_refused: str | None = None

    def check(self, config, *, channels: bool, heads: bool) -> None:
        keys = [self.channels_key] if channels else []
        keys += [self.heads_key, self.kv_heads_key] if heads else []
        missing = [key for key in keys if getattr(config, key, None) is None]
        if missing:
            raise FamilyError(f"{type(config).__name__} has no {', '.join(missing)}, so a config cannot describe "
                              "the pruned widths; this architecture is not supported by structured pruning")
        if heads and self.heads_refused:
            raise FamilyError(f"head_sparsity: {self.heads_refused}; prune MLP channels only (head_sparsity: 0)")
        if heads and getattr(config, "head_dim", None) is None:
            raise FamilyError(f"head_sparsity: {type(config).__name__} derives the head width from hidden_size / "
                              "num_attention_heads, so removing heads would change it; use head_sparsity: 0")

    def sizes(self, config) -> tuple[int, int, int]:
        heads = getattr(config, self.heads_key, None)
        kv_heads = getattr(config, self.kv_heads_key, None) or heads
        return int(getattr(config, self.channels_key)), int(heads or 0), int(kv_heads or 0)

    def channels(self, layer: torch.nn.Module) -> PrunableUnits:
        gate_up = tuple((_linear(layer, name), 1) for name in self.gate_up)
        down = _linear(layer, self.down)
        return PrunableUnits(down.in_features, gate_up, ((down, 1),))

    def kv_groups(self, layer: torch.nn.Module, config) -> PrunableUnits:
        q, k, v, o = (_linear(layer, name) for name in self.attention)
        head_dim = int(config.head_dim)
        _, heads, kv_heads = self.sizes(config)
        per_group = heads // kv_heads * head_dim  # one KV group's query rows (and o_proj columns)
        return PrunableUnits(kv_heads, ((q, per_group), (k, head_dim), (v, head_dim)), ((o, per_group),))

    def rewrite_config(self, config, *, channels: int, heads: int, kv_heads: int) -> dict:
        fields = {self.channels_key: channels, self.heads_key: heads}
        if getattr(config, self.kv_heads_key, None) is not None:
            fields[self.kv_heads_key] = kv_heads
        for key, value in fields.items():
            setattr(config, key, value)
        return fields


class LLaDAWidths(NamedWidths):
    """LLaDA sizes its MLP by ``mlp_hidden_size``, or ``mlp_ratio * d_model`` where that is unset; the rewritten
    config always sets ``mlp_hidden_size``, which its code reads first."""

    def sizes(self, config) -> tuple[int, int, int]:
        channels = getattr(config, "mlp_hidden_size", None) or int(config.mlp_ratio * config.d_model)
        return int(channels), int(config.n_heads), int(getattr(config, "n_kv_heads", None) or config.n_heads)

    def check(self, config, *, channels: bool, heads: bool) -> None:
        if getattr(config, "block_type", "llama") != "llama":
            raise FamilyError(f"LLaDA block_type {config.block_type!r} fuses its projections; structured pruning "
                              "supports block_type 'llama' only")
        if getattr(config, "activation_type", "silu") == "swiglu":
            raise FamilyError("LLaDA activation_type 'swiglu' halves ff_out's width inside the activation; "
                              "structured pruning supports LLaDA's gated 'silu' blocks only")
        super().check(config, channels=False, heads=heads)


class Unsupported(LayerWidths):
    """An architecture structured pruning refuses, with the reason (one line)."""

    def __init__(self, reason: str):
        self.reason = reason

    def check(self, config, *, channels: bool, heads: bool) -> None:
        raise FamilyError(self.reason)


HF_DECODER = NamedWidths()
LLADA = LLaDAWidths(
    gate_up=("ff_proj", "up_proj"), down="ff_out", attention=None, channels_key="mlp_hidden_size",
    heads_key="n_heads", kv_heads_key="n_kv_heads",
    heads_refused="LLaDA's code sizes q_proj and attn_out as d_model and derives head_dim = d_model // n_heads",
)
DREAM = NamedWidths(heads_refused="Dream's code derives head_dim = hidden_size // num_attention_heads")


def widths_for(model: torch.nn.Module) -> LayerWidths:
    """LLaDA's layout where the config speaks LLaDA's keys, transformers' decoder layout otherwise."""
    config = getattr(model, "config", None)
    if all(getattr(config, key, None) is not None for key in ("d_model", "n_heads", "n_layers")):
        return LLADA
    return HF_DECODER


def _linear(layer: torch.nn.Module, name: str) -> torch.nn.Linear:
    try:
        module = layer.get_submodule(name)
    except AttributeError:
        module = None
    if not isinstance(module, torch.nn.Linear):
        raise FamilyError(f"{type(layer).__name__} has no Linear {name!r}: structured pruning targets must be the "
                          "model's decoder layers (leave targets unset)")
    return module
