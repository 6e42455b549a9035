"""The sink report travels with the model: its ``save_pretrained`` writes ``sink_report.json`` too.

``oneshot`` saves the model after every modifier has finalized and never tells modifiers where; wrapping the
model's own ``save_pretrained`` is the one place that sees the output directory, whatever entry point saves.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

REPORT_NAME = "sink_report.json"


def write_report(report: dict, directory: str | Path) -> Path:
    path = Path(directory) / REPORT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True))
    tmp.replace(path)
    return path


def attach_report(model: torch.nn.Module, report: dict) -> None:
    """Make ``model.save_pretrained(dir)`` also write ``report`` to ``dir/sink_report.json``."""
    previous = getattr(model, "_sink_report", None)
    model._sink_report = report
    if previous is not None:
        return  # already wrapped; the wrapper reads the latest report
    original = model.save_pretrained

    @functools.wraps(original)
    def save_pretrained(save_directory, *args, **kwargs):
        result = original(save_directory, *args, **kwargs)
        write_report(model._sink_report, save_directory)
        return result

    model.save_pretrained = save_pretrained
