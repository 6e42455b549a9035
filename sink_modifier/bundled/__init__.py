"""The bundled reference models: a small trained masked diffusion LM and its autoregressive twin.

Both are Gemma-3 text models (5.8M parameters, bf16) trained by ``benchmarks/train_reference.py`` on permissive
English text (docs/corpus.md, docs/reference-models.md); they share one tokenizer that has a ``[MASK]`` token and
starts every encoding with ``[BOS]``. ``eval_slice.txt`` is a fixed piece of the corpus's test split, so that
evaluation works offline. Everything loads with ``from_pretrained`` on the returned paths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

__all__ = ["bundled_model_path", "eval_slice_path", "load_eval_slice"]

BUNDLED_DIR = Path(__file__).resolve().parent
DOC_SEPARATOR = "<|endoftext|>"  # a line between the documents of eval_slice.txt
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")


class BundledModelMissing(FileNotFoundError):
    """The package was installed without its data files (or they were deleted)."""


def bundled_model_path(kind: Literal["dlm", "ar"] = "dlm") -> Path:
    """Directory of the bundled masked DLM (``"dlm"``) or its causal twin (``"ar"``), for ``from_pretrained``."""
    if kind not in ("dlm", "ar"):
        raise ValueError(f"kind must be 'dlm' or 'ar', got {kind!r}")
    path = BUNDLED_DIR / kind
    missing = [name for name in _REQUIRED if not (path / name).is_file()]
    if missing:
        raise BundledModelMissing(
            f"The bundled {kind} model is incomplete at {path} (missing {', '.join(missing)}). The package data "
            "was not installed: reinstall sink-aware-pruning from a checkout or wheel that includes "
            "sink_modifier/bundled, or regenerate it with `python benchmarks/train_reference.py --ship`."
        )
    return path


def eval_slice_path() -> Path:
    """``eval_slice.txt``: documents from the corpus's test split separated by ``DOC_SEPARATOR`` lines."""
    path = BUNDLED_DIR / "eval_slice.txt"
    if not path.is_file():
        raise BundledModelMissing(
            f"{path} is missing: reinstall the package with its data files, or regenerate it with "
            "`python benchmarks/train_reference.py --ship`."
        )
    return path


def load_eval_slice() -> list[str]:
    """The documents of ``eval_slice.txt``, in file order."""
    text = eval_slice_path().read_text(encoding="utf-8")
    return [doc.strip("\n") for doc in text.split(f"\n{DOC_SEPARATOR}\n") if doc.strip()]
