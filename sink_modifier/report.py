"""Saving: the sink report travels with the model, and no save leaves a half-written or mixed checkpoint.

``oneshot`` saves the model after every modifier has finalized and never tells modifiers where; wrapping the
model's own ``save_pretrained`` is the one place that sees the output directory, whatever entry point saves.
The wrapper writes the checkpoint and ``sink_report.json`` into a staging directory and publishes it with
``sink_modifier.publish`` (one swap; the previous checkpoint's files, an old ``sink_report.json`` included, go,
other files stay), so a crash, an exception or Ctrl-C at any moment leaves the old output or the new one.
"""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

import torch

from sink_modifier import compat
from sink_modifier.publish import staged

REPORT_NAME = "sink_report.json"


def write_report(report: dict, directory: str | Path) -> Path:
    path = Path(directory) / REPORT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True))
    tmp.replace(path)
    return path


def attach_report(model: torch.nn.Module, report: dict | None, adapter=None) -> None:
    """Make ``model.save_pretrained(dir)`` stage the checkpoint plus ``report`` (if any), then publish it.

    ``adapter`` (a model family's adapter) wraps the save in its ``saving`` context and edits the staged
    directory with ``finish_checkpoint`` before it is published.
    """
    model._sink_report = report
    model._sink_adapter = adapter
    if getattr(model, "_sink_save_wrapped", False):
        return  # already wrapped; the wrapper reads the latest report and adapter
    model._sink_save_wrapped = True
    original = model.save_pretrained

    @functools.wraps(original)
    def save_pretrained(save_directory, *args, **kwargs):
        with staged(save_directory, existing="merge") as staging:
            adapter = model._sink_adapter
            with adapter.saving(model) if adapter is not None else contextlib.nullcontext():
                result = original(str(staging), *args, **kwargs)
            if adapter is not None:
                adapter.finish_checkpoint(model, staging)
            if model._sink_report is not None:
                write_report(model._sink_report, staging)
        return result

    compat.replace_save_pretrained(model, save_pretrained)
