"""``sink-prune``: prune, inspect and evaluate diffusion LMs from the shell.

A thin front over the library: ``run`` is ``llmcompressor.oneshot`` with a recipe, ``inspect`` is the trajectory
phase alone plus pictures, ``eval`` is ``sink_modifier.evaluation``, ``demo`` chains them on the bundled small
DLM. Results go to stdout, logs (loguru, llm-compressor's logger) and progress bars to stderr, so
``sink-prune ... > result.txt`` keeps only results. Models, datasets and matplotlib are imported inside the
commands that need them.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from sink_modifier.plots import SinkDynamics

__all__ = ["CLIError", "build_parser", "main"]

PROG = "sink-prune"
_LOG_FORMAT = "{time:YYYY-MM-DDTHH:mm:ss.SSSS} | {function} | {level} - {message}"
_PARAGRAPH = re.compile(r"\n\s*\n")
_DOCUMENT = re.compile(r"^[ \t]*<\|endoftext\|>[ \t]*$", re.MULTILINE)


class CLIError(Exception):
    """A problem the user can fix; printed as one line, without a traceback."""


# --------------------------------------------------------------------------- argument parsing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Sink-aware pruning of diffusion language models (an llm-compressor plugin).",
        epilog="Run 'sink-prune COMMAND --help' for a command's options. Results go to stdout, logs and "
        "progress bars to stderr.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("--quiet", "-q", action="store_true",
                       help="no progress bars; log warnings and errors only")
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--trust-remote-code", action="store_true",
                       help="allow the model's own Python code from the Hub to run (off by default)")
    model.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="dtype to load the weights in (default: the checkpoint's)")
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")

    run = commands.add_parser(
        "run", parents=[quiet, model, output], help="prune a model with a recipe (llmcompressor.oneshot)",
        description="Prune MODEL with RECIPE through llmcompressor.oneshot and save a checkpoint that "
        "transformers loads, with recipe.yaml and (for sink-aware recipes) sink_report.json. The checkpoint "
        "is written to a temporary sibling directory and moved into place only when complete.",
    )
    run.add_argument("model", metavar="MODEL", help="Hugging Face Hub id or local directory")
    _data_options(run, samples=128, length=512, dataset_help="a datasets dataset saved with save_to_disk "
                  "(column 'input_ids' or 'text'); any other value is passed to llm-compressor as a dataset "
                  "name, which needs the network",
                  seed_help="seed Python, NumPy and torch, and override the seed of the recipe's "
                  "SinkAwarePruningModifiers (default: the recipe's)")
    run.add_argument("--recipe", required=True, type=Path, help="llm-compressor recipe (YAML file)")
    run.add_argument("--pipeline", default=None,
                     choices=["independent", "sequential", "basic", "diffusion"],
                     help="llm-compressor calibration pipeline; 'diffusion' calibrates every modifier on the "
                     "denoising states (default: independent; diffusion for DiffusionGemma, which needs it)")
    run.add_argument("--output", "-o", required=True, type=Path, metavar="DIR", help="checkpoint directory")
    run.set_defaults(func=cmd_run)

    inspect = commands.add_parser(
        "inspect", parents=[quiet, model, output], help="measure and picture the sinks (no pruning)",
        description="Run only the trajectory phase (sink scores per layer along the denoising trajectory) and "
        "write sink_report.json, PNG pictures and a self-contained report.html. With --compare, the second "
        "model (typically the AR twin of a DLM) is measured the same way and drawn next to the first.",
    )
    inspect.add_argument("model", metavar="MODEL", help="Hugging Face Hub id or local directory")
    _data_options(inspect, samples=16, length=128, dataset_help=_DISK_DATASET, default_text=True,
                  seed_help="seed of the forward-noise masks or the sampler (default: 0)")
    inspect.add_argument("--trajectory", default="forward_noise", choices=["forward_noise", "sampler"],
                         help="how the denoising states are produced: 'forward_noise' masks each sample at K "
                         "noise levels; 'sampler' records the model's own sampler completing the second half of "
                         "each sample (default: forward_noise)")
    inspect.add_argument("--compare", metavar="OTHER_MODEL", help="a second model to measure and draw alongside")
    inspect.add_argument("--noise-levels", type=_positive, default=10, metavar="K",
                         help="forward_noise: states per sample (default: 10)")
    inspect.add_argument("--sampler-steps", type=_positive, default=16, metavar="N",
                         help="sampler: denoising steps, one state each (default: 16)")
    inspect.add_argument("--output", "-o", required=True, type=Path, metavar="DIR", help="report directory")
    inspect.set_defaults(func=cmd_inspect)

    evaluate = commands.add_parser(
        "eval", parents=[quiet, model],
        help="perplexity: masked-diffusion ELBO (DLM) or exact (AR); lm-eval tasks with --tasks",
        description="Perplexity of MODEL on a text: the Monte-Carlo masked-diffusion ELBO bound for a DLM "
        "(with its standard error over MC samples), the exact next-token perplexity for an AR model. "
        "Without --text-file or --dataset, the evaluation slice shipped with the bundled model is used. "
        "With --tasks, lm-evaluation-harness tasks scored with the masked-diffusion likelihood instead "
        "(the diffusion_lm model; needs the eval extra; see docs/evaluation.md).",
    )
    evaluate.add_argument("model", metavar="MODEL", help="Hugging Face Hub id or local directory")
    _data_options(evaluate, samples=None, length=128, dataset_help=_DISK_DATASET, default_text=True,
                  length_help="evaluation window in tokens; longer texts are cut into windows",
                  seed_help="seed of the ELBO's masks (default: 0)")
    evaluate.add_argument("--num-mc-samples", type=_positive, default=16, metavar="N",
                          help="Monte-Carlo samples of the ELBO (DLMs only; default: 16)")
    evaluate.add_argument("--json", action="store_true", help="print the result as JSON")
    tasks = evaluate.add_argument_group("lm-evaluation-harness tasks (pip install 'sink-aware-pruning[eval]')")
    tasks.add_argument("--tasks", metavar="A,B,...",
                       help="lm-eval task names, e.g. bundled_cloze (shipped, offline) or arc_challenge,piqa")
    tasks.add_argument("--include-path", action="append", type=Path, default=[], metavar="DIR",
                       help="a directory of task YAMLs (repeatable)")
    tasks.add_argument("--limit", type=float, metavar="N", help="examples per task (a fraction if below 1)")
    tasks.add_argument("--num-fewshot", type=int, metavar="K", help="few-shot examples (default: the task's)")
    tasks.add_argument("--batch-size", type=_positive, default=16, metavar="B", help="forwards per batch (16)")
    tasks.add_argument("--device", metavar="DEV", help="torch device (default: cuda if available, else cpu)")
    evaluate.set_defaults(func=cmd_eval)

    demo = commands.add_parser(
        "demo", parents=[quiet, output],
        help="prune the bundled small DLM: sink-aware Wanda vs plain Wanda (offline, ~2 min on 2 cores)",
        description="Prune the bundled small diffusion LM to 50% unstructured sparsity with sink-aware Wanda "
        "and with llm-compressor's plain WandaPruningModifier (same sparsity, same decoder-layer targets), "
        "evaluate the dense and both pruned models, and print a table. Offline; needs no download.",
    )
    demo.add_argument("--output", "-o", type=Path, default=Path("sink-prune-demo"), metavar="DIR",
                      help="where the checkpoints and the report go (default: ./sink-prune-demo)")
    demo.add_argument("--quick", action="store_true", help="a smaller configuration (used by the test suite)")
    demo.add_argument("--seed", type=int, default=0, metavar="S",
                      help="seed of the evaluation masks (default: 0)")
    demo.add_argument("--threads", type=_positive, default=1, metavar="N",
                      help="CPU threads for torch (default: 1; the bundled model is too small to gain from more, "
                      "and one thread cannot be oversubscribed)")
    demo.set_defaults(func=cmd_demo)
    for command in (run, inspect, evaluate):
        command.add_argument("--threads", type=_positive, metavar="N",
                             help="CPU threads for torch (default: torch's choice; fewer avoid oversubscription "
                             "on a shared machine)")
    return parser


_DISK_DATASET = "a datasets dataset saved with save_to_disk (column 'input_ids' or 'text')"


def _data_options(
    parser: argparse.ArgumentParser, *, samples: int | None, length: int, dataset_help: str,
    default_text: bool = False, length_help: str = "truncate each sample to L tokens",
    seed_help: str = "random seed (default: 0)",
) -> None:
    group = parser.add_argument_group("evaluation text" if parser.prog.endswith("eval") else "calibration text")
    source = group.add_mutually_exclusive_group()
    fallback = " (default: the evaluation slice shipped with the bundled model)" if default_text else ""
    source.add_argument("--text-file", type=Path, metavar="FILE",
                        help="UTF-8 text, one sample per paragraph (paragraphs are separated by blank lines)"
                        + fallback)
    source.add_argument("--dataset", metavar="PATH_OR_NAME" if "name" in dataset_help else "PATH",
                        help=dataset_help)
    group.add_argument("--num-samples", type=_positive, default=samples, metavar="N",
                       help=f"number of samples (default: {samples or 'all'})")
    group.add_argument("--max-seq-length", type=_positive, default=length, metavar="L",
                       help=f"{length_help} (default: {length})")
    group.add_argument("--seed", type=int, metavar="S", help=seed_help)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sink-aware-pruning")
    except PackageNotFoundError:
        return "unknown"


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    import torch

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    with _console(quiet=args.quiet):
        try:
            return int(args.func(args) or 0)
        except KeyboardInterrupt:
            print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
            return 130
        except Exception as error:
            if not _is_user_error(error):
                raise
            print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
            return 1
        finally:
            torch.set_num_threads(threads)


def _is_user_error(error: Exception) -> bool:
    """Errors whose message tells the user what to change; anything else is a bug and keeps its traceback."""
    from pydantic import ValidationError

    from sink_modifier.adapters import AdapterError

    return isinstance(error, CLIError | AdapterError | ValidationError | FileNotFoundError)


# --------------------------------------------------------------------------- console: logs and progress bars


@contextlib.contextmanager
def _console(*, quiet: bool) -> Iterator[None]:
    """Logs to stderr at INFO (WARNING with --quiet), and no progress bars with --quiet; restored on exit.

    ``LLM_COMPRESSOR_LOG_LEVEL`` still wins, as it does for llm-compressor itself, and its file log is kept.
    """
    from transformers.utils import logging as hf_logging

    level = os.environ.get("LLM_COMPRESSOR_LOG_LEVEL", "WARNING" if quiet else "INFO").upper()
    _loguru_sinks(lambda: sys.stderr, level)
    hf_verbosity = hf_logging.get_verbosity()
    if quiet:
        hf_logging.set_verbosity_error()
    try:
        with _progress_bars(enabled=not quiet):
            yield
    finally:
        _loguru_sinks(lambda: sys.stdout, _llmc_logger().LOGGER_CONFIG.console_log_level)
        hf_logging.set_verbosity(hf_verbosity)


def _llmc_logger():
    """llm-compressor's logger module (``llmcompressor.logger`` as an attribute is the loguru logger itself)."""
    import importlib

    return importlib.import_module("llmcompressor.logger")


def _loguru_sinks(console, level: str | None) -> None:
    """Replace loguru's sinks: console lines go to ``console()``, looked up per message (so a redirected
    stream, e.g. under pytest, is honoured), in llm-compressor's format; its file log is kept when configured.
    """
    llmc = _llmc_logger()
    config = llmc.LOGGER_CONFIG
    logger.remove()
    if level and not config.disabled:
        logger.add(lambda message: console().write(message), level=level.upper(), format=_LOG_FORMAT,
                   filter=llmc.support_log_once, colorize=False)
    if config.log_file or config.log_file_level:
        logger.add(config.log_file or "llmcompressor.log", level=(config.log_file_level or "INFO").upper(),
                   serialize=True, filter=llmc.support_log_once)


@contextlib.contextmanager
def _progress_bars(*, enabled: bool) -> Iterator[None]:
    """Disable every tqdm bar (ours, llm-compressor's, transformers', datasets') while the command runs.

    They all derive from ``tqdm.std.tqdm``; its ``TQDM_DISABLE`` variable is read at import, too late here.
    """
    if enabled:
        yield
        return
    from tqdm import std

    original = std.tqdm.__init__

    @functools.wraps(original)
    def silent(self, *args, **kwargs):
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    std.tqdm.__init__ = silent
    try:
        yield
    finally:
        std.tqdm.__init__ = original


# --------------------------------------------------------------------------- models and data


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def display_name(name: str) -> str:
    """A short model name for titles: the directory name of a local path, the Hub id otherwise."""
    path = Path(name).expanduser()
    return path.resolve().name if path.exists() else name


def _offline_miss(error: BaseException) -> bool:
    """Whether loading failed because the Hub could not be reached and the files are not cached."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, LocalEntryNotFoundError | OfflineModeIsEnabled | ConnectionError):
            return True
        if type(error).__name__ in {"ConnectError", "ConnectTimeout"}:  # httpx / requests
            return True
        error = error.__cause__ or error.__context__
    return False


def load_model(
    name: str, *, trust_remote_code: bool = False, dtype: str = "auto"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer from a local directory or a Hub id, with errors that say what to do."""
    import torch
    from transformers import AutoTokenizer

    path = Path(name).expanduser()
    if path.exists() and not path.is_dir():
        raise CLIError(f"{name} is a file; MODEL must be a Hub id or a directory with config.json and weights")
    if not path.exists() and _looks_like_path(name):
        raise CLIError(f"{name}: no such directory")
    hub = not path.exists()
    source = name if hub else str(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model_class = _model_class(source, trust_remote_code)
        model = model_class.from_pretrained(
            source, dtype=dtype if dtype == "auto" else getattr(torch, dtype), trust_remote_code=trust_remote_code
        )
    except OSError as error:
        if hub and _offline_miss(error):
            raise CLIError(
                f"could not load {name} from the Hugging Face Hub: this machine is offline and it is not in "
                "the local cache; pass a local path (a directory with config.json, the weights and the tokenizer)"
            ) from error
        raise CLIError(f"could not load {name}: {error}") from error
    except ValueError as error:
        if "trust_remote_code" in str(error):
            raise CLIError(
                f"{name} ships its own modeling code; pass --trust-remote-code if you trust it"
            ) from error
        raise
    logger.info(f"Loaded {type(model).__name__} from {source} ({_parameter_count(model)} parameters)")
    return model, tokenizer


def _model_class(source: str, trust_remote_code: bool):
    """DiffusionGemma is not an ``AutoModelForCausalLM``; every other supported family is."""
    from transformers import AutoConfig, AutoModelForCausalLM, DiffusionGemmaForBlockDiffusion

    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    if getattr(config, "model_type", None) == "diffusion_gemma":
        return DiffusionGemmaForBlockDiffusion
    return AutoModelForCausalLM


def _pipeline_for(model, requested: str | None) -> str:
    """The default pipeline is llm-compressor's, except for DiffusionGemma, which calibrates only on its
    recorded denoising states (the diffusion pipeline); another explicit choice for it is an error."""
    from sink_modifier.diffusion_gemma import is_diffusion_gemma

    if not is_diffusion_gemma(model):
        return requested or "independent"
    if requested not in (None, "diffusion"):
        raise CLIError(f"DiffusionGemma calibrates on its own denoising states: use --pipeline diffusion "
                       f"(or leave it out), not {requested!r}")
    return "diffusion"


def _parameter_count(model: torch.nn.Module) -> str:
    count = sum(p.numel() for p in model.parameters())
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


def read_samples(path: Path) -> list[str]:
    """One sample per paragraph (blank-line separated); a file with ``<|endoftext|>`` lines (the bundled text
    files) has one sample per document between them instead. Whitespace is stripped and empty samples dropped.
    """
    if not path.is_file():
        raise CLIError(f"--text-file {path}: no such file")
    text = path.read_text(encoding="utf-8")
    splitter = _DOCUMENT if _DOCUMENT.search(text) else _PARAGRAPH
    samples = [p.strip() for p in splitter.split(text) if p.strip()]
    if not samples:
        raise CLIError(f"--text-file {path} has no text")
    return samples


def _texts_from_disk(path: Path) -> tuple[list[str] | None, list[list[int]] | None]:
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


def token_samples(
    args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase, default_text: Path | None = None,
) -> list[list[int]]:
    """The first ``--num-samples`` samples of ``--text-file`` / ``--dataset`` (or ``default_text``), tokenized
    with the model's tokenizer, truncated to ``--max-seq-length``, empty ones dropped."""
    texts, ids = None, None
    if args.dataset is not None:
        path = Path(args.dataset).expanduser()
        if not path.exists():
            raise CLIError(f"--dataset {args.dataset}: no such directory")
        texts, ids = _texts_from_disk(path)
    elif args.text_file is not None or default_text is not None:
        texts = read_samples(args.text_file if args.text_file is not None else default_text)
    else:
        raise CLIError("no calibration text: pass --text-file FILE or --dataset PATH")
    limit = args.num_samples
    if texts is not None:
        texts = [t for t in texts if t.strip()]
        texts = texts[:limit] if limit else texts
        ids = [tokenizer(t, truncation=True, max_length=args.max_seq_length)["input_ids"] for t in texts]
    samples = [list(row[: args.max_seq_length]) for row in ids if len(row) > 0]
    samples = samples[:limit] if limit else samples
    if not samples:
        raise CLIError("the calibration text is empty after tokenization")
    logger.info(f"{len(samples)} samples, {sum(map(len, samples))} tokens" + (
        f" (at most {limit} were asked for)" if limit and len(samples) < limit else ""))
    return samples


def _dataset(samples: list[list[int]]):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": samples, "attention_mask": [[1] * len(s) for s in samples]})


def seed_everything(seed: int | None) -> None:
    from transformers import set_seed

    set_seed(0 if seed is None else seed)


# --------------------------------------------------------------------------- output directories


def check_output(output: Path, overwrite: bool) -> Path:
    """Refuse a non-empty output directory unless --overwrite (checked before any heavy work)."""
    output = output.expanduser()
    if output.exists() and not output.is_dir():
        raise CLIError(f"--output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise CLIError(f"--output {output} is not empty; pass --overwrite to replace it")
    return output


@contextlib.contextmanager
def staged_directory(output: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling of ``output`` to write into; on success it becomes ``output`` by a rename.

    An existing ``output`` (``--overwrite``) is renamed aside first and deleted afterwards. On any error (or
    Ctrl-C) the temporary directory is removed and ``output`` is left as it was, so a directory at ``output`` is
    always a complete result.
    """
    output = output.expanduser().absolute()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should look like any new directory
    try:
        yield staging
        check_output(output, overwrite)  # nothing appeared there while we worked
        if output.is_dir():
            previous = output.with_name(f".{output.name}.old-{os.getpid()}")
            output.rename(previous)
            try:
                staging.rename(output)
            except BaseException:
                previous.rename(output)
                raise
            shutil.rmtree(previous, ignore_errors=True)
        else:
            staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------- run


def _load_recipe(path: Path, seed: int | None):
    """Parse the recipe now (a typo fails before the model loads); --seed overrides sink modifiers' seed."""
    from llmcompressor.recipe import Recipe

    from sink_modifier import SinkAwarePruningModifier

    if not path.is_file():
        raise CLIError(f"--recipe {path}: no such file")
    recipe = Recipe.create_instance(str(path))
    if seed is not None:
        for modifier in recipe.modifiers:
            if isinstance(modifier, SinkAwarePruningModifier):
                modifier.seed = seed
    return recipe


def pruned_fraction(model: torch.nn.Module) -> float:
    """Fraction of zeros in the Linear weights outside the LM head (what pruning recipes target)."""
    import torch

    head = model.get_output_embeddings()
    zeros = total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / total if total else 0.0


def prune(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, samples: list[list[int]], recipe: Any,
    output: Path, *, overwrite: bool, pipeline: str = "independent", max_seq_length: int | None = None,
) -> Path:
    """``oneshot`` into a staged directory that replaces ``output`` only when the checkpoint is complete."""
    from llmcompressor import oneshot

    import sink_modifier  # noqa: F401  (registers the modifier and the diffusion pipeline)

    with staged_directory(output, overwrite=overwrite) as staging:
        oneshot(
            model=model, processor=tokenizer, dataset=_dataset(samples), recipe=recipe, pipeline=pipeline,
            num_calibration_samples=len(samples), max_seq_length=max_seq_length or max(map(len, samples)),
            output_dir=str(staging),
        )
    return output.expanduser()


def cmd_run(args: argparse.Namespace) -> int:
    output = check_output(args.output, args.overwrite)
    recipe = _load_recipe(args.recipe, args.seed)
    seed_everything(args.seed)
    model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code, dtype=args.dtype)
    if args.dataset is not None and not Path(args.dataset).expanduser().exists():
        samples = None  # a dataset name: llm-compressor loads and tokenizes it
    else:
        samples = token_samples(args, tokenizer)
    start = time.perf_counter()
    args.pipeline = _pipeline_for(model, args.pipeline)
    if samples is None:
        from llmcompressor import oneshot

        import sink_modifier  # noqa: F401

        with staged_directory(output, overwrite=args.overwrite) as staging:
            oneshot(model=model, processor=tokenizer, dataset=args.dataset, recipe=recipe, pipeline=args.pipeline,
                    num_calibration_samples=args.num_samples, max_seq_length=args.max_seq_length,
                    output_dir=str(staging), trust_remote_code_model=args.trust_remote_code)
    else:
        prune(model, tokenizer, samples, recipe, output, overwrite=args.overwrite, pipeline=args.pipeline,
              max_seq_length=args.max_seq_length)
    elapsed = time.perf_counter() - start
    print(f"Pruned {display_name(args.model)} in {elapsed:.0f} s: {pruned_fraction(model):.1%} of the Linear "
          "weights outside the LM head are zero")
    _print_checkpoint(output, loader=type(model).__name__ if "DiffusionGemma" in type(model).__name__ else None)
    return 0


def _print_checkpoint(output: Path, indent: str = "", loader: str | None = None) -> None:
    report = output / "sink_report.json"
    how = f"{loader}.from_pretrained after `import sink_modifier` (its per-expert keys)" if loader else (
        "AutoModelForCausalLM.from_pretrained")
    print(f"{indent}checkpoint:  {output}/  (load with {how})")
    print(f"{indent}recipe:      {output / 'recipe.yaml'}")
    if report.exists():
        print(f"{indent}sink report: {report}")
    else:
        print(f"{indent}sink report: none (the recipe has no SinkAwarePruningModifier)")


# --------------------------------------------------------------------------- inspect


def measure_sinks(
    model: torch.nn.Module, samples: list[list[int]], *, noise_levels: int, seed: int | None, name: str,
    progress: bool, trajectory: str = "forward_noise", sampler_steps: int = 16,
) -> SinkDynamics:
    """The trajectory phase alone, with per-layer scores (what the pictures show)."""
    import torch

    from sink_modifier.adapters import adapter_for
    from sink_modifier.plots import SinkDynamics
    from sink_modifier.trajectory import TrajectorySettings, run_trajectory

    settings = TrajectorySettings(sink_scope="layer", trajectory=trajectory, noise_levels=noise_levels,
                                  sampler_steps=sampler_steps, seed=0 if seed is None else seed)
    adapter = adapter_for(model)
    tensors = [torch.tensor(s, dtype=torch.long) for s in samples]
    result = run_trajectory(model, adapter, tensors, settings, progress=progress)
    report = {"model": name, **result.report(settings, adapter)}
    return SinkDynamics.from_trajectory(display_name(name), result, report)


def write_inspection(dynamics: list, directory: Path) -> dict[str, Path]:
    """sink_report.json (first model), sink_report_compare.json (second), the pictures and report.html."""
    from sink_modifier.plots import render_inspection
    from sink_modifier.report import write_report

    directory.mkdir(parents=True, exist_ok=True)
    write_report(dynamics[0].report, directory)
    if len(dynamics) > 1:
        compare = json.dumps(dynamics[1].report, indent=2, sort_keys=True)
        (directory / "sink_report_compare.json").write_text(compare)
    return render_inspection(dynamics, directory)


def _default_text() -> Path | None:
    """The bundled evaluation slice, when the bundled models are installed."""
    try:
        from sink_modifier.bundled import eval_slice_path

        return Path(eval_slice_path())
    except (ImportError, FileNotFoundError):
        return None


def cmd_inspect(args: argparse.Namespace) -> int:
    output = check_output(args.output, args.overwrite)
    if args.dataset is not None and not Path(args.dataset).expanduser().exists():
        raise CLIError(f"--dataset {args.dataset}: inspect reads only datasets saved to disk; no such directory")
    dynamics = []
    for name in [args.model] + ([args.compare] if args.compare else []):
        seed_everything(args.seed)
        model, tokenizer = load_model(name, trust_remote_code=args.trust_remote_code, dtype=args.dtype)
        samples = token_samples(args, tokenizer, default_text=_default_text())
        dynamics.append(measure_sinks(model, samples, noise_levels=args.noise_levels, seed=args.seed, name=name,
                                      progress=not args.quiet, trajectory=args.trajectory,
                                      sampler_steps=args.sampler_steps))
        del model
    with staged_directory(output, overwrite=args.overwrite) as staging:
        pictures = write_inspection(dynamics, staging)
    print(f"Sink dynamics of {' vs '.join(d.name for d in dynamics)} "
          f"({dynamics[0].report['num_samples']} samples, {dynamics[0].report['num_states']} states, "
          f"{len(dynamics[0].layers)} layers)")
    print_table(_sink_rows(dynamics))
    print(f"report:      {output / 'report.html'}")
    print(f"sink report: {output / 'sink_report.json'}" + (
        f" and {output / 'sink_report_compare.json'}" if len(dynamics) > 1 else ""))
    print("pictures:    " + ", ".join(p.name for p in pictures.values() if p.suffix == ".png"))
    return 0


def _sink_rows(dynamics) -> list[list[str]]:
    """Per model: the paper's diagnostics averaged over layers and samples."""
    rows = [["model", "adapter", "centroid temporal var", "dominant-sink var", "score temporal var"]]
    for dyn in dynamics:
        centroid, dominant = (_layer_mean(dyn.report, key) for key in ("centroid_temporal_variance",
                                                                        "dominant_sink_variance"))
        rows.append([dyn.name, dyn.adapter, f"{centroid:.3g}", f"{dominant:.3g}",
                     f"{float(dyn.mean_temporal_variance.mean()):.3g}"])
    return rows


def _layer_mean(report: dict, key: str) -> float:
    values = report["aggregate"][key]["mean"]
    return sum(values) / len(values)


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


def cmd_eval(args: argparse.Namespace) -> int:
    from sink_modifier.evaluation import perplexity

    if args.tasks:
        return _eval_tasks(args)
    if args.dataset is not None and not Path(args.dataset).expanduser().exists():
        raise CLIError(f"--dataset {args.dataset}: eval reads only datasets saved to disk; no such directory")
    default = _default_text()
    if args.text_file is None and args.dataset is None and default is None:
        raise CLIError("no evaluation text: pass --text-file FILE or --dataset PATH")
    model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code, dtype=args.dtype)
    # Whole texts go to the evaluator, which cuts them into max-length windows itself.
    if args.dataset is not None:
        texts, ids = _texts_from_disk(Path(args.dataset).expanduser())
        inputs = texts if texts is not None else ids
    else:
        inputs = read_samples(args.text_file if args.text_file is not None else default)
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

        from sink_modifier.harness import DiffusionLM, UnsupportedModel, evaluate_tasks
    except ImportError as error:
        raise CLIError(f"--tasks needs lm-evaluation-harness ({error}): "
                       "pip install 'sink-aware-pruning[eval]'") from error
    tasks = [name.strip() for name in args.tasks.split(",") if name.strip()]
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    model_args = {"mc_samples": args.num_mc_samples, "batch_size": args.batch_size,
                  "seed": 0 if args.seed is None else args.seed}
    try:
        lm = DiffusionLM(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                         device=args.device, **model_args)
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


def cmd_demo(args: argparse.Namespace) -> int:
    from sink_modifier.demo import run_demo

    return run_demo(args)


if __name__ == "__main__":
    sys.exit(main())
