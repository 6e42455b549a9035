"""The manifest, ``.sink-prune.json``: which top-level files and directories of an output this package wrote,
and whether they are complete. It is data from disk, so it is checked before it is believed: an entry that is
not a plain name of a file (``files``) or a directory (``directories``) directly inside the output (``../x``,
``/abs``, ``sub/x``, a symbolic link, a FIFO) refuses the whole manifest, and a corrupt one is called corrupt.
Used by ``sink_modifier.saving.publish``.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from sink_modifier.errors import OutputError

__all__ = ["INNER_LOCK", "INNER_STAGING", "MANIFEST", "ManifestError", "entry_kind", "internal", "ours",
           "manifest_text", "read_manifest"]

MANIFEST = ".sink-prune.json"
INNER_STAGING = ".sink-prune.partial-"  # staging inside an output filled in place
INNER_LOCK = ".sink-prune.lock"


class ManifestError(OutputError):
    """A manifest that cannot be trusted: unreadable, corrupt, or naming something outside its directory."""



def internal(name: str) -> bool:
    """Bookkeeping: the manifest, the lock, staging inside the output (``..``: a save into that staging)."""
    return name in (MANIFEST, INNER_LOCK, f"{MANIFEST}.tmp") or name.startswith((INNER_STAGING,
                                                                                 "." + INNER_STAGING))


def entry_kind(path: Path) -> str | None:
    """"file", "directory", "other" (a symlink, a FIFO, ...) or None (absent), without following links."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    return "file" if stat.S_ISREG(mode) else "directory" if stat.S_ISDIR(mode) else "other"


def read_manifest(directory: str | os.PathLike) -> dict | None:
    """The manifest of an output this package wrote, or None where there is none.

    Raises ``ManifestError`` (one line) for a manifest that is unreadable or corrupt, or that lists anything but
    plain names of files (``files``) or directories (``directories``) directly inside ``directory``."""
    path = Path(directory) / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise ManifestError(f"{path} cannot be read ({getattr(error, 'strerror', None) or error})") from None
    try:
        manifest = json.loads(text)
    except ValueError as error:
        raise ManifestError(f"{path} is corrupt (not JSON: {error.msg} at line {error.lineno}); it is not "
                            "followed: remove the directory yourself or choose another") from None
    lists = [manifest.get(key, []) for key in ("files", "directories")] if isinstance(manifest, dict) else []
    if not lists or not isinstance(manifest.get("files"), list) or not all(
            isinstance(names, list) and all(isinstance(n, str) for n in names) for names in lists):
        raise ManifestError(f"{path} is corrupt (no list of file names); it is not followed: remove the "
                            "directory yourself or choose another")
    for kind, names in zip(("file", "directory"), lists, strict=True):
        for name in names:
            found = entry_kind(Path(directory) / name) if plain_name(name) else "outside"
            if found not in (None, kind):
                raise ManifestError(f"{path} lists {name!r}, which is not a {kind} directly inside {directory}; "
                                    "the manifest is refused, not followed: remove the directory yourself")
    manifest.setdefault("directories", [])
    return manifest


def plain_name(name: str) -> bool:
    return name not in ("", ".", "..") and "/" not in name and "\0" not in name \
        and not internal(name)


def ours(manifest: dict | None) -> set[str]:
    return set(manifest["files"]) | set(manifest["directories"]) if manifest else set()


def manifest_text(files: set[str], directories: set[str], *, complete: bool) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("sink-aware-pruning")
    except PackageNotFoundError:
        release = "unknown"
    return json.dumps({"writer": "sink-aware-pruning", "version": release, "complete": complete,
                       "files": sorted(files), "directories": sorted(directories)}, indent=1) + "\n"
