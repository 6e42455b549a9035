"""llm-compressor's Wanda and SparseGPT, with each token's input row scaled before they accumulate.

The pruning math (statistics accumulation, mask selection, unstructured and N:M) stays llm-compressor's: these
classes are its ``WandaPruningModifier`` / ``SparseGPTModifier`` with one mixin in front. Before an input
reaches the engine every token's row is multiplied by its row scale (``1 - s`` in the paper), so the engine
accumulates ``sum (r x)^2`` (Wanda) and ``sum (r x)(r x)^T`` (SparseGPT), exactly what the reference code does.
With every scale 1 the result is bit-identical to llm-compressor's own modifiers (tests/test_fidelity.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from compressed_tensors.offload.dist_utils import is_distributed
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
from pydantic import BaseModel, PrivateAttr

from sink_modifier import compat

#: ``weigh(module, input) -> weighted input``: the rows as the statistics should see them
RowWeigher = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


class RowWeighting(BaseModel):
    """Mixin for a llm-compressor pruning modifier: weigh the input rows, then accumulate as usual."""

    _weigh: RowWeigher | None = PrivateAttr(None)

    def weigh_rows_with(self, weigh: RowWeigher) -> None:
        self._weigh = weigh

    def calibrate_module(self, module: torch.nn.Module, args: tuple, output: torch.Tensor):
        if self._weigh is None:
            raise RuntimeError(f"{type(self).__name__} calibrated before weigh_rows_with() was called")
        super().calibrate_module(module, (self._weigh(module, args[0]), *args[1:]), output)

    def compress_modules(self):
        if is_distributed():  # llm-compressor 0.14 prunes each rank from its own shard otherwise
            compat.reduce_statistics_across_ranks(self)
        super().compress_modules()


class SinkWeightedWanda(RowWeighting, WandaPruningModifier):
    pass


class SinkWeightedSparseGPT(RowWeighting, SparseGPTModifier):
    pass


ENGINES: dict[str, type[RowWeighting]] = {"wanda": SinkWeightedWanda, "sparsegpt": SinkWeightedSparseGPT}
