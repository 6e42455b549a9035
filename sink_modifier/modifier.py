"""``SinkAwarePruningModifier``: llm-compressor's Wanda / SparseGPT with sink-aware token weights.

The modifier is deliberately thin. The pruning math (statistics accumulation, mask selection, unstructured
and N:M) is llm-compressor's own ``WandaPruningModifier`` / ``SparseGPTModifier`` code, which this class holds as
an *engine* and calls from its hooks. The only thing added is the token weighting: before an input reaches the
engine, every token's row is multiplied by its sink row scale (``1 - s`` in the paper), so the engine
accumulates ``sum (r x)^2`` (Wanda) and ``sum (r x)(r x)^T`` (SparseGPT), exactly what the reference code does.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from compressed_tensors.offload.dist_utils import is_distributed
from compressed_tensors.utils import match_named_modules
from llmcompressor.core import Event, State, active_session
from llmcompressor.modeling.moe.context import get_calibrate_all_experts_flag
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
from llmcompressor.utils.pytorch.module import infer_sequential_targets
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator

from sink_modifier import compat
from sink_modifier.adapters import AdapterName, DiffusionAdapter, adapter_for
from sink_modifier.compat import make_saveable
from sink_modifier.errors import UserError
from sink_modifier.report import attach_report
from sink_modifier.scales import (
    SampleScales,
    StateScales,
    calibration_rows,
    same_draw_as_pipeline,
    warn_if_ranks_share_data,
)
from sink_modifier.trajectory import TrajectoryResult, TrajectorySettings, run_trajectory

__all__ = ["SinkAwarePruningModifier"]

_NM = re.compile(r"^(\d+):(\d+)$")


class SinkAwarePruningModifier(compat.SparsityModifierBase, TrajectorySettings):
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

    sparsity: float | list[float] = 0.5
    method: Literal["wanda", "sparsegpt"] = "wanda"
    # None: the model's decoder layers (the sequential targets), so the LM head and embeddings are never in
    # scope whatever the model calls them.
    targets: str | list[str] | None = None
    # Routers (MoE expert choice) and vision towers are never pruned either.
    ignore: list[str] = Field(
        default_factory=lambda: ["re:.*lm_head.*", "re:.*embed.*", "re:.*router.*", "re:.*vision.*"]
    )
    adapter: AdapterName = "auto"
    mask_token_id: int | None = Field(None, ge=0)
    # masked DLMs: token ids the forward noise never masks (None: the config's BOS and pad; []: none)
    never_mask_token_ids: list[int] | None = None
    # SparseGPT only
    block_size: int = Field(128, ge=1)
    dampening_frac: float = Field(0.01, ge=0.0)
    offload_hessians: bool = False

    _engine: WandaPruningModifier | SparseGPTModifier | None = PrivateAttr(None)
    _adapter: DiffusionAdapter | None = PrivateAttr(None)
    _scales: SampleScales | StateScales | None = PrivateAttr(None)
    _trajectory: TrajectoryResult | None = PrivateAttr(None)
    _module_group: dict[torch.nn.Module, int] = PrivateAttr(default_factory=dict)
    _device_scales: tuple[tuple, torch.Tensor] | None = PrivateAttr(None)

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
        match = _NM.match(str(value))
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

    def trajectory_settings(self) -> TrajectorySettings:
        return TrajectorySettings(**{k: getattr(self, k) for k in TrajectorySettings.model_fields})

    # ---- lifecycle ----

    def on_initialize(self, state: State, **kwargs) -> bool:
        model = state.model
        calib = state.data.calib
        if calib is None or (hasattr(calib, "__len__") and len(calib) == 0):
            raise UserError("SinkAwarePruningModifier needs calibration data, and the calibration set is empty")
        # Fail (or fix) now, not after hours of calibration: a model that cannot be driven or saved.
        make_saveable(model)
        self._adapter = adapter_for(model, family=self.adapter, mask_token_id=self.mask_token_id,
                                    never_mask_token_ids=self.never_mask_token_ids)
        if self.adapter == "auto" and self._adapter.name == "autoregressive":
            logger.warning(
                f"{type(model).__name__} attends causally: it is an autoregressive model, not a diffusion LM. "
                "Sink-aware pruning is meant for diffusion LMs (an AR model's sink stays on its first token, "
                "so the weighting does little); it proceeds with the autoregressive adapter. Set adapter: "
                "autoregressive to silence this"
            )
        self._adapter.prepare(model)  # before targets are resolved: it may restructure modules
        if self.targets is None:
            self.targets = self._adapter.layer_targets(model) or sorted(
                infer_sequential_targets(model, kwargs.get("sequential_targets"))
            )
        super().on_initialize(state, **kwargs)
        if not self._target_layers:
            raise UserError(f"targets {self.targets} matched no module of {type(model).__name__}")
        engine_cls = WandaPruningModifier if self.method == "wanda" else SparseGPTModifier
        extra = (
            {}
            if self.method == "wanda"
            else dict(block_size=self.block_size, dampening_frac=self.dampening_frac,
                      offload_hessians=self.offload_hessians)
        )
        self._engine = engine_cls(
            sparsity=self.sparsity, mask_structure=self.mask_structure, targets=self.targets,
            ignore=self.ignore, **extra,
        )
        # Checks that need only the modules in scope run now, before the trajectory phase spends any time.
        planned = self._planned_modules()
        self._check_in_scope(model, planned)
        if self.method == "sparsegpt" and len(self._adapter.streams) > 1:
            self._check_hessians_fit(planned)
        return True

    def _planned_modules(self) -> dict[torch.nn.Module, str]:
        """The Linears the engine will hook: llm-compressor's own selection (target layers, minus ignore)."""
        from compressed_tensors.utils import match_targets

        planned = {}
        for layer_name, layer in self._target_layers.items():
            for name, module in match_named_modules(layer, compat.PRUNABLE_LAYER_TYPES):
                name = f"{layer_name}.{name}"
                if not match_targets(name, module, self.ignore) and not isinstance(module, torch.nn.Embedding):
                    planned.setdefault(module, name)
        return planned

    @property
    def adapter_instance(self) -> DiffusionAdapter:
        return self._adapter

    def use_trajectory(self, result: TrajectoryResult, scales: StateScales, adapter: DiffusionAdapter) -> None:
        """Called by the ``diffusion`` pipeline, which measured the trajectory and calibrates on its states."""
        self._trajectory, self._scales, self._adapter = result, scales, adapter

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        model = state.model
        if self._scales is None:
            if len(self._adapter.streams) > 1:
                raise UserError(
                    f"{type(model).__name__} calibrates on its recorded denoising states (encoder prefill and "
                    "decoder canvas steps), which only the diffusion pipeline feeds: pass pipeline='diffusion' "
                    "to oneshot"
                )
            self._scales = self._measure_clean_samples(model, state.data.calib)
            embedding = model.get_input_embeddings()
            self.register_hook(embedding, self._observe_batch, "forward_pre")
        super().on_calibration_start(state, event, **kwargs)
        compat.share_bookkeeping(self._engine, self._module_names, self._module_sparsities)
        self._map_layer_scope(model)  # scope itself was checked in on_initialize, on the same selection

    def calibrate_module(self, module: torch.nn.Module, args: tuple, output: torch.Tensor):
        inp = args[0]
        if not torch.isfinite(inp).all():
            raise FloatingPointError(
                f"Non-finite input to {self._module_names[module]} during calibration: the model overflows in "
                f"{inp.dtype} on this data; load it in bfloat16 or float32"
            )
        scale = self._current_scales(inp.device)[:, self._module_group.get(module, 0)]  # [B, T] of this stream
        if inp.dim() == 3 and inp.shape[:2] == scale.shape:
            weighted = inp.float() * scale.unsqueeze(-1)
        elif inp.dim() == 2 and inp.shape[0] == scale.numel() and get_calibrate_all_experts_flag():
            # MoE experts see every token, in token order, only with llm-compressor's all-experts flag;
            # otherwise their rows are the routed tokens in routing order and cannot be matched.
            weighted = inp.float() * scale.reshape(-1, 1)
        else:
            raise UserError(
                f"{self._module_names[module]} received input {tuple(inp.shape)} that cannot be matched to "
                f"the {tuple(scale.shape)} tokens of its batch, so its rows cannot be sink-weighted"
                + (" (MoE experts need oneshot(..., moe_calibrate_all_experts=True), the default)"
                   if inp.dim() == 2 else "")
            )
        self._engine.calibrate_module(module, (weighted, *args[1:]), output)

    def compress_modules(self):
        if isinstance(self._scales, SampleScales):
            self._scales.verify()
        if is_distributed():
            compat.reduce_statistics_across_ranks(self._engine, self.method)
        self._engine.compress_modules()

    def on_finalize(self, state: State, **kwargs) -> bool:
        if not self.ended_:
            self.on_end(state, None)
        left = compat.uncompressed_modules(self._engine)
        if left:
            raise ValueError(f"Failed to compress {left} modules")
        if self._trajectory is not None:
            attach_report(state.model, self._trajectory.report(self.trajectory_settings(), self._adapter),
                          adapter=self._adapter)
        self._scales = self._device_scales = None
        self._module_names, self._module_sparsities, self._module_group = {}, {}, {}
        return True

    # ---- helpers ------

    @property
    def report(self) -> dict | None:
        if self._trajectory is None:
            return None
        return self._trajectory.report(self.trajectory_settings(), self._adapter)

    def _measure_clean_samples(self, model, dataloader) -> SampleScales:
        """Pre-pass for ordinary pipelines: each clean sample gets its timestep-averaged row scales.

        Exactly the rows the pipeline is about to calibrate on are measured (``same_draw_as_pipeline``).
        """
        warn_if_ranks_share_data(dataloader)
        with same_draw_as_pipeline():
            rows = list(calibration_rows(dataloader))
            if not rows:
                raise UserError("The calibration dataset is empty")
            if not all(valid.any() for _, valid in rows):
                raise UserError("A calibration sample is all padding; remove empty samples from the dataset")
            layers = dict(match_named_modules(model, self._sequential_targets))
            result = run_trajectory(model, self._adapter, [row[valid] for row, valid in rows],
                                    self.trajectory_settings(), layers=layers)
        scales = SampleScales(pad_token_id=getattr(model.config, "pad_token_id", None))
        for (row, valid), sample in zip(rows, result.samples, strict=True):
            scales.add(row, valid, sample.tokens, sample.mean_row_scales)
        self._trajectory = result
        return scales

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

    def _observe_batch(self, module, args):
        self._scales.observe(active_session().state.current_batch_idx, args[0])

    def _current_scales(self, device: torch.device) -> torch.Tensor:
        key = (active_session().state.current_batch_idx, self._adapter.current_stream)
        if self._device_scales is None or self._device_scales[0] != key:
            scales = self._scales.batch_scales(*key)
            self._device_scales = (key, scales.to(device=device, dtype=torch.float32))
        return self._device_scales[1]

    def _check_in_scope(self, model: torch.nn.Module, modules: dict[torch.nn.Module, str]):
        """Refuse to prune the LM head, an embedding, or what the model family protects (routers, vision)."""
        self._adapter.check_scope(list(modules.values()))
        output_embeddings = model.get_output_embeddings()
        for module, name in modules.items():
            if module is output_embeddings or isinstance(module, torch.nn.Embedding):
                raise UserError(
                    f"The recipe would prune {name}, the model's LM head or an embedding; narrow targets to "
                    "the decoder layers or add a matching pattern (e.g. 're:.*lm_head.*') to ignore"
                )

    def _map_layer_scope(self, model: torch.nn.Module):
        """With ``sink_scope: layer`` map each Linear to its layer's scales."""
        if self.sink_scope != "layer":
            return
        layers = list(match_named_modules(model, self._adapter.layer_targets(model) or self._sequential_targets))
        attention_layers = len(self._trajectory.layer_names) if self._trajectory else None
        if attention_layers is not None and attention_layers != len(layers):
            raise UserError(
                f"sink_scope 'layer' needs one attention layer per decoder layer; found "
                f"{attention_layers} attention layers and {len(layers)} decoder layers. Use sink_scope: global"
            )
        for index, (_, layer) in enumerate(layers):
            for sub in layer.modules():
                self._module_group[sub] = index
