"""The ``diffusion`` pipeline hands its calibration to the recipe's modifiers explicitly and takes it back: no
state outside the modifiers carries it, so another modifier or a later run in the same process never sees it."""

from __future__ import annotations

import pytest
from llmcompressor import oneshot
from llmcompressor.modifiers import Modifier
from pydantic import PrivateAttr

from conftest import calibration_dataset
from sink_modifier import SinkAwarePruningModifier, load_model
from sink_modifier.calibration.handoff import SinkCalibration, handed_to, receivers
from sink_modifier.calibration.scales import SampleScales, StateScales


class Receiver(Modifier):
    """Any modifier with ``receive_calibration``: records what it was handed, and what it held at calibration."""

    _received: list = PrivateAttr(default_factory=list)
    _at_start: object = PrivateAttr(None)
    _held: object = PrivateAttr(None)

    def receive_calibration(self, calibration):
        self._received.append(calibration)
        self._held = calibration

    def on_initialize(self, state, **kwargs) -> bool:
        return True

    def on_calibration_start(self, state, event, **kwargs):
        self._at_start = self._held


def test_the_pipeline_hands_its_calibration_to_each_receiver_and_takes_it_back(dlm_path):
    sink = SinkAwarePruningModifier(sparsity=0.5, noise_levels=2)
    receiver, bystander = Receiver(), SinkAwarePruningModifier(sparsity=0.5)
    oneshot(model=load_model(dlm_path), dataset=calibration_dataset(dlm_path), recipe=[sink, receiver],
            pipeline="diffusion")
    handed, taken_back = receiver._received
    assert isinstance(handed, SinkCalibration) and isinstance(handed.scales, StateScales)
    assert taken_back is None and receiver._at_start is handed  # held while calibrating, not after
    assert sink._handed is None and bystander._handed is None
    assert sink.report == handed.report()  # the sink modifier calibrated on the very calibration handed over


def test_a_later_run_with_the_default_pipeline_measures_its_own_rows(dlm_path):
    oneshot(model=load_model(dlm_path), dataset=calibration_dataset(dlm_path), pipeline="diffusion",
            recipe=[SinkAwarePruningModifier(sparsity=0.5, noise_levels=2)])
    later = SinkAwarePruningModifier(sparsity=0.5, noise_levels=2)
    seen = []
    original = later._measure_clean_samples

    def measured(model, dataloader):
        seen.append(original(model, dataloader))
        return seen[-1]

    object.__setattr__(later, "_measure_clean_samples", measured)
    oneshot(model=load_model(dlm_path), dataset=calibration_dataset(dlm_path), recipe=[later])
    assert len(seen) == 1 and isinstance(seen[0].scales, SampleScales)


def test_the_calibration_is_taken_back_when_calibration_fails():
    receiver = Receiver()
    calibration = SinkCalibration(None, None, StateScales([]))
    with pytest.raises(RuntimeError, match="broke"), handed_to(calibration, [object(), receiver]):
        raise RuntimeError("broke")
    assert receiver._received == [calibration, None]
    assert receivers([object(), receiver, SinkAwarePruningModifier(sparsity=0.5)])[0] is receiver
