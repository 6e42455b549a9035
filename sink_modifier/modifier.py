"""``SinkAwarePruningModifier``: the recipe entry point of sink-aware Wanda / SparseGPT.

The modifier is deliberately thin. It resolves the model's family, makes sure a trajectory was measured (the
``diffusion`` pipeline's, or its own pre-pass over the clean calibration rows), and hands llm-compressor's own
pruning modifier (``engines``: Wanda or SparseGPT with a row-weighting mixin) the function that scales each
token's input row by its sink row scale. Lifecycle events are passed to that engine unchanged.
"""

from __future__ import annotations

import re
import warnings
from typing import Literal

import torch
from compressed_tensors.utils import match_named_modules
from llmcompressor.core import Event, State, active_session
from llmcompressor.modeling.moe.context import get_calibrate_all_experts_flag
from llmcompressor.modifiers import Modifier
from llmcompressor.utils.pytorch.module import infer_sequential_targets
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator, model_validator

from sink_modifier import calibration, families
from sink_modifier.compat import make_saveable
from sink_modifier.engines import ENGINES, RowWeighting
from sink_modifier.errors import UserError
from sink_modifier.families import Family, FamilyOptions
from sink_modifier.report import SavePlan, save_plan
from sink_modifier.scales import SampleScales, calibration_rows, same_draw_as_pipeline, warn_if_ranks_share_data
from sink_modifier.scope import check_in_scope, never_pruned_ignore, planned_modules, protect_output_head
from sink_modifier.trajectory import TrajectorySettings, run_trajectory

__all__ = ["SinkAwarePruningModifier"]

_N_OF_M = re.compile(r"^(\d+):(\d+)$")


class SinkAwarePruningModifier(Modifier, TrajectorySettings):
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
    sparsity_profile: str | None = None
    # llm-compressor's pruning fields that recipes written for its Wanda / SparseGPT (and recipe.yaml files saved
    # by earlier versions of this package) carry: accepted, with OWL refused below
    owl_m: int | None = None
    owl_lmbda: float | None = None
    sequential_update: bool | None = True
    mask_structure: str = "0:0"
    method: Literal["wanda", "sparsegpt"] = "wanda"
    # None: the model's decoder layers (the sequential targets), so the LM head and embeddings are never in
    # scope whatever the model calls them.
    targets: str | list[str] | None = None
    # Routers (MoE expert choice) and vision towers are never pruned either.
    ignore: list[str] = Field(default_factory=never_pruned_ignore)
    family: str = "auto"
    mask_token_id: int | None = Field(None, ge=0)
    # None: the family's default (a masked DLM's BOS and pad ids); [] lets the forward process mask every position
    never_mask_token_ids: list[int] | None = None
    # SparseGPT only
    block_size: int = Field(128, ge=1)
    dampening_frac: float = Field(0.01, ge=0.0)
    offload_hessians: bool = False

    _family: Family | None = PrivateAttr(None)
    _engine: RowWeighting | None = PrivateAttr(None)
    _calibration: calibration.SinkCalibration | None = PrivateAttr(None)
    _save: SavePlan | None = PrivateAttr(None)
    _report: dict | None = PrivateAttr(None)
    _module_names: dict[torch.nn.Module, str] = PrivateAttr(default_factory=dict)
    _module_group: dict[torch.nn.Module, int] = PrivateAttr(default_factory=dict)
    _sequential_targets: list[str] = PrivateAttr(default_factory=list)
    _device_scales: tuple[tuple, torch.Tensor] | None = PrivateAttr(None)

    # ---- validation (runs when a recipe is parsed) ----

    @model_validator(mode="before")
    @classmethod
    def _adapter_is_family(cls, values):
        """``adapter`` was this field's name before 0.2; it is still read, with a warning."""
        if isinstance(values, dict) and "adapter" in values:
            values = dict(values)
            old = values.pop("adapter")
            if values.get("family", old) != old:
                raise ValueError(f"adapter ({old!r}) and family ({values['family']!r}) disagree; keep family only")
            values["family"] = old
            message = "SinkAwarePruningModifier: 'adapter' is deprecated; rename it to 'family'"
            warnings.warn(message, DeprecationWarning, stacklevel=2)
            logger.warning(message)
        return values

    @field_validator("family")
    @classmethod
    def _known_family(cls, value):
        if value != "auto" and value not in families.names():
            raise ValueError(f"family must be auto or one of {families.names()} (got {value!r})")
        return value

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

    @field_validator("sparsity_profile", "owl_m", "owl_lmbda", mode="before")
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

    def family_selection(self) -> tuple[str, FamilyOptions]:
        """The family this recipe asks for, as the pipeline and the modifier resolve it."""
        never = None if self.never_mask_token_ids is None else tuple(self.never_mask_token_ids)
        return self.family, FamilyOptions(mask_token_id=self.mask_token_id, never_mask_token_ids=never)

    # ---- lifecycle ----

    def on_initialize(self, state: State, **kwargs) -> bool:
        model = state.model
        calib = state.data.calib
        if calib is None or (hasattr(calib, "__len__") and len(calib) == 0):
            raise UserError("SinkAwarePruningModifier needs calibration data, and the calibration set is empty")
        # Fail (or fix) now, not after hours of calibration: a model that cannot be driven or saved.
        make_saveable(model)
        self._family = families.resolve(model, *self.family_selection())
        if self.family == "auto" and not self._family.noise.is_diffusion:
            logger.warning(
                f"{type(model).__name__} attends causally: it is an autoregressive model, not a diffusion LM. "
                "Sink-aware pruning is meant for diffusion LMs (an AR model's sink stays on its first token, "
                "so the weighting does little); it proceeds as the autoregressive control. Set family: "
                "autoregressive to silence this"
            )
        self._family.checkpoint.prepare(model)  # before targets are resolved: it may restructure modules
        self._sequential_targets = infer_sequential_targets(model, kwargs.get("sequential_targets"))
        if self.targets is None:
            self.targets = self._family.calibration.layer_targets(model) or sorted(self._sequential_targets)
        target_layers = dict(match_named_modules(model, self.targets))
        if not target_layers:
            raise UserError(f"targets {self.targets} matched no module of {type(model).__name__}")
        # Checks that need only the modules in scope run now, before the trajectory phase spends any time.
        self._module_names = planned_modules(target_layers, self.ignore)
        self._family.checkpoint.check_scope(list(self._module_names.values()))
        check_in_scope(model, self._module_names)
        later = [m for m in getattr(active_session().lifecycle.recipe, "modifiers", None) or []
                 if not isinstance(m, SinkAwarePruningModifier) and not getattr(m, "initialized", False)]
        protect_output_head(model, self._family.checkpoint.output_head(model), later)
        if self.method == "sparsegpt" and self._family.calibration.needs_state_pipeline:
            self._check_hessians_fit(self._module_names)
        extra = {} if self.method == "wanda" else dict(
            block_size=self.block_size, dampening_frac=self.dampening_frac, offload_hessians=self.offload_hessians)
        self._engine = ENGINES[self.method](sparsity=self.sparsity, mask_structure=self.mask_structure,
                                            targets=self.targets, ignore=self.ignore, **extra)
        self._engine.weigh_rows_with(self._weighted_rows)
        self._engine.initialize(state, **kwargs)
        self._save = save_plan(model, self._family.checkpoint)
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        model = state.model
        self._calibration = calibration.current()
        if self._calibration is None:
            if self._family.calibration.needs_state_pipeline:
                raise UserError(
                    f"{type(model).__name__} calibrates on its recorded denoising states (encoder prefill and "
                    "decoder canvas steps), which only the diffusion pipeline feeds: pass pipeline='diffusion' "
                    "to oneshot"
                )
            self._calibration = self._measure_clean_samples(model, state.data.calib)
            self.register_hook(model.get_input_embeddings(), self._observe_batch, "forward_pre")
        self._map_layer_scope(model)
        self._engine.update_event(state, event, **kwargs)  # the engine hooks its Linears

    def on_sequential_epoch_end(self, state: State, event: Event, **kwargs):
        if isinstance(self._calibration.scales, SampleScales):
            self._calibration.scales.verify()
        self._engine.update_event(state, event, **kwargs)  # the engine selects masks and prunes

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        self.remove_hooks()
        self._engine.update_event(state, event, **kwargs)

    def on_finalize(self, state: State, **kwargs) -> bool:
        self._engine.finalize(state, **kwargs)
        if self._calibration is not None:
            self._report = self._calibration.report()
            if self._report is not None:
                self._save.report = self._report
        self._calibration = self._device_scales = None
        self._module_names, self._module_group = {}, {}
        return True

    @property
    def report(self) -> dict | None:
        """The sink report of this run (also written next to the checkpoint as ``sink_report.json``)."""
        return self._report if self._calibration is None else self._calibration.report()

    # ---- row weighting ------

    def _weighted_rows(self, module: torch.nn.Module, inp: torch.Tensor) -> torch.Tensor:
        name = self._module_names.get(module, type(module).__name__)
        if not torch.isfinite(inp).all():
            raise FloatingPointError(
                f"Non-finite input to {name} during calibration: the model overflows in "
                f"{inp.dtype} on this data; load it in bfloat16 or float32"
            )
        scale = self._current_scales(inp.device)[:, self._module_group.get(module, 0)]  # [B, T] of this stream
        if inp.dim() == 3 and inp.shape[:2] == scale.shape:
            return inp.float() * scale.unsqueeze(-1)
        if inp.dim() == 2 and inp.shape[0] == scale.numel() and get_calibrate_all_experts_flag():
            # MoE experts see every token, in token order, only with llm-compressor's all-experts flag;
            # otherwise their rows are the routed tokens in routing order and cannot be matched.
            return inp.float() * scale.reshape(-1, 1)
        raise UserError(
            f"{name} received input {tuple(inp.shape)} that cannot be matched to "
            f"the {tuple(scale.shape)} tokens of its batch, so its rows cannot be sink-weighted"
            + (" (MoE experts need oneshot(..., moe_calibrate_all_experts=True), the default)"
               if inp.dim() == 2 else "")
        )

    def _current_scales(self, device: torch.device) -> torch.Tensor:
        key = (active_session().state.current_batch_idx, self._calibration.current_stream())
        if self._device_scales is None or self._device_scales[0] != key:
            scales = self._calibration.scales.batch_scales(*key)
            self._device_scales = (key, scales.to(device=device, dtype=torch.float32))
        return self._device_scales[1]

    def _observe_batch(self, module, args):
        self._calibration.scales.observe(active_session().state.current_batch_idx, args[0])

    # ---- helpers ------

    def _measure_clean_samples(self, model, dataloader) -> calibration.SinkCalibration:
        """Pre-pass for ordinary pipelines: each clean sample gets its timestep-averaged row scales.

        Exactly the rows the pipeline is about to calibrate on are measured (``same_draw_as_pipeline``).
        """
        warn_if_ranks_share_data(dataloader)
        settings = self.trajectory_settings()
        with same_draw_as_pipeline():
            rows = list(calibration_rows(dataloader))
            if not rows:
                raise UserError("The calibration dataset is empty")
            if not all(valid.any() for _, valid in rows):
                raise UserError("A calibration sample is all padding; remove empty samples from the dataset")
            layers = dict(match_named_modules(model, self._sequential_targets))
            result = run_trajectory(model, self._family, [row[valid] for row, valid in rows], settings,
                                    layers=layers)
        scales = SampleScales(pad_token_id=getattr(model.config, "pad_token_id", None))
        for (row, valid), sample in zip(rows, result.samples, strict=True):
            scales.add(row, valid, sample.tokens, sample.mean_row_scales)
        return calibration.SinkCalibration(self._family, settings, scales, result)

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

    def _map_layer_scope(self, model: torch.nn.Module):
        """With ``sink_scope: layer`` map each Linear to its layer's scales."""
        if self.sink_scope != "layer":
            return
        targets = self._family.calibration.layer_targets(model) or self._sequential_targets
        layers = list(match_named_modules(model, targets))
        trajectory = self._calibration.trajectory
        attention_layers = len(trajectory.layer_names) if trajectory is not None else None
        if attention_layers is not None and attention_layers != len(layers):
            raise UserError(
                f"sink_scope 'layer' needs one attention layer per decoder layer; found "
                f"{attention_layers} attention layers and {len(layers)} decoder layers. Use sink_scope: global"
            )
        for index, (_, layer) in enumerate(layers):
            for sub in layer.modules():
                self._module_group[sub] = index
