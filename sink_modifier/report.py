"""Saving: the sink report travels with the model, and no run leaves a half-written checkpoint.

``oneshot`` saves the model after every modifier has finalized and never tells modifiers where; wrapping the
model's own ``save_pretrained`` is the one place that sees the output directory, whatever entry point saves.
The wrapper writes the checkpoint and ``sink_report.json`` into a temporary sibling directory and moves it into
place only once everything is written, so an exception or Ctrl-C while saving leaves the output directory as
it was (absent, if it did not exist).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(staging: Path, target: Path) -> None:
    """Move a complete ``staging`` directory to ``target``.

    A new target is one atomic rename. An existing target keeps its other files; each written file replaces
    its namesake atomically, config.json last, so a reader never sees new weights with an old config.
    """
    if not target.exists():
        os.replace(staging, target)
        return
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == "config.json")
    for source in files:
        destination = target / source.relative_to(staging)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, destination)
    shutil.rmtree(staging, ignore_errors=True)


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
        target = Path(save_directory).absolute()
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        staging.chmod(0o777 & ~_umask())  # mkdtemp's private 0700 would otherwise become the output's mode
        try:
            adapter = model._sink_adapter
            with adapter.saving(model) if adapter is not None else contextlib.nullcontext():
                result = original(str(staging), *args, **kwargs)
            if adapter is not None:
                adapter.finish_checkpoint(model, staging)
            if model._sink_report is not None:
                write_report(model._sink_report, staging)
            for path in staging.rglob("*"):  # transformers writes weights 0600; a checkpoint is meant to be shared
                if path.is_file():
                    path.chmod(0o666 & ~_umask())
            publish(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return result

    model.save_pretrained = save_pretrained
