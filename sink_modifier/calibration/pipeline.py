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

from sink_modifier import families
from sink_modifier.calibration.handoff import SinkCalibration, handed_to
from sink_modifier.calibration.scales import StateScales, calibration_rows, warn_if_ranks_share_data
from sink_modifier.calibration.trajectory import TrajectoryResult, TrajectorySettings, run_trajectory
from sink_modifier.errors import UserError
from sink_modifier.families import Family, FamilyOptions
from sink_modifier.saving.report import save_plan

__all__ = ["DiffusionPipeline", "state_dataloader"]


def state_dataloader(result: TrajectoryResult, family: Family) -> tuple[DataLoader, StateScales]:
    """One batch per state, in a fixed order, and the matching row scales [1, G, T] per batch and stream."""
    layout = family.calibration
    batches, scales = [], []
    for sample in result.samples:
        batches.extend(layout.calibration_batches(sample.states))
        for state, state_scales in zip(sample.states, sample.row_scales, strict=True):
            streams = layout.stream_scales(state, state_scales)
            scales.append({stream: value.unsqueeze(0) for stream, value in streams.items()})
    loader = DataLoader(batches, batch_size=None, shuffle=False)
    return loader, StateScales(scales)


def _recipe_settings(modifiers: list) -> tuple[TrajectorySettings, str, FamilyOptions]:
    """The one trajectory and family every sink-aware modifier of the recipe asks for."""
    if not modifiers:
        return TrajectorySettings(), "auto", FamilyOptions()
    asked = [(m.trajectory_settings(), *m.family_selection()) for m in modifiers]
    if any(entry != asked[0] for entry in asked):
        raise UserError(
            "The diffusion pipeline runs one trajectory for the whole recipe, but its "
            "SinkAwarePruningModifiers ask for different trajectory, sink or family settings; make them equal"
        )
    return asked[0]


@CalibrationPipeline.register("diffusion")
class DiffusionPipeline(CalibrationPipeline):
    @staticmethod
    def __call__(model: torch.nn.Module, dataloader: DataLoader, dataset_args):
        if dataloader is None:
            raise UserError("The diffusion pipeline needs calibration data: pass a dataset to oneshot")
        recipe = active_session().lifecycle.recipe
        # The sink-aware modifiers are the ones carrying trajectory settings.
        modifiers = [m for m in recipe.modifiers if isinstance(m, TrajectorySettings)]
        settings, family_name, options = _recipe_settings(modifiers)
        family = families.resolve(model, family_name, options)
        family.checkpoint.prepare(model)
        # A recipe without a SinkAwarePruningModifier still needs the family's save path (DiffusionGemma's
        # shared modules); the modifier adds its report when it finalizes.
        save_plan(model, family.checkpoint)
        warn_if_ranks_share_data(dataloader)
        rows = list(calibration_rows(dataloader))
        if not rows or not any(valid.any() for _, valid in rows):
            raise UserError("The calibration dataset is empty (or all padding)")
        targets = infer_sequential_targets(model, dataset_args.sequential_targets)
        layers = dict(match_named_modules(model, targets))
        samples = [row[valid] for row, valid in rows if valid.any()]
        result = run_trajectory(model, family, samples, settings, layers=layers)
        states, scales = state_dataloader(result, family)
        all_states = [state for sample in result.samples for state in sample.states]
        calibration = SinkCalibration(family, settings, scales, result)
        with handed_to(calibration, recipe.modifiers), calibration.feeding(model, all_states):
            if family.calibration.needs_state_pipeline:
                # Weights shared by several streams (DiffusionGemma's encoder and decoder) are called from
                # several layers of one forward; llm-compressor's layer-by-layer pipeline would compress them
                # after the first, so every module is calibrated over whole forwards and compressed at the end.
                BasicPipeline()(model, states, dataset_args)
            else:
                SequentialPipeline()(model, states, dataset_args)
