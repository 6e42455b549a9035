"""The error types for problems the user fixes; ``sink-prune`` prints them on one line without a traceback,
where any other exception is a bug.

This module imports nothing at module level: the ``sink-prune`` script loads it by file, before the package
(see ``cli/main.py``).
"""

from __future__ import annotations

__all__ = ["CLIError", "OutputError", "UserError", "one_line"]


class UserError(ValueError):
    """The recipe, model or data needs the change the message names.

    A ``ValueError``, so ``except ValueError`` keeps working."""


class CLIError(Exception):
    """A command-line input (an option's value, a file it names) the user can fix."""


class OutputError(Exception):
    """An output directory that cannot or must not be written; the message says why, on one line."""


def one_line(error: Exception) -> str:
    """``error``'s message on one line, as ``sink-prune`` prints it."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or error.title}: {_problem(e)}"
                             for e in error.errors())
        return f"invalid {error.title}: {problems}"
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    return " ".join(str(error).split()) or type(error).__name__


def _problem(detail: dict) -> str:
    """One pydantic error; a key the model does not have (a typo, or a field removed before 1.0 such as
    ``adapter``) says so in words a recipe's author recognises."""
    if detail["type"] == "extra_forbidden":
        return "unknown field; check its spelling (docs/recipes.md lists the sink-aware modifiers' fields)"
    return detail["msg"]
