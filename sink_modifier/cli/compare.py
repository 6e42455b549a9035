"""``sink-prune compare MODEL``: the controlled comparison of sink-aware pruning against its ablations.

Every cell is ``llmcompressor.oneshot`` on a fresh copy of the dense model; every pruned model is evaluated on
the same evaluation masks (ELBO perplexity for a masked DLM, exact perplexity for an AR model), so differences
between cells are paired. Methods (targets: the decoder layers; ignore: LM head and embeddings):

* ``magnitude``: |W| per row (or N:M) through llm-compressor's Wanda selection with every column statistic equal
  (no calibration data, so it runs once);
* ``wanda`` / ``sparsegpt``: llm-compressor's modifiers on the clean samples (default pipeline);
* ``wanda_noised`` / ``sparsegpt_noised`` (the ablation): ``SinkAwarePruningModifier`` with
  ``sink_selection: none``, i.e. the noised states with validity weights only (1 on the rows a state holds, 0
  elsewhere); for a DLM this is plain Wanda / SparseGPT on the noised states, for the AR control it calibrates
  on exactly the prefix rows its sink-aware run weights;
* ``sink_<engine>_all`` / ``_unstable``: the sink-aware runs on the same states;
* ``sink_<engine>_random`` (the random-row control): each state's ``all`` row scales permuted over its valid
  positions, so the same amount of down-weighting lands on random tokens.

Calibration draws are disjoint sets of documents of the calibration text (a seeded permutation cut into
consecutive chunks); each draw also seeds the forward noise. The differences to the ablation (and to the random
control) are computed per draw and summarised by their mean and their spread over draws (sample std); a
difference counts as resolved only when its mean exceeds that spread and twice the paired MC standard error.

``--structured`` compares whole-channel / KV-group removal the same way (``sink_modifier.cli.compare_structured``).

This module imports nothing heavy at load time: the CLI loads it by path for ``--help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CompareConfig", "METHODS", "QUICK", "add_arguments", "main", "recipe", "run_compare"]

ENGINES = ("wanda", "sparsegpt")
SELECTIONS = ("all", "unstable", "random")
METHODS = ("magnitude", *ENGINES, *(f"{e}_noised" for e in ENGINES),
           *(f"sink_{e}_{s}" for s in SELECTIONS for e in ENGINES))
QUICK = dict(sparsities=("0.5",), num_samples=2, max_seq_length=64, eval_documents=6, mc_samples=2)
DATA_FREE = ("magnitude", "structured-magnitude")  # run once: they use no calibration data
# --structured (sink_modifier.cli.compare_structured builds their recipes)
STRUCTURED_METHODS = ("structured-magnitude", "structured-wanda", "structured-wanda_noised",
                      *(f"sink_structured-wanda_{s}" for s in SELECTIONS))
STRUCTURED_SPARSITIES = ("0.25", "0.5", "0.5/0.5")


@dataclass
class CompareConfig:
    model: str | None = None  # None: the bundled DLM
    calibration_text: Path | None = None  # None: sink_modifier/assets/calibration.txt
    eval_text: Path | None = None  # None: the bundled evaluation slice
    sparsities: tuple[str, ...] = ("0.5", "2:4", "0.75")
    methods: tuple[str, ...] = METHODS
    draws: int = 2
    num_samples: int = 8  # calibration documents per draw
    max_seq_length: int = 128
    eval_documents: int | None = 50
    mc_samples: int = 4
    noise_levels: int = 10
    seed: int = 0  # picks the draws' documents; draw d uses noise seed ``seed + d``
    eval_seed: int = 0
    dtype: str = "float32"
    trust_remote_code: bool = False
    structured: bool = False  # sparsities are structured ("C" or "C/H"); see compare_structured
    progress: bool = True
    extra: dict = field(default_factory=dict)  # recorded in the JSON (command line, machine)


def _one_shot_magnitude():
    import torch
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    class OneShotMagnitude(WandaPruningModifier):
        """Magnitude pruning in one shot: Wanda's selection on |W| alone (every column statistic equal).

        llm-compressor 0.14's MagnitudePruningModifier applies its masks on optimizer steps only, so through
        ``oneshot`` it prunes nothing.
        """

        def calibrate_module(self, module, args, output):
            super().calibrate_module(module, (torch.ones_like(args[0]), *args[1:]), output)

    return OneShotMagnitude


def recipe(method: str, sparsity: str, targets: list[str], *, seed: int = 0, noise_levels: int = 10):
    """(modifiers, pipeline) of one cell; ``sparsity`` is a fraction ("0.5") or N:M ("2:4")."""
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    from sink_modifier import SinkAwarePruningModifier
    from sink_modifier.modifiers.scope import never_pruned_ignore

    if method in STRUCTURED_METHODS:
        from sink_modifier.cli import compare_structured

        return compare_structured.recipe(method, sparsity, targets, seed=seed, noise_levels=noise_levels)
    ignore = never_pruned_ignore("lm_head", "embed")  # as sink-prune demo: the decoder layers' Linears
    structured = ":" in sparsity
    value, mask = (0.5, sparsity) if structured else (float(sparsity), "0:0")
    if method == "magnitude":
        return [_one_shot_magnitude()(sparsity=value, mask_structure=mask, targets=targets, ignore=ignore)], \
            "independent"
    if method in ENGINES:
        cls = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[method]
        return [cls(sparsity=value, mask_structure=mask, targets=targets, ignore=ignore)], "independent"
    if method.endswith("_noised"):
        engine, selection = method.split("_")[0], "none"
    else:
        _, engine, selection = method.split("_")
    return [SinkAwarePruningModifier(
        sparsity=value, mask_structure=mask, method=engine, noise_levels=noise_levels, seed=seed,
        sink_selection=selection, targets=targets, ignore=ignore)], "diffusion"


def draw_documents(count: int, draws: int, per_draw: int, seed: int) -> list[list[int]]:
    """Disjoint document indices for each draw: a seeded permutation of ``range(count)`` cut into chunks."""
    if draws * per_draw > count:
        raise ValueError(f"{draws} disjoint draws of {per_draw} documents need {draws * per_draw} documents; "
                         f"the calibration text has {count}. Lower --draws or --num-samples")
    order = random.Random(seed).sample(range(count), count)
    return [sorted(order[d * per_draw : (d + 1) * per_draw]) for d in range(draws)]


def _cells(config: CompareConfig) -> list[tuple[str, str | None, int]]:
    """(method, sparsity, draw): dense first, magnitude once (no data), then whole draws one after another."""
    cells = [("dense", None, 0)]
    cells += [(m, s, 0) for m in DATA_FREE if m in config.methods for s in config.sparsities]
    cells += [(m, s, d) for d in range(config.draws) for s in config.sparsities for m in config.methods
              if m not in DATA_FREE]
    return cells


def run_compare(config: CompareConfig) -> dict:
    """Run every cell and return the results (see :func:`sink_modifier.cli.compare_table.summarize`)."""
    import copy

    import torch
    from llmcompressor import oneshot
    from llmcompressor.utils.pytorch.module import infer_sequential_targets
    from loguru import logger
    from tqdm import tqdm

    from sink_modifier.cli.compare_table import cell_key, summarize
    from sink_modifier.cli.demo import CALIBRATION_TEXT
    from sink_modifier.cli.workflows import (
        load_model,
        pruned_fraction,
        read_samples,
        seed_everything,
        tokenize_prefix,
    )
    from sink_modifier.evaluation.perplexity import perplexity

    known = STRUCTURED_METHODS if config.structured else METHODS
    unknown = set(config.methods) - set(known)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {list(known)}"
                         + ("" if config.structured else " (or pass --structured)"))
    if config.model is None:
        from sink_modifier.bundled import bundled_model_path

        config.model = str(bundled_model_path("dlm"))
    if config.eval_text is None:
        from sink_modifier.bundled import eval_slice_path

        config.eval_text = eval_slice_path()
    documents = read_samples(Path(config.calibration_text or CALIBRATION_TEXT))
    eval_texts = read_samples(Path(config.eval_text))[: config.eval_documents]
    draws = draw_documents(len(documents), config.draws, config.num_samples, config.seed)
    dense, tokenizer = load_model(config.model, trust_remote_code=config.trust_remote_code, dtype=config.dtype)
    targets = sorted(infer_sequential_targets(dense))
    samples = [[tokenize_prefix(tokenizer, documents[i], config.max_seq_length) for i in chosen]
               for chosen in draws]

    def evaluate(model):
        return perplexity(model, eval_texts, tokenizer=tokenizer, num_mc_samples=config.mc_samples,
                          seed=config.eval_seed, max_length=config.max_seq_length)

    results: dict[str, dict] = {}
    cells = _cells(config)
    bar = tqdm(cells, desc="compare", unit="cell", dynamic_ncols=True,  # and off under TQDM_DISABLE
               **({} if config.progress else {"disable": True}))
    for method, sparsity, draw in bar:
        bar.set_postfix_str(f"{method} {sparsity or ''} draw {draw}".replace("  ", " "))
        start = time.perf_counter()
        if method == "dense":
            model = dense
        else:
            seed_everything(config.seed + draw)
            model = copy.deepcopy(dense)
            modifiers, pipeline = recipe(method, sparsity, targets, seed=config.seed + draw,
                                         noise_levels=config.noise_levels)
            rows = samples[draw]
            oneshot(model=model, processor=tokenizer, output_dir=None, recipe=modifiers, pipeline=pipeline,
                    dataset=_dataset(rows), num_calibration_samples=len(rows),
                    max_seq_length=max(map(len, rows)), trust_remote_code_model=config.trust_remote_code)
        pruned = time.perf_counter()
        result = evaluate(model)
        results[cell_key(method, sparsity, draw)] = {
            "method": method, "sparsity": sparsity, "draw": draw, "zeros": pruned_fraction(model),
            "parameters": sum(p.numel() for p in model.parameters()),
            "prune_seconds": pruned - start, "eval_seconds": time.perf_counter() - pruned,
            **result.to_dict(), "sample_nlls": list(result.sample_nlls)}
        logger.debug(f"{method} {sparsity} draw {draw}: ppl {result.perplexity:.3f}")
        if model is not dense:
            del model
    bar.close()
    setup = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()}
    setup.update(torch=torch.__version__, threads=torch.get_num_threads(), draw_documents=draws,
                 metric="ELBO perplexity" if results["dense|-|0"]["num_mc_samples"] else "perplexity")
    return summarize(results, setup)


def _dataset(rows: list[list[int]]):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})


# --------------------------------------------------------------------------- command line


DEFAULTS = dict(sparsities=("0.5", "2:4", "0.75"), num_samples=8, max_seq_length=128, eval_documents=50,
                mc_samples=4)


def add_arguments(parser: argparse.ArgumentParser, types) -> None:
    """``types``: ``sink_modifier.cli.arguments`` (the CLI loads it by file; importing the package here would load
    llm-compressor for ``--help``). Options that ``--quick`` sets default to None: an explicit value wins."""

    def method_list(value: str) -> tuple[str, ...]:
        names = types.name_list(value)
        unknown = [name for name in names if name not in METHODS + STRUCTURED_METHODS]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)} "
                                             f"(or with --structured: {', '.join(STRUCTURED_METHODS)})")
        return names

    parser.add_argument("model", metavar="MODEL", nargs="?", default=None,
                        help="Hugging Face Hub id or local directory (default: the bundled small DLM)")
    parser.add_argument("--quick", action="store_true",
                        help="one sparsity (50%%), 2 documents x 64 tokens per draw, 6 evaluation documents, "
                        "2 MC samples: every row of the table in a few minutes (options given explicitly win)")
    parser.add_argument("--structured", action="store_true",
                        help="remove whole MLP channels and KV-head groups instead (methods: "
                        + ", ".join(STRUCTURED_METHODS) + "; sparsities C or C/H, default "
                        + ",".join(STRUCTURED_SPARSITIES) + ")")
    parser.add_argument("--sparsities", type=types.sparsity_list, metavar="A,B",
                        help="fractions and/or N:M patterns (default: 0.5,2:4,0.75); with --structured, channel "
                        "fractions C or C/H with H the share of KV-head groups")
    parser.add_argument("--methods", type=method_list, default=None, metavar="A,B",
                        help="subset of: " + ", ".join(METHODS))
    parser.add_argument("--draws", type=types.positive_int, default=2, metavar="D",
                        help="disjoint calibration draws (default: 2; at least 2 to measure the spread)")
    parser.add_argument("--num-samples", type=types.positive_int, metavar="N",
                        help="documents per draw (default: 8)")
    parser.add_argument("--max-seq-length", type=types.positive_int, metavar="L",
                        help="calibration and evaluation window in tokens (default: 128)")
    parser.add_argument("--text-file", type=Path, metavar="FILE",
                        help="calibration documents (default: the bundled calibration text, 30 documents)")
    parser.add_argument("--eval-file", type=Path, metavar="FILE",
                        help="evaluation documents (default: the bundled evaluation slice)")
    parser.add_argument("--eval-documents", type=types.positive_int, metavar="N",
                        help="evaluate on the first N documents (default: 50)")
    parser.add_argument("--num-mc-samples", type=types.positive_int, metavar="M",
                        help="ELBO Monte-Carlo samples, shared by every cell (DLMs; default: 4)")
    parser.add_argument("--noise-levels", type=types.positive_int, default=10, metavar="K",
                        help="states per sample (10)")
    parser.add_argument("--seed", type=types.seed, default=0, metavar="S",
                        help="picks the draws' documents; draw d uses noise seed S+d (default: 0)")
    parser.add_argument("--output", "-o", type=Path, default=Path("sink-prune-compare"), metavar="DIR",
                        help="results.json, table.md and table.png go here (default: ./sink-prune-compare)")
    parser.add_argument("--threads", type=types.positive_int, default=1, metavar="N",
                        help="CPU threads for torch (default: 1: the bundled model gains nothing from more)")


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    structured = getattr(args, "structured", False)
    if not structured and any("/" in s for s in args.sparsities or ()):
        raise argparse.ArgumentTypeError("--sparsities: C/H (channels/KV-head groups) needs --structured")
    methods = args.methods or (STRUCTURED_METHODS if structured else METHODS)
    known = STRUCTURED_METHODS if structured else METHODS
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"--methods: {unknown[0]!r} is not a "
                                         f"{'structured' if structured else 'weight-pruning'} method; choose "
                                         f"from {', '.join(known)}")
    quick = QUICK if args.quick else {}
    given = dict(sparsities=args.sparsities, num_samples=args.num_samples, max_seq_length=args.max_seq_length,
                 eval_documents=args.eval_documents, mc_samples=args.num_mc_samples)
    defaults = dict(DEFAULTS, sparsities=STRUCTURED_SPARSITIES) if structured else DEFAULTS
    sized = {**defaults, **quick, **{k: v for k, v in given.items() if v is not None}}
    return CompareConfig(
        model=args.model, calibration_text=args.text_file, eval_text=args.eval_file, structured=structured,
        sparsities=tuple(sized["sparsities"]), methods=tuple(methods), draws=args.draws,
        num_samples=sized["num_samples"], max_seq_length=sized["max_seq_length"],
        eval_documents=sized["eval_documents"], mc_samples=sized["mc_samples"], noise_levels=args.noise_levels,
        seed=args.seed, dtype="float32" if getattr(args, "dtype", "auto") == "auto" else args.dtype,
        trust_remote_code=getattr(args, "trust_remote_code", False), progress=not getattr(args, "quiet", False))


def main(args: argparse.Namespace) -> int:
    from sink_modifier.cli.compare_table import format_tables, write_outputs
    from sink_modifier.errors import CLIError
    from sink_modifier.saving.publish import check_output, staged

    config = config_from_args(args)
    if config.draws < 1:
        raise CLIError("--draws must be at least 1 (2 or more to measure the spread over draws)")
    output = check_output(args.output, overwrite=args.overwrite)
    start = time.perf_counter()
    with staged(output, existing="replace" if args.overwrite else "refuse") as staging:
        try:
            summary = run_compare(config)
        except ValueError as error:
            raise CLIError(str(error)) from None
        summary["setup"]["seconds"] = round(time.perf_counter() - start, 1)
        write_outputs(summary, staging)
    print(format_tables(summary))
    print(f"\nresults: {output / 'results.json'}\ntable:   {output / 'table.png'}  ({output / 'table.md'})")
    print(f"{len(summary['cells'])} cells in {summary['setup']['seconds']:.0f} s")
    return 0
