"""One owner of a run's trajectory: the calibration context the modifier's Linear hooks read.

Whoever runs the trajectory phase creates a ``SinkCalibration``: the ``diffusion`` pipeline (which then
calibrates on the states) or, in llm-compressor's own pipelines, the modifier's pre-pass on the clean rows.
The pipeline hands its calibration to the recipe's modifiers that take one (``CalibrationReceiver``: a
``receive_calibration`` method) before calibration starts and takes it back when it ends (``handed_to``); no
module or context-variable state carries it, so two runs in one process never see each other's. Which token
stream a forward belongs to is handed out by the family's ``calibrating`` context while the pipeline runs, never
stored on the family.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from sink_modifier.calibration.scales import SampleScales, StateScales
from sink_modifier.calibration.trajectory import TrajectoryResult, TrajectorySettings
from sink_modifier.families import DenoisingState, Family


@dataclass
class SinkCalibration:
    """Row scales of every calibration batch, the trajectory they came from, and the running stream."""

    family: Family
    settings: TrajectorySettings
    scales: SampleScales | StateScales
    trajectory: TrajectoryResult | None = None
    current_stream: Callable[[], str | None] = field(default=lambda: None)

    def report(self) -> dict | None:
        """The content of ``sink_report.json`` (None when no trajectory was measured)."""
        if self.trajectory is None:
            return None
        return self.trajectory.report(self.settings, self.family.name)

    @contextlib.contextmanager
    def feeding(self, model: torch.nn.Module, states: list[DenoisingState]) -> Iterator[None]:
        """While the pipeline runs ``states``: the family's calibration context, with its stream function."""
        with self.family.calibration.calibrating(model, states) as current_stream:
            previous, self.current_stream = self.current_stream, current_stream
            try:
                yield
            finally:
                self.current_stream = previous


@runtime_checkable
class CalibrationReceiver(Protocol):
    """A modifier that calibrates on the calibration a pipeline measured (None: the pipeline took it back)."""

    def receive_calibration(self, calibration: SinkCalibration | None) -> None: ...


def receivers(modifiers) -> list[CalibrationReceiver]:
    """The modifiers (of a recipe) that take a pipeline's calibration."""
    return [modifier for modifier in modifiers if isinstance(modifier, CalibrationReceiver)]


@contextlib.contextmanager
def handed_to(calibration: SinkCalibration, modifiers) -> Iterator[SinkCalibration]:
    """Give ``calibration`` to every receiver among ``modifiers`` for the block, and take it back after."""
    given = receivers(modifiers)
    try:
        for modifier in given:
            modifier.receive_calibration(calibration)
        yield calibration
    finally:
        for modifier in given:
            modifier.receive_calibration(None)
