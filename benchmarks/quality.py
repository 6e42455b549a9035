"""Quality after pruning on the bundled DLM (and its AR twin as a control), every cell through ``oneshot``.

Methods (all with targets = the decoder-layer class and ignore = lm_head/embeddings, as in ``sink-prune demo``):

* ``magnitude``: |W| per row (or N:M) through llm-compressor's Wanda selection with every column statistic equal
  (``OneShotMagnitude``; llm-compressor's own ``MagnitudePruningModifier`` prunes nothing through ``oneshot``);
* ``wanda`` / ``sparsegpt``: llm-compressor's ``WandaPruningModifier`` / ``SparseGPTModifier`` calibrated on the
  clean samples (default pipeline);
* ``wanda_noised`` / ``sparsegpt_noised``: the same plain modifiers with ``pipeline="diffusion"``: they calibrate
  on the noised trajectory states (the pipeline's default settings: 10 noise levels, noise seed 0);
* ``sink_wanda_all`` / ``sink_sparsegpt_all`` / ``sink_wanda_unstable`` / ``sink_sparsegpt_unstable``:
  ``SinkAwarePruningModifier`` with ``pipeline="diffusion"``, 10 noise levels, noise seed 0 (so its states are
  exactly the ``*_noised`` runs' states) and ``sink_selection`` ``all`` / ``unstable``.

A calibration seed picks which ``--num-samples`` documents of ``sink_modifier/assets/calibration.txt`` (30) are
used (``random.Random(seed).sample``) and seeds Python/NumPy/torch before ``oneshot``. The forward-noise masks
are a function of each sample's tokens and the noise seed (fixed at 0), so a different subset also means
different noised states. Evaluation: ELBO perplexity (DLM; ``--mc-samples`` MC samples with eval seed 0, so every
model sees the same masks and differences are paired per MC sample) or exact perplexity (AR) on the bundled
test-split evaluation slice. Per-cell results are cached in ``benchmarks/.cache/quality.json`` (resumable).

    python benchmarks/quality.py --smoke       # one tiny cell, no cache, no docs
    python benchmarks/quality.py               # full grid; writes the table into docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from loguru import logger

from sink_modifier.bundled import bundled_model_path, load_eval_slice
from sink_modifier.demo import CALIBRATION_TEXT, paired_difference
from sink_modifier.evaluation import perplexity
from sink_modifier.workflows import (
    load_model,
    prune,
    pruned_fraction,
    read_samples,
    seed_everything,
)

sys.path.insert(0, str(Path(__file__).parent))
from sinks import write_docs  # noqa: E402

CACHE = Path(__file__).parent / ".cache" / "quality.json"
MARKER_BEGIN, MARKER_END = "<!-- quality:begin -->", "<!-- quality:end -->"
METHODS = ["magnitude", "wanda", "sparsegpt", "wanda_noised", "sparsegpt_noised", "sink_wanda_all",
           "sink_sparsegpt_all", "sink_wanda_unstable", "sink_sparsegpt_unstable"]
ABLATION = {m: m.split("_")[1] + "_noised" for m in METHODS if m.startswith("sink_")}
IGNORE = ["re:.*lm_head.*", "re:.*embed.*"]


def _one_shot_magnitude():
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    class OneShotMagnitude(WandaPruningModifier):
        """Magnitude pruning in one shot: llm-compressor's Wanda selection (per row, or N:M) on |W| alone.

        llm-compressor 0.14's MagnitudePruningModifier applies its masks on optimizer steps only, so through
        ``oneshot`` it prunes nothing. Wanda's metric |W| sqrt(S) with every column statistic S equal is |W|.
        """

        def calibrate_module(self, module, args, output):
            super().calibrate_module(module, (torch.ones_like(args[0]), *args[1:]), output)

    return OneShotMagnitude


def recipe(method: str, sparsity: str, targets: list[str]) -> tuple[list, str]:
    """(modifiers, pipeline) for one cell; ``sparsity`` is "0.5" or "2:4"."""
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    from sink_modifier import SinkAwarePruningModifier

    OneShotMagnitude = _one_shot_magnitude()  # noqa: N806
    structured = ":" in sparsity
    value, mask = (0.5, sparsity) if structured else (float(sparsity), "0:0")
    if method == "magnitude":
        modifier = OneShotMagnitude(sparsity=value, mask_structure=mask, targets=targets, ignore=IGNORE)
        return [modifier], "independent"
    if method.startswith("sink_"):
        _, engine, selection = method.split("_")
        return [SinkAwarePruningModifier(
            sparsity=value, mask_structure=sparsity if structured else "unstructured", method=engine,
            noise_levels=10, seed=0, sink_selection=selection, targets=targets, ignore=IGNORE)], "diffusion"
    engine, _, noised = method.partition("_")
    cls = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[engine]
    return [cls(sparsity=value, mask_structure=mask, targets=targets, ignore=IGNORE)], (
        "diffusion" if noised else "independent")


def run_cell(kind: str, method: str, sparsity: str, seed: int, args, eval_texts: list[str]) -> dict:
    from llmcompressor.utils.pytorch.module import infer_sequential_targets

    path = str(bundled_model_path(kind))
    seed_everything(seed)
    model, tokenizer = load_model(path, dtype="float32")
    start = time.perf_counter()
    if method != "dense":
        documents = read_samples(CALIBRATION_TEXT)
        chosen = random.Random(seed).sample(range(len(documents)), args.num_samples)
        samples = [tokenizer(documents[i], truncation=True, max_length=args.max_seq_length)["input_ids"]
                   for i in sorted(chosen)]
        modifiers, pipeline = recipe(method, sparsity, sorted(infer_sequential_targets(model)))
        with tempfile.TemporaryDirectory() as tmp:
            prune(model, tokenizer, samples, modifiers, Path(tmp) / "out", overwrite=False, pipeline=pipeline)
            del model
            model, tokenizer = load_model(str(Path(tmp) / "out"), dtype="float32")  # what a user gets back
    prune_seconds = time.perf_counter() - start
    result = perplexity(model, eval_texts, tokenizer=tokenizer, num_mc_samples=args.mc_samples, seed=0,
                        max_length=args.max_seq_length)
    return {"zeros": pruned_fraction(model), "prune_seconds": prune_seconds,
            "eval_seconds": time.perf_counter() - start - prune_seconds, **result.to_dict(),
            "sample_nlls": list(result.sample_nlls)}


def key(kind, method, sparsity, seed, args) -> str:
    seed = 0 if method in ("dense", "magnitude") else seed  # neither uses calibration data
    sparsity = "-" if method == "dense" else sparsity
    return f"{kind}|{method}|{sparsity}|{seed}|n{args.num_samples}|mc{args.mc_samples}|L{args.max_seq_length}"


def label(sparsity: str) -> str:
    return sparsity if ":" in sparsity else f"{float(sparsity):.0%}"


def fmt(values: list[float], digits: int = 2) -> str:
    if not values:
        return "—"
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def paired_delta(a: dict, b: dict, stderr: bool = False):
    """Per-token NLL difference a - b (and its standard error over MC samples): paired over MC samples for the
    DLM (same masks), exact for the AR model (stderr 0)."""
    if a["sample_nlls"] and b["sample_nlls"]:
        d = paired_difference(*(argparse.Namespace(sample_nlls=r["sample_nlls"]) for r in (a, b)))
        delta, se = d["nll_per_token"], d["stderr"]
    else:
        delta, se = a["nll_per_token"] - b["nll_per_token"], 0.0
    return (delta, se) if stderr else delta


def tables(cache: dict, args) -> str:
    lines = []
    for kind in args.models:
        dense = cache.get(key(kind, "dense", None, 0, args))
        if dense is None:
            continue
        metric = "ELBO perplexity" if kind == "dlm" else "perplexity"
        header = "| method | " + " | ".join(label(x) for x in args.sparsities) + " |"
        rule = "|---" * (1 + len(args.sparsities)) + "|"
        lines += [f"**{kind.upper()}**: {metric} (mean ± std over calibration seeds; dense "
                  f"{dense['perplexity']:.2f}) and, below each, NLL − dense in nats/token (paired)", "",
                  header, rule]
        for method in args.methods:
            cells = []
            for sparsity in args.sparsities:
                runs = [cache.get(key(kind, method, sparsity, s, args)) for s in args.seeds]
                runs = [r for r in runs if r is not None]
                seen = len({key(kind, method, sparsity, s, args) for s in args.seeds})
                n = f" (n={len(runs)})" if len(runs) < seen else ""
                cells.append(f"{fmt([r['perplexity'] for r in runs])}{n}<br>"
                             f"Δ {fmt([paired_delta(r, dense) for r in runs], 3)}" if runs else "—")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        sink = [m for m in args.methods if m in ABLATION and ABLATION[m] in args.methods]
        if sink:
            lines += ["", f"**{kind.upper()}**: sink-aware minus its same-state ablation (plain modifier, "
                      "`pipeline=\"diffusion\"`), NLL nats/token, mean ± std over seeds, and the paired MC "
                      "standard error averaged over seeds (negative = sink-aware better)", "", header, rule]
            for method in sink:
                cells = []
                for sparsity in args.sparsities:
                    pairs = [(cache.get(key(kind, method, sparsity, s, args)),
                              cache.get(key(kind, ABLATION[method], sparsity, s, args))) for s in args.seeds]
                    deltas = [paired_delta(a, b, stderr=True) for a, b in pairs if a and b]
                    mc_se = statistics.fmean(se for _, se in deltas) if deltas else 0.0
                    cells.append(f"{fmt([d for d, _ in deltas], 4)} (MC se {mc_se:.4f})" if deltas else "—")
                lines.append(f"| {method} − {ABLATION[method]} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", default="0.5,0.6,0.7,2:4")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--models", default="dlm,ar")
    parser.add_argument("--num-samples", type=int, default=8, help="calibration documents per seed (of 30)")
    parser.add_argument("--mc-samples", type=int, default=4, help="ELBO Monte-Carlo samples (DLM)")
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--eval-documents", type=int, default=50, help="documents of the eval slice (of 50)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="one tiny cell; no cache, no docs")
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="run nothing; tabulate the cached cells")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sparsities, args.seeds, args.methods, args.models = "0.5", "0", "sink_wanda_all", "dlm"
        args.num_samples, args.mc_samples, args.max_seq_length, args.eval_documents = 2, 2, 64, 4
    args.sparsities, args.methods, args.models = (v.split(",") for v in (args.sparsities, args.methods,
                                                                         args.models))
    args.seeds = [int(s) for s in args.seeds.split(",")]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    torch.set_num_threads(args.threads)
    eval_texts = load_eval_slice()[: args.eval_documents]
    cache = {} if args.smoke else (json.loads(CACHE.read_text()) if CACHE.exists() else {})
    cells = [(kind, "dense", None, 0) for kind in args.models] + [
        (kind, method, sparsity, seed) for kind in args.models for seed in args.seeds  # seeds outermost: a
        for sparsity in args.sparsities for method in args.methods]  # stopped run leaves whole seeds behind
    for kind, method, sparsity, seed in cells:
        k = key(kind, method, sparsity, seed, args)
        if k in cache or args.report_only:
            continue
        cache[k] = run_cell(kind, method, sparsity, seed, args, eval_texts)
        r = cache[k]
        print(f"{k}: ppl {r['perplexity']:.3f} zeros {r['zeros']:.3f} prune {r['prune_seconds']:.1f}s "
              f"eval {r['eval_seconds']:.1f}s", file=sys.stderr, flush=True)
        if not args.smoke:
            CACHE.parent.mkdir(parents=True, exist_ok=True)
            CACHE.write_text(json.dumps(cache, indent=1))
    command = "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    setup = (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads; "
             f"{args.num_samples} calibration documents x {args.max_seq_length} tokens per seed, seeds "
             f"{args.seeds}; eval: {len(eval_texts)} eval-slice documents, {args.mc_samples} MC samples (seed 0)")
    text = f"Command: `{command.strip()}`  \nMachine: {setup}\n\n{tables(cache, args)}"
    print(text)
    if not (args.smoke or args.no_docs):
        write_docs(text, MARKER_BEGIN, MARKER_END, "Quality after pruning")


if __name__ == "__main__":
    main()
