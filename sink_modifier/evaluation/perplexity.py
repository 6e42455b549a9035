"""Likelihood evaluation: masked-diffusion ELBO perplexity for masked DLMs, ordinary perplexity for AR models
(which one, and how logits line up with tokens, is the family's ``Scoring`` role).

Pruning is judged by how much likelihood it costs, so both numbers must be comparable and precise:

* Masked DLMs have no exact likelihood; the standard bound (LLaDA, MDLM) is
  ``-log p(x) <= E_{t~U(0,1)} E_{x_t} [ 1/t * sum_{i masked in x_t} -log p(x_i | x_t) ]``, where each token is
  masked independently with probability ``t``. It is estimated by Monte Carlo; one MC sample is one noisy copy
  of every sequence, and the reported standard error is the spread of those independent per-sample estimates.
* Within an MC sample the sequences' noise levels are stratified: ``t_j = frac(u + j / J)`` for sequence ``j`` of
  ``J`` with one uniform shift ``u`` per sample (a randomly shifted lattice). Each ``t_j`` is still uniform, so
  every sample is unbiased and samples stay independent, but the sum over sequences covers ``(0, 1)`` evenly.
* Noise depends only on ``seed`` and the token sequences, never on the model or the batch size: two models
  evaluated with the same seed see identical masks, so their difference (``EvalResult.sample_nlls`` paired by
  index) is far more precise than either number alone.

A leading BOS token is a given prefix: it is never masked nor scored, so with BOS both estimators score exactly
the text tokens and their perplexities are comparable (an AR model cannot score a first token without one).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sink_modifier.seeding import content_generator

__all__ = [
    "EvalMode", "EvalResult", "ar_perplexity", "elbo_perplexity", "model_bos_id", "noise_generator",
    "noise_levels", "perplexity", "prepare_sequences", "token_nll", "token_scores",
]

Inputs = Sequence[str] | Sequence[torch.Tensor] | Sequence[Sequence[int]] | torch.Tensor


@dataclass(frozen=True)
class EvalResult:
    """Per-token negative log-likelihood (nats) and its perplexity.

    ``stderr`` is the standard error of ``nll_per_token`` over the MC samples (0 for the exact AR perplexity,
    NaN with a single MC sample); ``perplexity_stderr`` carries it to the perplexity scale.
    """

    perplexity: float
    stderr: float
    nll_per_token: float
    num_tokens: int
    num_mc_samples: int
    sample_nlls: tuple[float, ...] = ()

    @property
    def perplexity_stderr(self) -> float:
        return self.perplexity * self.stderr  # delta method: d exp(x) = exp(x) dx

    def to_dict(self) -> dict:
        return {
            "perplexity": self.perplexity,
            "perplexity_stderr": self.perplexity_stderr,
            "nll_per_token": self.nll_per_token,
            "stderr": self.stderr,
            "num_tokens": self.num_tokens,
            "num_mc_samples": self.num_mc_samples,
        }


def model_bos_id(model: torch.nn.Module, tokenizer=None) -> int | None:
    """The BOS every sequence starts with: the tokenizer's, else the model config's (None: no BOS)."""
    if tokenizer is not None and getattr(tokenizer, "bos_token_id", None) is not None:
        return int(tokenizer.bos_token_id)
    value = getattr(getattr(model, "config", None), "bos_token_id", None)
    return None if value is None else int(value)


def prepare_sequences(
    inputs: Inputs, *, tokenizer=None, bos_token_id: int | None = None, max_length: int = 128
) -> list[torch.Tensor]:
    """Token sequences of at most ``max_length`` tokens, each starting with BOS when its source did.

    Texts are tokenized (BOS is prepended when the tokenizer has one and did not add it); a longer sequence is
    cut into consecutive non-overlapping windows and every window gets the BOS prefix back, so each window is
    scored as the model was trained: a BOS, then text.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if isinstance(inputs, torch.Tensor):
        inputs = list(inputs) if inputs.dim() == 2 else [inputs]
    if isinstance(inputs, str):
        raise TypeError("pass a list of texts, not a single string")
    sequences = []
    for item in inputs:
        if isinstance(item, str):
            if tokenizer is None:
                raise ValueError("texts need a tokenizer; pass tokenizer= or token id tensors")
            ids = list(tokenizer(item, add_special_tokens=True, verbose=False)["input_ids"])  # windows below
            if tokenizer.eos_token_id is not None and ids and ids[-1] == tokenizer.eos_token_id:
                ids = ids[:-1]  # an appended EOS would be scored as if it were text
            if bos_token_id is not None and (not ids or ids[0] != bos_token_id):
                ids = [bos_token_id] + ids
            tokens = torch.tensor(ids, dtype=torch.long)
        else:
            tokens = torch.as_tensor(item, dtype=torch.long).flatten().cpu()
        has_bos = bos_token_id is not None and tokens.numel() > 0 and int(tokens[0]) == bos_token_id
        body = tokens[1:] if has_bos else tokens
        width = max_length - 1 if has_bos else max_length
        for start in range(0, body.numel(), width):
            window = body[start : start + width]
            sequences.append(torch.cat([tokens[:1], window]) if has_bos else window)
    if not sequences:
        raise ValueError("nothing to evaluate: every input is empty")
    return sequences


def _pad(batch: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask (right padding leaves real positions' outputs unchanged)."""
    length = max(x.numel() for x in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), length), dtype=torch.long)
    for row, x in enumerate(batch):
        ids[row, : x.numel()] = x
        attention[row, : x.numel()] = 1
    return ids, attention


Logits = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def _model_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def token_scores(
    model: torch.nn.Module, batch: list[torch.Tensor], targets: list[torch.Tensor], logits: Logits | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-log p(target) (float32) and whether the target is the argmax, at every position ([B, T]; padding 0 and
    False). One right-padded forward of ``batch``; ``logits(model, ids, attention_mask)`` aligns the model's
    logits with the positions they predict (a family's ``Scoring.token_logits``; default: as the model gives)."""
    device = next(model.parameters()).device
    ids, attention = _pad(batch, 0)
    logits = (logits or _model_logits)(model, ids.to(device), attention.to(device))
    target_ids, _ = _pad(targets, 0)
    target_ids, attention = target_ids.to(device), attention.to(device).bool()
    logp = F.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, target_ids[..., None])[..., 0]
    greedy = logits.argmax(dim=-1) == target_ids
    return (nll * attention).cpu(), (greedy & attention).cpu()


def token_nll(model: torch.nn.Module, batch: list[torch.Tensor], targets: list[torch.Tensor],
              logits: Logits | None = None) -> torch.Tensor:
    """-log p(target) at every position of every row (float32, [B, T], padding 0)."""
    return token_scores(model, batch, targets, logits)[0]


def noise_generator(seed: int, sample: int, sequences: list[torch.Tensor]) -> torch.Generator:
    """One generator per MC sample, keyed by the seed, the sample index and the tokens (not the model)."""
    return content_generator(f"{seed}:{sample}:{len(sequences)}", *sequences)


def noise_levels(shift: float, count: int) -> list[float]:
    """Stratified noise levels of one MC sample: a lattice over (0, 1) shifted by a uniform ``shift``."""
    return [(shift + j / count) % 1.0 for j in range(count)]


def _noise(
    sequences: list[torch.Tensor], num_mc_samples: int, seed: int, bos_token_id: int | None
) -> list[tuple[int, int, float, torch.Tensor]]:
    """(sample, sequence, t, masked positions) for every MC sample and sequence, in a fixed order."""
    plan = []
    for sample in range(num_mc_samples):
        generator = noise_generator(seed, sample, sequences)
        shift = float(torch.rand((), generator=generator, dtype=torch.float64))
        for j, (tokens, t) in enumerate(zip(sequences, noise_levels(shift, len(sequences)), strict=True)):
            masked = torch.rand(tokens.shape, generator=generator, dtype=torch.float64) < t
            if bos_token_id is not None and int(tokens[0]) == bos_token_id:
                masked[0] = False
            plan.append((sample, j, t, masked))
    return plan


def _result(totals: torch.Tensor, num_tokens: int) -> EvalResult:
    """Per-sample totals [M] (nats) -> per-token mean, standard error over samples, perplexity."""
    per_sample = totals / num_tokens
    mean = float(per_sample.mean())
    samples = per_sample.numel()
    stderr = float(per_sample.std(correction=1) / math.sqrt(samples)) if samples > 1 else float("nan")
    return EvalResult(
        perplexity=math.exp(mean), stderr=stderr, nll_per_token=mean, num_tokens=num_tokens,
        num_mc_samples=samples, sample_nlls=tuple(per_sample.tolist()),
    )


class EvalMode:
    """``model.eval()`` under ``torch.no_grad()`` for the duration, restoring the training flag after."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.was_training = model, model.training
        self.no_grad = torch.no_grad()

    def __enter__(self):
        self.model.eval()
        self.no_grad.__enter__()

    def __exit__(self, *exc):
        self.no_grad.__exit__(*exc)
        self.model.train(self.was_training)


def elbo_perplexity(
    model: torch.nn.Module,
    texts_or_token_tensors: Inputs,
    *,
    tokenizer=None,
    mask_token_id: int,
    num_mc_samples: int = 16,
    seed: int = 0,
    max_length: int = 128,
    batch_size: int = 16,
    logits: Logits | None = None,
) -> EvalResult:
    """Monte-Carlo masked-diffusion ELBO of a masked DLM, per token, and ``exp`` of it (an upper bound on the
    true perplexity). See the module docstring for the estimator and its stratified noise levels. ``logits``:
    the family's alignment of logits with tokens (``Scoring.token_logits``: Dream's are shifted by one)."""
    if num_mc_samples < 1:
        raise ValueError(f"num_mc_samples must be at least 1, got {num_mc_samples}")
    bos = model_bos_id(model, tokenizer)
    sequences = prepare_sequences(texts_or_token_tensors, tokenizer=tokenizer, bos_token_id=bos,
                                  max_length=max_length)
    num_tokens = sum(int(x.numel()) - int(bos is not None and int(x[0]) == bos) for x in sequences)
    if num_tokens == 0:
        raise ValueError("nothing to score: every sequence is only a BOS token")
    # Items with nothing masked contribute exactly 0 and need no forward.
    plan = [item for item in _noise(sequences, num_mc_samples, seed, bos) if item[3].any()]
    totals = torch.zeros(num_mc_samples, dtype=torch.float64)
    with EvalMode(model):
        for start in range(0, len(plan), batch_size):
            chunk = plan[start : start + batch_size]
            clean = [sequences[j] for _, j, _, _ in chunk]
            noisy = [torch.where(m, torch.full_like(sequences[j], mask_token_id), sequences[j])
                     for _, j, _, m in chunk]
            nll = token_nll(model, noisy, clean, logits).double()
            for row, (sample, _, t, masked) in enumerate(chunk):
                totals[sample] += nll[row, : masked.numel()][masked].sum() / t
    return _result(totals, num_tokens)


def ar_perplexity(
    model: torch.nn.Module,
    texts_or_token_tensors: Inputs,
    *,
    tokenizer=None,
    max_length: int = 128,
    batch_size: int = 16,
    logits: Logits | None = None,
) -> EvalResult:
    """Exact next-token perplexity of a causal LM over the same windows the ELBO uses (stderr 0)."""
    bos = model_bos_id(model, tokenizer)
    sequences = prepare_sequences(texts_or_token_tensors, tokenizer=tokenizer, bos_token_id=bos,
                                  max_length=max_length)
    sequences = [x for x in sequences if x.numel() > 1]
    if not sequences:
        raise ValueError("nothing to score: an AR model needs sequences of at least two tokens")
    total, num_tokens = 0.0, 0
    with EvalMode(model):
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start : start + batch_size]
            nll = token_nll(model, [x[:-1] for x in batch], [x[1:] for x in batch], logits).double()
            total += float(nll.sum())
            num_tokens += sum(x.numel() - 1 for x in batch)
    mean = total / num_tokens
    return EvalResult(perplexity=math.exp(mean), stderr=0.0, nll_per_token=mean, num_tokens=num_tokens,
                      num_mc_samples=0)


def perplexity(
    model: torch.nn.Module,
    texts_or_token_tensors: Inputs,
    *,
    tokenizer=None,
    mask_token_id: int | None = None,
    num_mc_samples: int = 16,
    seed: int = 0,
    max_length: int = 128,
    batch_size: int = 16,
) -> EvalResult:
    """The likelihood the model's family defines (its ``Scoring`` role, ``families.resolve``): the ELBO for a
    masked DLM (with the family's logit alignment), ordinary perplexity for an AR model; a family without an
    estimator (DiffusionGemma) is refused in one line (``FamilyError``)."""
    from sink_modifier import families

    scoring = families.resolve(model, "auto", families.FamilyOptions(mask_token_id=mask_token_id)).scoring
    if scoring.likelihood == "elbo":
        return elbo_perplexity(
            model, texts_or_token_tensors, tokenizer=tokenizer, mask_token_id=scoring.mask_token_id,
            num_mc_samples=num_mc_samples, seed=seed, max_length=max_length, batch_size=batch_size,
            logits=scoring.token_logits,
        )
    if scoring.likelihood == "causal":
        return ar_perplexity(model, texts_or_token_tensors, tokenizer=tokenizer, max_length=max_length,
                             batch_size=batch_size, logits=scoring.token_logits)
    raise families.FamilyError(scoring.refusal)
