"""``num_calibration_samples`` is exact: the report, the trajectory and the pruning see the same N rows.

A dataset of a few hundred rows with ``num_calibration_samples=4``, for both pipelines, with llm-compressor's
shuffling on and off. The rows the pipeline actually fed (seen at the input embedding during calibration) must
be exactly the rows the trajectory phase measured, each once, and every pruned module must have been
calibrated on exactly 4 samples (default pipeline) or 4 x K states (diffusion pipeline).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from datasets import Dataset
from llmcompressor import oneshot

from conftest import load_model
from sink_modifier import SinkAwarePruningModifier
from sink_modifier.calibration.scales import SampleScales
from sink_modifier.seeding import content_id

ROWS, SAMPLES, LEVELS, LENGTH = 300, 4, 3, 12


def big_dataset() -> Dataset:
    generator = torch.Generator().manual_seed(0)
    # ids 5.. avoid the toy tokenizer's special tokens; every row is distinct
    rows = torch.randint(5, 90, (ROWS, LENGTH), generator=generator)
    return Dataset.from_dict({"input_ids": rows.tolist()})


@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffled", "ordered"])
@pytest.mark.parametrize("pipeline", ["independent", "diffusion"])
@pytest.mark.slow
def test_exactly_num_calibration_samples(dlm_path, monkeypatch, pipeline, shuffle):
    model = load_model(dlm_path)
    calls: Counter = Counter()
    fed: list[str] = []  # the clean rows the default pipeline fed to the input embedding while calibrating
    weigh, observe = SinkAwarePruningModifier._weighted_rows, SampleScales.observe

    def counting(self, module, inputs):
        calls[self._module_names[module]] += 1
        return weigh(self, module, inputs)

    def recording(self, batch_idx, input_ids):
        fed.extend(content_id(row) for row in input_ids)
        return observe(self, batch_idx, input_ids)

    monkeypatch.setattr(SinkAwarePruningModifier, "_weighted_rows", counting)
    monkeypatch.setattr(SampleScales, "observe", recording)
    modifier = SinkAwarePruningModifier(sparsity=0.5, noise_levels=LEVELS)
    oneshot(model=model, dataset=big_dataset(), recipe=[modifier], pipeline=pipeline,
            num_calibration_samples=SAMPLES, shuffle_calibration_samples=shuffle, max_seq_length=LENGTH)

    report = modifier.report
    assert report["num_samples"] == SAMPLES
    assert report["num_states"] == SAMPLES * LEVELS
    measured = Counter(sample["id"] for sample in report["samples"])
    assert len(measured) == SAMPLES and set(measured.values()) == {1}

    batches = SAMPLES * LEVELS if pipeline == "diffusion" else SAMPLES
    assert calls and set(calls.values()) == {batches}, calls  # every module: one call per batch
    if pipeline == "independent":
        assert Counter(fed) == measured  # the pipeline calibrated on exactly the measured rows, each once
    else:
        assert not fed  # the diffusion pipeline feeds its own states, looked up by index
