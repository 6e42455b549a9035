"""``sink-prune``: prune, inspect and evaluate diffusion LMs from the shell.

The argument parser and the exit codes; what each command does is in ``cli.workflows`` (``run``, ``eval``),
``cli.inspection`` (``inspect``), ``cli.demo`` (``demo``) and ``cli.compare`` (``compare``), what the terminal
shows while it runs in ``cli.console``. ``run`` is ``llmcompressor.oneshot`` with a recipe, ``inspect`` is the
trajectory phase alone plus pictures, ``eval`` is ``evaluation.perplexity`` (or lm-eval), ``demo`` chains them on
the bundled small DLM. Results go to stdout, logs and progress bars to stderr, so ``sink-prune ... > result.txt``
keeps only results. Nothing heavy is imported at module level (the ``sink-prune`` script loads this module without
the package, see ``sink_prune.py``): ``errors``, ``sources`` and ``console``, which import only the standard
library and loguru, are loaded by file until the package is imported, and a command imports the package, torch,
llm-compressor, models, datasets and matplotlib when it runs, so ``--help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["CLIError", "build_parser", "main"]

PROG = "sink-prune"


def _light_module(name: str) -> ModuleType:
    """``sink_modifier.NAME`` (``errors``, ``loading.sources``, ``cli.console``, ...), a module that imports
    nothing heavy, loaded by file when the package (which imports llm-compressor) is not imported yet; the
    package's own import of it later gets the same module."""
    module = sys.modules.get(f"sink_modifier.{name}")
    if module is None:
        path = Path(__file__).parents[1].joinpath(*name.split(".")).with_suffix(".py")
        spec = importlib.util.spec_from_file_location(f"sink_modifier.{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"sink_modifier.{name}"] = module
        spec.loader.exec_module(module)
    return module


_errors = _light_module("errors")
_types = _light_module("cli.arguments")
CLIError = _errors.CLIError


class _Parser(argparse.ArgumentParser):
    """argparse with a wrong option or value reported on one line (exit 2), not after the whole usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------- argument parsing


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    inspect.add_argument("--noise-levels", type=_types.positive_int, default=10, metavar="K",
                         help="forward_noise: states per sample (default: 10)")
    inspect.add_argument("--sampler-steps", type=_types.positive_int, default=16, metavar="N",
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
    evaluate.add_argument("--num-mc-samples", type=_types.positive_int, default=16, metavar="N",
                          help="Monte-Carlo samples of the ELBO (DLMs only; default: 16)")
    evaluate.add_argument("--json", action="store_true", help="print the result as JSON")
    tasks = evaluate.add_argument_group("lm-evaluation-harness tasks (pip install 'sink-aware-pruning[eval]')")
    tasks.add_argument("--tasks", metavar="A,B,...", type=_types.name_list,
                       help="lm-eval task names, e.g. bundled_cloze (shipped, offline) or arc_challenge,piqa")
    tasks.add_argument("--include-path", action="append", type=_types.directory, default=[], metavar="DIR",
                       help="a directory of task YAMLs (repeatable)")
    tasks.add_argument("--limit", type=_types.fraction_or_count, metavar="N",
                       help="examples per task (a fraction if below 1)")
    tasks.add_argument("--num-fewshot", type=_types.nonnegative_int, metavar="K",
                       help="few-shot examples (default: the task's)")
    tasks.add_argument("--batch-size", type=_types.positive_int, default=16, metavar="B",
                       help="forwards per batch (16)")
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
    demo.add_argument("--seed", type=_types.seed, default=0, metavar="S",
                      help="seed of the evaluation masks (default: 0)")
    demo.add_argument("--threads", type=_types.positive_int, default=1, metavar="N",
                      help="CPU threads for torch (default: 1; the bundled model is too small to gain from more, "
                      "and one thread cannot be oversubscribed)")
    demo.set_defaults(func=cmd_demo)
    compare = commands.add_parser(
        "compare", parents=[quiet, model, output], help="the controlled comparison: sink-aware vs its ablation "
        "and a random-row control over disjoint calibration draws",
        description=_light_module("cli.compare").__doc__)
    compare.formatter_class = argparse.RawDescriptionHelpFormatter
    _light_module("cli.compare").add_arguments(compare, _types)
    compare.set_defaults(func=lambda args: _light_module("cli.compare").main(args),
                         check=lambda args: _light_module("cli.compare").config_from_args(args))
    for command in (run, inspect, evaluate):
        command.add_argument("--threads", type=_types.positive_int, metavar="N",
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
    group.add_argument("--num-samples", type=_types.positive_int, default=samples, metavar="N",
                       help=f"number of samples (default: {samples or 'all'})")
    group.add_argument("--max-seq-length", type=_types.positive_int, default=length, metavar="L",
                       help=f"{length_help} (default: {length})")
    group.add_argument("--seed", type=_types.seed, metavar="S", help=seed_help)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sink-aware-pruning")
    except PackageNotFoundError:
        return "unknown"



def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:  # options that are valid alone but not together (a command's ``check``)
        getattr(args, "check", lambda args: None)(args)
    except argparse.ArgumentTypeError as error:
        print(f"{PROG} {args.command}: error: {error} (see {PROG} {args.command} --help)", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # else a warning when datasets forks
    console = _light_module("cli.console")
    with console.signals_as_interrupts():
        try:
            _check_model_sources(args)  # before torch is imported: a typo fails in milliseconds
            with console.bars_off_before_import(args.quiet):  # before tqdm is imported, under sink-prune
                return _run(args, console)
        except KeyboardInterrupt as stop:
            if args.debug:
                raise
            signum = stop.signum if isinstance(stop, console.Terminated) else 2
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
                print(f"{PROG} {args.command}: error: {_errors.one_line(error)}", file=sys.stderr)
            else:
                print(f"{PROG} {args.command}: error: {type(error).__name__}: {_errors.one_line(error)} "
                      "(unexpected: rerun with --debug for the traceback, and please report it)", file=sys.stderr)
            return 1


def _check_model_sources(args: argparse.Namespace) -> None:
    """``resolve_source`` for MODEL (and ``--compare``), from ``sink_modifier/loading/sources.py`` loaded by itself
    when the package (which imports llm-compressor) is not imported yet."""
    names = [getattr(args, "model", None), getattr(args, "compare", None)]
    if not any(name is not None for name in names):
        return
    module = _light_module("loading.sources")
    for name in names:
        if name is not None:
            module.resolve_source(name)


def _run(args: argparse.Namespace, console: ModuleType) -> int:
    import torch

    threads = torch.get_num_threads()
    if args.threads:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if args.threads > cores:
            print(f"{PROG} {args.command}: warning: --threads {args.threads} is more than the {cores} CPU cores "
                  f"this process may use; the threads would wait on each other (many times slower): use --threads "
                  f"{cores} or fewer", file=sys.stderr)
        torch.set_num_threads(args.threads)
    try:
        with console.command_console(quiet=args.quiet, verbose=args.verbose):
            return int(args.func(args) or 0)
    finally:
        torch.set_num_threads(threads)


_USER_ERRNOS = {"EACCES", "EPERM", "ENOSPC", "EDQUOT", "EROFS", "ENOTDIR", "EISDIR", "ENOENT", "EEXIST", "EBUSY"}


def _is_user_error(error: Exception) -> bool:
    """Errors whose message tells the user what to change; anything else is a bug."""
    import errno

    sources = sys.modules.get("sink_modifier.loading.sources")
    if isinstance(error, CLIError) or sources is not None and isinstance(error, sources.LoadError):
        return True  # decided without importing the package: a typo'd MODEL fails fast

    import contextlib
    import io

    from pydantic import ValidationError

    with contextlib.redirect_stdout(io.StringIO()):  # the package's first import: llm-compressor's stdout line
        from sink_modifier.errors import OutputError, UserError
        from sink_modifier.loading.checkpoints import LoadError

    if isinstance(error, OSError) and errno.errorcode.get(error.errno) in _USER_ERRNOS:
        return True  # permissions, a full disk, a path under a file: the file system says what is wrong
    return isinstance(error, CLIError | UserError | LoadError | OutputError | ValidationError | FloatingPointError
                      | FileNotFoundError)


# --------------------------------------------------------------------------- the commands


def cmd_run(args: argparse.Namespace) -> int:
    from sink_modifier.cli.workflows import run_command

    return run_command(args)


def cmd_inspect(args: argparse.Namespace) -> int:
    from sink_modifier.cli.inspection import inspect_command

    return inspect_command(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from sink_modifier.cli.workflows import eval_command

    return eval_command(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from sink_modifier.cli.demo import run_demo

    return run_demo(args)


if __name__ == "__main__":
    sys.exit(main())
