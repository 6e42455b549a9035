"""The published MoE blocks of LLaDA-MoE and LLaDA2.x (remote code), made calibratable and prunable by expert.

Their blocks route inline: each expert is an MLP in a ``ModuleList`` called with the rows of its routed tokens
only, in an order of the block's making (LLaDA2 sorts them with a non-stable ``argsort``). llm-compressor
calibrates every expert of its own MoE models on every token (``moe_calibrate_all_experts``, the default), so
that rarely routed experts get statistics too and each expert's rows line up with the batch's tokens (which the
sink row scales need). ``ExpertsSeeEveryToken`` does the same for these blocks with hooks on the published
modules, the weights and their names untouched:

* a pre-hook on the block keeps its input rows ``X`` [N, H];
* a pre-hook on each expert finds its routed rows in ``X`` by content (exact copies, so the order the block
  chose does not matter) and, under llm-compressor's all-experts flag, hands the expert all of ``X`` instead;
* a forward hook on the expert returns the outputs of the rows the block asked for, so the block's result is
  the published computation's;
* experts the block did not call (LLaDA2 skips those no token was routed to) are called on ``X`` after it.

Expert pruning watches the same hooks (``PublishedExperts.watch``): the routing the block used, and each
expert's tokens and outputs.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from sink_modifier.families.moe import (
    ExpertLayout,
    MoeBlock,
    RoutingLimits,
    keep_expert_rows,
    keep_experts,
    set_expert_count,
)

#: ``route(block, gate_output) -> (top_k_index [N, k], top_k_weights [N, k])``: the routing a block computes
#: from its gate's output
Route = Callable[[torch.nn.Module, object], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class _Forward:
    """What one forward of a block exposed (only while an expert needs it)."""

    rows: torch.Tensor | None = None  # X [N, H]
    index: dict[bytes, list[int]] | None = None
    tokens: dict[int, torch.Tensor] = field(default_factory=dict)
    outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    gate_output: object = None
    watched: bool = False

    def find(self, routed: torch.Tensor) -> torch.Tensor:
        """Token indices of ``routed`` rows in ``X`` (duplicates of a row are handed out in turn)."""
        if self.index is None:
            self.index = {}
            for position, row in enumerate(_row_keys(self.rows)):
                self.index.setdefault(row, []).append(position)
        taken: dict[bytes, int] = {}
        positions = []
        for row in _row_keys(routed):
            candidates = self.index[row]
            positions.append(candidates[taken.get(row, 0) % len(candidates)])
            taken[row] = taken.get(row, 0) + 1
        return torch.tensor(positions, dtype=torch.long, device=routed.device)


def _row_keys(rows: torch.Tensor) -> list[bytes]:
    data = rows.detach().contiguous().cpu()
    return [bytes(row) for row in data.view(torch.uint8).numpy()]


def _calibrating_all_experts() -> bool:
    from llmcompressor.modeling.moe.context import get_calibrate_all_experts_flag

    return get_calibrate_all_experts_flag()


class ExpertsSeeEveryToken:
    """The hooks described in the module docstring, installed once per model by the family's ``prepare``."""

    _INSTALLED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, blocks: dict[torch.nn.Module, torch.nn.ModuleList]):
        self.blocks = blocks
        self.current: dict[torch.nn.Module, _Forward] = {}
        for block, experts in blocks.items():
            block.register_forward_pre_hook(self._block_starts)
            block.register_forward_hook(self._block_ends)
            block.gate.register_forward_hook(self._gate_output)
            for index, expert in enumerate(experts):
                expert.register_forward_pre_hook(self._expert_input(block, index))
                expert.register_forward_hook(self._expert_output(block, index))

    @classmethod
    def install(cls, model: torch.nn.Module, blocks: dict[torch.nn.Module, torch.nn.ModuleList]):
        if model not in cls._INSTALLED:
            cls._INSTALLED[model] = cls(blocks)
        return cls._INSTALLED[model]

    def _active(self, block) -> bool:
        return _calibrating_all_experts() or block in self.current and self.current[block].watched

    def _block_starts(self, block, args):
        if self._active(block):
            forward = self.current.setdefault(block, _Forward())
            forward.rows = args[0].reshape(-1, args[0].shape[-1])

    def _block_ends(self, block, args, output):
        forward = self.current.get(block)
        if forward is None:
            return
        if _calibrating_all_experts() and forward.rows is not None:
            # LLaDA2's block skips experts no token was routed to; they calibrate on every token all the same
            rows, forward.rows = forward.rows, None  # the expert hooks stand aside for these calls
            for index, expert in enumerate(self.blocks[block]):
                if index not in forward.tokens:
                    expert(rows)
            forward.rows = rows
        if not forward.watched:
            del self.current[block]

    def _gate_output(self, gate, args, output):
        for block, forward in self.current.items():
            if block.gate is gate and forward.watched:
                forward.gate_output = output

    def _expert_input(self, block, index):
        def hook(expert, args):
            forward = self.current.get(block)
            if forward is None or forward.rows is None:
                return None
            forward.tokens[index] = forward.find(args[0])
            return (forward.rows,) if _calibrating_all_experts() else None
        return hook

    def _expert_output(self, block, index):
        def hook(expert, args, output):
            forward = self.current.get(block)
            if forward is None or index not in forward.tokens:
                return None
            tokens = forward.tokens[index]
            routed = output[tokens] if _calibrating_all_experts() else output
            if forward.watched:
                forward.outputs[index] = (tokens, routed.detach())
            return routed
        return hook


class PublishedExperts(ExpertLayout):
    """Experts role for published blocks with a ``gate`` and ``experts`` (a ``ModuleList`` of MLPs).

    ``route`` turns what the gate returned into the routing the block used; ``expert_buffers`` are per-expert
    tensors on the gate or the block (routing biases) that shrink with the experts.
    """

    def __init__(self, route: Route, *, top_k_key: str = "num_experts_per_tok",
                 group_keys: tuple[str, str] | None = None, min_per_group: int = 1,
                 expert_buffers: Sequence[str] = ()):
        self.route = route
        self.min_per_group = min_per_group
        self.top_k_key = top_k_key
        self.group_keys = group_keys
        self.expert_buffers = tuple(expert_buffers)
        self._hooks: dict[int, tuple[ExpertsSeeEveryToken, torch.nn.Module]] = {}  # id(experts) -> (hooks, block)

    @staticmethod
    def blocks(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
        return {name: module for name, module in model.named_modules()
                if isinstance(getattr(module, "experts", None), torch.nn.ModuleList)
                and isinstance(getattr(module, "gate", None), torch.nn.Module)}

    def install(self, model: torch.nn.Module) -> ExpertsSeeEveryToken:
        """The all-experts hooks on every MoE block of ``model`` (once per model)."""
        blocks = self.blocks(model)
        hooks = ExpertsSeeEveryToken.install(model, {block: block.experts for block in blocks.values()})
        self._hooks.update({id(block.experts): (hooks, block) for block in blocks.values()})
        return hooks

    def moe_blocks(self, model):
        self.install(model)
        layers = {id(layer): index for index, layer in enumerate(model.model.layers)}
        return [MoeBlock(name, block.experts, layers[id(model.get_submodule(name.rpartition(".")[0]))])
                for name, block in self.blocks(model).items()]

    def routing_limits(self, model):
        config = model.config
        groups = [getattr(config, key, None) for key in self.group_keys] if self.group_keys else [None, None]
        return RoutingLimits(int(config.num_experts), int(getattr(config, self.top_k_key)), *groups,
                             min_per_group=self.min_per_group)

    def watch(self, block: MoeBlock, observe, register) -> None:
        hooks, module = self._hooks[id(block.experts)]

        def starts(moe, args):
            hooks.current[moe] = _Forward(watched=True)

        def ends(moe, args, output):
            forward = hooks.current.pop(moe, None)
            if forward is not None and forward.outputs:
                top_k_index, top_k_weights = self.route(moe, forward.gate_output)
                observe(top_k_index, top_k_weights, forward.outputs)

        register(module, starts, "forward_pre", prepend=True)  # before the hooks' own pre-hook reads the rows
        register(module, ends, "forward")

    def remove_experts(self, model, block: MoeBlock, retained):
        moe = model.get_submodule(block.name)
        keep_experts(moe.experts, retained)
        keep_expert_rows(moe.gate, ("weight", "bias", *self.expert_buffers), retained)
        keep_expert_rows(moe, self.expert_buffers, retained)
        set_expert_count((moe, moe.gate), len(retained))

    def rewrite_config(self, model, num_experts: int) -> None:
        model.config.num_experts = num_experts
