"""Which process writes an output: a lock file holding the writer's pid and host, and the pid in the names of
staging directories, so that a live writer keeps others off and a dead one's leftovers are recognised and
removed (``remove_leftovers``).
Used by ``sink_modifier.saving.publish``."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from loguru import logger

from sink_modifier.errors import OutputError
from sink_modifier.saving.manifest import INNER_STAGING

__all__ = ["holding_lock", "owner_pid", "process_alive", "remove_leftovers"]


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a process of another user counts; a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child that nobody reaped yet is a zombie: dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def owner_pid(name: str, prefix: str) -> int | None:
    """The pid in a staging or lock name ``PREFIX<pid>-...``."""
    head = name[len(prefix):].split("-", 1)[0]
    return int(head) if name.startswith(prefix) and head.isdigit() else None


@contextlib.contextmanager
def holding_lock(lock: Path, target: Path) -> Iterator[None]:
    """Hold ``lock`` (a file with our pid) while writing ``target``; a live holder fails this at once."""
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except PermissionError as error:
            raise OutputError(f"cannot write to {lock.parent}: permission denied") from error
        except FileExistsError:
            try:
                pid, host = (lock.read_text().split() + ["", ""])[:2]
            except OSError:
                continue  # released meanwhile
            if not pid.isdigit() or host != socket.gethostname() or process_alive(int(pid)):
                raise OutputError(f"{target} is being written by another sink-prune run (pid {pid or '?'}"
                                  f"{'' if host in ('', socket.gethostname()) else ' on ' + host}, lock {lock}); "
                                  "wait for it or stop it") from None
            logger.warning(f"Removed the lock of a run that died (pid {pid}): {lock}")
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            continue
        with os.fdopen(fd, "w") as file:
            file.write(f"{os.getpid()} {socket.gethostname()}\n")
        break
    else:
        raise OutputError(f"could not take the lock {lock} for {target}")
    try:
        yield
    finally:
        try:
            lock.unlink()
        except FileNotFoundError:
            pass
        except OSError as error:  # e.g. remounted read-only: the error that stopped the run is the one to show,
            # and the next writer removes a dead process's lock anyway
            logger.debug(f"could not remove the lock {lock}: {error.strerror}")


def remove_leftovers(target: Path) -> None:
    """Staging directories of dead runs (SIGKILL, OOM, power loss); an output a dead run had moved aside
    (two-rename swap) is put back when nothing replaced it."""
    removed = []
    # ``..NAME.partial-*``: a save into our own staging directory (the CLI's oneshot) staged next to it
    places = [(target.parent, f".{target.name}.partial-"), (target.parent, f"..{target.name}.partial-"),
              (target.parent, f".{target.name}.old-")]
    if target.is_dir():
        places += [(target, INNER_STAGING), (target, "." + INNER_STAGING)]
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
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                removed.append(path.name)
    if removed:
        logger.warning(f"Removed {len(removed)} staging leftover{'' if len(removed) == 1 else 's'} of runs "
                       f"that died, next to {target}: {', '.join(removed)}")
