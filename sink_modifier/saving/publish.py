"""Publishing an output directory: a reader sees the old complete output or the new one, and no file that this
package did not write is ever deleted or replaced.

The one staged-publish helper, used by the ``sink-prune`` commands and by the Python save path
(``report.save_plan``). A result is written into a staging directory and published only when complete:

* a new output directory appears by one rename (``existing`` any);
* an existing one that the CLI may replace (``"refuse"`` when empty, ``"replace"`` when everything in it is
  ours) is swapped for the new one by one atomic exchange (Linux ``renameat2``; elsewhere two renames, with a
  moment in which the output is absent, never mixed), then the old one is deleted;
* an existing directory the Python save path writes into (``"merge"``), and one that must not or cannot be
  renamed (a mount point, such as a container volume; the current directory, its ancestors, the home
  directory; one whose parent is not writable) is filled in place: the staging directory is inside it, each
  top-level entry moves in by an atomic rename, and the manifest, marked complete, is written last. Nothing
  below the directory's top level is ever looked at, and a top-level name that is not ours is never replaced.

Every published directory holds ``.sink-prune.json``, the manifest: the top-level files and directories this
package wrote and whether they are complete. It is data from disk: an entry that is not a plain name of a file
(or a directory) directly inside the output, or a symbolic link, makes it refused, never followed. It is how
``--overwrite`` knows a directory is safe to replace, and how a later save knows which old files belong to the
previous output and may go. A lock file holding the writer's pid keeps two writers off one output; staging
directories and locks of dead processes are removed by the next writer. An output given through a symbolic
link is written into the link's target (the link is kept); a dangling link is refused at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from loguru import logger

from sink_modifier.errors import OutputError
from sink_modifier.saving.locks import holding_lock, remove_leftovers
from sink_modifier.saving.manifest import (
    INNER_LOCK,
    INNER_STAGING,
    MANIFEST,
    ManifestError,
    entry_kind,
    internal,
    manifest_text,
    ours,
    read_manifest,
)

__all__ = ["MANIFEST", "ManifestError", "OutputError", "check_output", "read_manifest", "staged"]

# Files of ours that a save into someone else's directory may find taken: the user's are kept and the new ones
# are written under these names instead (any other taken name refuses the save: a checkpoint with renamed
# weights or config would not load).
_RENAMED_ON_CLASH = {"recipe.yaml": "recipe.sink-prune.yaml", "sink_report.json": "sink_report.sink-prune.json"}
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


def _entries(directory: Path) -> list[str]:
    """What a directory holds at its top level, this package's bookkeeping (manifest, lock, staging) left out."""
    return sorted(name for name in os.listdir(directory) if not internal(name))


def _resolve_output(output: Path, shown: str) -> Path:
    """``output`` absolute, written through a symbolic link (the link is kept); a dangling link is refused."""
    target = Path(os.path.abspath(output.expanduser()))
    if os.path.islink(target) and not target.exists():
        raise OutputError(f"{shown} is a symbolic link to {os.readlink(target)}, which does not exist; create "
                          "that directory or name another output")
    return Path(os.path.realpath(target))


def check_output(output: Path, *, overwrite: bool) -> Path:
    """The CLI's checks of ``--output``, before any work: refuse what must not be replaced; return it absolute
    (a symbolic link resolved: the result is written into the link's target).

    A non-empty directory is replaced only with ``overwrite`` and only when this package wrote all of it.
    The current directory, its ancestors, the home directory and ``/`` are refused outright: replacing them
    is what ``-o "$UNSET" --overwrite`` or ``-o .`` would otherwise do.
    """
    shown = str(output) or "''"
    target = _resolve_output(output, f"--output {shown}")
    why = _protected(target)
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
    _refuse_foreign(target, manifest, f"--output {shown}", "move them away or choose another directory")
    return target


def _refuse_foreign(target: Path, manifest: dict | None, shown: str, advice: str) -> None:
    foreign = [name for name in _entries(target) if name not in ours(manifest)]
    if foreign:
        raise OutputError(f"{shown} holds files sink-prune did not write ({', '.join(foreign[:3])}"
                          f"{', ...' if len(foreign) > 3 else ''}); {advice}")


# --------------------------------------------------------------------------- filesystem steps
# Every step that changes what a reader of the output sees goes through _rename / _exchange / _remove, so the
# tests can stop a publish between any two of them.


def _rename(source: Path, destination: Path) -> None:
    os.replace(source, destination)


def _remove(path: Path) -> None:
    """Unlink a file, or delete a directory this package wrote whole; never follows a link."""
    if entry_kind(path) == "directory":
        shutil.rmtree(path)
        return
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
            dirs[:] = [d for d in dirs if not internal(d)]
            names = [n for n in names if not internal(n)]
        found.update(Path(root, n).relative_to(directory).as_posix() for n in names)
    return found


def _write_manifest(staging: Path, names: set[str], *, complete: bool, into: Path | None = None) -> None:
    """The manifest of top-level ``names`` (found in ``staging`` or in ``into``), written atomically into
    ``staging`` (or moved from there into ``into``)."""
    where = into or staging
    directories = {n for n in names if "directory" in (entry_kind(where / n), entry_kind(staging / n))}
    temporary = staging / f"{MANIFEST}.tmp"
    temporary.write_text(manifest_text(names - directories, directories, complete=complete))
    _fsync(temporary)
    _rename(temporary, where / MANIFEST)


def _clashes(target: Path, new: list[str], ours: set[str]) -> dict[str, str]:
    """Where each new top-level entry goes in ``target``: its own name, or (``_RENAMED_ON_CLASH``) another when
    the user's file holds it; any other name that is taken by something not ours refuses the save."""
    placed, taken = {}, []
    for name in new:
        placed[name] = name
        if entry_kind(target / name) is None or name in ours:
            continue
        other = _RENAMED_ON_CLASH.get(name)
        if other is None or entry_kind(target / other) is not None and other not in ours:
            taken.append(name)
        else:
            placed[name] = other
    if taken:
        raise OutputError(f"{target} already holds {', '.join(taken)}, which sink-aware-pruning did not write; "
                          "nothing was saved (no file there was changed): save into a new or empty directory")
    for name, other in placed.items():
        if other != name:
            logger.warning(f"{target / name} is not this package's: kept, and the new one written as {other}")
    return placed


def _fill_in_place(staging: Path, target: Path, new: list[str], previous: set[str], placed: dict[str, str]):
    """Publish into ``target`` itself, entry by entry; the manifest says "incomplete" from the first change to
    the last, and "complete" with the new list after it. Only ``previous`` (ours) is replaced or removed."""
    final = set(placed.values())
    _write_manifest(staging, (previous & set(_entries(target))) | final, complete=False, into=target)
    for name in sorted(new):
        destination = target / placed[name]
        if entry_kind(destination) == "directory" or entry_kind(staging / name) == "directory":
            aside = staging / f".previous-{placed[name]}"  # a directory cannot be renamed over a directory
            if entry_kind(destination) is not None:
                _rename(destination, aside)
        _rename(staging / name, destination)
    for name in sorted(previous - final):
        _remove(target / name)
    _write_manifest(staging, final, complete=True, into=target)
    _fsync(target, directory=True)


def _swap(staging: Path, target: Path) -> None:
    """Put ``staging`` at ``target``, an existing directory: one atomic exchange, else two renames."""
    if _exchange(staging, target):
        _fsync(target.parent, directory=True)
        shutil.rmtree(staging, ignore_errors=True)  # now the old output: everything in it was ours
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


def _publish(staging: Path, target: Path, *, in_place: bool, existing: Existing) -> None:
    new = _entries(staging)
    for name in _files(staging):  # transformers writes weights 0600; a checkpoint is meant to be shared
        (staging / name).chmod(0o666 & ~_umask())
        _fsync(staging / name)
    if not target.exists():
        _write_manifest(staging, set(new), complete=True)
        _rename(staging, target)
        _fsync(target.parent, directory=True)
        return
    manifest = _trusted_manifest(target, existing)
    if existing != "merge":  # "replace" was checked before the work; "refuse" needs an empty directory
        _refuse_foreign(target, manifest, str(target), "they were written there meanwhile; the result was not "
                        "published")
    placed = _clashes(target, new, ours(manifest))
    if in_place:
        _fill_in_place(staging, target, new, ours(manifest), placed)
        return
    _write_manifest(staging, set(new), complete=True)
    try:
        _swap(staging, target)
    except OSError as error:
        if error.errno not in _UNRENAMABLE:
            raise
        # e.g. a mount point that /proc did not show: stage inside it and fill it in place instead
        logger.info(f"{target} cannot be renamed ({error.strerror}); writing the files into it one by one")
        inner = Path(tempfile.mkdtemp(prefix=f"{INNER_STAGING}{os.getpid()}-", dir=target))
        try:
            for name in new:
                shutil.move(staging / name, inner / name)
            _fill_in_place(inner, target, new, ours(manifest), placed)
        finally:
            shutil.rmtree(inner, ignore_errors=True)


def _trusted_manifest(target: Path, existing: Existing) -> dict | None:
    """The CLI refuses an untrusted manifest; the Python save path (whose run is done) treats the directory as
    someone else's instead: nothing in it is replaced."""
    try:
        return read_manifest(target)
    except ManifestError as error:
        if existing != "merge":
            raise
        logger.warning(f"{error}; every file in {target} is treated as someone else's")
        return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------- the helper


def _fill_in_place_needed(target: Path) -> bool:
    """An existing directory that must not or cannot be renamed."""
    resolved = target.resolve()
    return bool(_protected(resolved)) or _is_mount_point(resolved) or not os.access(target.parent, os.W_OK)


def _mkdir(path: Path, what: str) -> list[Path]:
    """Create ``path`` and its missing parents; return those it created, deepest first."""
    created = [p for p in (path, *path.parents) if not os.path.lexists(p)]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError as error:
        raise OutputError(f"cannot create {what} {path}: {error.filename} is a file") from error
    except NotADirectoryError as error:
        raise OutputError(f"cannot create {what} {path}: a part of it is a file, not a directory") from error
    except OSError as error:
        raise OutputError(f"cannot create {what} {path}: {error.strerror}") from error
    return created


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO, errno.EACCES, errno.EPERM}


def _writing_error(error: Exception, staging: Path, target: Path) -> Exception:
    """A failed write into the staging directory, told as the output's: a full disk, a quota, a read-only
    remount, reported by Python (``OSError``) or by Rust libraries (safetensors: "... (os error 28)")."""
    if isinstance(error, OutputError):  # a nested save (the CLI's oneshot into its staging directory)
        text = str(error).replace(str(staging), str(target))
        return error if text == str(error) else type(error)(text)
    code = error.errno if isinstance(error, OSError) else None
    found = re.search(r"\(os error (\d+)\)", str(error))
    code = int(found.group(1)) if code is None and found else code
    if code not in _WRITE_ERRNOS:
        return error
    name = getattr(error, "filename", None)
    path = Path(name) if name else target
    if name and path.is_relative_to(staging):  # the name the file would have had; bookkeeping is not named
        inner = path.relative_to(staging)
        path = target if internal(inner.parts[0]) else target / inner
    return OutputError(f"cannot write {path}: {os.strerror(code)}; nothing was published")


def _remove_empty(directories: list[Path]) -> None:
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            return


@contextlib.contextmanager
def staged(target: str | os.PathLike, *, existing: Existing = "merge") -> Iterator[Path]:
    """Yield an empty staging directory; when the block ends without an exception, publish it at ``target``.

    ``existing`` says what an existing non-empty ``target`` gets: ``"refuse"`` (an error, checked on entry and
    again before publishing), ``"replace"`` (the CLI's ``--overwrite``, checked by ``check_output`` first and
    again before publishing: everything in it must be ours) or ``"merge"`` (the Python save path): the
    directory is filled in place; entries the manifest lists as ours are replaced, ``recipe.yaml`` and
    ``sink_report.json`` of someone else's are kept (the new ones get ``_RENAMED_ON_CLASH`` names) and any other
    name that is taken refuses the save; nothing below the top level is looked at.

    On entry (before the caller's expensive work) the parent is created, the lock taken, leftovers of dead runs
    removed and the staging directory made, so an unwritable location or a busy output fails at once. On an
    exception, Ctrl-C or SIGTERM (which the CLI turns into an exception) the staging directory, the lock and
    the empty parents it created are removed and ``target`` is as it was.
    """
    target = _resolve_output(Path(target), str(target))
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target} exists and is not a directory")
    created = _mkdir(target.parent, "the parent directory")
    try:
        in_place = target.is_dir() and (existing == "merge" or _fill_in_place_needed(target))
        lock = target / INNER_LOCK if in_place else target.parent / f".{target.name}.lock"
        with holding_lock(lock, target):
            remove_leftovers(target)
            if existing == "refuse" and target.is_dir() and _entries(target):
                raise OutputError(f"{target} is not empty; pass --overwrite to replace it")
            try:
                staging = Path(tempfile.mkdtemp(
                    prefix=f"{INNER_STAGING}{os.getpid()}-" if in_place else f".{target.name}.partial-"
                    f"{os.getpid()}-", dir=target if in_place else target.parent))
            except OSError as error:
                raise OutputError(f"cannot write to {error.filename or target.parent}: {error.strerror}") \
                    from error
            staging.chmod(0o777 & ~_umask())  # mkdtemp's private 0700 would otherwise become the output's mode
            try:
                try:
                    yield staging
                except Exception as error:
                    raise _writing_error(error, staging, target) from error
                _publish(staging, target, in_place=in_place, existing=existing)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        _remove_empty(created)
        raise
