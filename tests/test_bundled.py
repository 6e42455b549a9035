"""The shipped reference models load offline and still score what they scored when they were shipped.

The expected values were measured on the shipped bf16 checkpoints loaded in float32 (the command is in
docs/reference-models.md). Noise in the ELBO depends only on the seed and the tokens, so the only remaining
differences between machines are float32 rounding, far below the tolerance; a broken loader, tokenizer or
evaluation moves these numbers by whole nats.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sink_modifier import bundled, families
from sink_modifier.bundled import bundled_model_path, eval_slice_path, load_eval_slice
from sink_modifier.evaluation.perplexity import ar_perplexity, elbo_perplexity, perplexity
from sink_modifier.families.sampling import masked_diffusion_sample

SLICE_DOCS = 6  # the first six documents of eval_slice.txt: one per corpus source
MC_SAMPLES = 4
EXPECTED_DLM_NLL = 5.96894  # nats/token, ELBO, seed 0, 4 MC samples, max_length 128 (stderr 0.16)
EXPECTED_AR_NLL = 4.11666  # nats/token, exact
EXPECTED_TOKENS = 1971
TOLERANCE = 2e-3  # nats/token: float32 rounding across CPUs is ~1e-5; a broken loader is off by > 1


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(bundled_model_path("dlm"), local_files_only=True)


@pytest.fixture(scope="module")
def dlm():
    return AutoModelForCausalLM.from_pretrained(bundled_model_path("dlm"), dtype=torch.float32,
                                                local_files_only=True)


@pytest.fixture(scope="module")
def ar():
    return AutoModelForCausalLM.from_pretrained(bundled_model_path("ar"), dtype=torch.float32,
                                                local_files_only=True)


def test_bundle_is_complete_and_small() -> None:
    files = [p for p in bundled.BUNDLED_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    assert eval_slice_path().stat().st_size <= 50_000
    docs = load_eval_slice()
    assert len(docs) > SLICE_DOCS and all(docs) and not any(bundled.DOC_SEPARATOR in d for d in docs)


def test_missing_bundle_fails_clearly(monkeypatch, tmp_path) -> None:
    with pytest.raises(ValueError, match="'dlm' or 'ar'"):
        bundled_model_path("llada")  # type: ignore[arg-type]
    monkeypatch.setattr(bundled, "BUNDLED_DIR", tmp_path)
    with pytest.raises(bundled.BundledModelMissing, match="train_reference.py --ship"):
        bundled_model_path("ar")
    with pytest.raises(FileNotFoundError):
        eval_slice_path()


def test_twins_share_config_and_tokenizer(dlm, ar, tokenizer) -> None:
    assert dlm.config.use_bidirectional_attention and not ar.config.use_bidirectional_attention
    assert dlm.config.mask_token_id == tokenizer.mask_token_id == tokenizer.convert_tokens_to_ids("[MASK]")
    ignored = {"use_bidirectional_attention", "mask_token_id", "_name_or_path"}
    dlm_config = {k: v for k, v in dlm.config.to_dict().items() if k not in ignored}
    assert dlm_config == {k: v for k, v in ar.config.to_dict().items() if k not in ignored}
    assert tokenizer("Hello")["input_ids"][0] == tokenizer.bos_token_id == dlm.config.bos_token_id
    assert AutoTokenizer.from_pretrained(bundled_model_path("ar")).get_vocab() == tokenizer.get_vocab()
    assert all(p.dtype == torch.float32 for p in dlm.parameters())
    for size in (dlm.config.hidden_size, dlm.config.intermediate_size):
        assert size % 128 == 0  # W4A16 group size
    assert families.resolve(dlm).name == "masked"
    assert families.resolve(ar).name == "autoregressive"


@pytest.mark.slow
def test_dlm_elbo_on_the_eval_slice_is_unchanged(dlm, tokenizer) -> None:
    result = elbo_perplexity(dlm, load_eval_slice()[:SLICE_DOCS], tokenizer=tokenizer,
                             mask_token_id=tokenizer.mask_token_id, num_mc_samples=MC_SAMPLES, seed=0,
                             max_length=128, batch_size=32)
    assert result.num_tokens == EXPECTED_TOKENS
    assert result.nll_per_token == pytest.approx(EXPECTED_DLM_NLL, abs=TOLERANCE)
    assert 0 < result.stderr < 0.5


def test_ar_perplexity_on_the_eval_slice_is_unchanged(ar, tokenizer) -> None:
    result = ar_perplexity(ar, load_eval_slice()[:SLICE_DOCS], tokenizer=tokenizer, max_length=128)
    assert result.num_tokens == EXPECTED_TOKENS
    assert result.nll_per_token == pytest.approx(EXPECTED_AR_NLL, abs=TOLERANCE)


@pytest.mark.slow
def test_perplexity_picks_the_estimator(dlm, ar, tokenizer) -> None:
    texts = load_eval_slice()[:1]
    assert perplexity(dlm, texts, tokenizer=tokenizer, num_mc_samples=2).num_mc_samples == 2
    assert perplexity(ar, texts, tokenizer=tokenizer).num_mc_samples == 0


@pytest.mark.slow
def test_dense_dlm_samples_deterministically(dlm, tokenizer) -> None:
    prompt = torch.tensor(tokenizer("And God said unto Moses,")["input_ids"])
    kwargs = dict(answer_length=16, steps=8, num_blocks=2, mask_token_id=tokenizer.mask_token_id)
    first = masked_diffusion_sample(dlm, prompt, **kwargs)
    assert first.tokens.shape == (prompt.numel() + 16,) and torch.equal(first.tokens[: prompt.numel()], prompt)
    assert not (first.tokens == tokenizer.mask_token_id).any()
    assert torch.equal(first.tokens, masked_diffusion_sample(dlm, prompt, **kwargs).tokens)
    answer = first.tokens[prompt.numel() :]
    assert answer.unique().numel() > 3  # not a single repeated token
