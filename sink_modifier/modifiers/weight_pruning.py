"""``SinkAwarePruningModifier``: the recipe entry point of sink-aware Wanda / SparseGPT.

The modifier is deliberately thin. The sink lifecycle it shares with the structured modifier (``sink_rows``:
the family, the trajectory, each row's sink scale) feeds llm-compressor's own pruning modifier (``engines``:
Wanda or SparseGPT with a row-weighting mixin) the function that scales each token's input row by its sink row
scale. Lifecycle events are passed to that engine unchanged.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from llmcompressor.core import Event, State
from llmcompressor.modifiers import Modifier
from pydantic import Field, PrivateAttr, field_validator

from sink_modifier.errors import UserError
from sink_modifier.modifiers.engines import ENGINES, RowWeighting
from sink_modifier.modifiers.sink_rows import SinkRowWeighting

__all__ = ["SinkAwarePruningModifier"]

_N_OF_M = re.compile(r"^(\d+):(\d+)$")


class SinkAwarePruningModifier(Modifier, SinkRowWeighting):
    """Prune a diffusion LM with Wanda or SparseGPT statistics that discount its attention sinks.

    ```yaml
    sparsity_stage:
      sparsity_modifiers:
        SinkAwarePruningModifier:
          sparsity: 0.5
          mask_structure: "2:4"
          method: wanda
    ```
    Every field is documented in docs/recipes.md.
    """

    requires_calibration_data: bool = True
    sparsity: float | list[float] = 0.5
    # llm-compressor's Wanda / SparseGPT take ``sparsity_profile: owl``; a recipe ported from them gets the
    # reason OWL is refused and what to write instead (below), not just "extra inputs are not permitted"
    sparsity_profile: None = None
    mask_structure: str = "0:0"
    method: Literal["wanda", "sparsegpt"] = "wanda"
    # SparseGPT only
    block_size: int = Field(128, ge=1)
    dampening_frac: float = Field(0.01, ge=0.0)
    offload_hessians: bool = False

    _engine: RowWeighting | None = PrivateAttr(None)

    # ---- validation (runs when a recipe is parsed) ----

    @field_validator("sparsity")
    @classmethod
    def _check_sparsity(cls, value):
        for s in value if isinstance(value, list) else [value]:
            if not 0.0 <= s < 1.0:
                raise ValueError(f"sparsity must be in [0, 1) (got {s}); 0.5 prunes half the weights")
        return value

    @field_validator("mask_structure", mode="before")
    @classmethod
    def _check_mask_structure(cls, value):
        if value in ("unstructured", None):
            return "0:0"
        match = _N_OF_M.match(str(value))
        if not match:
            raise ValueError(f"mask_structure must be 'unstructured' or 'N:M' like '2:4' (got {value!r})")
        n, m = map(int, match.groups())
        if (n, m) != (0, 0) and not 0 < n < m:
            raise ValueError(f"mask_structure {value!r}: N:M needs 0 < N < M (N zeros in every M weights)")
        return f"{n}:{m}"

    @field_validator("sparsity_profile", mode="before")
    @classmethod
    def _no_owl(cls, value):
        if value is not None:
            raise ValueError(
                "sparsity_profile is not supported: OWL calls run_calibration from on_initialize, which fails "
                "in llm-compressor 0.14; give a per-layer sparsity list instead"
            )
        return value

    # ---- lifecycle ----

    def on_initialize(self, state: State, **kwargs) -> bool:
        self._resolve_scope(state, **kwargs)
        if self.method == "sparsegpt" and self._family.calibration.needs_state_pipeline:
            self._check_hessians_fit(self._module_names)
        extra = {} if self.method == "wanda" else dict(
            block_size=self.block_size, dampening_frac=self.dampening_frac, offload_hessians=self.offload_hessians)
        self._engine = ENGINES[self.method](sparsity=self.sparsity, mask_structure=self.mask_structure,
                                            targets=self.targets, ignore=self.ignore, **extra)
        self._engine.weigh_rows_with(self._weighted_rows)
        self._engine.initialize(state, **kwargs)
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        self._start_sink_calibration(state)
        self._engine.update_event(state, event, **kwargs)  # the engine hooks its Linears

    def on_sequential_epoch_end(self, state: State, event: Event, **kwargs):
        self._verify_rows()
        self._engine.update_event(state, event, **kwargs)  # the engine selects masks and prunes

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        self.remove_hooks()
        self._engine.update_event(state, event, **kwargs)

    def on_finalize(self, state: State, **kwargs) -> bool:
        self._engine.finalize(state, **kwargs)
        self._finish_sink_calibration()
        return True

    # ---- helpers ------

    def _check_hessians_fit(self, modules: dict[torch.nn.Module, str]):
        """Refuse a SparseGPT run whose Hessians cannot all be held at once (docs/memory.md).

        Weights shared by several streams are calibrated over whole forwards, so every target's Hessian
        (``4 in_features^2`` bytes) is alive until the end: 234 GiB for DiffusionGemma-26B's experts. Failing
        here costs nothing; running out of memory after the trajectory phase costs hours.
        """
        import psutil

        need = sum(4 * m.weight.shape[1] ** 2 for m in modules)
        device = next(iter(modules)).weight.device
        if self.offload_hessians or device.type != "cuda":
            where, have = "CPU memory", psutil.virtual_memory().available
        else:
            where, have = f"free memory on {device}", torch.cuda.mem_get_info(device)[0]
        if need > 0.9 * have:
            raise UserError(
                f"SparseGPT here keeps every target's Hessian until calibration ends: {need / 2**30:.1f} GiB, "
                f"more than the {have / 2**30:.1f} GiB of {where}. Use method: wanda (row statistics: "
                f"{sum(4 * m.weight.shape[1] for m in modules) / 2**20:.1f} MiB), set "
                "offload_hessians: true on a machine with enough RAM, or prune fewer layers per run (targets)"
            )
