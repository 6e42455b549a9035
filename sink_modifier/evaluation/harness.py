"""lm-evaluation-harness model ``diffusion_lm``: downstream tasks scored the way each family defines likelihood.

lm-eval's ``hf`` model scores causal next-token likelihoods, which mean nothing for a bidirectional masked DLM.
This model scores through the family's ``Scoring`` role (``families.resolve``): its likelihood estimator,
its alignment of logits with tokens (Dream's logits lag one position, as its ``generation_utils.py`` shifts
them) and its generator:

* masked DLMs (``likelihood: elbo``): ``log p(continuation | context)`` is the masked-diffusion bound restricted
  to the continuation, ``E_t E_mask [1/t * sum_{i masked} log p(y_i | context, y_t)]``, ``t ~ U(0, 1)``, each
  continuation token masked with probability ``t`` and the context never. ``mc_samples`` noise levels per
  request form a randomly shifted lattice (``evaluation.noise_levels``) and the noise is drawn from ``seed`` and
  the continuation's tokens only, so every model evaluated with the same seed sees the same masks (pairwise
  comparable), and so does one continuation after each of several contexts (multiple-input tasks). ``is_greedy``:
  every continuation token is the argmax when the whole continuation is masked (one parallel step). Rolling
  (perplexity) requests are ``evaluation.elbo_perplexity``; generation is ``sampling.masked_diffusion_sample``.
* causal LMs such as the AR twin: exact next-token log-likelihood, ``evaluation.ar_perplexity``,
  ``model.generate``.
* a family without an estimator (DiffusionGemma): generation only (its own ``generate()``); likelihood requests
  are refused with the family's one-line reason.

Importing this module registers the model (it imports lm-eval, an optional extra: ``pip install -e ".[eval]"``).
``python -m sink_modifier.evaluation.harness ARGS`` registers it and hands ARGS to lm-eval's own command line.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from loguru import logger
from tqdm import tqdm

from sink_modifier import families
from sink_modifier.evaluation.perplexity import (
    EvalMode,
    ar_perplexity,
    elbo_perplexity,
    model_bos_id,
    noise_generator,
    noise_levels,
    token_scores,
)
from sink_modifier.evaluation.tasks import TASKS_DIR

__all__ = ["DiffusionLM", "UnsupportedModel", "evaluate_tasks", "main", "task_manager"]

MODEL_NAME = "diffusion_lm"


class UnsupportedModel(ValueError):
    """The model (or this kind of request for it) cannot be evaluated; the message says why, in one line."""


def _batches(order: list[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(order), size):
        yield order[start : start + size]


class DiffusionLM(TemplateLM):
    """A masked DLM (LLaDA, Dream), its AR twin or DiffusionGemma as an lm-eval model (see the module docstring).

    ``pretrained``: a path or Hub id, or an already loaded model (then pass ``tokenizer``). ``mc_samples``: noise
    levels per loglikelihood request (and ELBO samples per rolling request). ``gen_steps`` (default: one token per
    step) and ``gen_block_length`` drive the masked sampler. ``progress=False``: no progress bar (lm-eval's
    passes ``disable=`` itself, so tqdm's ``TQDM_DISABLE`` does not reach it).
    """

    # Not "causal": context and continuation are tokenized separately, so the scored tokens are exactly the
    # continuation's own (lm-eval's causal split moves tokens across the boundary when it falls inside a word).
    backend = "separate"

    def __init__(
        self, pretrained: str | torch.nn.Module, tokenizer=None, *, mc_samples: int = 16,
        batch_size: int | str = 16, seed: int = 0, device: str | None = None, dtype: str = "auto",
        trust_remote_code: bool = False,
        max_length: int | None = None, max_gen_toks: int = 256, gen_steps: int | None = None,
        gen_block_length: int = 32, mask_token_id: int | None = None, max_batch_size: int | None = None,
        progress: bool = True,
    ):
        super().__init__()
        if int(mc_samples) < 1:
            raise UnsupportedModel(f"mc_samples must be at least 1, got {mc_samples}")
        loaded_here = isinstance(pretrained, str)
        if loaded_here:
            from sink_modifier.loading.checkpoints import load_model_and_tokenizer

            pretrained, tokenizer = load_model_and_tokenizer(pretrained, trust_remote_code=trust_remote_code,
                                                             dtype=dtype)
        elif tokenizer is None:
            raise UnsupportedModel("diffusion_lm needs tokenizer= when pretrained is a model object")
        if device is None and loaded_here:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            logger.warning(f"diffusion_lm: device {device} is not available; using cpu")  # lm-eval's default
            device = "cpu"
        if device is not None:
            pretrained = pretrained.to(device)
        self.model, self.tokenizer = pretrained, tokenizer
        self._device = next(self.model.parameters()).device
        self.mc_samples, self.seed = int(mc_samples), int(seed)
        self.progress = bool(progress)  # False: no bar of lm-eval's or ours (sink-prune eval -q)
        self.batch_size = self._batch_size(batch_size)
        self.max_gen_toks, self.gen_steps = int(max_gen_toks), gen_steps
        self.gen_block_length = int(gen_block_length)
        config = self.model.config
        self._max_length = int(max_length or getattr(config, "max_position_embeddings", None) or 2048)
        self.bos_id = model_bos_id(self.model, tokenizer)
        self.family, self.scoring = self._family(mask_token_id)
        self.mask_token_id = self.scoring.mask_token_id
        logger.info(f"diffusion_lm: {type(self.model).__name__} scored as {self.family}")

    # ---- setup ---------------------------------------------------------------------------------------

    @staticmethod
    def _batch_size(value) -> int:
        if isinstance(value, str) and value.startswith("auto"):
            logger.info("diffusion_lm: no automatic batch size; using 16")
            return 16
        size = int(value)
        if size < 1:
            raise UnsupportedModel(f"batch_size must be at least 1, got {value}")
        return size

    def _family(self, mask_token_id: int | None) -> tuple[str, families.Scoring]:
        try:
            family = families.resolve(self.model, "auto", families.FamilyOptions(mask_token_id=mask_token_id))
        except families.FamilyError as error:
            raise UnsupportedModel(f"diffusion_lm cannot score {type(self.model).__name__}: {error}") from error
        return family.name, family.scoring

    # ---- tokens --------------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return int(eos if eos is not None else self.prefix_token_id)

    @property
    def prefix_token_id(self) -> int:
        return int(self.bos_id if self.bos_id is not None else self.tokenizer.eos_token_id)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Text tokens, after a BOS unless ``add_special_tokens`` is False (never an appended EOS: it would be
        scored as text)."""
        ids = list(self.tokenizer(string, add_special_tokens=False)["input_ids"])
        if add_special_tokens is not False and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _fit(self, context: list[int], continuation: list[int], room: int) -> list[int]:
        """``context`` cut from the left (after its BOS) so that ``room`` more tokens fit in ``max_length``."""
        keep = self.max_length - room
        if len(context) <= keep:
            return context
        bos = context[:1] if self.bos_id is not None and context and context[0] == self.bos_id else []
        if keep <= len(bos):
            raise UnsupportedModel(f"a {len(continuation)}-token continuation leaves no room for context in "
                                   f"max_length {self.max_length}")
        return bos + context[len(context) - (keep - len(bos)):]

    def _progress(self, total: int, desc: str, disable: bool) -> tqdm:
        return tqdm(total=total, desc=desc, disable=disable or not self.progress or self.rank != 0)

    # ---- loglikelihood -------------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """lm-eval's (it tokenizes, then calls ``_loglikelihood_tokens``), its bar off without ``progress``."""
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        if self.scoring.likelihood is None:
            raise UnsupportedModel(f"diffusion_lm cannot score likelihoods: {self.scoring.refusal}")
        pairs = [(self._fit(list(ctx), list(cont), len(cont)), list(cont)) for _, ctx, cont in requests]
        score = self._masked_scores if self.scoring.likelihood == "elbo" else self._ar_scores
        results = score(pairs, disable_tqdm)
        for (key, _, _), answer in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def _masked_noise(self, continuation: list[int]) -> list[tuple[float, torch.Tensor]]:
        """(t, masked continuation positions) of every MC sample, drawn from the seed and the continuation's
        tokens alone: identical for every model, and for every context one continuation is scored after
        (multiple-input tasks such as WinoGrande compare exactly that), so differences are paired."""
        tokens = torch.tensor(continuation)
        shift = float(torch.rand((), generator=noise_generator(self.seed, 0, [tokens]), dtype=torch.float64))
        return [(t, torch.rand(len(continuation), generator=noise_generator(self.seed, sample + 1, [tokens]),
                               dtype=torch.float64) < t)
                for sample, t in enumerate(noise_levels(shift, self.mc_samples))]

    def _masked_scores(self, pairs, disable_tqdm: bool) -> list[tuple[float, bool]]:
        # items: (request, weight 1/t or None for the greedy check, masked continuation positions)
        items = []
        for r, (_, cont) in enumerate(pairs):
            items += [(r, 1.0 / t, masked) for t, masked in self._masked_noise(cont) if masked.any()]
            items.append((r, None, torch.ones(len(cont), dtype=torch.bool)))
        totals = torch.zeros(len(pairs), dtype=torch.float64)
        greedy = [False] * len(pairs)
        order = sorted(range(len(items)), key=lambda i: -sum(map(len, pairs[items[i][0]])))
        with EvalMode(self.model), self._progress(len(items), "diffusion_lm loglikelihood", disable_tqdm) as bar:
            for batch in _batches(order, self.batch_size):
                clean, noisy = [], []
                for i in batch:
                    r, _, masked = items[i]
                    ctx, cont = pairs[r]
                    tokens = torch.tensor(ctx + cont)
                    full = torch.cat([torch.zeros(len(ctx), dtype=torch.bool), masked])
                    clean.append(tokens)
                    noisy.append(torch.where(full, torch.full_like(tokens, self.mask_token_id), tokens))
                nll, hits = token_scores(self.model, noisy, clean, self.scoring.token_logits)
                for row, i in enumerate(batch):
                    r, weight, masked = items[i]
                    start = len(pairs[r][0])
                    positions = torch.arange(start, start + masked.numel())[masked]
                    if weight is None:
                        greedy[r] = bool(hits[row, positions].all())
                    else:
                        totals[r] -= float(nll[row, positions].double().sum()) * weight
                bar.update(len(batch))
        return [(float(total) / self.mc_samples, g) for total, g in zip(totals, greedy, strict=True)]

    def _ar_scores(self, pairs, disable_tqdm: bool) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda r: -sum(map(len, pairs[r])))
        with EvalMode(self.model), self._progress(len(pairs), "diffusion_lm loglikelihood", disable_tqdm) as bar:
            for batch in _batches(order, self.batch_size):
                sequences = [torch.tensor(pairs[r][0] + pairs[r][1]) for r in batch]
                nll, hits = token_scores(self.model, [x[:-1] for x in sequences], [x[1:] for x in sequences],
                                         self.scoring.token_logits)
                for row, r in enumerate(batch):
                    stop = sequences[row].numel() - 1
                    span = slice(stop - len(pairs[r][1]), stop)
                    results[r] = (-float(nll[row, span].double().sum()), bool(hits[row, span].all()))
                bar.update(len(batch))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood: the ELBO (masked DLMs) or the exact AR likelihood over max-length windows
        (``evaluation.prepare_sequences``; each window restarts from BOS)."""
        if self.scoring.likelihood is None:
            self._loglikelihood_tokens([])  # the same refusal
        results = []
        for (text,) in tqdm([req.args for req in requests], desc="diffusion_lm rolling loglikelihood",
                            disable=disable_tqdm or not self.progress or self.rank != 0):
            if not text:
                results.append(0.0)
                continue
            kwargs = {"tokenizer": self.tokenizer, "max_length": self.max_length, "batch_size": self.batch_size}
            if self.scoring.likelihood == "elbo":
                result = elbo_perplexity(self.model, [text], mask_token_id=self.mask_token_id,
                                         num_mc_samples=self.mc_samples, seed=self.seed,
                                         logits=self.scoring.token_logits, **kwargs)
            else:
                result = ar_perplexity(self.model, [text], logits=self.scoring.token_logits, **kwargs)
            results.append(-result.nll_per_token * result.num_tokens)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), results[-1])
        return results

    # ---- generation ----------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or ``do_sample`` with ``temperature``) completions of ``max_gen_toks`` tokens, cut at EOS
        and at the first ``until`` string. Requests whose prompts have equal lengths are batched."""
        jobs = []
        for context, gen_kwargs in (req.args for req in requests):
            options = dict(gen_kwargs or {})
            until = options.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            length = int(options.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(options.get("temperature", 0.0)) if options.get("do_sample") else 0.0
            prompt = self._fit(self.tok_encode(context), [], self._canvas(length))
            jobs.append((prompt, length, temperature, until))
        outputs: list[str] = [""] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for j, (prompt, length, temperature, _) in enumerate(jobs):
            groups.setdefault((len(prompt), length, temperature), []).append(j)
        size = 1 if self.scoring.generation == "own" else self.batch_size
        generate = {"masked": self._generate_masked, "causal": self._generate_ar,
                    "own": self._generate_own}[self.scoring.generation]
        with self._progress(len(jobs), "diffusion_lm generate_until", disable_tqdm) as bar:
            for (_, length, temperature), members in groups.items():
                for batch in _batches(members, size):
                    prompts = torch.tensor([jobs[j][0] for j in batch])
                    answers = generate(prompts, length, temperature)
                    for j, answer in zip(batch, answers, strict=True):
                        outputs[j] = self._stop(answer[:length], jobs[j][3])
                        self.cache_hook.add_partial("generate_until", requests[j].args, outputs[j])
                    bar.update(len(batch))
        return outputs

    def _canvas(self, length: int) -> int:
        """How many tokens the sampler writes for ``length`` (whole blocks or canvases)."""
        if self.scoring.generation == "masked":
            block = min(self.gen_block_length, length)
            return math.ceil(length / block) * block
        canvas = self.scoring.canvas_length(self.model)
        return math.ceil(length / canvas) * canvas if canvas else length

    def _stop(self, answer: torch.Tensor, until: list[str]) -> str:
        ids = answer.tolist()
        stops = {self.eot_token_id} | ({self.tokenizer.eos_token_id} - {None})
        cut = next((i for i, token in enumerate(ids) if token in stops), len(ids))
        text = self.tok_decode(ids[:cut])
        for stop in until:
            if stop and stop in text:
                text = text[: text.index(stop)]
        return text

    def _generate_masked(self, prompts: torch.Tensor, length: int, temperature: float) -> list[torch.Tensor]:
        from sink_modifier.families.sampling import masked_diffusion_sample

        answer = self._canvas(length)
        blocks = answer // min(self.gen_block_length, length)
        steps = max(blocks, (self.gen_steps or answer) // blocks * blocks)
        tokens = masked_diffusion_sample(self.model, prompts, answer_length=answer, steps=steps,
                                         num_blocks=blocks, mask_token_id=self.mask_token_id,
                                         temperature=temperature, seed=self.seed,
                                         logits=self.scoring.token_logits).tokens
        return list(tokens[:, prompts.shape[1]:])

    def _seeded(self, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        devices = [self._device] if self._device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), EvalMode(self.model):
            torch.manual_seed(self.seed)
            return run()

    def _generate_ar(self, prompts: torch.Tensor, length: int, temperature: float) -> list[torch.Tensor]:
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        sequences = self._seeded(lambda: self.model.generate(
            prompts.to(self._device), attention_mask=torch.ones_like(prompts).to(self._device),
            max_new_tokens=length, pad_token_id=self.eot_token_id, **sampling))
        return list(sequences[:, prompts.shape[1]:].cpu())

    def _generate_own(self, prompts: torch.Tensor, length: int, temperature: float) -> list:
        output = self._seeded(lambda: self.model.generate(prompts.to(self._device),
                                                          max_new_tokens=self._canvas(length)))
        sequences = output.sequences if hasattr(output, "sequences") else output
        return list(sequences[:, prompts.shape[1]:].cpu())


if __name__ != "__main__":  # run as a script, the module imported by main() registers the one class
    register_model(MODEL_NAME)(DiffusionLM)


# ---- running lm-eval ---------------------------------------------------------------------------------


def task_manager(tasks: Sequence[str], include_path: Sequence[str | Path] = ()):
    """lm-eval's TaskManager over the shipped tasks and ``include_path``; lm-eval's own task catalogue (slow to
    index, ~13 s) is added only when a requested task is not among those."""
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR), *map(str, include_path)]
    local = TaskManager(include_path=paths, include_defaults=False)
    if all(name in local.all_tasks for name in tasks):
        return local
    return TaskManager(include_path=paths)


def evaluate_tasks(
    model: DiffusionLM, tasks: Sequence[str], *, include_path: Sequence[str | Path] = (),
    limit: float | None = None, num_fewshot: int | None = None, log_samples: bool = False,
) -> dict:
    """``lm_eval.simple_evaluate`` of ``model`` on ``tasks`` (names of shipped, included or lm-eval tasks)."""
    from lm_eval import simple_evaluate

    if limit is not None and limit >= 1:
        limit = int(limit)
    return simple_evaluate(model=model, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                           task_manager=task_manager(tasks, include_path), log_samples=log_samples,
                           batch_size=model.batch_size)


def main(argv: Sequence[str] | None = None) -> int:
    """lm-eval's command line with ``diffusion_lm`` registered and the shipped tasks included (unless
    ``--include_path`` names another directory)."""
    from sink_modifier.compat import run_lm_eval_command_line
    from sink_modifier.errors import CLIError
    from sink_modifier.loading.checkpoints import LoadError

    args = list(sys.argv[1:] if argv is None else argv)
    if args and not any(a.startswith("--include_path") for a in args) and not {"-h", "--help"} & set(args):
        args += ["--include_path", str(TASKS_DIR)]
    try:
        run_lm_eval_command_line(args)  # an explicit list: sys.argv is read, never replaced
    except (UnsupportedModel, CLIError, LoadError) as error:
        print(f"python -m sink_modifier.evaluation.harness: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from sink_modifier.evaluation.harness import main as _main

    sys.exit(_main())
