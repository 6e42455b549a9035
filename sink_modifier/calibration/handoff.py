"""One owner of a run's trajectory: the calibration context the modifier's Linear hooks read.

Whoever runs the trajectory phase creates a ``SinkCalibration``: the ``diffusion`` pipeline (which then
calibrates on the states) or, in llm-compressor's own pipelines, the modifier's pre-pass on the clean rows.
The pipeline publishes its context with ``active(...)`` for the duration of its calibration; the modifier finds
it with ``current()``. Which token stream a forward belongs to is handed out by the family's ``calibrating``
context while the pipeline runs, never stored on the family.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

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


_ACTIVE: ContextVar[SinkCalibration | None] = ContextVar("sink_calibration", default=None)


@contextlib.contextmanager
def active(calibration: SinkCalibration) -> Iterator[SinkCalibration]:
    """Publish ``calibration`` to the modifiers for the duration of a pipeline run."""
    token = _ACTIVE.set(calibration)
    try:
        yield calibration
    finally:
        _ACTIVE.reset(token)


def current() -> SinkCalibration | None:
    """The calibration a pipeline is running now, if it published one."""
    return _ACTIVE.get()
