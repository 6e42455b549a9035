"""Wall-time ratios measured the only fair way: in one process, on the same threads, interleaved round-robin.

Used by ``sink-prune demo`` (the structured line) and ``benchmarks/structured.py``; speed claims are ratios of
these medians, never absolute thresholds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["denoising_batch", "interleaved_medians"]


def _synchronize(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(calls: dict[str, Callable[[], object]], repeats: int = 5,
                        device: torch.device | None = None) -> dict[str, float]:
    """Median seconds of each call after one warm-up, the calls taking turns so that every one of them sees
    the same machine state (other processes, frequency, caches)."""
    for call in calls.values():
        call()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            _synchronize(device)
            start = time.perf_counter()
            call()
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def denoising_batch(
    config, batch: int = 8, length: int = 128, masked: float = 0.25, seed: int = 0
) -> torch.Tensor:
    """Token ids of one denoising step's batch: random tokens, a share of them the mask token."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(10, config.vocab_size, (batch, length), generator=generator)
    mask_id = getattr(config, "mask_token_id", None)
    if mask_id is not None:
        tokens[torch.rand(tokens.shape, generator=generator) < masked] = mask_id
    return tokens
