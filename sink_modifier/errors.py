"""The error type for problems the user fixes by changing the recipe, the model or the data.

A ``ValueError`` (so ``except ValueError`` keeps working) whose message says what to change; ``sink-prune`` prints
it on one line without a traceback, where any other exception is a bug.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """The recipe, model or data needs the change the message names."""
