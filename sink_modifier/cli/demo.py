"""``sink-prune demo``: the bundled small DLM pruned with sink-aware Wanda and with llm-compressor's Wanda,
both evaluated with the same Monte-Carlo masks, plus the DLM-vs-AR sink pictures, and one structured line: the
smaller dense model of recipes/sink_structured_50.yaml, its size and denoising-step time against dense (one
process, interleaved) and its quality cost."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger

from sink_modifier.cli.inspection import measure_sinks, write_inspection
from sink_modifier.cli.workflows import (
    format_perplexity,
    load_model,
    print_table,
    prune,
    pruned_fraction,
    read_samples,
    seed_everything,
)
from sink_modifier.errors import CLIError
from sink_modifier.modifiers.scope import never_pruned_ignore
from sink_modifier.saving.publish import check_output, staged

__all__ = ["CALIBRATION_TEXT", "DemoConfig", "paired_difference", "run_demo"]


@dataclass(frozen=True)
class DemoConfig:
    """How much work the demo does; ``QUICK`` is for the test suite."""

    calibration_samples: int = 8
    max_seq_length: int = 128
    eval_documents: int | None = 24  # None: the whole bundled evaluation slice
    num_mc_samples: int = 4
    pictures: bool = True  # inspect the dense DLM against its AR twin
    cloze_items: int = 32  # bundled_cloze items scored through lm-eval (when installed)


DEMO_FULL = DemoConfig()
DEMO_QUICK = DemoConfig(calibration_samples=2, max_seq_length=64, eval_documents=6, num_mc_samples=2,
                        pictures=False, cloze_items=8)
CALIBRATION_TEXT = Path(__file__).parents[1] / "assets" / "calibration.txt"


def _demo_recipes(model: torch.nn.Module) -> dict[str, list]:
    """recipes/sink_wanda_unstructured_50.yaml in code, and llm-compressor's Wanda with the same sparsity,
    structure, targets (the decoder layers) and ignore list, so the sink weighting is the only difference.

    The noise settings are the ``diffusion`` pipeline's defaults (10 levels, seed 0), which is what it uses when
    the recipe has no sink-aware modifier: both recipes then calibrate on identical noised states.
    """
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.utils.pytorch.module import infer_sequential_targets

    from sink_modifier import SinkAwarePruningModifier, SinkAwareStructuredPruningModifier

    targets = sorted(infer_sequential_targets(model))
    ignore = never_pruned_ignore("lm_head", "embed")
    return {
        "wanda": [WandaPruningModifier(sparsity=0.5, mask_structure="0:0", targets=targets, ignore=ignore)],
        "sink_aware_wanda": [SinkAwarePruningModifier(
            sparsity=0.5, mask_structure="unstructured", method="wanda", noise_levels=10,
            sink_threshold_std=2.0, sink_sharpness=5.0, sink_score="raw", sink_scope="global",
            sink_selection="all", seed=0, targets=targets, ignore=ignore,
        )],
        # recipes/sink_structured_50.yaml: a smaller dense model, not zeros
        "sink_structured": [SinkAwareStructuredPruningModifier(
            sparsity=0.5, head_sparsity=0.5, method="wanda", noise_levels=10, seed=0, targets=targets,
        )],
    }


def run_demo(args: argparse.Namespace) -> int:
    from sink_modifier.evaluation.perplexity import perplexity

    try:
        from sink_modifier.bundled import bundled_model_path, eval_slice_path
    except ImportError as error:
        raise CLIError("the bundled models are not installed (sink_modifier/bundled is missing)") from error
    config = DEMO_QUICK if args.quick else DEMO_FULL
    output = check_output(args.output, overwrite=args.overwrite)
    dlm = str(bundled_model_path("dlm"))
    eval_texts = read_samples(Path(eval_slice_path()))[: config.eval_documents]
    calibration = read_samples(CALIBRATION_TEXT)[: config.calibration_samples]
    start = time.perf_counter()

    cloze = []  # bundled_cloze accuracy of each model, in results' order

    def evaluate(model, tokenizer):
        cloze.append(cloze_accuracy(model, tokenizer, config.cloze_items, config.num_mc_samples, args.seed))
        return perplexity(model, eval_texts, tokenizer=tokenizer, num_mc_samples=config.num_mc_samples,
                          seed=args.seed, max_length=config.max_seq_length)

    results, sparsity = {}, {}
    with staged(output, existing="replace" if args.overwrite else "refuse") as staging:
        seed_everything(args.seed)
        model, tokenizer = load_model(dlm, dtype="float32")
        logger.info(f"Evaluating the dense model on {len(eval_texts)} documents")
        results["dense"], sparsity["dense"] = evaluate(model, tokenizer), pruned_fraction(model)
        samples = [tokenizer(t, truncation=True, max_length=config.max_seq_length)["input_ids"]
                   for t in calibration]
        for name, recipe in _demo_recipes(model).items():
            seed_everything(args.seed)
            model, tokenizer = load_model(dlm, dtype="float32")
            # the diffusion pipeline: both modifiers calibrate on the same noised states of the same samples
            prune(model, tokenizer, samples, recipe, staging / name, pipeline="diffusion")
            del model
            pruned, tokenizer = load_model(str(staging / name), dtype="float32")  # what a user gets back
            logger.info(f"Evaluating {name}")
            results[name], sparsity[name] = evaluate(pruned, tokenizer), pruned_fraction(pruned)
            if name == "sink_structured":
                dense, _ = load_model(dlm, dtype="float32")
                structured = structured_size_and_speed(dense, pruned)
        if config.pictures:
            dynamics = []
            for kind in ("dlm", "ar"):
                model, tokenizer = load_model(str(bundled_model_path(kind)), dtype="float32")
                dynamics.append(measure_sinks(model, samples[:8], noise_levels=10, seed=0,
                                              name=f"bundled {kind.upper()}", progress=not args.quiet))
            write_inspection(dynamics, staging / "sinks")
        summary = {
            "model": "bundled dlm", "seed": args.seed, "quick": args.quick, "config": dataclasses.asdict(config),
            "results": {name: {"sparsity": sparsity[name], **r.to_dict()} for name, r in results.items()},
            "bundled_cloze_accuracy": dict(zip(results, cloze, strict=True)),
            "structured": structured,
        }
        if config.num_mc_samples > 1:
            summary["sink_aware_minus_wanda"] = paired_difference(results["sink_aware_wanda"], results["wanda"])
            summary["minus_dense"] = {name: paired_difference(results[name], results["dense"])
                                      for name in ("wanda", "sink_aware_wanda", "sink_structured")}
        (staging / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    elapsed = time.perf_counter() - start
    _print_demo(output, results, sparsity, summary, config, elapsed)
    print(_cloze_line(summary["bundled_cloze_accuracy"], config))
    return 0


@torch.no_grad()
def structured_size_and_speed(dense: torch.nn.Module, pruned: torch.nn.Module) -> dict:
    """Parameters and one denoising step's time (batch 8 x 128, medians of 5 interleaved forwards) of the
    structured model against dense, in this process on its threads."""
    from sink_modifier.evaluation.speed import denoising_batch, interleaved_medians

    batch = denoising_batch(dense.config)
    times = interleaved_medians({"dense": lambda: dense(input_ids=batch, use_cache=False),
                                 "pruned": lambda: pruned(input_ids=batch, use_cache=False)})
    count = {name: sum(p.numel() for p in model.parameters()) for name, model in (("dense", dense),
                                                                                  ("pruned", pruned))}
    config = pruned.config
    return {"parameters": count["pruned"], "dense_parameters": count["dense"],
            "parameters_ratio": count["pruned"] / count["dense"], "step_seconds": times["pruned"],
            "dense_step_seconds": times["dense"], "step_ratio": times["pruned"] / times["dense"],
            "widths": [config.intermediate_size, config.num_attention_heads, config.num_key_value_heads]}


def cloze_accuracy(model, tokenizer, items: int, mc_samples: int, seed: int) -> float | None:
    """Accuracy on the first ``items`` of the shipped lm-eval task bundled_cloze (None without lm-eval)."""
    try:
        from sink_modifier.evaluation.harness import DiffusionLM, evaluate_tasks
    except ImportError:
        return None
    lm = DiffusionLM(model, tokenizer, mc_samples=mc_samples, seed=seed)
    return evaluate_tasks(lm, ["bundled_cloze"], limit=items)["results"]["bundled_cloze"]["acc,none"]


def _cloze_line(accuracy: dict, config: DemoConfig) -> str:
    if None in accuracy.values():
        return "bundled_cloze accuracy: needs lm-eval (pip install 'sink-aware-pruning[eval]')"
    names = {"dense": "dense", "wanda": "Wanda", "sink_aware_wanda": "sink-aware", "sink_structured": "structured"}
    return (f"bundled_cloze accuracy (lm-eval, {config.cloze_items} items, chance 0.25): "
            + ", ".join(f"{names[name]} {value:.3f}" for name, value in accuracy.items()))


def paired_difference(a, b) -> dict:
    """Mean and standard error of the per-token NLL difference a - b, paired by MC sample (same masks)."""
    import statistics

    diffs = [x - y for x, y in zip(a.sample_nlls, b.sample_nlls, strict=True)]
    return {"nll_per_token": statistics.fmean(diffs),
            "stderr": statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan"),
            "num_mc_samples": len(diffs)}


def _format_paired_difference(paired: dict) -> str:
    """``paired_difference``'s mean and standard error as "+0.0123 ± 0.0045"."""
    return f"{paired['nll_per_token']:+.4f} ± {paired['stderr']:.4f}"


def _print_demo(output: Path, results: dict, sparsity: dict, summary: dict, config: DemoConfig,
                elapsed: float) -> None:
    labels = {"dense": "dense", "wanda": "Wanda (llm-compressor)", "sink_aware_wanda": "sink-aware Wanda",
              "sink_structured": "sink-aware structured"}
    rows = [["model", "zeros", "ELBO perplexity", "NLL/token", "NLL - dense (paired)"]]
    for name, result in results.items():
        change = "" if name == "dense" else _format_paired_difference(
            paired_difference(result, results["dense"]))
        zeros = "—" if name == "sink_structured" else f"{sparsity[name]:.1%}"  # smaller, not sparse
        rows.append([labels[name], zeros, format_perplexity(result),
                     f"{result.nll_per_token:.4f}", change])
    print(f"Bundled DLM, 50% unstructured Wanda, calibrated on {config.calibration_samples} samples x "
          f"10 noise levels; ELBO on {results['dense'].num_tokens} tokens, "
          f"{config.num_mc_samples} MC samples ({elapsed:.0f} s)")
    print_table(rows, left=1)
    if "sink_aware_minus_wanda" in summary:
        difference = _format_paired_difference(summary["sink_aware_minus_wanda"])
        print(f"sink-aware minus Wanda: {difference} nats/token "
              "(paired over MC samples: every model sees the same masks)")
    size = summary["structured"]
    cost = summary.get("minus_dense", {}).get("sink_structured")
    print(f"structured (50% of MLP channels and KV-head groups removed, widths {size['widths']}): "
          f"{size['parameters_ratio']:.2f}x the parameters ({size['parameters'] / 1e6:.2f}M of "
          f"{size['dense_parameters'] / 1e6:.2f}M), {size['step_ratio']:.2f}x the time of a denoising step "
          f"(8 x 128 tokens, this process), ELBO perplexity {results['sink_structured'].perplexity:.2f} vs "
          f"{results['dense'].perplexity:.2f} dense"
          + (f" (NLL {_format_paired_difference(cost)} nats/token)" if cost else ""))
    print(f"results:     {output / 'results.json'}")
    for name in ("wanda", "sink_aware_wanda", "sink_structured"):
        print(f"checkpoint:  {output / name}/  (recipe.yaml inside"
              + (", sink_report.json)" if name != "wanda" else ")"))
    if config.pictures:
        print(f"sink report: {output / 'sinks' / 'report.html'}  (dense DLM vs its AR twin)")
