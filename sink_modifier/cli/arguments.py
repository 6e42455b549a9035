"""Value types of ``sink-prune``'s options: a wrong value fails while the command line is parsed (exit 2, one
line naming the option and the value), before anything is imported or loaded.

Standard library only: the CLI loads this module by file before the package (see ``cli/main.py``).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

__all__ = ["directory", "fraction_or_count", "name_list", "nonnegative_int", "positive_int", "seed",
           "sparsity_list"]

_MAX_SEED = 2**32 - 1  # NumPy's seed range, which transformers.set_seed passes it to


def _integer(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {value!r}") from None


def positive_int(value: str) -> int:
    number = _integer(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def nonnegative_int(value: str) -> int:
    number = _integer(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return number


def seed(value: str) -> int:
    number = _integer(value)
    if not 0 <= number <= _MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be between 0 and {_MAX_SEED}, got {value}")
    return number


def fraction_or_count(value: str) -> float:
    """lm-eval's ``limit``: a count (1 or more) or a fraction of the examples (between 0 and 1)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {value!r}") from None
    if not number > 0 or number != number or number == float("inf") or number > 1 and number != int(number):
        raise argparse.ArgumentTypeError(f"must be a count (1, 2, ...) or a fraction in (0, 1), got {value}")
    return number


def directory(value: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: {'not a directory' if path.exists() else 'no such directory'}")
    return path


def name_list(value: str) -> tuple[str, ...]:
    """Comma-separated names, at least one."""
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"names nothing, got {value!r}; give comma-separated names")
    return names


_PATTERN = re.compile(r"^(\d+):(\d+)$")


def sparsity_list(value: str) -> tuple[str, ...]:
    """Comma-separated sparsities: fractions in (0, 1), N:M patterns with 0 < N < M, or (structured) C/H, the
    shares of MLP channels and of KV-head groups (each in [0, 1))."""
    items = name_list(value)
    for item in items:
        pattern = _PATTERN.match(item)
        if pattern:
            if not 0 < int(pattern.group(1)) < int(pattern.group(2)):
                raise argparse.ArgumentTypeError(f"{item!r}: an N:M pattern needs 0 < N < M, e.g. 2:4")
            continue
        parts = item.split("/")
        try:
            fractions = [float(part) for part in parts]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is neither a fraction (0.5), an N:M pattern (2:4) nor "
                                             "channels/heads (0.5/0.5)") from None
        if len(parts) > 2 or not all(0 <= f < 1 for f in fractions) or not any(fractions):
            raise argparse.ArgumentTypeError(f"{item!r}: a sparsity must be between 0 and 1 (C/H: each in [0, 1), "
                                             "not both 0)")
    return items
