"""lm-evaluation-harness tasks shipped with the package (``sink-prune eval --tasks`` finds them by itself).

``bundled_cloze``: a multiple-choice cloze over the bundled evaluation slice, so that downstream accuracy can be
measured offline (``make_bundled_cloze.py`` builds its data).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["TASKS_DIR", "load_local_json"]

TASKS_DIR = Path(__file__).resolve().parent


def load_local_json(data_files: dict[str, str], **_):
    """datasets' ``json`` builder with ``data_files`` relative to this directory: a task YAML's ``data_files``
    would otherwise be resolved against the working directory. Other keyword arguments (lm-eval passes the
    task's metadata) are ignored."""
    import datasets

    return datasets.load_dataset("json", data_files={split: str(TASKS_DIR / name)
                                                     for split, name in data_files.items()})
