"""Where a model comes from, decided with the standard library only.

``sink-prune`` checks ``MODEL`` with this module before it imports torch or llm-compressor, so a typo'd local
path fails in a fraction of a second instead of after the imports (or after a minute of Hub retries). It must
therefore import nothing from the package: the CLI loads it by file when the package is not imported yet.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

__all__ = ["LoadError", "check_checkpoint_files", "resolve_source"]

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
        check_checkpoint_files(path)
        return str(path), False
    if path.exists():
        raise LoadError(f"{text} is a file; MODEL must be a Hub id or a directory with config.json and weights")
    if not _HUB_ID.match(text) or text.startswith((".", "~")):
        raise LoadError(f"{text}: no such directory (a Hugging Face Hub id has the form org/name)")
    return text, True


def check_checkpoint_files(directory: Path) -> None:
    """The checkpoint's weights (each ``*.safetensors``: its header, and a size that holds every tensor it
    lists) and its JSON files, so that a truncated download or a corrupt file is named before anything loads."""
    for path in sorted(directory.glob("*.safetensors")):
        problem = _safetensors_problem(path)
        if problem:
            raise LoadError(f"{path} is truncated or not a safetensors file ({problem}); download or save the "
                            "checkpoint again")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json"):
        path = directory / name
        if path.is_file():
            try:
                json.loads(path.read_bytes())
            except ValueError as error:
                where = f" at line {error.lineno}" if isinstance(error, json.JSONDecodeError) else ""
                raise LoadError(f"{path} is not valid JSON ({getattr(error, 'msg', error)}{where}); download or "
                                "save the checkpoint again") from None


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with path.open("rb") as file:
        head = file.read(8)
        if len(head) < 8:
            return f"{size} bytes"
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            return f"a {length}-byte header in a {size}-byte file"
        try:
            header = json.loads(file.read(length))
        except ValueError:
            return "its header is not JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"
            and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2]
    needed = 8 + length + max(ends, default=0)
    return f"{size} bytes where its tensors need {needed}" if needed > size else None
