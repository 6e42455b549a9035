"""One way to keep PyTorch hooks installed for exactly the duration of a ``with`` block."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch.utils.hooks import RemovableHandle


@contextlib.contextmanager
def removing(*handles: RemovableHandle) -> Iterator[None]:
    """Remove ``handles`` when the block ends, however it ends."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
