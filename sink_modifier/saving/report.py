"""Saving: the sink report travels with the model, and no save leaves a half-written or mixed checkpoint.

``oneshot`` saves the model after every modifier has finalized and never tells modifiers where; wrapping the
model's own ``save_pretrained`` is the one place that sees the output directory, whatever entry point saves.
The wrapper writes the checkpoint and ``sink_report.json`` into a staging directory and publishes it with
``sink_modifier.saving.publish`` (``existing="merge"``: a new directory by one rename; an existing one filled in
place at its top level, replacing only what the manifest of an earlier save of ours lists, keeping the user's
``recipe.yaml`` / ``sink_report.json`` next to ours under other names, refusing any other taken name), so a
crash, an exception or Ctrl-C at any moment leaves the old output or the new one and no file of the user's is
deleted or replaced.
"""

from __future__ import annotations

import contextlib
import functools
import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sink_modifier import compat
from sink_modifier.families import CheckpointHooks
from sink_modifier.saving.publish import staged

REPORT_NAME = "sink_report.json"


def write_report(report: dict, directory: str | Path) -> Path:
    path = Path(directory) / REPORT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True))
    tmp.replace(path)
    return path


@dataclass
class SavePlan:
    """What the next ``save_pretrained`` of a model writes besides the weights: its family's checkpoint hooks
    and the sink report. The modifier and the pipeline fill it in; the save wrapper reads only this."""

    checkpoint: CheckpointHooks | None = None
    report: dict | None = None
    #: config.json fields to set after saving: llm-compressor re-saves the *original* config over transformers'
    #: (patching only the fields it changes itself), so a structured run's new widths are written here
    config_fields: dict = field(default_factory=dict)
    #: more top-level sections of the report, each owned by one modifier (``expert_pruning``)
    sections: dict[str, dict] = field(default_factory=dict)

    def full_report(self) -> dict | None:
        return {**self.report, **self.sections} if self.report is not None else (self.sections or None)


_PLANS: weakref.WeakKeyDictionary[torch.nn.Module, SavePlan] = weakref.WeakKeyDictionary()


def save_plan(model: torch.nn.Module, checkpoint: CheckpointHooks | None = None) -> SavePlan:
    """The model's save plan; the first call makes ``model.save_pretrained(dir)`` stage the checkpoint (inside
    the family's ``saving`` context, edited by its ``finish_checkpoint``) plus the report, then publish it."""
    plan = _PLANS.get(model)
    if plan is None:
        plan = _PLANS[model] = SavePlan()
        _wrap_save_pretrained(model, plan)
    if checkpoint is not None:
        plan.checkpoint = checkpoint
    return plan


def _wrap_save_pretrained(model: torch.nn.Module, plan: SavePlan) -> None:
    original = model.save_pretrained

    @functools.wraps(original)
    def save_pretrained(save_directory, *args, **kwargs):
        with staged(save_directory, existing="merge") as staging:
            hooks = plan.checkpoint
            with hooks.saving(model) if hooks is not None else contextlib.nullcontext():
                result = original(str(staging), *args, **kwargs)
            if hooks is not None:
                hooks.finish_checkpoint(model, staging)
            if plan.config_fields:
                _set_config_fields(Path(staging) / "config.json", plan.config_fields)
            if plan.full_report() is not None:
                write_report(plan.full_report(), staging)
        return result

    compat.replace_save_pretrained(model, save_pretrained)


def _set_config_fields(path: Path, fields: dict) -> None:
    """Set ``fields`` in a saved config.json (in its ``text_config`` where the model keeps them there)."""
    config = json.loads(path.read_text())
    target = config.get("text_config", config) if all(k in config.get("text_config", {}) for k in fields) \
        else config
    target.update(fields)
    path.write_text(json.dumps(config, indent=2, sort_keys=True))
