"""Which process writes an output: a lock file holding the writer's pid and host, and the pid in the names of
staging directories, so that a live writer keeps others off and a dead one's leftovers can be recognised.
Used by ``sink_modifier.publish``."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from loguru import logger

from sink_modifier.errors import OutputError

__all__ = ["holding_lock", "owner_pid", "process_alive"]


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
        except OSError as error:  # e.g. remounted read-only: the error that stopped the run is the one to show
            logger.warning(f"could not remove the lock {lock}: {error.strerror}")
