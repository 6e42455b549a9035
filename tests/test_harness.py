"""The lm-eval model ``diffusion_lm`` on the bundled models and the shipped offline task ``bundled_cloze``.

The bundled DLM is weak but uses its context; the cloze is built so that ignoring the context scores exactly
chance (25%). Limits and MC samples are small: each evaluation is a few seconds on one core.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lm_eval")

from sink_modifier.bundled import bundled_model_path  # noqa: E402
from sink_modifier.cli.main import main  # noqa: E402
from sink_modifier.cli.workflows import load_model  # noqa: E402
from sink_modifier.evaluation.harness import DiffusionLM, UnsupportedModel, evaluate_tasks  # noqa: E402
from sink_modifier.evaluation.tasks.make_bundled_cloze import OUTPUT, build  # noqa: E402

LIMIT = 16  # four groups of four: a context-blind model scores exactly 4/16


@pytest.fixture(scope="module")
def dlm():
    return load_model(str(bundled_model_path("dlm")), dtype="float32")


@pytest.fixture(scope="module")
def ar():
    return load_model(str(bundled_model_path("ar")), dtype="float32")


def _cloze(model, tokenizer, mc_samples: int = 2) -> tuple[float, list[float]]:
    """Accuracy on the first LIMIT items and the gold choice's loglikelihood of each."""
    lm = DiffusionLM(model, tokenizer, mc_samples=mc_samples, batch_size=16)
    results = evaluate_tasks(lm, ["bundled_cloze"], limit=LIMIT, log_samples=True)
    samples = sorted(results["samples"]["bundled_cloze"], key=lambda s: s["doc_id"])
    gold = [float(s["filtered_resps"][s["doc"]["label"]][0]) for s in samples]
    return results["results"]["bundled_cloze"]["acc,none"], gold


@pytest.fixture(scope="module")
def dense_cloze(dlm):
    return _cloze(*dlm)


def _request(*args) -> SimpleNamespace:
    return SimpleNamespace(args=args)


def test_task_data_is_what_the_script_builds() -> None:
    from sink_modifier.bundled import load_eval_slice

    shipped = [json.loads(line) for line in OUTPUT.read_text(encoding="utf-8").splitlines()]
    assert shipped == build(load_eval_slice())
    assert 50 <= len(shipped) <= 100
    for item in shipped:
        assert len(item["contexts"]) == 4 and 0 <= item["label"] < 4
    # groups of four share their contexts, each context the answer once: ignoring the context scores 25%
    for start in range(0, len(shipped), 4):
        group = shipped[start : start + 4]
        assert all(item["contexts"] == group[0]["contexts"] for item in group)
        assert sorted(item["label"] for item in group) == [0, 1, 2, 3]


@pytest.mark.slow
def test_dense_dlm_scores_above_chance_reproducibly(dlm, dense_cloze) -> None:
    accuracy, gold = dense_cloze
    assert accuracy >= 0.5  # chance is 0.25
    assert _cloze(*dlm) == (accuracy, gold)  # bit-identical: the masks depend on the seed and the tokens only


@pytest.mark.slow
def test_magnitude_pruned_dlm_scores_the_answers_lower(dlm, dense_cloze) -> None:
    model, tokenizer = dlm
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in pruned.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                weight = module.weight
                threshold = weight.abs().flatten().kthvalue(int(0.7 * weight.numel())).values
                weight[weight.abs() <= threshold] = 0
    _, gold = _cloze(pruned, tokenizer)
    _, dense_gold = dense_cloze
    # Same masks, so the gold choice's likelihood is paired item by item. (The accuracy on 16 items does not
    # move: the bundled DLM leans on its unpruned embeddings, and its 70%-pruned layers cost ~1 nat per item.)
    assert sum(gold) < sum(dense_gold)
    assert sum(g < d for g, d in zip(gold, dense_gold, strict=True)) > len(gold) / 2


def test_masked_loglikelihood_matches_its_definition(dlm) -> None:
    """One MC sample at a known noise level, recomputed by hand: -1/t * sum of masked continuation NLLs."""
    model, tokenizer = dlm
    lm = DiffusionLM(model, tokenizer, mc_samples=1, seed=3)
    context, continuation = lm.tok_encode("And Jacob went on his"), lm.tok_encode(" way, and the angels", False)
    [(t, masked)] = lm._masked_noise(continuation)
    [(score, _)] = lm._loglikelihood_tokens([(("", ""), context, continuation)], disable_tqdm=True)
    clean = torch.tensor(context + continuation)
    noisy = clean.clone()
    noisy[len(context):][masked] = lm.mask_token_id
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=noisy[None]).logits[0].double(), dim=-1)
    positions = torch.arange(len(context), len(clean))[masked]
    assert masked.any()
    assert score == pytest.approx(float(logp[positions, clean[positions]].sum()) / t, rel=1e-5)


def test_generate_until_stops_at_until(dlm) -> None:
    model, tokenizer = dlm
    lm = DiffusionLM(model, tokenizer, gen_block_length=8)
    context = "And Jacob went on his way, and the angels of God met him. And"
    [full] = lm.generate_until([_request(context, {"until": [], "max_gen_toks": 16})], disable_tqdm=True)
    assert len(full) > 4
    stop = full[3:5]
    [cut] = lm.generate_until([_request(context, {"until": [stop], "max_gen_toks": 16})], disable_tqdm=True)
    assert cut == full[: full.index(stop)]


def test_ar_twin_scores_exact_next_token_likelihood_and_generates(ar) -> None:
    model, tokenizer = ar
    lm = DiffusionLM(model, tokenizer)
    assert lm.family == "autoregressive"
    context, continuation = lm.tok_encode("And Jacob went on his"), lm.tok_encode(" way, and the angels", False)
    [(score, greedy)] = lm._loglikelihood_tokens([(("", ""), context, continuation)], disable_tqdm=True)
    tokens = torch.tensor(context + continuation)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=tokens[None, :-1]).logits[0].double(), dim=-1)
    targets = tokens[1:]
    expected = logp[torch.arange(len(targets)), targets][len(context) - 1:].sum()
    assert score == pytest.approx(float(expected), rel=1e-5)
    prompt = "And Jacob went on his way, and"
    [text] = lm.generate_until([_request(prompt, {"until": [], "max_gen_toks": 8})], disable_tqdm=True)
    with torch.no_grad():
        ids = torch.tensor([lm.tok_encode(prompt)])
        reference = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=lm.eot_token_id)
    assert text == lm._stop(reference[0, ids.shape[1]:], [])


def test_rolling_loglikelihood_is_the_elbo_of_every_window_by_hand(dlm) -> None:
    """The harness's whole-text score against the bound computed from direct forwards: its windows of
    ``max_length`` tokens (each restarting from BOS), its mask id, MC samples and seed, and the sign and scale
    lm-eval expects (a log-likelihood in nats of the whole text, averaged over MC samples). An empty text
    scores 0."""
    from sink_modifier.evaluation import perplexity

    model, tokenizer = dlm
    text = "In the beginning God created the heaven and the earth. And the earth was without form, and void."
    lm = DiffusionLM(model, tokenizer, mc_samples=3, seed=5, max_length=12)
    [score, empty] = lm.loglikelihood_rolling([_request(text), _request("")], disable_tqdm=True)
    bos = model.config.bos_token_id
    ids = tokenizer(text)["input_ids"]
    ids = ids if ids[0] == bos else [bos, *ids]
    windows = [torch.tensor([bos, *ids[1:][i : i + 11]]) for i in range(0, len(ids) - 1, 11)]
    assert len(windows) >= 2 and all(len(w) <= 12 for w in windows)
    total = 0.0
    for _, j, t, masked in perplexity._noise(windows, 3, 5, bos):
        clean = windows[j]
        noisy = torch.where(masked, torch.full_like(clean, lm.mask_token_id), clean)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=noisy[None]).logits[0].double(), dim=-1)
        total += float(-logp[masked, clean[masked]].sum() / t)
    assert lm.mask_token_id == 4
    assert score == pytest.approx(-total / 3, rel=1e-5)
    assert empty == 0.0


def test_rolling_loglikelihood_of_the_ar_twin_is_its_exact_likelihood(ar) -> None:
    model, tokenizer = ar
    text = "And Jacob went on his way, and the angels of God met him."
    lm = DiffusionLM(model, tokenizer)
    [score] = lm.loglikelihood_rolling([_request(text)], disable_tqdm=True)
    bos = model.config.bos_token_id
    ids = tokenizer(text)["input_ids"]
    tokens = torch.tensor(ids if ids[0] == bos else [bos, *ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=tokens[None, :-1]).logits[0].double(), dim=-1)
    assert score == pytest.approx(float(logp[torch.arange(len(tokens) - 1), tokens[1:]].sum()), rel=1e-6)


def test_refusal_is_one_line(diffusion_gemma_path) -> None:
    """DiffusionGemma generates but has no likelihood here: a loglikelihood task is refused in one line (by the
    ``sink-prune`` script, which switches lm-eval's bars off through tqdm's environment before importing it)."""
    from tests.published import run_fresh

    done = run_fresh("import sink_prune, sys; sys.exit(sink_prune.main())", "eval", str(diffusion_gemma_path),
                     "--tasks", "bundled_cloze", "--limit", "1", "-q")
    code, err = done.returncode, done.stderr.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and err.startswith("sink-prune eval: error: diffusion_lm cannot score")
    with pytest.raises(UnsupportedModel, match="mc_samples"):
        DiffusionLM(torch.nn.Linear(1, 1), object(), mc_samples=0)


@pytest.mark.slow
def test_cli_prints_lm_evals_table(capsys) -> None:
    dlm = str(bundled_model_path("dlm"))
    assert main(["eval", dlm, "--tasks", "bundled_cloze", "--limit", "4", "--num-mc-samples", "1", "-q"]) == 0
    out = capsys.readouterr().out
    assert "|bundled_cloze|" in out and "|acc   |" in out and out.startswith("diffusion_lm (dlm, masked")


@pytest.mark.slow
def test_module_entry_point_hands_arguments_to_lm_eval(tmp_path) -> None:
    """``python -m sink_modifier.evaluation.harness`` with lm-eval's own flags, offline, from another directory."""
    dlm = bundled_model_path("dlm")
    command = [sys.executable, "-m", "sink_modifier.evaluation.harness", "--model", "diffusion_lm", "--model_args",
               f"pretrained={dlm},mc_samples=1,dtype=float32", "--tasks", "bundled_cloze", "--limit", "4",
               "--batch_size", "16", "--device", "cpu"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "|bundled_cloze|" in done.stdout and "diffusion_lm" in done.stdout


@pytest.mark.slow
def test_module_entry_point_passes_an_explicit_argument_list(monkeypatch, capsys) -> None:
    """In-process ``harness.main(argv)``: lm-eval parses ``argv`` (no subcommand given: ``run`` is implied) while
    ``sys.argv`` stays the caller's, untouched, during the run too."""
    from sink_modifier.evaluation import harness

    callers = ["pytest", "--not-an-lm-eval-flag"]
    monkeypatch.setattr(sys, "argv", callers)
    during = []
    create = DiffusionLM.create_from_arg_obj.__func__

    def recording(cls, *args, **kwargs):
        during.append(list(sys.argv))
        return create(cls, *args, **kwargs)

    monkeypatch.setattr(DiffusionLM, "create_from_arg_obj", classmethod(recording))
    dlm = bundled_model_path("dlm")
    assert harness.main(["--model", "diffusion_lm", "--model_args", f"pretrained={dlm},mc_samples=1,dtype=float32",
                         "--tasks", "bundled_cloze", "--limit", "2", "--batch_size", "16", "--device", "cpu"]) == 0
    assert "|bundled_cloze|" in capsys.readouterr().out
    assert during == [callers] and sys.argv is callers and callers == ["pytest", "--not-an-lm-eval-flag"]


@pytest.mark.slow
def test_diffusion_gemma_generates_through_its_own_generate(diffusion_gemma_path) -> None:
    lm = DiffusionLM(*load_model(str(diffusion_gemma_path), dtype="float32"))
    assert lm.family == "diffusion_gemma"
    request = _request("abc", {"until": [], "max_gen_toks": 5})
    [text] = lm.generate_until([request], disable_tqdm=True)
    assert isinstance(text, str) and lm.generate_until([request], disable_tqdm=True) == [text]  # seeded
