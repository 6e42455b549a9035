"""Quality after pruning on the bundled DLM and its AR twin: ``sink-prune compare`` on each, tables into the docs.

A thin caller of ``sink_modifier.cli.compare`` (the ``sink-prune compare`` command): for every model in
``--models`` it runs ``sink-prune compare <bundled model> -o benchmarks/.cache/compare-<kind> --overwrite
[options]`` in this process, then writes both tables (and the PNGs, as docs/images/compare_<kind>.png) between the
quality markers of docs/benchmarks.md. Options after ``--`` go to ``sink-prune compare`` unchanged.

    python benchmarks/quality.py --smoke                 # sink-prune compare --quick on the DLM; no docs
    python benchmarks/quality.py                         # both models, full grid; writes docs/benchmarks.md
    python benchmarks/quality.py --report-only           # rewrite the docs from the cached outputs
    python benchmarks/quality.py --models ar -- --draws 3
    python benchmarks/quality.py --structured            # sink-prune compare --structured; its own docs block
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from sinks import write_docs  # noqa: E402

CACHE = Path(__file__).parent / ".cache"
IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"
MARKER_BEGIN, MARKER_END = "<!-- quality:begin -->", "<!-- quality:end -->"
STRUCTURED_BEGIN, STRUCTURED_END = "<!-- structured-quality:begin -->", "<!-- structured-quality:end -->"


def compare_command(kind: str, extra: list[str], output: Path) -> list[str]:
    from sink_modifier.bundled import bundled_model_path

    return ["compare", str(bundled_model_path(kind)), "-o", str(output), "--overwrite", *extra]


def shown(kind: str, extra: list[str], name: str) -> str:
    model = "" if kind == "dlm" else " sink_modifier/bundled/ar"
    return f"sink-prune compare{model} -o benchmarks/.cache/{name} " + " ".join(extra)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="dlm,ar")
    parser.add_argument("--smoke", action="store_true", help="sink-prune compare --quick on the DLM; no docs")
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="run nothing; rewrite the docs from the cache")
    parser.add_argument("--structured", action="store_true", help="sink-prune compare --structured")
    args = parser.parse_args(own)
    if args.structured:
        extra = ["--structured", *extra]
    prefix = "compare-structured" if args.structured else "compare"
    if args.smoke:
        args.models, args.no_docs, extra = "dlm", True, ["--quick", *extra]
    from sink_modifier.cli.main import main as cli

    sections = []
    for kind in args.models.split(","):
        output = CACHE / f"{prefix}-{kind}{'-smoke' if args.smoke else ''}"  # the smoke keeps the full run's cache
        if not args.report_only:
            code = cli(compare_command(kind, extra, output))
            if code:
                return code
        summary = json.loads((output / "results.json").read_text())
        setup = summary["setup"]
        machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch {setup['torch']}, {setup['threads']} "
                   f"thread(s); {setup['seconds']:.0f} s for {len(summary['cells'])} cells")
        table = (output / "table.md").read_text().strip()
        image = f"{prefix.replace('-', '_')}_{kind}.png"
        sections.append(f"**{kind.upper()}**. Command: `{shown(kind, extra, output.name).strip()}`  \n"
                        f"Machine: {machine}\n\n{table}\n\n![{kind} table](images/{image})")
        if not args.no_docs:
            shutil.copyfile(output / "table.png", IMAGES / image)
    text = "\n\n".join(sections)
    print(text)
    if not args.no_docs:
        begin, end = (STRUCTURED_BEGIN, STRUCTURED_END) if args.structured else (MARKER_BEGIN, MARKER_END)
        write_docs(text, begin, end, "Quality after structured pruning" if args.structured else
                   "Quality after pruning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
