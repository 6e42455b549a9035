"""Content-keyed randomness: noise and sample names that depend on the tokens, never on their order.

llm-compressor shuffles, batches and partitions calibration data across ranks; keying every draw on the
sample's own tokens (plus the recipe seed) keeps states, evaluation masks and report entries identical
whatever order the samples arrive in.
"""

from __future__ import annotations

import hashlib

import torch


def content_digest(*parts: torch.Tensor | int | str) -> bytes:
    """8-byte BLAKE2b of ``parts`` in order: token ids as int64, ints as 8 little-endian bytes, text as UTF-8."""
    digest = hashlib.blake2b(digest_size=8)
    for part in parts:
        if isinstance(part, torch.Tensor):
            digest.update(part.to(torch.int64).cpu().numpy().tobytes())
        elif isinstance(part, int):
            digest.update(part.to_bytes(8, "little", signed=True))
        else:
            digest.update(str(part).encode())
    return digest.digest()


def content_id(tokens: torch.Tensor) -> str:
    """A short name of a clean sample: the report lists samples by it, in content order."""
    return content_digest(tokens).hex()


def content_generator(*parts: torch.Tensor | int | str) -> torch.Generator:
    """A CPU generator seeded from ``parts`` (the tokens, the recipe seed, an MC sample index, ...)."""
    seed = int.from_bytes(content_digest(*parts), "little") & (2**63 - 1)
    return torch.Generator().manual_seed(seed)
