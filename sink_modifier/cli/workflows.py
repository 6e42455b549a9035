"""What the ``sink-prune`` commands do, callable from Python: loading a model, reading calibration and
evaluation text, parsing a recipe, pruning and saving a checkpoint (``run``), perplexity and lm-eval tasks
(``eval``), and the table the commands print. ``sink_modifier.cli.inspection`` holds ``inspect``'s part,
``sink_modifier.cli.demo`` the demo's; ``sink_modifier.cli.main`` is only the argument parser in front of them.

The ``*_command`` functions, ``calibration_source`` and ``token_samples`` take a command's parsed arguments (an
``argparse.Namespace``, see ``cli.build_parser``); the others take plain values. Results are printed to stdout;
logs go through loguru (``sink_modifier.cli.console`` routes them to stderr). Torch, llm-compressor, datasets and
models are imported inside the functions that need them. Outputs are published through
``sink_modifier.saving.publish`` (locked, staged, never replacing what it did not write).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from sink_modifier.cli.preflight import check_dataset_name, check_device
from sink_modifier.errors import CLIError, one_line

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "calibrate_and_save", "calibration_source", "default_text", "display_name", "eval_command",
    "format_perplexity", "load_model", "load_recipe", "print_table", "prune", "pruned_fraction", "read_samples",
    "run_command", "seed_everything", "texts_from_disk", "token_samples", "tokenize_prefix",
]

_PARAGRAPH = re.compile(r"\n\s*\n")
_DOCUMENT = re.compile(r"^[ \t]*<\|endoftext\|>[ \t]*$", re.MULTILINE)


# --------------------------------------------------------------------------- models and data


def display_name(name: str) -> str:
    """A short model name for titles: the directory name of a local path, the Hub id otherwise."""
    path = Path(name).expanduser()
    return path.resolve().name if path.exists() else name


def load_model(
    name: str, *, trust_remote_code: bool = False, dtype: str = "auto"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer through ``loading.checkpoints`` (repairs, a finite check forward, fast failures).
    A local ``tokenizer.json`` that the tokenizers library cannot read is named (it fails deep in transformers
    with a ``KeyError`` or the like); ``sources.check_checkpoint_files`` already named corrupt weights and JSON."""
    from sink_modifier.errors import UserError
    from sink_modifier.loading.checkpoints import LoadError, load_model_and_tokenizer

    try:
        return load_model_and_tokenizer(name, trust_remote_code=trust_remote_code, dtype=dtype)
    except (UserError, LoadError, OSError):
        raise
    except Exception:
        tokenizer = Path(name).expanduser() / "tokenizer.json"
        if tokenizer.is_file():
            from tokenizers import Tokenizer

            try:
                Tokenizer.from_file(str(tokenizer))
            except Exception as error:
                raise LoadError(f"{tokenizer} is not a tokenizer the tokenizers library can read "
                                f"({one_line(error)}); download or save the checkpoint again") from None
        raise


def _pipeline_for(model, requested: str | None) -> str:
    """The default pipeline is llm-compressor's, except for families that calibrate only on their recorded
    denoising states (DiffusionGemma: the diffusion pipeline); another explicit choice for them is an error."""
    from sink_modifier import families

    if not families.resolve(model).calibration.needs_state_pipeline:
        return requested or "independent"
    if requested not in (None, "diffusion"):
        raise CLIError(f"{type(model).__name__} calibrates on its own denoising states: use --pipeline diffusion "
                       f"(or leave it out), not {requested!r}")
    return "diffusion"


def read_samples(path: Path) -> list[str]:
    """One sample per paragraph (blank-line separated); a file with ``<|endoftext|>`` lines (the bundled text
    files) has one sample per document between them instead. Whitespace is stripped and empty samples dropped.
    """
    if not path.is_file():
        what = "a directory" if path.is_dir() else "not a regular file (a FIFO, socket or device)" \
            if path.exists() else "no such file"
        raise CLIError(f"--text-file {path}: {what}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise CLIError(f"--text-file {path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
                       f"{error.start}); convert it, e.g. iconv -t UTF-8") from None
    splitter = _DOCUMENT if _DOCUMENT.search(text) else _PARAGRAPH
    samples = [p.strip() for p in splitter.split(text) if p.strip()]
    if not samples:
        raise CLIError(f"--text-file {path} has no text")
    if len(samples) == 1 and splitter is _PARAGRAPH and "\n" in samples[0]:
        logger.warning(f"--text-file {path} has no blank line, so all of it is one sample: samples are "
                       "separated by blank lines (or by <|endoftext|> lines)")
    return samples


def texts_from_disk(path: Path) -> tuple[list[str] | None, list[list[int]] | None]:
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except FileNotFoundError as error:
        raise CLIError(f"--dataset {path} is not a dataset saved with datasets' save_to_disk") from error
    if isinstance(dataset, DatasetDict):
        split = "train" if "train" in dataset else next(iter(dataset))
        logger.info(f"Using split '{split}' of {path}")
        dataset = dataset[split]
    if "input_ids" in dataset.column_names:
        return None, [list(map(int, row)) for row in dataset["input_ids"]]
    if "text" in dataset.column_names:
        return [str(t) for t in dataset["text"]], None
    raise CLIError(f"--dataset {path} needs an 'input_ids' or a 'text' column; it has {dataset.column_names}")


def calibration_source(
    args: argparse.Namespace, default_text: Path | None = None,
) -> tuple[list[str] | None, list[list[int]] | None]:
    """The texts (or token ids) of ``--text-file`` / ``--dataset`` (or ``default_text``), read before any model
    loads so that a missing or undecodable input fails at once."""
    if args.dataset is not None:
        path = Path(args.dataset).expanduser()
        if not path.exists():
            raise CLIError(f"--dataset {args.dataset}: no such directory")
        return texts_from_disk(path)
    if args.text_file is not None or default_text is not None:
        return read_samples(args.text_file if args.text_file is not None else default_text), None
    raise CLIError("no calibration text: pass --text-file FILE or --dataset PATH")


def token_samples(
    args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase, default_text: Path | None = None,
    source: tuple[list[str] | None, list[list[int]] | None] | None = None,
) -> list[list[int]]:
    """The first ``--num-samples`` samples of ``source`` (``calibration_source``, read now if not given),
    tokenized with the model's tokenizer, truncated to ``--max-seq-length``, empty ones dropped."""
    texts, ids = source if source is not None else calibration_source(args, default_text)
    limit = args.num_samples
    if texts is not None:
        texts = [t for t in texts if t.strip()]
        texts = texts[:limit] if limit else texts
        ids = [tokenize_prefix(tokenizer, t, args.max_seq_length) for t in texts]
    samples = [list(row[: args.max_seq_length]) for row in ids if len(row) > 0]
    samples = samples[:limit] if limit else samples
    if not samples:
        raise CLIError("the calibration text is empty after tokenization")
    logger.info(f"{len(samples)} samples, {sum(map(len, samples))} tokens" + (
        f" (at most {limit} were asked for)" if limit and len(samples) < limit else ""))
    return samples


def tokenize_prefix(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int) -> list[int]:
    """``tokenizer(text, truncation=True, max_length=max_length)``'s ids, tokenizing only a prefix of the text
    (a tokenizer truncates after tokenizing all of it: 52 s and 3.5 GB for a 20 MB one-line file). The prefix,
    cut at whitespace, doubles until it yields more tokens than needed or is the whole text: only the last word
    before a cut can tokenize differently, and it lies beyond the tokens kept."""
    budget = 16 * max_length + 64
    while True:
        cut = text if budget >= len(text) else text[: text.rfind(" ", 0, budget) + 1 or budget]
        if cut is text or len(tokenizer(cut, add_special_tokens=False)["input_ids"]) > max_length + 8:
            return tokenizer(cut, truncation=True, max_length=max_length)["input_ids"]
        budget *= 4


def _dataset(samples: list[list[int]]):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": samples, "attention_mask": [[1] * len(s) for s in samples]})


def seed_everything(seed: int | None) -> None:
    from transformers import set_seed

    set_seed(0 if seed is None else seed)


# --------------------------------------------------------------------------- run


def load_recipe(path: Path, seed: int | None):
    """Parse the recipe now (a typo fails before the model loads); --seed overrides sink modifiers' seed."""
    import yaml
    from llmcompressor.recipe import Recipe
    from pydantic import ValidationError

    from sink_modifier import SinkAwarePruningModifier, SinkAwareStructuredPruningModifier

    if not path.is_file():
        raise CLIError(f"--recipe {path}: {'a directory' if path.is_dir() else 'no such file'}")
    try:
        if not isinstance(yaml.safe_load(path.read_text(encoding="utf-8")), dict):
            raise CLIError(f"--recipe {path} is empty or not a YAML mapping of stages and modifiers; see the "
                           "recipes/ directory for examples")
        recipe = Recipe.create_instance(str(path))
    except UnicodeDecodeError:
        raise CLIError(f"--recipe {path} is not a YAML recipe (not UTF-8 text)") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise CLIError(f"--recipe {path} is not valid YAML: {getattr(error, 'problem', None) or error}{where}") \
            from None
    except ValidationError:
        raise
    except (ValueError, TypeError, AttributeError) as error:
        unknown = re.search(r"No modifier of type '([^']+)'", str(error))
        if unknown:
            raise CLIError(f"--recipe {path}: there is no modifier called {unknown.group(1)!r} (check its "
                           "spelling; e.g. SinkAwarePruningModifier, WandaPruningModifier, QuantizationModifier)"
                           ) from None
        raise CLIError(f"--recipe {path} is not an llm-compressor recipe: {one_line(error)}") from None
    if not recipe.modifiers:
        raise CLIError(f"--recipe {path} defines no modifier; see the recipes/ directory for examples")
    if seed is not None:
        for modifier in recipe.modifiers:
            if isinstance(modifier, SinkAwarePruningModifier | SinkAwareStructuredPruningModifier):
                modifier.seed = seed
    return recipe


def pruned_fraction(model: torch.nn.Module) -> float:
    """Fraction of zeros in the Linear weights outside the LM head (what pruning recipes target).

    Measure before saving: a quantizing recipe's save packs the weights in place (``weight_packed``)."""
    import torch

    head = model.get_output_embeddings()
    zeros = total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / total if total else 0.0


def calibrate_and_save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path,
                       **oneshot_args: Any) -> tuple[float, int]:
    """``oneshot`` without its own save, the zero fraction measured, then what ``oneshot`` would have saved
    (compressed checkpoint with recipe.yaml, and the tokenizer) written to ``directory``; returns the fraction
    and the parameter count before saving (structured pruning makes it smaller)."""
    from llmcompressor import oneshot

    import sink_modifier  # noqa: F401  (registers the modifier and the diffusion pipeline)

    _protect_output_head(model, oneshot_args.get("recipe"))
    oneshot(model=model, processor=tokenizer, output_dir=None, **oneshot_args)
    fraction, parameters = pruned_fraction(model), sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(directory), save_compressed=True)
    tokenizer.save_pretrained(str(directory))
    return fraction, parameters


def _protect_output_head(model: PreTrainedModel, recipe: Any) -> None:
    """The family's LM head added to every non-sink modifier's ``ignore`` that misses it (``scope``)."""
    from sink_modifier import SinkAwarePruningModifier, families
    from sink_modifier.families import CheckpointHooks
    from sink_modifier.modifiers.scope import protect_output_head

    modifiers = [m for m in getattr(recipe, "modifiers", None) or []
                 if not isinstance(m, SinkAwarePruningModifier)]
    if not modifiers:
        return
    try:
        hooks = families.resolve(model).checkpoint
    except families.FamilyError:  # e.g. a masked DLM without a mask token: the default head
        hooks = CheckpointHooks()
    protect_output_head(model, hooks.output_head(model), modifiers)


def prune(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, samples: list[list[int]], recipe: Any,
    directory: Path, *, pipeline: str = "independent", max_seq_length: int | None = None,
    trust_remote_code: bool = False,
) -> tuple[float, int]:
    """``oneshot`` on token samples, saved to ``directory`` (a staging directory: see ``publish.staged``)."""
    return calibrate_and_save(
        model, tokenizer, directory, dataset=_dataset(samples), recipe=recipe, pipeline=pipeline,
        num_calibration_samples=len(samples), max_seq_length=max_seq_length or max(map(len, samples)),
        trust_remote_code_model=trust_remote_code,  # oneshot re-reads the config
    )


def run_command(args: argparse.Namespace) -> int:
    """``sink-prune run``: the recipe applied by ``oneshot`` and the checkpoint published to ``--output``."""
    from sink_modifier.saving.publish import check_output, staged

    # Everything that can fail cheaply fails before the model loads: output, recipe, text, lock.
    output = check_output(args.output, overwrite=args.overwrite)
    recipe = load_recipe(args.recipe, args.seed)
    named = args.dataset is not None and not Path(args.dataset).expanduser().exists()
    if named:
        check_dataset_name(args.dataset)
    source = None if named else calibration_source(args)  # a dataset name: llm-compressor loads it
    with staged(output, existing="replace" if args.overwrite else "refuse") as staging:
        seed_everything(args.seed)
        model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code, dtype=args.dtype)
        dense_parameters = sum(p.numel() for p in model.parameters())
        start = time.perf_counter()
        args.pipeline = _pipeline_for(model, args.pipeline)
        if named:
            try:
                fraction, parameters = calibrate_and_save(
                    model, tokenizer, staging, dataset=args.dataset, recipe=recipe, pipeline=args.pipeline,
                    num_calibration_samples=args.num_samples, max_seq_length=args.max_seq_length,
                    trust_remote_code_model=args.trust_remote_code)
            except ConnectionError as error:
                raise CLIError(f"--dataset {args.dataset}: not a directory, and the Hub could not be reached to "
                               f"fetch it ({type(error).__name__}); save it with datasets' save_to_disk where "
                               "there is a network and pass that directory") from None
        else:
            samples = token_samples(args, tokenizer, source=source)
            fraction, parameters = prune(model, tokenizer, samples, recipe, staging, pipeline=args.pipeline,
                max_seq_length=args.max_seq_length, trust_remote_code=args.trust_remote_code)
        elapsed = time.perf_counter() - start
    shrunk = parameters != dense_parameters  # whole channels, heads or experts removed
    head = f"Pruned {display_name(args.model)} in {elapsed:.0f} s"
    zeros = f": {fraction:.1%} of the Linear weights outside the LM head are zero"
    print(head if shrunk and not fraction else head + zeros)
    if shrunk:
        print(f"parameters:  {parameters / 1e6:.2f}M of {dense_parameters / 1e6:.2f}M remain "
              f"({parameters / dense_parameters:.1%}; whole MLP channels, attention heads or experts removed)")
    _print_checkpoint(args.output.expanduser(), model)  # as the user wrote it (``output`` is absolute)
    return 0


def _print_checkpoint(output: Path, model: torch.nn.Module) -> None:
    """Where the checkpoint is and the call that loads it again (the model's family says which)."""
    from sink_modifier.families import registry

    report = output / "sink_report.json"
    print(f"checkpoint:  {output}/  (recipe.yaml inside; load with {registry.reload_call(model, str(output))})")
    if report.exists():
        print(f"sink report: {report}")
    else:
        print("sink report: none (the recipe has no SinkAwarePruningModifier)")

def default_text() -> Path | None:
    """The bundled evaluation slice, when the bundled models are installed."""
    try:
        from sink_modifier.bundled import eval_slice_path

        return Path(eval_slice_path())
    except (ImportError, FileNotFoundError):
        return None


def print_table(rows: list[list[str]], left: int = 2) -> None:
    """Aligned columns: the first ``left`` are text (left-aligned), the rest numbers (right-aligned)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        cells = [cell.ljust(width) if i < left else cell.rjust(width)
                 for i, (cell, width) in enumerate(zip(row, widths, strict=True))]
        print("  ".join(cells).rstrip())
        if index == 0:
            print("  ".join("-" * w for w in widths))


# --------------------------------------------------------------------------- eval


def eval_command(args: argparse.Namespace) -> int:
    """``sink-prune eval``: perplexity of a text, or lm-eval tasks with ``--tasks``."""
    from sink_modifier.evaluation.perplexity import perplexity

    if args.tasks:
        return _eval_tasks(args)
    if args.dataset is not None and not Path(args.dataset).expanduser().exists():
        raise CLIError(f"--dataset {args.dataset}: eval reads only datasets saved to disk; no such directory")
    default = default_text()
    if args.text_file is None and args.dataset is None and default is None:
        raise CLIError("no evaluation text: pass --text-file FILE or --dataset PATH")
    # Whole texts go to the evaluator, which cuts them into max-length windows itself; read before the model.
    if args.dataset is not None:
        texts, ids = texts_from_disk(Path(args.dataset).expanduser())
        inputs = texts if texts is not None else ids
    else:
        inputs = read_samples(args.text_file if args.text_file is not None else default)
    model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code, dtype=args.dtype)
    if args.num_samples:
        inputs = inputs[: args.num_samples]
    start = time.perf_counter()
    result = perplexity(model, inputs, tokenizer=tokenizer, num_mc_samples=args.num_mc_samples,
                        seed=0 if args.seed is None else args.seed, max_length=args.max_seq_length)
    elapsed = time.perf_counter() - start
    if args.json:
        print(json.dumps({"model": args.model, **result.to_dict()}, indent=2))
        return 0
    kind = "ELBO perplexity (upper bound)" if result.num_mc_samples else "perplexity"
    print(f"{display_name(args.model)}: {kind} {format_perplexity(result)} over {result.num_tokens} tokens"
          + (f", {result.num_mc_samples} MC samples" if result.num_mc_samples else "") + f" ({elapsed:.0f} s)")
    return 0


def _eval_tasks(args: argparse.Namespace) -> int:
    """``--tasks``: lm-eval's simple_evaluate with the diffusion_lm model, printed as lm-eval prints it."""
    if args.text_file is not None or args.dataset is not None or args.num_samples:
        raise CLIError("--tasks takes its data from the tasks; drop --text-file, --dataset and --num-samples")
    try:
        from lm_eval.utils import make_table

        from sink_modifier.evaluation.harness import DiffusionLM, UnsupportedModel, evaluate_tasks
    except ImportError as error:
        raise CLIError(f"--tasks needs lm-evaluation-harness ({error}): "
                       "pip install 'sink-aware-pruning[eval]'") from error
    tasks = [name.strip() for name in (args.tasks.split(",") if isinstance(args.tasks, str) else args.tasks)
             if name.strip()]
    if not tasks:
        raise CLIError(f"--tasks {args.tasks!r} names no task")
    if args.device is not None:
        check_device(args.device)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    model_args = {"mc_samples": args.num_mc_samples, "batch_size": args.batch_size,
                  "seed": 0 if args.seed is None else args.seed}
    try:
        lm = DiffusionLM(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                         device=args.device, progress=not args.quiet, **model_args)
        results = evaluate_tasks(lm, tasks, include_path=args.include_path, limit=limit,
                                 num_fewshot=args.num_fewshot)
    except (UnsupportedModel, KeyError) as error:
        raise CLIError(str(error).strip("'\"")) from error
    if args.json:
        print(json.dumps({"model": args.model, "results": results["results"]}, indent=2, default=str))
        return 0
    print(f"diffusion_lm ({display_name(args.model)}, {lm.family}, "
          + ", ".join(f"{k}={v}" for k, v in model_args.items())
          + f"), limit: {limit}, num_fewshot: {args.num_fewshot}")
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    return 0


def format_perplexity(result) -> str:
    if result.num_mc_samples > 1:
        return f"{result.perplexity:.3f} ± {result.perplexity_stderr:.3f}"
    return f"{result.perplexity:.3f}"

