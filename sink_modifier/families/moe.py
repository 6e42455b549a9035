"""The experts role: where a mixture-of-experts model keeps its routed experts, how they are routed, and how to
remove some of them so that the smaller model still loads and routes.

Expert pruning (``sink_modifier.modifiers.experts``) reads this role only. A family overrides what differs from the
default, which describes what llm-compressor's own REAP handles: blocks with ``experts`` (llm-compressor's
``LinearExperts2D``, called as ``experts(hidden [N, H], top_k_index [N, k], top_k_weights [N, k])``) next to a
``router`` or ``gate`` Linear, counted by the config keys REAP knows (``reap/utils.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from sink_modifier.errors import UserError


@dataclass(frozen=True)
class MoeBlock:
    """One MoE layer: ``experts`` is called with the routing decision (see the module docstring)."""

    name: str  # the module that holds experts and router, as the report names it
    experts: torch.nn.Module
    layer_index: int  # the decoder layer it belongs to (``sink_scope: layer`` picks that layer's scales)


@dataclass(frozen=True)
class RoutingLimits:
    """How many routed experts there are and what routing needs of them."""

    num_experts: int
    top_k: int
    n_group: int | None = None  # group-limited routing (DeepSeek-V3 style, LLaDA2): groups of equal size
    topk_group: int | None = None
    #: experts a group must keep: routers that score a group by its best two experts (LLaDA2) need 2
    min_per_group: int = 1

    @property
    def group_size(self) -> int | None:
        return None if self.n_group is None else self.num_experts // self.n_group

    def experts_to_drop(self, sparsity: float) -> int:
        """How many experts ``sparsity`` removes per layer; refuses what would break routing (one line)."""
        drop = int(self.num_experts * sparsity)
        if drop == 0:
            raise UserError(f"sparsity {sparsity} removes no expert of {self.num_experts} per layer; use at least "
                            f"{1 / self.num_experts:.3g}")
        left = self.num_experts - drop
        if self.n_group is not None:
            if drop % self.n_group:
                raise UserError(
                    f"sparsity {sparsity} removes {drop} of {self.num_experts} experts, which leaves the "
                    f"{self.n_group} routing groups uneven; remove a multiple of {self.n_group} experts (e.g. "
                    f"sparsity {self.n_group * max(1, round(drop / self.n_group)) / self.num_experts:g})")
            if left // self.n_group < self.min_per_group:
                raise UserError(
                    f"sparsity {sparsity} leaves {left // self.n_group} experts per routing group, but the router "
                    f"scores each group by its best {self.min_per_group}; lower sparsity")
            reachable = self.topk_group * (left // self.n_group)
            if self.top_k > reachable:
                raise UserError(
                    f"sparsity {sparsity} leaves {left // self.n_group} experts in each of the {self.topk_group} "
                    f"groups a token may use ({reachable} reachable), fewer than the {self.top_k} it routes to; "
                    "lower sparsity")
        elif self.top_k > left:
            raise UserError(f"sparsity {sparsity} leaves {left} experts per layer, fewer than the {self.top_k} "
                            "every token is routed to; lower sparsity")
        return drop


#: ``observe(top_k_index [N, k], top_k_weights [N, k], outputs)`` after every forward of a block, where ``outputs``
#: maps each expert that ran to (the tokens it computed for [n], its outputs for them [n, H]); tokens index the
#: block's flattened input rows
Observer = Callable[[torch.Tensor, torch.Tensor, dict[int, tuple[torch.Tensor, torch.Tensor]]], None]


class ExpertLayout:
    """The default: llm-compressor's REAP conventions (``LinearExperts2D`` experts next to a router Linear)."""

    def watch(self, block: MoeBlock, observe: Observer, register: Callable) -> None:
        """Call ``observe`` after every forward of ``block``; hooks go through ``register(module, hook, kind,
        **kwargs)`` (the modifier's, so llm-compressor can disable them while it propagates).

        ``LinearExperts2D`` calls every expert with all tokens under llm-compressor's all-experts flag, and with
        its routed tokens in ``(slot, token)`` order (``torch.where`` over ``[k, N]``) without it.
        """
        from llmcompressor.modeling.moe.context import get_calibrate_all_experts_flag

        outputs: dict[int, torch.Tensor] = {}

        def expert_output(index, module, args, output):
            outputs[index] = (output[0] if isinstance(output, tuple) else output).detach()

        def routed(module, args, kwargs, output):
            names = ("hidden_states", "top_k_index", "top_k_weights")
            values = [*args, *(kwargs[k] for k in names if k in kwargs)]
            top_k_index, top_k_weights = values[1], values[2]
            seen = {}
            for index, rows in outputs.items():
                if get_calibrate_all_experts_flag():
                    tokens = (top_k_index == index).any(dim=-1).nonzero().squeeze(-1)
                    rows = rows[tokens]
                else:
                    tokens = torch.where((top_k_index == index).T)[1]
                seen[index] = (tokens, rows)
            outputs.clear()
            observe(top_k_index, top_k_weights, seen)

        for name, expert in block.experts.named_children():
            if name.isdigit():
                register(expert, partial(expert_output, int(name)), "forward")
        register(block.experts, routed, "forward", with_kwargs=True)

    def moe_blocks(self, model: torch.nn.Module) -> list[MoeBlock]:
        from llmcompressor.modeling.moe.linear_experts import LinearExperts2D

        blocks, seen = [], set()
        for name, module in model.named_modules():
            experts = getattr(module, "experts", None)
            if isinstance(experts, LinearExperts2D) and _router(module) is not None and id(experts) not in seen:
                seen.add(id(experts))
                blocks.append(MoeBlock(name, experts, len(blocks)))
        return blocks

    def routing_limits(self, model: torch.nn.Module) -> RoutingLimits:
        from llmcompressor.modifiers.pruning.reap.utils import get_moe_attrs

        try:
            attrs = get_moe_attrs(model, [])
        except ValueError as error:
            raise UserError(f"{type(model).__name__} is not a mixture of experts this package can prune: "
                            f"{error}") from None
        return RoutingLimits(attrs.num_experts, attrs.top_k, attrs.n_group, attrs.top_k_group)

    def remove_experts(self, model: torch.nn.Module, block: MoeBlock, retained: Sequence[int]) -> None:
        """Keep only ``retained`` experts (in that order) and the router rows that choose them."""
        holder = model.get_submodule(block.name)
        keep_experts(block.experts, retained)
        router = _router(holder)
        keep_expert_rows(router, ("weight", "bias", "e_score_correction_bias"), retained)
        keep_expert_rows(holder, ("e_score_correction_bias",), retained)
        set_expert_count((holder, router, block.experts), len(retained))

    def rewrite_config(self, model: torch.nn.Module, num_experts: int) -> None:
        from llmcompressor.modifiers.pruning.reap.utils import get_moe_attrs, update_model_config

        update_model_config(model, get_moe_attrs(model, []), num_experts)


def _router(module: torch.nn.Module) -> torch.nn.Module | None:
    for name in ("router", "gate"):
        candidate = getattr(module, name, None)
        if isinstance(candidate, torch.nn.Module):
            return candidate
    return None


def keep_experts(experts: torch.nn.Module, retained: Sequence[int]) -> None:
    """Renumber an expert container's numbered children to ``retained`` (other children, e.g. ``act_fn``, stay).

    Existing modules are moved, not copied, so offloading state travels with them (as in REAP's
    ``prune_moe_layer``, which keeps only llm-compressor's ``ExpertMLP`` children and so cannot renumber a
    published ``ModuleList`` of plain MLPs).
    """
    children = list(experts.named_children())
    numbered = {int(name): child for name, child in children if name.isdigit()}
    if sorted(set(retained)) != sorted(retained) or not set(retained) <= set(numbered):
        raise ValueError(f"retained experts {list(retained)} are not distinct experts of 0..{len(numbered) - 1}")
    for name, _ in children:
        delattr(experts, name)
    for new, old in enumerate(retained):
        experts.add_module(str(new), numbered[old])
    for name, child in children:
        if not name.isdigit():
            experts.add_module(name, child)


@torch.no_grad()
def keep_expert_rows(module: torch.nn.Module | None, names: Iterable[str], retained: Sequence[int]) -> None:
    """Slice the per-expert parameters / buffers ``names`` of ``module`` (first dimension) to ``retained``."""
    if module is None:
        return
    from compressed_tensors import align_module_device

    with align_module_device(module):
        updates = {}
        for name in names:
            tensor = getattr(module, name, None)
            if isinstance(tensor, torch.Tensor):
                index = torch.as_tensor(list(retained), dtype=torch.long, device=tensor.device)
                updates[name] = (tensor, tensor.detach().index_select(0, index).contiguous())
    for name, (old, new) in updates.items():
        if isinstance(old, torch.nn.Parameter):
            setattr(module, name, torch.nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            setattr(module, name, new)  # a registered buffer stays a buffer
    if isinstance(getattr(module, "out_features", None), int) and "weight" in updates:
        module.out_features = len(retained)


def set_expert_count(modules: Iterable[torch.nn.Module | None], count: int) -> None:
    """Update the expert counts modules keep as ints (``num_experts``, REAP's other names)."""
    for module in modules:
        for key in ("num_experts", "n_experts", "n_routed_experts"):
            if module is not None and isinstance(getattr(module, key, None), int):
                setattr(module, key, count)
