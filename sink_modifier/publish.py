"""Publishing an output directory: a reader sees the old complete output or the new one, and no file that this
package did not write is ever deleted.

The one staged-publish helper, used by the ``sink-prune`` commands and by the Python save path
(``report.attach_report``). A result is written into a staging directory and published only when complete:

* a new output directory appears by one rename;
* an existing one is swapped for the new one by one atomic exchange (Linux ``renameat2``; elsewhere two renames,
  with a moment in which the output is absent, never mixed), then the old one is deleted;
* a directory that must not or cannot be renamed (a mount point, such as a container volume; the current
  directory, its ancestors, the home directory; one whose parent is not writable) is filled in place: the
  staging directory is inside it, each file moves in by an atomic rename, and the manifest, marked complete,
  is written last.

Every published directory holds ``.sink-prune.json``, the manifest: the files this package wrote and whether
they are complete. It is how ``--overwrite`` knows a directory is safe to replace, and how a later save knows
which old files (an old ``sink_report.json``, old weight shards) belong to the previous output and must go;
other files in the directory are carried over untouched. A lock file holding the writer's pid keeps two writers
off one output; staging directories and locks of dead processes are removed by the next writer.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from loguru import logger

from sink_modifier.errors import OutputError
from sink_modifier.locks import holding_lock, owner_pid, process_alive

__all__ = ["MANIFEST", "OutputError", "check_output", "read_manifest", "staged"]

MANIFEST = ".sink-prune.json"
_INNER_STAGING = ".sink-prune.partial-"  # staging inside an output filled in place
_INNER_LOCK = ".sink-prune.lock"
# Files of a checkpoint that a new checkpoint must not leave behind even where no manifest lists them: stale
# weights or a stale report next to new ones would load "successfully".
_CHECKPOINT_FILES = ("*.safetensors", "*.safetensors.index.json", "sink_report.json", "recipe.yaml")
_UNRENAMABLE = {errno.EBUSY, errno.EXDEV, errno.EPERM, errno.EACCES, errno.EROFS, errno.EINVAL}

Existing = Literal["refuse", "replace", "merge"]


# --------------------------------------------------------------------------- checks


def _protected(path: Path) -> str | None:
    """Why ``path`` must never be replaced or renamed: it holds the shell's working directory or the user's."""
    cwd = Path.cwd().resolve()
    if path == Path(path.anchor):
        return "the root directory"
    if path == Path.home().resolve():
        return "the home directory"
    if path == cwd:
        return "the current directory"
    if path in cwd.parents:
        return "an ancestor of the current directory"
    return None


def _mount_points() -> set[Path]:
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return set()
    # field 5 is the mount point, with spaces and the like escaped as octal
    return {Path(line.split()[4].encode().decode("unicode_escape")) for line in lines if len(line.split()) > 4}


def _is_mount_point(path: Path) -> bool:
    return os.path.ismount(path) or path in _mount_points()


def _internal(name: str) -> bool:
    """Bookkeeping: the manifest, the lock, staging inside the output (``..``: a save into that staging)."""
    return name in (MANIFEST, _INNER_LOCK) or name.startswith((_INNER_STAGING, "." + _INNER_STAGING))


def _entries(directory: Path) -> list[str]:
    """What a directory holds, this package's bookkeeping (manifest, lock, staging) left out."""
    return sorted(name for name in os.listdir(directory) if not _internal(name))


def read_manifest(directory: Path) -> dict | None:
    """The manifest of an output this package wrote, or None (none, or unreadable)."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), list) else None


def check_output(output: Path, *, overwrite: bool) -> Path:
    """The CLI's checks of ``--output``, before any work: refuse what must not be replaced; return it absolute.

    A non-empty directory is replaced only with ``overwrite`` and only when this package wrote all of it.
    The current directory, its ancestors, the home directory and ``/`` are refused outright: replacing them
    is what ``-o "$UNSET" --overwrite`` or ``-o .`` would otherwise do.
    """
    shown = str(output) or "''"
    target = Path(os.path.abspath(output.expanduser()))
    resolved = target.resolve()
    why = _protected(resolved)
    if why:
        raise OutputError(f"--output {shown} is {why}; name a new directory for the result")
    if target.exists() and not target.is_dir():
        raise OutputError(f"--output {shown} exists and is not a directory")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"--output {shown}: {parent} is a file, not a directory")
            break
    if not target.is_dir():
        return target
    entries = _entries(target)
    if not entries:
        return target
    if not overwrite:
        raise OutputError(f"--output {shown} is not empty; pass --overwrite to replace it")
    manifest = read_manifest(target)
    if manifest is None:
        raise OutputError(f"--output {shown} was not written by sink-prune (no {MANIFEST}); --overwrite replaces "
                          "only its own outputs: remove it yourself or choose another directory")
    foreign = _foreign(entries, manifest)
    if foreign:
        raise OutputError(f"--output {shown} holds files sink-prune did not write ({', '.join(foreign[:3])}"
                          f"{', ...' if len(foreign) > 3 else ''}); move them away or choose another directory")
    return target


def _foreign(entries: list[str], manifest: dict) -> list[str]:
    """Top-level entries no manifest file lives under."""
    ours = {f.split("/", 1)[0] for f in manifest["files"]}
    return [name for name in entries if name not in ours]


# --------------------------------------------------------------------------- leftovers of dead runs


def _remove_leftovers(target: Path) -> None:
    """Staging directories of dead runs (SIGKILL, OOM, power loss); an output a dead run had moved aside
    (two-rename swap) is put back when nothing replaced it."""
    removed = []
    # ``..NAME.partial-*``: a save into our own staging directory (the CLI's oneshot) staged next to it
    places = [(target.parent, f".{target.name}.partial-"), (target.parent, f"..{target.name}.partial-"),
              (target.parent, f".{target.name}.old-")]
    if target.is_dir():
        places += [(target, _INNER_STAGING), (target, "." + _INNER_STAGING)]
    for directory, prefix in places:
        with contextlib.suppress(OSError):
            for entry in os.scandir(directory):
                pid = owner_pid(entry.name, prefix)
                if pid is None or pid == os.getpid() or process_alive(pid):
                    continue
                path = Path(entry.path)
                if prefix.endswith(".old-") and not target.exists():
                    path.rename(target)
                    logger.warning(f"Restored {target} from {path}, left by a run that died (pid {pid})")
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    _remove(path)
                removed.append(path.name)
    if removed:
        logger.warning(f"Removed {len(removed)} staging leftover{'' if len(removed) == 1 else 's'} of runs "
                       f"that died, next to {target}: {', '.join(removed)}")


# --------------------------------------------------------------------------- filesystem steps
# Every step that changes what a reader of the output sees goes through _rename / _exchange / _remove, so the
# tests can stop a publish between any two of them.


def _rename(source: Path, destination: Path) -> None:
    os.replace(source, destination)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


@functools.cache
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    function = getattr(_libc(), "renameat2", None)
    if function is None:
        return False
    if function(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0:  # AT_FDCWD, RENAME_EXCHANGE
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False  # a kernel or filesystem without exchange
    raise OSError(code, os.strerror(code), str(b))


def _fsync(path: Path, directory: bool = False) -> None:
    """Flush to disk, so that a power loss after publishing cannot leave renamed but empty files."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _files(directory: Path) -> set[str]:
    """Relative paths of the files under ``directory`` (this package's bookkeeping left out)."""
    found = set()
    for root, dirs, names in os.walk(directory):
        if Path(root) == directory:
            dirs[:] = [d for d in dirs if not _internal(d)]
            names = [n for n in names if not _internal(n)]
        found.update(Path(root, n).relative_to(directory).as_posix() for n in names)
    return found


def _previous_output(target: Path, new_files: set[str]) -> set[str]:
    """Files of the output being replaced: what its manifest lists, and checkpoint files in any case."""
    manifest = read_manifest(target)
    listed = set(manifest["files"]) if manifest else set()
    checkpoint = {f for f in _files(target)
                  if any(fnmatch.fnmatch(f.rsplit("/", 1)[-1], pattern) for pattern in _CHECKPOINT_FILES)}
    return (listed | checkpoint) - new_files


def _write_manifest(staging: Path, files: set[str], *, complete: bool, into: Path | None = None) -> None:
    """The manifest, written atomically into ``staging`` (or moved from there into ``into``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("sink-aware-pruning")
    except PackageNotFoundError:
        release = "unknown"
    text = json.dumps({"writer": "sink-aware-pruning", "version": release, "complete": complete,
                       "files": sorted(files)}, indent=1)
    temporary = staging / f"{MANIFEST}.tmp"
    temporary.write_text(text + "\n")
    _fsync(temporary)
    _rename(temporary, (into or staging) / MANIFEST)


def _carry_over(target: Path, staging: Path, drop: set[str]) -> None:
    """Hard-link (or copy) into ``staging`` everything in ``target`` that is not ours to drop: the user's files
    survive the swap, and ``target`` itself is untouched until then."""
    for root, dirs, names in os.walk(target):
        here = Path(root)
        if here == target:
            dirs[:] = [d for d in dirs if not _internal(d)]
            names = [n for n in names if not _internal(n)]
        relative = here.relative_to(target)
        for name in dirs:
            (staging / relative / name).mkdir(exist_ok=True)
        for name in names:
            if (relative / name).as_posix() in drop or (staging / relative / name).exists():
                continue
            source, copy = here / name, staging / relative / name
            if source.is_symlink():
                os.symlink(os.readlink(source), copy)
                continue
            try:
                os.link(source, copy)
            except OSError:
                shutil.copy2(source, copy)


def _fill_in_place(staging: Path, target: Path, new_files: set[str]) -> None:
    """Publish into ``target`` itself, file by file; the manifest says "incomplete" from the first change to the
    last, and "complete" with the new file list after it."""
    previous = _previous_output(target, new_files)
    _write_manifest(staging, previous | new_files, complete=False, into=target)
    for name in sorted(new_files):
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        _rename(staging / name, target / name)
    for name in sorted(previous):
        _remove(target / name)
    _write_manifest(staging, new_files, complete=True, into=target)
    _fsync(target, directory=True)


def _swap(staging: Path, target: Path) -> None:
    """Put ``staging`` at ``target``, an existing directory: one atomic exchange, else two renames."""
    if _exchange(staging, target):
        _fsync(target.parent, directory=True)
        shutil.rmtree(staging, ignore_errors=True)  # now the old output
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
    _rename(target, old)
    try:
        _rename(staging, target)
    except BaseException:
        _rename(old, target)
        raise
    _fsync(target.parent, directory=True)
    shutil.rmtree(old, ignore_errors=True)


def _publish(staging: Path, target: Path, *, in_place: bool) -> None:
    new_files = _files(staging)
    for name in new_files:  # transformers writes weights 0600; a checkpoint is meant to be shared like any file
        (staging / name).chmod(0o666 & ~_umask())
        _fsync(staging / name)
    if in_place:
        _fill_in_place(staging, target, new_files)
        return
    if not target.exists():
        _write_manifest(staging, new_files, complete=True)
        _rename(staging, target)
        _fsync(target.parent, directory=True)
        return
    _carry_over(target, staging, _previous_output(target, new_files) | new_files)
    _write_manifest(staging, new_files, complete=True)
    try:
        _swap(staging, target)
    except OSError as error:
        if error.errno not in _UNRENAMABLE:
            raise
        # e.g. a mount point that /proc did not show: stage inside it and fill it in place instead
        logger.info(f"{target} cannot be renamed ({error.strerror}); writing the files into it one by one")
        inner = Path(tempfile.mkdtemp(prefix=f"{_INNER_STAGING}{os.getpid()}-", dir=target))
        try:
            for name in sorted(new_files):
                (inner / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.move(staging / name, inner / name)
            _fill_in_place(inner, target, new_files)
        finally:
            shutil.rmtree(inner, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------- the helper


def _fill_in_place_needed(target: Path) -> bool:
    """An existing directory that must not or cannot be renamed."""
    resolved = target.resolve()
    return bool(_protected(resolved)) or _is_mount_point(resolved) or not os.access(target.parent, os.W_OK)


def _mkdir(path: Path, what: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError as error:
        raise OutputError(f"cannot create {what} {path}: {error.filename} is a file") from error
    except NotADirectoryError as error:
        raise OutputError(f"cannot create {what} {path}: a part of it is a file, not a directory") from error
    except OSError as error:
        raise OutputError(f"cannot create {what} {path}: {error.strerror}") from error


@contextlib.contextmanager
def staged(target: str | os.PathLike, *, existing: Existing = "merge") -> Iterator[Path]:
    """Yield an empty staging directory; when the block ends without an exception, publish it at ``target``.

    ``existing`` says what an existing non-empty ``target`` gets: ``"refuse"`` (an error, checked on entry and
    again before publishing), ``"replace"`` (the CLI's ``--overwrite``, checked by ``check_output`` first) or
    ``"merge"`` (the Python save path): the new output replaces the previous one (the files its manifest lists,
    and any weights, ``sink_report.json`` or ``recipe.yaml``) and every other file is kept.

    On entry (before the caller's expensive work) the parent is created, the lock taken, leftovers of dead runs
    removed and the staging directory made, so an unwritable location or a busy output fails at once. On an
    exception, Ctrl-C or SIGTERM (which the CLI turns into an exception) the staging directory is removed and
    ``target`` is as it was.
    """
    target = Path(os.path.abspath(Path(target).expanduser()))
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target} exists and is not a directory")
    _mkdir(target.parent, "the parent directory")
    in_place = target.is_dir() and _fill_in_place_needed(target)
    lock = target / _INNER_LOCK if in_place else target.parent / f".{target.name}.lock"
    with holding_lock(lock, target):
        _remove_leftovers(target)
        if existing == "refuse" and target.is_dir() and _entries(target):
            raise OutputError(f"{target} is not empty; pass --overwrite to replace it")
        try:
            staging = Path(tempfile.mkdtemp(
                prefix=f"{_INNER_STAGING}{os.getpid()}-" if in_place else f".{target.name}.partial-{os.getpid()}-",
                dir=target if in_place else target.parent))
        except OSError as error:
            raise OutputError(f"cannot write to {error.filename or target.parent}: {error.strerror}") from error
        staging.chmod(0o777 & ~_umask())  # mkdtemp's private 0700 would otherwise become the output's mode
        try:
            yield staging
            if existing == "refuse" and target.is_dir() and _entries(target):
                raise OutputError(f"{target} is not empty (something was written there meanwhile); the result "
                                  "was not published")
            _publish(staging, target, in_place=in_place)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
