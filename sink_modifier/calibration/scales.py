"""Getting each calibration batch's per-token row scales to the Linear hooks that need them.

Two sources, one per pipeline:

* ``SampleScales`` (any llm-compressor pipeline, calibration on clean samples): the scales are computed per
  sample in a pre-pass and found again *by the tokens themselves* when the pipeline feeds a batch to the input
  embedding, so the match survives llm-compressor's shuffling and batching (llm-compressor 0.14's batches carry
  no sample index; the pre-pass reads the same draw through ``compat.same_draw_as_pipeline``).
* ``StateScales`` (the ``diffusion`` pipeline): the pipeline builds the dataloader of trajectory states itself,
  in a fixed order, so batch ``i`` simply has the scales of states ``i``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import torch
from loguru import logger
from torch.utils.data import DataLoader


class CalibrationMismatchError(RuntimeError):
    """A calibration batch holds tokens the trajectory phase never saw."""


def _key(tokens: torch.Tensor) -> bytes:
    return tokens.detach().to(torch.int64).cpu().numpy().tobytes()


class SampleScales:
    """Row scales of clean calibration rows, looked up by their token ids."""

    def __init__(self, pad_token_id: int | None = None):
        self.pad_token_id = pad_token_id
        self._by_row: dict[bytes, tuple[int, torch.Tensor]] = {}  # collated row -> (sample, [G, T])
        self._samples: list[tuple[torch.Tensor, torch.Tensor]] = []  # unpadded tokens, [G, T]
        self._batches: dict[int, torch.Tensor] = {}
        self._observed: dict[int, list[int]] = {}  # batch index -> the samples its rows are
        # sample -> the first sample with the same tokens: a calibration text may repeat a row, and identical
        # rows get identical scales (the trajectory is seeded by content), so they are one sample twice
        self._first_equal: list[int] = []

    def add(self, row: torch.Tensor, valid: torch.Tensor, tokens: torch.Tensor, scales: torch.Tensor):
        """Register a collated ``row`` whose real tokens (``valid``) are ``tokens`` with ``scales`` [G, T]."""
        placed = torch.zeros(scales.shape[0], row.shape[0], dtype=scales.dtype)
        placed[:, valid] = scales
        first = self._by_row.setdefault(_key(row), (len(self._samples), placed))
        self._first_equal.append(first[0])
        self._samples.append((tokens, scales))

    def __len__(self) -> int:
        return len(self._samples)

    def lookup(self, row: torch.Tensor) -> tuple[int, torch.Tensor]:
        """(measured sample, scales [G, T]) for a row as the pipeline presents it; padding gets 0."""
        found = self._by_row.get(_key(row))
        if found is not None:
            return found
        # Collated differently than in the pre-pass (another batch, another truncation): find the sample
        # whose tokens this row's non-padding core starts.
        start, end = 0, row.shape[0]
        if self.pad_token_id is not None:
            while start < end and row[start] == self.pad_token_id:
                start += 1
            while end > start and row[end - 1] == self.pad_token_id:
                end -= 1
        core = row[start:end].cpu()
        for index, (tokens, scales) in enumerate(self._samples):
            if tokens.shape[0] >= core.shape[0] and torch.equal(tokens[: core.shape[0]], core):
                placed = torch.zeros(scales.shape[0], row.shape[0], dtype=scales.dtype)
                placed[:, start:end] = scales[:, : core.shape[0]]
                return index, placed
        raise CalibrationMismatchError(
            f"A calibration row of {row.shape[0]} tokens was not seen by the sink trajectory phase. "
            "Pass the same dataset to oneshot that the trajectory phase used, and do not change the "
            "dataloader between them."
        )

    def observe(self, batch_idx: int, input_ids: torch.Tensor):
        """Called with each batch's token ids as they enter the model's input embedding."""
        found = [self.lookup(row) for row in input_ids]
        self._observed[batch_idx] = [index for index, _ in found]
        self._batches[batch_idx] = torch.stack([scales for _, scales in found])

    def verify(self) -> None:
        """The pipeline calibrated on exactly the measured samples, each once (compat.same_draw_as_pipeline)."""
        seen = Counter(index for indices in self._observed.values() for index in indices)
        expected = Counter(self._first_equal)
        if seen != expected:
            missing = sum((expected - seen).values())
            raise CalibrationMismatchError(
                f"The sink pre-pass measured {len(self._samples)} calibration samples, but the pipeline fed "
                f"{sum(seen.values())} rows ({missing} measured samples never came, "
                f"{sum((seen - expected).values())} came more often than measured). The pipeline drew its "
                "calibration rows differently from its dataloader's copy; pass shuffle_calibration_samples=False "
                "to oneshot or a dataset of exactly num_calibration_samples rows"
            )

    def batch_scales(self, batch_idx: int, stream: str | None = None) -> torch.Tensor:
        try:
            return self._batches[batch_idx]
        except KeyError:
            raise CalibrationMismatchError(
                f"No row scales for calibration batch {batch_idx}: its tokens never reached the input "
                "embedding, so the model's embedding module is not the one the probe hooked."
            ) from None


class StateScales:
    """Row scales of the ``diffusion`` pipeline's state batches, by batch index and token stream.

    A stream is a set of rows one forward feeds through the same weights: a single one (``None``) for most
    models; DiffusionGemma's prefix rows (encoder) and canvas rows (decoder).
    """

    def __init__(self, batches: list[dict[str | None, torch.Tensor]]):
        self._batches = batches

    def batch_scales(self, batch_idx: int, stream: str | None = None) -> torch.Tensor:
        scales = self._batches[batch_idx]
        if stream not in scales:
            raise CalibrationMismatchError(
                f"Calibration batch {batch_idx} has row scales for streams {sorted(map(str, scales))}, "
                f"not for {stream!r}"
            )
        return scales[stream]


def warn_if_ranks_share_data(dataloader: DataLoader) -> None:
    """Say so when llm-compressor's rank partition gives every rank the same shard.

    llm-compressor 0.14 partitions a dataset that is identical on every rank by building each rank's sampler
    over ``dataset.select(range(start, end))`` but handing the DataLoader the whole dataset, so the sampler's
    indices read the *first* shard on every rank. The modifier cannot repair the pipeline's own dataloader
    (llm-compressor hands modifiers a deep copy), so it reports the problem and the fix instead.
    """
    from compressed_tensors.offload.dist_utils import is_distributed

    source = getattr(getattr(getattr(dataloader, "batch_sampler", None), "sampler", None), "data_source", None)
    if is_distributed() and source is not None and len(source) < len(dataloader.dataset):
        logger.warning(
            "llm-compressor 0.14 gives every rank the first shard of a dataset shared by all ranks, so the ranks "
            "calibrate on the same samples. Pass each rank its own shard instead, e.g. "
            "dataset.shard(num_shards=world_size, index=rank, contiguous=True); sink and pruning statistics "
            "are then reduced over all of them."
        )


def calibration_rows(dataloader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The rows of one pass over ``dataloader``, as (collated row, valid mask)."""
    for batch in dataloader:
        input_ids = batch["input_ids"]
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        mask = batch.get("attention_mask")
        mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
        mask = mask.reshape(input_ids.shape)
        for row, valid in zip(input_ids, mask, strict=True):
            yield row.cpu(), valid.cpu()
