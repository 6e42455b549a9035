"""Checks of a command's inputs that need a library (torch, llm-compressor) but not the model, so that they
run before the model loads: a ``--device`` this machine lacks, a ``--dataset`` name nobody can fetch."""

from __future__ import annotations

from sink_modifier.errors import CLIError

__all__ = ["check_dataset_name", "check_device"]


def check_device(name: str) -> None:
    """``--device``, checked before the model loads."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {name}: not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and not (backend is not None and hasattr(backend, "is_available")
                                     and backend.is_available()):
        raise CLIError(f"--device {name}: this machine has no {device.type} device; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CLIError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")


def check_dataset_name(name: str) -> None:
    """A ``--dataset`` that is not a directory is a name of llm-compressor's dataset registry, fetched from the
    Hub: an unknown name, or any name while the Hub is switched off, fails before the model loads."""
    import os

    from llmcompressor.transformers.data.base import TextGenerationDataset

    known = TextGenerationDataset.registered_names() + TextGenerationDataset.registered_aliases()
    if name.lower().replace("_", "-") not in known:
        raise CLIError(f"--dataset {name}: no such directory, and not a dataset name llm-compressor knows "
                       f"({', '.join(sorted(known))})")
    offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
               if os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")]
    if offline:
        raise CLIError(f"--dataset {name}: no such directory, and {offline[0]} forbids fetching it from the Hub; "
                       "pass a directory saved with datasets' save_to_disk")
