"""What the sink-aware modifiers share: their sink fields, the scope they prune, and each calibration row's
sink row scale.

``SinkAwarePruningModifier`` (unstructured / N:M, through llm-compressor's Wanda and SparseGPT) and
``SinkAwareStructuredPruningModifier`` (whole channels and KV groups) differ only in what they do with the
weighted rows; resolving the family, measuring the trajectory (the ``diffusion`` pipeline's, or a pre-pass over
the clean calibration rows) and scaling every token's input row by its sink row scale live here, once.
"""

from __future__ import annotations

import torch
from compressed_tensors.utils import match_named_modules
from llmcompressor.core import active_session
from llmcompressor.modeling.moe.context import get_calibrate_all_experts_flag
from llmcompressor.utils.pytorch.module import infer_sequential_targets
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator

from sink_modifier import families
from sink_modifier.calibration import handoff as calibration
from sink_modifier.calibration.scales import SampleScales, calibration_rows, warn_if_ranks_share_data
from sink_modifier.calibration.trajectory import TrajectorySettings, run_trajectory
from sink_modifier.compat import make_saveable, same_draw_as_pipeline
from sink_modifier.errors import UserError
from sink_modifier.families import Family, FamilyOptions
from sink_modifier.modifiers.scope import check_in_scope, never_pruned_ignore, planned_modules, protect_output_head
from sink_modifier.saving.report import SavePlan, save_plan

__all__ = ["SinkFamilySettings", "SinkRowWeighting"]


class SinkFamilySettings(TrajectorySettings):
    """The fields every sink-aware modifier shares (trajectory, family and its options) and the calibration the
    ``diffusion`` pipeline hands it (a mixin for a Modifier)."""

    family: str = "auto"
    mask_token_id: int | None = Field(None, ge=0)
    # None: the family's default (a masked DLM's BOS and pad ids); [] lets the forward process mask every position
    never_mask_token_ids: list[int] | None = None

    _family: Family | None = PrivateAttr(None)
    _calibration: calibration.SinkCalibration | None = PrivateAttr(None)
    _handed: calibration.SinkCalibration | None = PrivateAttr(None)  # the diffusion pipeline's, while it runs
    _save: SavePlan | None = PrivateAttr(None)

    @field_validator("family")
    @classmethod
    def _known_family(cls, value):
        if value != "auto" and value not in families.names():
            raise ValueError(f"family must be auto or one of {families.names()} (got {value!r})")
        return value

    def trajectory_settings(self) -> TrajectorySettings:
        return TrajectorySettings(**{k: getattr(self, k) for k in TrajectorySettings.model_fields})

    def family_selection(self) -> tuple[str, FamilyOptions]:
        """The family this recipe asks for, as the pipeline and the modifier resolve it."""
        never = None if self.never_mask_token_ids is None else tuple(self.never_mask_token_ids)
        return self.family, FamilyOptions(mask_token_id=self.mask_token_id, never_mask_token_ids=never)

    def receive_calibration(self, measured: calibration.SinkCalibration | None) -> None:
        """The ``diffusion`` pipeline hands its calibration over before calibrating (and None after)."""
        self._handed = measured


class SinkRowWeighting(SinkFamilySettings):
    """Scope and the row-weighting lifecycle of a sink-aware weight-pruning modifier (a mixin for a Modifier)."""

    # None: the model's decoder layers (the sequential targets), so the LM head and embeddings are never in
    # scope whatever the model calls them.
    targets: str | list[str] | None = None
    # Routers (MoE expert choice) and vision towers are never pruned either.
    ignore: list[str] = Field(default_factory=never_pruned_ignore)

    _report: dict | None = PrivateAttr(None)
    _module_names: dict[torch.nn.Module, str] = PrivateAttr(default_factory=dict)
    _module_group: dict[torch.nn.Module, int] = PrivateAttr(default_factory=dict)
    _sequential_targets: list[str] = PrivateAttr(default_factory=list)
    _device_scales: tuple[tuple, torch.Tensor] | None = PrivateAttr(None)

    @property
    def report(self) -> dict | None:
        """The sink report of this run (also written next to the checkpoint as ``sink_report.json``)."""
        return self._report if self._calibration is None else self._calibration.report()

    # ---- lifecycle pieces, called by the modifiers ----

    def _resolve_scope(self, state, **kwargs) -> dict[str, torch.nn.Module]:
        """Resolve the family and the layers in scope, refusing what cannot run before any calibration.

        Returns the target layers by name; ``_module_names`` holds the Linears in scope.
        """
        model = state.model
        calib = state.data.calib
        if calib is None or (hasattr(calib, "__len__") and len(calib) == 0):
            raise UserError(f"{type(self).__name__} needs calibration data, and the calibration set is empty")
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
                 if not isinstance(m, SinkRowWeighting) and not getattr(m, "initialized", False)]
        protect_output_head(model, self._family.checkpoint.output_head(model), later)
        self._save = save_plan(model, self._family.checkpoint)
        return target_layers

    def _start_sink_calibration(self, state) -> None:
        """Find (``diffusion`` pipeline) or measure (pre-pass) the row scales of the batches about to run."""
        model = state.model
        self._calibration = self._handed
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

    def _verify_rows(self) -> None:
        """After a layer: the pipeline calibrated on exactly the rows the pre-pass measured."""
        if isinstance(self._calibration.scales, SampleScales):
            self._calibration.scales.verify()

    def _finish_sink_calibration(self) -> None:
        """Keep the sink report for the checkpoint and drop every per-run reference."""
        if self._calibration is not None:
            self._report = self._calibration.report()
            if self._report is not None:
                self._save.report = self._report
        self._calibration = self._device_scales = None
        self._module_names, self._module_group = {}, {}

    # ---- row weighting ----

    def _weighted_rows(self, module: torch.nn.Module, inp: torch.Tensor) -> torch.Tensor:
        """``inp`` with every token's row multiplied by its sink row scale (float32)."""
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

    def _measure_clean_samples(self, model, dataloader) -> calibration.SinkCalibration:
        """Pre-pass for ordinary pipelines: each clean sample gets its timestep-averaged row scales.

        Exactly the rows the pipeline is about to calibrate on are measured (``compat.same_draw_as_pipeline``).
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
