"""Where a model comes from, decided with the standard library only.

``sink-prune`` checks ``MODEL`` with this module before it imports torch or llm-compressor, so a typo'd local
path fails in a fraction of a second instead of after the imports (or after a minute of Hub retries). It must
therefore import nothing from the package: the CLI loads it by file when the package is not imported yet.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["LoadError", "resolve_source"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class LoadError(ValueError):
    """The checkpoint cannot be loaded as asked; the message says what to change."""


def resolve_source(name: str | os.PathLike) -> tuple[str, bool]:
    """(what to hand ``from_pretrained``, whether it is a Hub id); fails fast on what cannot be either."""
    text = str(name)
    if not text.strip():
        raise LoadError("the model path is empty (an unset shell variable?)")
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LoadError(f"{text}: no config.json in this directory; MODEL must be a checkpoint directory")
        return str(path), False
    if path.exists():
        raise LoadError(f"{text} is a file; MODEL must be a Hub id or a directory with config.json and weights")
    if not _HUB_ID.match(text) or text.startswith((".", "~")):
        raise LoadError(f"{text}: no such directory (a Hugging Face Hub id has the form org/name)")
    return text, True
