"""Shared fixtures: tiny models built from configs (nothing is downloaded) and a small calibration set."""

from __future__ import annotations

import os

# The suite never needs the Hugging Face Hub: fail fast instead of waiting on a network that is not there.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.toy import build_tiny_diffusion_gemma, build_toy_model

CALIBRATION_TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A diffusion language model denoises every position of its canvas at once.",
    "Pruning removes half of the weights while keeping the model useful.",
    "Attention sinks are positions that receive far more attention than others.",
    "In autoregressive models the first token is a stable attention sink.",
    "Masked tokens are predicted in parallel and unmasked step by step.",
    "Calibration data drives the statistics that choose which weights to drop.",
    "Two of every four weights are zero in the semi-structured pattern.",
]


@pytest.fixture(scope="session")
def dlm_path(tmp_path_factory):
    return build_toy_model(tmp_path_factory.mktemp("dlm"), bidirectional=True)


@pytest.fixture(scope="session")
def ar_path(tmp_path_factory):
    return build_toy_model(tmp_path_factory.mktemp("ar"), bidirectional=False)


@pytest.fixture(scope="session")
def diffusion_gemma_path(tmp_path_factory):
    """Tiny random text-only DiffusionGemma (canvas 8, sliding window 16, 4 experts) with a char tokenizer."""
    return build_tiny_diffusion_gemma(tmp_path_factory.mktemp("diffusion_gemma"))


@pytest.fixture(scope="session")
def published_llada(tmp_path_factory):
    """A tiny random LLaDA-8B-Instruct checkpoint with the published remote code (tests/published.py)."""
    from tests.published import FIXTURES, SKIP_REASON, build

    if not (FIXTURES / "llada").is_dir():
        pytest.skip(SKIP_REASON)
    return build("llada", tmp_path_factory.mktemp("published") / "llada")


@pytest.fixture(scope="session")
def published_dream(tmp_path_factory):
    """A tiny random Dream-v0-Instruct-7B checkpoint with the Hub's code and tokenizer (tests/published.py)."""
    from tests.published import FIXTURES, SKIP_REASON, build

    if not (FIXTURES / "dream").is_dir():
        pytest.skip(SKIP_REASON)
    return build("dream", tmp_path_factory.mktemp("published") / "dream")


def load_model(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def calibration_dataset(path, texts=CALIBRATION_TEXTS, trust_remote_code: bool = False) -> Dataset:
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return Dataset.from_dict({"input_ids": [tokenizer(t)["input_ids"] for t in texts]})
