"""``SampleScales``: finding a clean calibration row's sink row scales, and checking the pipeline fed each
measured sample as often as it was measured."""

from __future__ import annotations

import pytest
import torch

from sink_modifier.calibration.scales import CalibrationMismatchError, SampleScales


def test_repeated_calibration_rows_are_one_sample_twice():
    """A calibration text may repeat a paragraph: identical rows (identical scales, content-seeded) match either
    copy, and the count check still catches a row that never came or came too often."""
    rows = [torch.tensor([5, 6, 7]), torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10])]

    def measured() -> SampleScales:
        scales = SampleScales()
        for row in rows:
            scales.add(row, torch.ones(3, dtype=torch.bool), row, torch.full((1, 3), float(row[0])))
        return scales

    fed = measured()
    fed.observe(0, torch.stack([rows[2], rows[0]]))
    fed.observe(1, torch.stack([rows[1]]))
    fed.verify()
    assert torch.equal(fed.batch_scales(1), torch.full((1, 1, 3), 5.0))
    for batches in ([rows[0], rows[2]], [rows[0], rows[0], rows[0], rows[2]]):
        short = measured()
        short.observe(0, torch.stack(batches))
        with pytest.raises(CalibrationMismatchError, match="never came|more often"):
            short.verify()
