"""The ``diffusion`` calibration pipeline: calibrate every modifier on the denoising states themselves.

``oneshot(..., pipeline="diffusion")`` first runs the trajectory phase on the dense model (each clean sample
becomes K noised states, measured with the attention probe), then hands a dataloader of those states to
llm-compressor's own sequential pipeline. Every modifier in the recipe, quantizers included, therefore
calibrates on what the model sees while it denoises; ``SinkAwarePruningModifier`` additionally weights each
state's tokens by that state's own sink row scales (the reference Wanda variant's semantics).
"""

from __future__ import annotations

import torch
from compressed_tensors.utils import match_named_modules
from llmcompressor.core import active_session
from llmcompressor.pipelines.basic import BasicPipeline
from llmcompressor.pipelines.registry import CalibrationPipeline
from llmcompressor.pipelines.sequential import SequentialPipeline
from llmcompressor.utils.pytorch.module import infer_sequential_targets
from torch.utils.data import DataLoader

from sink_modifier.adapters import DiffusionAdapter, adapter_for
from sink_modifier.errors import UserError
from sink_modifier.modifier import SinkAwarePruningModifier
from sink_modifier.report import attach_report
from sink_modifier.scales import StateScales, calibration_rows, warn_if_ranks_share_data
from sink_modifier.trajectory import TrajectoryResult, TrajectorySettings, run_trajectory

__all__ = ["DiffusionPipeline", "state_dataloader"]


def state_dataloader(result: TrajectoryResult, adapter: DiffusionAdapter) -> tuple[DataLoader, StateScales]:
    """One batch per state, in a fixed order, and the matching row scales [1, G, T] per batch and stream."""
    batches, scales = [], []
    for sample in result.samples:
        batches.extend(adapter.calibration_batches(sample.states))
        for state, state_scales in zip(sample.states, sample.row_scales, strict=True):
            streams = adapter.stream_scales(state, state_scales)
            scales.append({stream: value.unsqueeze(0) for stream, value in streams.items()})
    loader = DataLoader(batches, batch_size=None, shuffle=False)
    return loader, StateScales(scales)


def _settings(modifiers: list[SinkAwarePruningModifier]) -> tuple[TrajectorySettings, dict]:
    if not modifiers:
        return TrajectorySettings(), {"family": "auto", "mask_token_id": None}
    settings = [m.trajectory_settings() for m in modifiers]
    if any(s != settings[0] for s in settings):
        raise UserError(
            "The diffusion pipeline runs one trajectory for the whole recipe, but its "
            "SinkAwarePruningModifiers ask for different trajectory or sink settings; make them equal"
        )
    first = modifiers[0]
    return settings[0], {"family": first.adapter, "mask_token_id": first.mask_token_id}


@CalibrationPipeline.register("diffusion")
class DiffusionPipeline(CalibrationPipeline):
    @staticmethod
    def __call__(model: torch.nn.Module, dataloader: DataLoader, dataset_args):
        if dataloader is None:
            raise UserError("The diffusion pipeline needs calibration data: pass a dataset to oneshot")
        session = active_session()
        modifiers = [
            m for m in session.lifecycle.recipe.modifiers if isinstance(m, SinkAwarePruningModifier)
        ]
        settings, adapter_args = _settings(modifiers)
        # The modifiers' own adapter: it tracks streams during calibration for their hooks.
        adapter = modifiers[0].adapter_instance if modifiers else adapter_for(model, **adapter_args)
        adapter.prepare(model)
        # A recipe without a SinkAwarePruningModifier still needs the family's save path (DiffusionGemma's
        # shared modules); the modifier adds its report here when it finalizes.
        attach_report(model, None, adapter=adapter)
        warn_if_ranks_share_data(dataloader)
        rows = list(calibration_rows(dataloader))
        if not rows or not any(valid.any() for _, valid in rows):
            raise UserError("The calibration dataset is empty (or all padding)")
        targets = infer_sequential_targets(model, dataset_args.sequential_targets)
        layers = dict(match_named_modules(model, targets))
        samples = [row[valid] for row, valid in rows if valid.any()]
        result = run_trajectory(model, adapter, samples, settings, layers=layers)
        states, scales = state_dataloader(result, adapter)
        for modifier in modifiers:
            modifier.use_trajectory(result, scales, adapter)
        all_states = [state for sample in result.samples for state in sample.states]
        with adapter.calibrating(model, all_states):
            if len(adapter.streams) > 1:
                # Weights shared by several streams (DiffusionGemma's encoder and decoder) are called from
                # several layers of one forward; llm-compressor's layer-by-layer pipeline would compress them
                # after the first, so every module is calibrated over whole forwards and compressed at the end.
                BasicPipeline()(model, states, dataset_args)
            else:
                SequentialPipeline()(model, states, dataset_args)
