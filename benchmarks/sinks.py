"""How much the attention sinks move: the bundled DLM across denoising steps vs its AR twin across decoding steps.

Per layer (``sink_scope="layer"``), for each trajectory (``forward_noise``: every sample masked at K noise levels;
``sampler``: the model's own sampler completing the second half of each sample, the AR twin decoding it greedily),
the paper's three diagnostics from the sink report's aggregate, mean ± std over samples:

* spatial variance: variance over positions of each position's time-mean sink mass;
* centroid temporal variance: variance across states of the mass-weighted sink centroid;
* dominant-sink variance: variance across states of the position with the largest sink mass.

Samples are the first ``--num-samples`` documents of the bundled test-split evaluation slice, cut to
``--max-seq-length`` tokens (the same text for both models; they share the tokenizer).

    python benchmarks/sinks.py      # writes the table into docs/benchmarks.md and docs/images/sink_variance.png
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
from loguru import logger

from sink_modifier.bundled import bundled_model_path, load_eval_slice
from sink_modifier.cli.inspection import measure_sinks
from sink_modifier.cli.workflows import load_model

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "images" / "sink_variance.png"
MARKER_BEGIN, MARKER_END = "<!-- sinks:begin -->", "<!-- sinks:end -->"
METRICS = {"spatial_variance": "spatial var", "centroid_temporal_variance": "centroid temporal var",
           "dominant_sink_variance": "dominant-sink var"}


def write_docs(text: str, begin: str, end: str, heading: str, docs: Path = DOCS) -> None:
    """Replace the block between ``begin`` and ``end`` (or append it under ``heading``)."""
    content = docs.read_text() if docs.exists() else "# Benchmarks\n"
    block = f"{begin}\n{text}\n{end}"
    if begin in content:
        head, rest = content.split(begin, 1)
        content = head + block + rest.split(end, 1)[1]
    else:
        content += f"\n## {heading}\n\n{block}\n"
    docs.write_text(content)


def measure(args) -> dict:
    """{(model, trajectory): aggregate} for the DLM and the AR twin."""
    results = {}
    for kind in ("dlm", "ar"):
        model, tokenizer = load_model(str(bundled_model_path(kind)), dtype="float32")
        texts = load_eval_slice()[: args.num_samples]
        samples = [tokenizer(t, truncation=True, max_length=args.max_seq_length)["input_ids"] for t in texts]
        for trajectory in ("forward_noise", "sampler"):
            dynamics = measure_sinks(model, samples, noise_levels=args.steps, sampler_steps=args.steps,
                                     seed=args.seed, name=kind, progress=False, trajectory=trajectory)
            results[kind, trajectory] = dynamics.report["aggregate"]
        del model
    return results


def table(results: dict) -> str:
    layers = len(next(iter(results.values()))["spatial_variance"]["mean"])
    header = "| layer | " + " | ".join(f"{name} ({model.upper()})" for name in METRICS.values()
                                       for model in ("dlm", "ar")) + " |"
    lines = []
    for trajectory in ("forward_noise", "sampler"):
        lines += [f"**{trajectory}** trajectory (mean ± std over samples)", "", header,
                  "|---" * (1 + 2 * len(METRICS)) + "|"]
        for layer in [*range(layers), "mean"]:  # "mean": both columns averaged over layers
            cells = []
            for key in METRICS:
                for model in ("dlm", "ar"):
                    agg = results[model, trajectory][key]
                    if layer == "mean":
                        mean, std = (sum(agg[s]) / layers for s in ("mean", "std"))
                    else:
                        mean, std = agg["mean"][layer], agg["std"][layer]
                    cells.append(f"{mean:.3g} ± {std:.2g}")
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip()


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(METRICS), figsize=(4.2 * len(METRICS), 6.5), sharex=True)
    for row, trajectory in enumerate(("forward_noise", "sampler")):
        for col, (key, label) in enumerate(METRICS.items()):
            ax = axes[row, col]
            for model, color in (("dlm", "tab:blue"), ("ar", "tab:orange")):
                agg = results[model, trajectory][key]
                x = range(len(agg["mean"]))
                mean, std = torch.tensor(agg["mean"]), torch.tensor(agg["std"])
                ax.plot(x, mean, marker="o", color=color, label=model.upper())
                ax.fill_between(x, (mean - std).clamp(min=0), mean + std, color=color, alpha=0.15)
            ax.set_yscale("symlog", linthresh=1.0)  # linear below 1 (the AR twin's zeros), log above
            ax.set_ylim(bottom=0)
            ax.set_title(f"{label}\n({trajectory})", fontsize=9)
            if row == 1:
                ax.set_xlabel("layer")
            ax.grid(alpha=0.3)
    axes[0, 0].legend()
    fig.suptitle("Sink variance per layer, mean (line) ± std (band) over samples: bundled DLM (denoising steps) "
                 "vs AR twin (decoding steps)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16, help="noise levels / sampler steps / decoding steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-docs", action="store_true", help="print only; do not update the docs or the plot")
    args = parser.parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = measure(args)
    elapsed = time.perf_counter() - start
    command = "python benchmarks/sinks.py " + " ".join(argv if argv is not None else sys.argv[1:])
    setup = (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads; "
             f"{args.num_samples} eval-slice documents x {args.max_seq_length} tokens, {args.steps} steps, "
             f"seed {args.seed}; {elapsed:.0f} s")
    text = f"Command: `{command.strip()}`  \nMachine: {setup}\n\n{table(results)}"
    print(text)
    if not args.no_docs:
        plot(results, PLOT)
        write_docs(text + "\n\n![sink variance per layer](images/sink_variance.png)", MARKER_BEGIN, MARKER_END,
                   "Sink variance: DLM vs AR twin")


if __name__ == "__main__":
    main()
