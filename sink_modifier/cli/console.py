"""What the user sees on the terminal while a ``sink-prune`` command runs: log lines (loguru, llm-compressor's
logger, transformers' and torch's loggers), progress bars, and SIGTERM / SIGHUP turned into interrupts.

Results go to stdout, logs and progress bars to stderr. Only the standard library and loguru are imported at
module level: the ``sink-prune`` script loads this module by file before the package (see ``cli/main.py``).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
from collections.abc import Iterator

from loguru import logger

__all__ = ["Terminated", "bars_off_before_import", "command_console", "loguru_sinks", "progress_bars",
           "signals_as_interrupts", "silent_children"]

_LOG_FORMAT = "{time:YYYY-MM-DDTHH:mm:ss.SSSS} | {function} | {level} - {message}"


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (Slurm, ``docker stop``, Kubernetes, a closed terminal), raised like Ctrl-C so that the
    same cleanup runs: the staging directory goes, the output stays as it was."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """SIGINT raises ``KeyboardInterrupt``, SIGTERM and SIGHUP ``Terminated``; after the first, all three stay
    ignored (the command is ending), so a second Ctrl-C during the cleanup or the interpreter's exit cannot
    interrupt it or print a traceback. A signal ignored when the command started (``nohup``, ``setsid``,
    systemd, a shell's background job) stays ignored: the user asked for the run to survive it."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        for other in previous:
            signal.signal(other, signal.SIG_IGN)
        stopped.append(signum)
        raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)

    stopped: list[int] = []
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for signum, old in previous.items():
        if old is not signal.SIG_IGN:
            signal.signal(signum, handler)
    try:
        yield
    finally:
        if not stopped:  # after a stop the process is ending: a second Ctrl-C must not interrupt its exit either
            for signum, old in previous.items():
                signal.signal(signum, old)


@contextlib.contextmanager
def command_console(*, quiet: bool, verbose: bool = False) -> Iterator[None]:
    """What the user sees on stderr while a command runs; everything is restored on exit.

    Default: this package's INFO lines, every library's warnings and errors, and every progress bar as its library
    draws it (llm-compressor's two per layer included). ``--quiet``: this package's warnings and everyone's
    errors, no bars. ``--verbose``: everything, llm-compressor's per-module lines (INFO and METRIC) included.
    ``LLM_COMPRESSOR_LOG_LEVEL`` still sets the level for all, as it does for llm-compressor itself, and its file
    log is kept.
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
    loguru_sinks(lambda: sys.stderr, ours, others, verbose=verbose)
    hf_verbosity = hf_logging.get_verbosity()
    if quiet:
        hf_logging.set_verbosity_error()
    torch_logger = logging.getLogger("torch")
    torch_level = torch_logger.level
    if not verbose:
        torch_logger.setLevel(logging.ERROR)  # torch.fx's tracing notice while llm-compressor builds subgraphs
    if quiet:
        logging.disable(logging.WARNING)  # every library's standard-library logger (lm-eval's, datasets')
    try:
        with warnings.catch_warnings(), progress_bars(not quiet), \
                silent_children() if quiet else contextlib.nullcontext():
            if not verbose:
                warnings.filterwarnings("ignore")  # libraries' notices; this package logs instead
            yield
    finally:
        loguru_sinks(lambda: sys.stdout, _llmc_logger().LOGGER_CONFIG.console_log_level)
        hf_logging.set_verbosity(hf_verbosity)
        torch_logger.setLevel(torch_level)
        if quiet:
            logging.disable(logging.NOTSET)


@contextlib.contextmanager
def silent_children() -> Iterator[None]:
    """File descriptor 2 goes to /dev/null while Python's ``sys.stderr`` keeps writing to the terminal: the
    stderr of child processes (lm-eval runs ``git describe``, which says "fatal: not a git repository") and of
    C code is dropped, this package's warnings are not. Nothing happens where ``sys.stderr`` is not fd 2."""
    try:
        own = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        own = False
    if not own:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    original, sys.stderr = sys.stderr, open(saved, "w", buffering=1, encoding=sys.stderr.encoding,  # noqa: SIM115
                                             errors="backslashreplace")
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        sys.stderr.close()
        sys.stderr = original


def _llmc_logger():
    """llm-compressor's logger module (``llmcompressor.logger`` as an attribute is the loguru logger itself)."""
    import importlib

    return importlib.import_module("llmcompressor.logger")


# llm-compressor's lines that are noise on a CPU machine or per module: shown only with --verbose
_NOISE = ("No accelerator available",)


def loguru_sinks(console, level: str | None, others: str | None = None, *, verbose: bool = True) -> None:
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


#: tqdm's own switch, read once when tqdm is first imported (``tqdm.utils.envwrap``): it acts only if set before.
_TQDM_OFF = "TQDM_DISABLE"


@contextlib.contextmanager
def bars_off_before_import(quiet: bool) -> Iterator[None]:
    """With ``--quiet``: ``TQDM_DISABLE=1`` in the environment for the command (restored after it).

    The ``sink-prune`` script parses the command line before anything imports tqdm (``cli/main.py`` is loaded by
    file), so every library's bar is created disabled by tqdm itself, and child processes inherit it. Where tqdm
    is imported already (``python -m sink_modifier.cli``, ``main()`` called in-process) it has read its
    environment; ``progress_bars`` then still silences the libraries with public switches.
    """
    if not quiet:
        yield
        return
    previous = os.environ.get(_TQDM_OFF)
    os.environ[_TQDM_OFF] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_TQDM_OFF, None)
        else:
            os.environ[_TQDM_OFF] = previous


@contextlib.contextmanager
def progress_bars(shown: bool) -> Iterator[None]:
    """Every bar as its library draws it, or (``--quiet``) none: tqdm's class is never edited.

    Off: tqdm's ``TQDM_DISABLE`` (``bars_off_before_import``), plus the public switches of the libraries that
    have one (transformers' weight loading and writing, huggingface_hub's downloads, datasets' maps), restored on
    exit; this package's own bars (sink trajectory, compare cells) follow ``--quiet`` explicitly. llm-compressor
    0.14 has no switch for its per-layer bars, so they are hidden only where tqdm reads ``TQDM_DISABLE`` (the
    ``sink-prune`` script).
    """
    if shown:
        yield
        return
    import datasets
    import huggingface_hub.utils as hub
    from transformers.utils import logging as hf_logging

    switches = [(hf_logging.is_progress_bar_enabled(), hf_logging.enable_progress_bar,
                 hf_logging.disable_progress_bar),
                (not hub.are_progress_bars_disabled(), hub.enable_progress_bars, hub.disable_progress_bars),
                (datasets.is_progress_bar_enabled(), datasets.enable_progress_bars,
                 datasets.disable_progress_bars)]
    for _, _, disable in switches:
        disable()
    try:
        yield
    finally:
        for enabled, enable, _ in switches:
            if enabled:
                enable()
