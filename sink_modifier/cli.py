"""``sink-prune``: prune, inspect and evaluate diffusion LMs from the shell.

A thin front over the library: ``run`` is ``llmcompressor.oneshot`` with a recipe, ``inspect`` is the trajectory
phase alone plus pictures, ``eval`` is ``sink_modifier.evaluation``, ``demo`` chains them on the bundled small
DLM. Results go to stdout, logs (loguru, llm-compressor's logger) and progress bars to stderr, so
``sink-prune ... > result.txt`` keeps only results. Nothing heavy is imported at module level (the ``sink-prune``
script loads this module without the package, see ``sink_prune.py``): torch, llm-compressor, models, datasets
and matplotlib are imported inside the commands that need them, so ``--help`` and ``--version`` answer at once.
Outputs are published through ``sink_modifier.publish`` (locked, staged, never replacing what it did not write).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import threading
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


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (Slurm, ``docker stop``, Kubernetes, a closed terminal), raised like Ctrl-C so that the
    same cleanup runs: the staging directory goes, the output stays as it was."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


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
    volume = quiet.add_mutually_exclusive_group()
    volume.add_argument("--quiet", "-q", action="store_true",
                        help="print only the final summary, errors and this tool's own warnings")
    volume.add_argument("--verbose", "-v", action="store_true",
                        help="also llm-compressor's per-module log lines and per-layer progress bars")
    quiet.add_argument("--debug", action="store_true", help="show the traceback of an error")
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--trust-remote-code", action="store_true",
                       help="allow the model's own Python code from the Hub to run (off by default)")
    model.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="dtype to load the weights in (default: the checkpoint's)")
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--overwrite", action="store_true",
                        help="replace an existing output directory that sink-prune wrote (it holds "
                        ".sink-prune.json); it stays intact until the new result is complete")

    run = commands.add_parser(
        "run", parents=[quiet, model, output], help="prune a model with a recipe (llmcompressor.oneshot)",
        description="Prune MODEL with RECIPE through llmcompressor.oneshot and save a checkpoint that "
        "transformers loads, with recipe.yaml and (for sink-aware recipes) sink_report.json. The checkpoint "
        "is staged and published only when complete; the output is locked while the run lasts.",
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
    inspect.add_argument("--sparsity", type=float, default=0.5, metavar="S",
                         help="sparsity of the mask-decision diagnostic (default: 0.5)")
    inspect.add_argument("--mask-structure", default="unstructured", metavar="N:M",
                         help="structure of the mask-decision diagnostic: 'unstructured' or N:M such as 2:4")
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
    compare = commands.add_parser(
        "compare", parents=[quiet, model, output], help="the controlled comparison: sink-aware vs its ablation "
        "and a random-row control over disjoint calibration draws", description=_light("compare").__doc__)
    compare.formatter_class = argparse.RawDescriptionHelpFormatter
    _light("compare").add_arguments(compare)
    compare.set_defaults(func=lambda args: _light("compare").main(args))
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
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # else a warning when datasets forks
    with _signals_as_interrupts():
        try:
            _check_model_sources(args)  # before torch is imported: a typo fails in milliseconds
            return _run(args)
        except KeyboardInterrupt as stop:
            if args.debug:
                raise
            signum = stop.signum if isinstance(stop, Terminated) else 2
            print(f"{PROG} {args.command}: {'interrupted' if signum == 2 else 'terminated'}; nothing was "
                  "published", file=sys.stderr)
            return 128 + signum
        except BrokenPipeError:  # the reader of stdout went away (``| head``): exit as a killed writer does
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        except Exception as error:
            if args.debug:
                raise
            if _is_user_error(error):
                print(f"{PROG} {args.command}: error: {_one_line(error)}", file=sys.stderr)
            else:
                print(f"{PROG} {args.command}: error: {type(error).__name__}: {_one_line(error)} (unexpected: "
                      "rerun with --debug for the traceback, and please report it)", file=sys.stderr)
            return 1


def _light(name: str):
    """``sink_modifier.<name>``, loaded by itself when the package (which imports llm-compressor) is not
    imported yet: the module must import nothing heavy at load time (sources, compare)."""
    module = sys.modules.get(f"sink_modifier.{name}")
    if module is None:
        import importlib.util

        path = Path(__file__).with_name(f"{name}.py")
        spec = importlib.util.spec_from_file_location(f"sink_modifier.{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"sink_modifier.{name}"] = module  # the package's own import of it gets this module
        spec.loader.exec_module(module)
    return module


def _check_model_sources(args: argparse.Namespace) -> None:
    """``resolve_source`` for MODEL (and ``--compare``), from ``sink_modifier/sources.py`` loaded by itself when
    the package (which imports llm-compressor) is not imported yet."""
    names = [getattr(args, "model", None), getattr(args, "compare", None)]
    if not any(name is not None for name in names):
        return
    module = sys.modules.get("sink_modifier.sources")
    if module is None:
        import importlib.util

        path = Path(__file__).with_name("sources.py")
        spec = importlib.util.spec_from_file_location("sink_modifier.sources", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["sink_modifier.sources"] = module  # the package's own import of it gets this module
        spec.loader.exec_module(module)
    for name in names:
        if name is not None:
            module.resolve_source(name)


def _run(args: argparse.Namespace) -> int:
    import torch

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        with _console(quiet=args.quiet, verbose=args.verbose):
            return int(args.func(args) or 0)
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _signals_as_interrupts() -> Iterator[None]:
    """SIGTERM and SIGHUP raise ``Terminated`` (once: a second one during the cleanup is ignored)."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        for other in previous:
            signal.signal(other, signal.SIG_IGN)
        raise Terminated(signum)

    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGHUP)}
    for signum in previous:
        signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


_USER_ERRNOS = {"EACCES", "EPERM", "ENOSPC", "EDQUOT", "EROFS", "ENOTDIR", "EISDIR", "ENOENT", "EEXIST", "EBUSY"}


def _is_user_error(error: Exception) -> bool:
    """Errors whose message tells the user what to change; anything else is a bug."""
    import errno

    sources = sys.modules.get("sink_modifier.sources")
    if isinstance(error, CLIError) or sources is not None and isinstance(error, sources.LoadError):
        return True  # decided without importing the package: a typo'd MODEL fails fast

    from pydantic import ValidationError

    from sink_modifier.errors import UserError
    from sink_modifier.loading import LoadError
    from sink_modifier.publish import OutputError

    if isinstance(error, OSError) and errno.errorcode.get(error.errno) in _USER_ERRNOS:
        return True  # permissions, a full disk, a path under a file: the file system says what is wrong
    return isinstance(error, CLIError | UserError | LoadError | OutputError | ValidationError | FloatingPointError
                      | FileNotFoundError)


def _one_line(error: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or error.title}: {e['msg']}" for e in error.errors())
        return f"invalid {error.title}: {problems}"
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    return " ".join(str(error).split()) or type(error).__name__


# --------------------------------------------------------------------------- console: logs and progress bars


@contextlib.contextmanager
def _console(*, quiet: bool, verbose: bool = False) -> Iterator[None]:
    """What the user sees on stderr while a command runs; everything is restored on exit.

    Default: this package's INFO lines, every library's warnings and errors, and one progress bar per phase.
    ``--quiet``: this package's warnings and everyone's errors, no bars. ``--verbose``: everything,
    llm-compressor's per-module lines (INFO and METRIC) and per-layer bars included. ``LLM_COMPRESSOR_LOG_LEVEL``
    still sets the level for all, as it does for llm-compressor itself, and its file log is kept.
    """
    import logging
    import warnings

    with contextlib.redirect_stdout(sys.stderr if verbose else io.StringIO()):
        import llmcompressor  # noqa: F401  (its import logs "No accelerator available!" to stdout)
    from transformers.utils import logging as hf_logging

    ours, others = ("WARNING", "ERROR") if quiet else ("INFO", "INFO" if verbose else "WARNING")
    level = os.environ.get("LLM_COMPRESSOR_LOG_LEVEL")
    if level:
        ours = others = level.upper()
    _loguru_sinks(lambda: sys.stderr, ours, others, verbose=verbose)
    hf_verbosity = hf_logging.get_verbosity()
    if quiet:
        hf_logging.set_verbosity_error()
    torch_logger = logging.getLogger("torch")
    torch_level = torch_logger.level
    if not verbose:
        torch_logger.setLevel(logging.ERROR)  # torch.fx's tracing notice while llm-compressor builds subgraphs
    try:
        with warnings.catch_warnings(), _progress_bars("off" if quiet else "all" if verbose else "phases"):
            if not verbose:
                warnings.filterwarnings("ignore")  # libraries' notices; this package logs instead
            yield
    finally:
        _loguru_sinks(lambda: sys.stdout, _llmc_logger().LOGGER_CONFIG.console_log_level)
        hf_logging.set_verbosity(hf_verbosity)
        torch_logger.setLevel(torch_level)


def _llmc_logger():
    """llm-compressor's logger module (``llmcompressor.logger`` as an attribute is the loguru logger itself)."""
    import importlib

    return importlib.import_module("llmcompressor.logger")


# llm-compressor's lines that are noise on a CPU machine or per module: shown only with --verbose
_NOISE = ("No accelerator available",)


def _loguru_sinks(console, level: str | None, others: str | None = None, *, verbose: bool = True) -> None:
    """Replace loguru's sinks: console lines go to ``console()``, looked up per message (so a redirected
    stream, e.g. under pytest, is honoured), in llm-compressor's format; its file log is kept when configured.
    This package's records need ``level``, everyone else's ``others``.
    """
    llmc = _llmc_logger()
    config = llmc.LOGGER_CONFIG
    logger.remove()
    if level and not config.disabled:
        mine, theirs = logger.level(level.upper()).no, logger.level((others or level).upper()).no

        def keep(record) -> bool:
            if (record["name"] or "").startswith("sink_modifier"):
                wanted = record["level"].no >= mine
            else:
                noise = record["level"].name == "METRIC" or record["message"].startswith(_NOISE)
                wanted = record["level"].no >= theirs and (verbose or not noise)
            return wanted and llmc.support_log_once(record)

        logger.add(lambda message: console().write(message), level=min(mine, theirs), format=_LOG_FORMAT,
                   filter=keep, colorize=False)
    if config.log_file or config.log_file_level:
        logger.add(config.log_file or "llmcompressor.log", level=(config.log_file_level or "INFO").upper(),
                   serialize=True, filter=llmc.support_log_once)


# llm-compressor's sequential pipeline draws two bars per layer: "(3/7): Calibrating", "(3/7): Propagating"
_LAYER_BAR = re.compile(r"^\((\d+)/(\d+)\): (Calibrating|Propagating)")
_HIDDEN_BARS = ("Compressing model", "Dispatching model")  # instant bookkeeping steps of the save


@contextlib.contextmanager
def _progress_bars(mode: str) -> Iterator[None]:
    """``off``: no tqdm bar at all; ``phases``: one bar per phase (llm-compressor's per-layer bars become one
    "Calibrating layers" bar); ``all``: every bar as its library draws it.

    Every library's bar derives from ``tqdm.std.tqdm``; its ``TQDM_DISABLE`` variable is read at import, too late.
    """
    if mode == "all":
        yield
        return
    from tqdm import std

    from sink_modifier import compat

    layers: dict[str, Any] = {"bar": None}

    def finish_layers():
        bar = layers.pop("bar", None)
        layers["bar"] = None
        if bar is not None:
            bar.n = bar.total
            bar.close()

    def edit(kwargs: dict, desc: str) -> None:
        layer = _LAYER_BAR.match(desc)
        if mode == "off" or layer or desc.startswith(_HIDDEN_BARS):
            kwargs["disable"] = True
        if mode == "phases" and layer:
            index, total = int(layer.group(1)), int(layer.group(2))
            if layers["bar"] is None or layers["bar"].total != total:
                finish_layers()
                layers["bar"] = std.tqdm(total=total, desc="Calibrating layers", unit="layer", file=sys.stderr)
            layers["bar"].n = index - 1
            layers["bar"].refresh()
        elif mode == "phases" and not desc.startswith(_HIDDEN_BARS) and not kwargs.get("disable"):
            finish_layers()  # the next phase began

    try:
        with compat.editing_tqdm_bars(edit):
            yield
    finally:
        finish_layers()


# --------------------------------------------------------------------------- models and data


def display_name(name: str) -> str:
    """A short model name for titles: the directory name of a local path, the Hub id otherwise."""
    path = Path(name).expanduser()
    return path.resolve().name if path.exists() else name


def load_model(
    name: str, *, trust_remote_code: bool = False, dtype: str = "auto"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer through ``sink_modifier.loading`` (repairs, a finite check forward, fast failures)."""
    from sink_modifier.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(name, trust_remote_code=trust_remote_code, dtype=dtype)


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


def read_samples(path: Path) -> list[str]:
    """One sample per paragraph (blank-line separated); a file with ``<|endoftext|>`` lines (the bundled text
    files) has one sample per document between them instead. Whitespace is stripped and empty samples dropped.
    """
    if not path.is_file():
        raise CLIError(f"--text-file {path}: no such file")
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


def calibration_source(
    args: argparse.Namespace, default_text: Path | None = None,
) -> tuple[list[str] | None, list[list[int]] | None]:
    """The texts (or token ids) of ``--text-file`` / ``--dataset`` (or ``default_text``), read before any model
    loads so that a missing or undecodable input fails at once."""
    if args.dataset is not None:
        path = Path(args.dataset).expanduser()
        if not path.exists():
            raise CLIError(f"--dataset {args.dataset}: no such directory")
        return _texts_from_disk(path)
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


# --------------------------------------------------------------------------- run


def _load_recipe(path: Path, seed: int | None):
    """Parse the recipe now (a typo fails before the model loads); --seed overrides sink modifiers' seed."""
    import yaml
    from llmcompressor.recipe import Recipe
    from pydantic import ValidationError

    from sink_modifier import SinkAwarePruningModifier

    if not path.is_file():
        raise CLIError(f"--recipe {path}: no such file")
    try:
        path.read_text(encoding="utf-8")
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
        raise CLIError(f"--recipe {path} is not an llm-compressor recipe: {_one_line(error)}") from None
    if not recipe.modifiers:
        raise CLIError(f"--recipe {path} defines no modifier; see the recipes/ directory for examples")
    if seed is not None:
        for modifier in recipe.modifiers:
            if isinstance(modifier, SinkAwarePruningModifier):
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
                       **oneshot_args: Any) -> float:
    """``oneshot`` without its own save, the zero fraction measured, then what ``oneshot`` would have saved
    (compressed checkpoint with recipe.yaml, and the tokenizer) written to ``directory``; returns the fraction."""
    from llmcompressor import oneshot

    import sink_modifier  # noqa: F401  (registers the modifier and the diffusion pipeline)

    oneshot(model=model, processor=tokenizer, output_dir=None, **oneshot_args)
    fraction = pruned_fraction(model)
    model.save_pretrained(str(directory), save_compressed=True)
    tokenizer.save_pretrained(str(directory))
    return fraction


def prune(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, samples: list[list[int]], recipe: Any,
    directory: Path, *, pipeline: str = "independent", max_seq_length: int | None = None,
    trust_remote_code: bool = False,
) -> float:
    """``oneshot`` on token samples, saved to ``directory`` (a staging directory: see ``publish.staged``)."""
    return calibrate_and_save(
        model, tokenizer, directory, dataset=_dataset(samples), recipe=recipe, pipeline=pipeline,
        num_calibration_samples=len(samples), max_seq_length=max_seq_length or max(map(len, samples)),
        trust_remote_code_model=trust_remote_code,  # oneshot re-reads the config
    )


def cmd_run(args: argparse.Namespace) -> int:
    from sink_modifier.publish import check_output, staged

    # Everything that can fail cheaply fails before the model loads: output, recipe, text, lock.
    output = check_output(args.output, overwrite=args.overwrite)
    recipe = _load_recipe(args.recipe, args.seed)
    named = args.dataset is not None and not Path(args.dataset).expanduser().exists()
    source = None if named else calibration_source(args)  # a dataset name: llm-compressor loads it
    with staged(output, existing="replace" if args.overwrite else "refuse") as staging:
        seed_everything(args.seed)
        model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code, dtype=args.dtype)
        start = time.perf_counter()
        args.pipeline = _pipeline_for(model, args.pipeline)
        if named:
            fraction = calibrate_and_save(
                model, tokenizer, staging, dataset=args.dataset, recipe=recipe, pipeline=args.pipeline,
                num_calibration_samples=args.num_samples, max_seq_length=args.max_seq_length,
                trust_remote_code_model=args.trust_remote_code)
        else:
            fraction = prune(model, tokenizer, token_samples(args, tokenizer, source=source), recipe, staging,
                             pipeline=args.pipeline, max_seq_length=args.max_seq_length,
                             trust_remote_code=args.trust_remote_code)
        elapsed = time.perf_counter() - start
    print(f"Pruned {display_name(args.model)} in {elapsed:.0f} s: {fraction:.1%} of the Linear weights outside "
          "the LM head are zero")
    _print_checkpoint(args.output.expanduser(),  # as the user wrote it (``output`` is absolute)
                      loader=type(model).__name__ if "DiffusionGemma" in type(model).__name__ else None)
    return 0


def _print_checkpoint(output: Path, loader: str | None = None) -> None:
    report = output / "sink_report.json"
    how = f"{loader}.from_pretrained after `import sink_modifier`" if loader else (
        "AutoModelForCausalLM.from_pretrained")
    print(f"checkpoint:  {output}/  (recipe.yaml inside; load with {how})")
    if report.exists():
        print(f"sink report: {report}")
    else:
        print("sink report: none (the recipe has no SinkAwarePruningModifier)")


# --------------------------------------------------------------------------- inspect


def measure_sinks(
    model: torch.nn.Module, samples: list[list[int]], *, noise_levels: int, seed: int | None, name: str,
    progress: bool, trajectory: str = "forward_noise", sampler_steps: int = 16,
    diagnostic: tuple[float, str] | None = None,
) -> SinkDynamics:
    """The trajectory phase alone, with per-layer scores (what the pictures show); with ``diagnostic``
    (sparsity, mask structure) the report also says how many Wanda decisions the sink weights move."""
    import torch
    from compressed_tensors.utils import match_named_modules
    from llmcompressor.utils.pytorch.module import infer_sequential_targets

    from sink_modifier.adapters import adapter_for
    from sink_modifier.diagnostics import diagnose
    from sink_modifier.plots import SinkDynamics
    from sink_modifier.trajectory import TrajectorySettings, run_trajectory

    settings = TrajectorySettings(sink_scope="layer", trajectory=trajectory, noise_levels=noise_levels,
                                  sampler_steps=sampler_steps, seed=0 if seed is None else seed)
    adapter = adapter_for(model)
    tensors = [torch.tensor(s, dtype=torch.long) for s in samples]
    result = run_trajectory(model, adapter, tensors, settings, progress=progress)
    report = {"model": name, **result.report(settings, adapter)}
    if diagnostic is not None and len(adapter.streams) == 1:
        layers = dict(match_named_modules(model, infer_sequential_targets(model, None)))
        if len(layers) == len(result.layer_names):  # per-layer sinks weight their own layer's rows
            report["diagnostic"] = diagnose(model, result, layers, sparsity=diagnostic[0],
                                            mask_structure=diagnostic[1])
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
    from sink_modifier.publish import check_output, staged

    output = check_output(args.output, overwrite=args.overwrite)
    if args.dataset is not None and not Path(args.dataset).expanduser().exists():
        raise CLIError(f"--dataset {args.dataset}: inspect reads only datasets saved to disk; no such directory")
    if not 0 <= args.sparsity < 1:
        raise CLIError(f"--sparsity {args.sparsity}: use a value in [0, 1), such as 0.5")
    structure = _mask_structure(args.mask_structure)
    source = calibration_source(args, default_text=_default_text())
    dynamics = []
    with staged(output, existing="replace" if args.overwrite else "refuse") as staging:
        for name in [args.model] + ([args.compare] if args.compare else []):
            seed_everything(args.seed)
            model, tokenizer = load_model(name, trust_remote_code=args.trust_remote_code, dtype=args.dtype)
            samples = token_samples(args, tokenizer, source=source)
            dynamics.append(measure_sinks(model, samples, noise_levels=args.noise_levels, seed=args.seed,
                                          name=name, progress=not args.quiet, trajectory=args.trajectory,
                                          sampler_steps=args.sampler_steps,
                                          diagnostic=(args.sparsity, structure)))
            del model
        pictures = write_inspection(dynamics, staging)
    print(f"Sink dynamics of {' vs '.join(d.name for d in dynamics)} "
          f"({dynamics[0].report['num_samples']} samples, {dynamics[0].report['num_states']} states, "
          f"{len(dynamics[0].layers)} layers)")
    print_table(_sink_rows(dynamics))
    for dyn in dynamics:
        if "diagnostic" in dyn.report:
            print(f"{dyn.name}: {dyn.report['diagnostic']['verdict']}")
    print(f"report:      {output / 'report.html'}")
    print(f"sink report: {output / 'sink_report.json'}" + (
        f" and {output / 'sink_report_compare.json'}" if len(dynamics) > 1 else ""))
    print("pictures:    " + ", ".join(p.name for p in pictures.values() if p.suffix == ".png"))
    return 0


def _mask_structure(value: str) -> str:
    """'unstructured' -> '0:0'; 'N:M' as given; anything else is a one-line usage error."""
    if value == "unstructured":
        return "0:0"
    n, _, m = value.partition(":")
    if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
        raise CLIError(f"--mask-structure {value!r}: use 'unstructured' or N:M with 0 < N < M, such as 2:4")
    return value


def _sink_rows(dynamics) -> list[list[str]]:
    """Per model: the paper's diagnostics averaged over layers and samples."""
    rows = [["model", "adapter", "centroid temporal var", "dominant-sink var", "score temporal var",
             "Wanda decisions moved"]]
    for dyn in dynamics:
        centroid, dominant = (_layer_mean(dyn.report, key) for key in ("centroid_temporal_variance",
                                                                        "dominant_sink_variance"))
        moved = dyn.report.get("diagnostic", {}).get("moved_decisions")
        rows.append([dyn.name, dyn.adapter, f"{centroid:.3g}", f"{dominant:.3g}",
                     f"{float(dyn.mean_temporal_variance.mean()):.3g}",
                     "n/a" if moved is None else f"{moved:.2%}"])
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
