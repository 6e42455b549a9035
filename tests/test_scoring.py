"""Scoring is a family role (``families.base.Scoring``): the estimator, the alignment of logits with tokens and
the generator come from the family, for ``sink-prune eval``, the lm-eval model and the samplers alike."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sink_modifier import families
from sink_modifier.evaluation.perplexity import elbo_perplexity, perplexity
from sink_modifier.families.masked import Dream, MaskedDiffusion

VOCAB, MASK = 64, 63


def _expected_next(position: int) -> int:
    return (position * 5) % 50 + 5


class NextTokenModel(torch.nn.Module):
    """Logits at position ``i`` single out token ``_expected_next(i + 1)``: a model that predicts the next
    position from each position, as Dream (initialised from an AR model) does."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None, **kwargs):
        batch, length = input_ids.shape
        logits = torch.zeros(batch, length, VOCAB)
        for i in range(length):
            logits[:, i, _expected_next(i + 1)] = 10.0 + i / length  # later positions slightly more confident
        return SimpleNamespace(logits=logits + self.anchor)


def test_shift_logits_moves_every_prediction_one_position_right():
    logits = torch.arange(24.0).view(1, 4, 6)
    shifted = families.shift_logits(logits, 1)
    assert torch.equal(shifted[:, 1:], logits[:, :-1]) and torch.equal(shifted[:, 0], logits[:, 0])
    assert families.shift_logits(logits, 0) is logits


def test_dream_sampler_reads_each_token_from_the_previous_position():
    """Dream's sampler (as its generation_utils.py) writes at position j what the logits at j - 1 predict;
    the unshifted masked sampler writes what position j predicts, the token of j + 1."""
    model, tokens = NextTokenModel(), torch.arange(5, 21)
    for family, offset in ((Dream(MASK), 0), (MaskedDiffusion(MASK), 1)):
        states = family.sampler_states(model, tokens, steps=4, blocks=1, prompt_fraction=0.5, temperature=0.0,
                                       seed=0)
        last = states[-1].input_ids
        written = [(j, int(last[j])) for j in range(8, 16) if int(last[j]) != MASK]
        assert len(written) == 6  # 8 answer tokens, 2 per step, the last step's 2 still masked
        assert all(token == _expected_next(j + offset) for j, token in written), (family, written)


class ShiftedMasked(MaskedDiffusion):
    logit_shift = 1


@pytest.fixture
def shifted_family(dlm_path):
    """The bundled DLM claimed by a family registered here, whose scoring shifts logits by one position."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(dlm_path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(dlm_path)
    spec = families.FamilySpec("test_shifted", lambda m, options, chosen: families.Family.of(
        "test_shifted", ShiftedMasked(tokenizer.mask_token_id)), matches=lambda m: m is model, priority=10_000,
        claims=True)
    families.register(spec)
    try:
        yield model, tokenizer
    finally:
        families.unregister("test_shifted")


def _shifted(model, input_ids, attention_mask):
    raw = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return torch.cat([raw[:, :1], raw[:, :-1]], dim=1)


TEXTS = ["the cat sat on the mat", "a diffusion model denoises every position at once"]


def test_a_family_registered_here_is_scored_through_its_role(shifted_family):
    model, tokenizer = shifted_family
    got = perplexity(model, TEXTS, tokenizer=tokenizer, num_mc_samples=3)
    by_hand = elbo_perplexity(model, TEXTS, tokenizer=tokenizer, mask_token_id=tokenizer.mask_token_id,
                              num_mc_samples=3, logits=_shifted)
    unshifted = elbo_perplexity(model, TEXTS, tokenizer=tokenizer, mask_token_id=tokenizer.mask_token_id,
                                num_mc_samples=3)
    assert got.sample_nlls == by_hand.sample_nlls
    assert got.nll_per_token != pytest.approx(unshifted.nll_per_token, rel=1e-3)


def test_the_lm_eval_model_scores_through_the_role(shifted_family):
    pytest.importorskip("lm_eval")
    from sink_modifier.evaluation.harness import DiffusionLM

    model, tokenizer = shifted_family
    lm = DiffusionLM(model, tokenizer, mc_samples=2, batch_size=4)
    assert lm.family == "test_shifted" and isinstance(lm.scoring, ShiftedMasked)
    [rolling] = lm.loglikelihood_rolling([SimpleNamespace(args=(TEXTS[0],))], disable_tqdm=True)
    by_hand = elbo_perplexity(model, [TEXTS[0]], tokenizer=tokenizer, mask_token_id=tokenizer.mask_token_id,
                              num_mc_samples=2, max_length=lm.max_length, batch_size=4, logits=_shifted)
    assert rolling == pytest.approx(-by_hand.nll_per_token * by_hand.num_tokens, rel=1e-12)


def test_diffusion_gemma_eval_is_refused_in_one_line(diffusion_gemma_path, tmp_path, capsys):
    from sink_modifier.cli.main import main

    text = tmp_path / "eval.txt"
    text.write_text("abc def\n\nghi jkl")
    assert main(["eval", str(diffusion_gemma_path), "--text-file", str(text), "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "DiffusionGemma (uniform-token block diffusion) has no likelihood" in err
