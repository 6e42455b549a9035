"""Likelihood evaluation and the masked sampler, on tiny random models and on stubs whose answer is known.

A stub whose prediction ignores its input has an exact ELBO (the masked-diffusion bound is tight when nothing is
learnt from context), which pins the estimator's scale, bias and standard error; the tiny Gemma models check the
plumbing (BOS, windows, padding, batching) against direct forwards.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer

from conftest import CALIBRATION_TEXTS, load_model
from sink_modifier.evaluation import perplexity as evaluation
from sink_modifier.evaluation.perplexity import ar_perplexity, elbo_perplexity, perplexity, prepare_sequences
from sink_modifier.families.sampling import masked_diffusion_sample, transfer_schedule
from tests.toy import BOS_ID, MASK_ID

VOCAB = 11


class UnigramStub(nn.Module):
    """p(x_i | anything) = softmax(table): the ELBO equals the exact NLL sum_i -log p(x_i)."""

    def __init__(self, bos_token_id: int | None = 0):
        super().__init__()
        self.table = nn.Parameter(torch.randn(VOCAB, generator=torch.Generator().manual_seed(0)))
        self.config = SimpleNamespace(bos_token_id=bos_token_id, vocab_size=VOCAB)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=self.table.expand(*input_ids.shape, VOCAB))


def _stub_sequences(count: int = 8, length: int = 20) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    body = torch.randint(1, VOCAB - 1, (count, length), generator=generator)
    return [torch.cat([torch.zeros(1, dtype=torch.long), row]) for row in body]  # BOS = 0


def test_stub_elbo_is_unbiased_and_its_stderr_is_calibrated() -> None:
    stub, sequences = UnigramStub(), _stub_sequences()
    logp = F.log_softmax(stub.table.detach().double(), dim=-1)
    exact = float(-torch.cat([logp[x[1:]] for x in sequences]).mean())
    result = elbo_perplexity(stub, sequences, mask_token_id=VOCAB - 1, num_mc_samples=400, seed=0)
    assert result.num_tokens == 8 * 20 and result.num_mc_samples == 400
    assert abs(result.nll_per_token - exact) < 4 * result.stderr
    assert result.perplexity == pytest.approx(math.exp(result.nll_per_token))
    # The stderr predicts how far independent seeds scatter.
    runs = [elbo_perplexity(stub, sequences, mask_token_id=VOCAB - 1, num_mc_samples=16, seed=seed)
            for seed in range(40)]
    spread = torch.tensor([r.nll_per_token for r in runs]).std().item()
    mean_stderr = sum(r.stderr for r in runs) / len(runs)
    assert 0.6 < spread / mean_stderr < 1.6


def test_fixed_noise_level_matches_a_hand_computed_bound(dlm_path, monkeypatch) -> None:
    """With t fixed to 1 every token is masked: the bound is one forward of an all-mask input."""
    model = load_model(dlm_path)
    tokens = torch.tensor([BOS_ID, 40, 41, 42, 43, 44, 45])
    monkeypatch.setattr(evaluation, "noise_levels", lambda shift, count: [1.0] * count)
    result = elbo_perplexity(model, [tokens], mask_token_id=MASK_ID, num_mc_samples=3, seed=0)
    noisy = torch.tensor([[BOS_ID] + [MASK_ID] * 6])
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=noisy).logits[0].double(), dim=-1)
    expected = float(-logp[torch.arange(1, 7), tokens[1:]].mean())
    assert result.nll_per_token == pytest.approx(expected, rel=1e-5)
    assert result.stderr == pytest.approx(0.0, abs=1e-9)  # no randomness left


def test_elbo_matches_direct_forwards_with_the_same_noise(dlm_path) -> None:
    """Batching and right padding change nothing: recompute every MC item unpadded, one at a time."""
    model, tokenizer = load_model(dlm_path), AutoTokenizer.from_pretrained(dlm_path)
    texts = CALIBRATION_TEXTS[:3]
    result = elbo_perplexity(model, texts, tokenizer=tokenizer, mask_token_id=MASK_ID, num_mc_samples=3,
                             seed=7, max_length=32, batch_size=5)
    sequences = prepare_sequences(texts, tokenizer=tokenizer, bos_token_id=BOS_ID, max_length=32)
    totals = torch.zeros(3, dtype=torch.float64)
    for sample, j, t, masked in evaluation._noise(sequences, 3, 7, BOS_ID):
        clean = sequences[j]
        noisy = torch.where(masked, torch.full_like(clean, MASK_ID), clean)
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=noisy[None]).logits[0].double(), dim=-1)
        totals[sample] += -logp[masked, clean[masked]].sum() / t
    num_tokens = sum(x.numel() - 1 for x in sequences)
    assert result.num_tokens == num_tokens == sum(len(tokenizer(t)["input_ids"]) for t in texts)
    assert result.sample_nlls == pytest.approx((totals / num_tokens).tolist(), rel=1e-5)


def test_elbo_is_seeded_and_independent_of_batch_size(dlm_path) -> None:
    model, tokenizer = load_model(dlm_path), AutoTokenizer.from_pretrained(dlm_path)
    kwargs = dict(tokenizer=tokenizer, mask_token_id=MASK_ID, num_mc_samples=4, max_length=24)
    first = elbo_perplexity(model, CALIBRATION_TEXTS, seed=3, batch_size=16, **kwargs)
    again = elbo_perplexity(model, CALIBRATION_TEXTS, seed=3, batch_size=3, **kwargs)
    other = elbo_perplexity(model, CALIBRATION_TEXTS, seed=4, batch_size=16, **kwargs)
    assert again.nll_per_token == pytest.approx(first.nll_per_token, rel=1e-5)
    assert other.nll_per_token != pytest.approx(first.nll_per_token, rel=1e-5)
    assert first.stderr > 0 and math.isfinite(first.perplexity)
    single = elbo_perplexity(model, CALIBRATION_TEXTS[:1], seed=3, **{**kwargs, "num_mc_samples": 1})
    assert math.isnan(single.stderr)


def test_ar_perplexity_is_the_next_token_loss(ar_path) -> None:
    model, tokenizer = load_model(ar_path), AutoTokenizer.from_pretrained(ar_path)
    tokens = torch.tensor([BOS_ID] + tokenizer(CALIBRATION_TEXTS[0])["input_ids"])
    with torch.no_grad():
        loss = model(input_ids=tokens[None], labels=tokens[None]).loss
    result = ar_perplexity(model, [CALIBRATION_TEXTS[0]], tokenizer=tokenizer)
    assert result.num_tokens == tokens.numel() - 1 and result.num_mc_samples == 0 and result.stderr == 0.0
    assert result.perplexity == pytest.approx(math.exp(float(loss)), rel=1e-5)
    padded = ar_perplexity(model, CALIBRATION_TEXTS[:3], tokenizer=tokenizer, batch_size=3)
    one_by_one = [ar_perplexity(model, [t], tokenizer=tokenizer) for t in CALIBRATION_TEXTS[:3]]
    total = sum(r.nll_per_token * r.num_tokens for r in one_by_one) / sum(r.num_tokens for r in one_by_one)
    assert padded.nll_per_token == pytest.approx(total, rel=1e-5)


def test_long_inputs_are_cut_into_windows_that_each_start_with_bos() -> None:
    tokens = torch.cat([torch.tensor([BOS_ID]), torch.arange(10, 30)])  # BOS + 20 tokens
    windows = prepare_sequences([tokens], bos_token_id=BOS_ID, max_length=8)
    assert [w.numel() for w in windows] == [8, 8, 7]  # BOS + 7, BOS + 7, BOS + 6 text tokens
    assert all(int(w[0]) == BOS_ID for w in windows)
    assert torch.equal(torch.cat([w[1:] for w in windows]), tokens[1:])
    assert [w.numel() for w in prepare_sequences([tokens[1:]], bos_token_id=BOS_ID, max_length=8)] == [8, 8, 4]
    with pytest.raises(ValueError, match="tokenizer"):
        prepare_sequences(["text"], bos_token_id=BOS_ID)


def test_perplexity_dispatches_on_attention(dlm_path, ar_path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(dlm_path)
    dlm = perplexity(load_model(dlm_path), CALIBRATION_TEXTS[:2], tokenizer=tokenizer, num_mc_samples=2)
    ar = perplexity(load_model(ar_path), CALIBRATION_TEXTS[:2], tokenizer=tokenizer, num_mc_samples=2)
    assert dlm.num_mc_samples == 2 and ar.num_mc_samples == 0
    assert dlm.num_tokens == ar.num_tokens  # BOS makes both score exactly the text tokens


# --------------------------------------------------------------------------- sampler


@torch.no_grad()
def llada_reference(model, prompt, answer_length, steps, num_blocks) -> torch.Tensor:
    """LLaDA's ``generate`` (temperature 0, low-confidence remasking) written out plainly, mask logit excluded."""
    x = torch.cat([prompt, torch.full((answer_length,), MASK_ID)])[None]
    block_length, per_block = answer_length // num_blocks, steps // num_blocks
    for b in range(num_blocks):
        start, stop = prompt.numel() + b * block_length, prompt.numel() + (b + 1) * block_length
        n = int((x[0, start:stop] == MASK_ID).sum())
        schedule = [n // per_block + (1 if i < n % per_block else 0) for i in range(per_block)]
        for k in schedule:
            mask_index = x == MASK_ID
            logits = model(input_ids=x).logits.float()
            logits[..., MASK_ID] = -torch.inf
            x0 = logits.argmax(-1)
            p = torch.softmax(logits, -1).gather(-1, x0[..., None])[..., 0]
            p[:, stop:] = -torch.inf
            confidence = torch.where(mask_index, p, torch.tensor(-torch.inf))
            index = torch.topk(confidence[0], k).indices
            x[0, index] = x0[0, index]
    return x[0]


@pytest.mark.parametrize("num_blocks", [1, 2])
def test_sampler_matches_llada_reference(dlm_path, num_blocks) -> None:
    model = load_model(dlm_path)
    prompt = torch.tensor([BOS_ID, 40, 41, 42])
    result = masked_diffusion_sample(model, prompt, answer_length=12, steps=6, num_blocks=num_blocks,
                                     mask_token_id=MASK_ID, record_steps=True)
    assert torch.equal(result.tokens, llada_reference(model, prompt, 12, 6, num_blocks))
    assert result.tokens.shape == (16,) and torch.equal(result.tokens[:4], prompt)
    assert not (result.tokens == MASK_ID).any()
    # One recorded state per forward, masks only ever filled (never re-masked), two per step.
    assert len(result.steps) == 6 and int((result.steps[0][4:] == MASK_ID).sum()) == 12
    masks = [int((s == MASK_ID).sum()) for s in result.steps] + [0]
    assert masks == list(range(12, -1, -2))
    for before, after in zip(result.steps, result.steps[1:] + [result.tokens], strict=True):
        kept = before != MASK_ID
        assert torch.equal(before[kept], after[kept])
    if num_blocks == 2:  # the second block stays masked while the first is decoded
        assert all((s[10:] == MASK_ID).all() for s in result.steps[:3])


def test_sampler_is_seeded_and_batched(dlm_path) -> None:
    model = load_model(dlm_path)
    prompt = torch.tensor([[BOS_ID, 40, 41], [BOS_ID, 50, 51]])
    kwargs = dict(answer_length=8, steps=4, mask_token_id=MASK_ID, temperature=1.0)
    first = masked_diffusion_sample(model, prompt, seed=1, **kwargs)
    assert first.tokens.shape == (2, 11) and first.steps is None
    assert torch.equal(first.tokens, masked_diffusion_sample(model, prompt, seed=1, **kwargs).tokens)
    assert not torch.equal(first.tokens, masked_diffusion_sample(model, prompt, seed=2, **kwargs).tokens)
    greedy = masked_diffusion_sample(model, prompt[1], answer_length=8, steps=4, mask_token_id=MASK_ID)
    batched = masked_diffusion_sample(model, prompt, answer_length=8, steps=4, mask_token_id=MASK_ID)
    assert torch.equal(greedy.tokens, batched.tokens[1])


def test_sampler_schedule_and_bad_arguments(dlm_path) -> None:
    assert transfer_schedule(10, 4) == [3, 3, 2, 2] and transfer_schedule(2, 4) == [1, 1, 0, 0]
    model = load_model(dlm_path)
    with pytest.raises(ValueError, match="divisible"):
        masked_diffusion_sample(model, torch.tensor([BOS_ID]), answer_length=10, steps=4, num_blocks=4,
                                mask_token_id=MASK_ID)
    with pytest.raises(ValueError, match="positive"):
        masked_diffusion_sample(model, torch.tensor([BOS_ID]), answer_length=4, steps=0, mask_token_id=MASK_ID)
