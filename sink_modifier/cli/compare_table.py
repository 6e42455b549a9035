"""The numbers of ``sink-prune compare``: paired differences per draw, their spread over draws, tables, PNG.

A difference between two cells is computed per calibration draw, paired: per MC sample on the shared
evaluation masks for a DLM (mean and standard error over MC samples), exact for an AR model. Over the draws
it is summarised by its mean and its *spread*, the sample standard deviation over draws (ddof 1). The spread
is the yardstick: the MC error is conditional on one calibration draw and is usually much smaller. A
difference is ``resolved`` only when its |mean| exceeds the spread and twice the mean MC standard error, with at
least two draws; with two draws this is a lenient test (one degree of freedom), so an unresolved difference
means "cannot be told apart", and a resolved one is worth a third draw before it is believed.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

__all__ = ["comparisons_for", "difference", "format_tables", "summarize", "write_outputs"]


def cell_key(method: str, sparsity: str | None, draw: int) -> str:
    return f"{method}|{sparsity or '-'}|{draw}"



def difference(a: dict, b: dict) -> tuple[float, float]:
    """(a - b in nats/token, its MC standard error): paired per MC sample when both have them, else exact."""
    if a.get("sample_nlls") and b.get("sample_nlls"):
        diffs = [x - y for x, y in zip(a["sample_nlls"], b["sample_nlls"], strict=True)]
        se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
        return statistics.fmean(diffs), se
    return a["nll_per_token"] - b["nll_per_token"], 0.0


def _over_draws(pairs: list[tuple[float, float]]) -> dict:
    values = [d for d, _ in pairs]
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else float("nan")
    mc = [se for _, se in pairs if not math.isnan(se)]
    mc_se = statistics.fmean(mc) if mc else float("nan")
    resolved = len(values) > 1 and abs(mean) > spread and not (mc and abs(mean) <= 2 * mc_se)
    verdict = ("better" if mean < 0 else "worse") if resolved else "not resolved"
    return {"draws": values, "mean": mean, "spread": spread, "mc_se": mc_se, "resolved": resolved,
            "verdict": verdict}


def comparisons_for(methods: list[str]) -> list[tuple[str, str]]:
    """(a, b) pairs: each sink-aware run and the random control minus its ablation, then sinks minus random."""
    pairs = []
    for engine in ("wanda", "sparsegpt", "structured-wanda"):
        ablation, random = f"{engine}_noised", f"sink_{engine}_random"
        for selection in ("all", "unstable", "random"):
            method = f"sink_{engine}_{selection}"
            if method in methods and ablation in methods:
                pairs.append((method, ablation))
        for selection in ("all", "unstable"):
            method = f"sink_{engine}_{selection}"
            if method in methods and random in methods:
                pairs.append((method, random))
    return pairs


def summarize(cells: dict[str, dict], setup: dict) -> dict:
    """Per method and sparsity: perplexity and NLL - dense over draws; per comparison: the paired differences."""

    dense = cells[cell_key("dense", None, 0)]
    methods = [m for m in setup["methods"] if any(c["method"] == m for c in cells.values())]
    data_free = ("dense", "magnitude", "structured-magnitude")
    draws = sorted({c["draw"] for c in cells.values() if c["method"] not in data_free}) or [0]

    def cell(method, sparsity, draw):  # magnitude uses no data: one run stands for every draw
        return cells.get(cell_key(method, sparsity, 0 if method.endswith("magnitude") else draw))

    per_method = {}
    for method in methods:
        per_method[method] = {}
        for sparsity in setup["sparsities"]:
            runs = [cell(method, sparsity, d) for d in draws]
            runs = [r for r in runs if r is not None]
            if runs:
                per_method[method][sparsity] = {
                    "perplexity": statistics.fmean(r["perplexity"] for r in runs),
                    "zeros": statistics.fmean(r["zeros"] for r in runs),
                    "minus_dense": _over_draws([difference(r, dense) for r in runs]),
                }
    comparisons = []
    for a, b in comparisons_for(methods):
        entry = {"a": a, "b": b, "kind": "control" if b.endswith("_random") else "ablation", "sparsity": {}}
        for sparsity in setup["sparsities"]:
            pairs = [(cell(a, sparsity, d), cell(b, sparsity, d)) for d in draws]
            pairs = [difference(x, y) for x, y in pairs if x is not None and y is not None]
            if pairs:
                entry["sparsity"][sparsity] = _over_draws(pairs)
        comparisons.append(entry)
    dense = {k: v for k, v in dense.items() if k != "sample_nlls"}
    return {"setup": {**setup, "draws_run": draws}, "dense": dense, "methods": per_method,
            "comparisons": comparisons, "cells": cells}


def _label(sparsity: str, structured: bool = False) -> str:
    if structured:
        from sink_modifier.cli.compare_structured import label

        return label(sparsity)
    return sparsity if ":" in sparsity else f"{float(sparsity):.0%}"


def table_rows(summary: dict) -> tuple[list[list[str]], list[list[str]]]:
    """The two tables as rows of strings (header first): per method, and the paired comparisons."""
    setup = summary["setup"]
    sparsities = setup["sparsities"]
    structured = setup.get("structured", False)
    header = ["method", *(_label(s, structured) for s in sparsities)]
    first = [header, ["dense", *[f"{summary['dense']['perplexity']:.2f}"] * len(sparsities)]]
    for method, by_sparsity in summary["methods"].items():
        row = [method + (" (ablation)" if method.endswith("_noised") else
                         " (random-row control)" if method.endswith("_random") else "")]
        for sparsity in sparsities:
            r = by_sparsity.get(sparsity)
            row.append("—" if r is None else f"{r['perplexity']:.2f} ({_pm(r['minus_dense'], 4)})")
        first.append(row)
    second = [["comparison", *(_label(s, structured) for s in sparsities)]]
    for entry in summary["comparisons"]:
        row = [f"{entry['a']} − {entry['b']}"]
        for sparsity in sparsities:
            r = entry["sparsity"].get(sparsity)
            if r is None:
                row.append("—")
                continue
            per_draw = ", ".join(f"{d:+.5f}" for d in r["draws"])
            row.append(f"{_pm(r, 5)} [{per_draw}] {r['verdict']}")
        second.append(row)
    return first, second


def _pm(r: dict, digits: int) -> str:
    spread = "n/a" if math.isnan(r["spread"]) else f"{r['spread']:.{digits}f}"
    return f"{r['mean']:+.{digits}f} ± {spread}"


def _markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|---" * len(rows[0]) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows[1:]])


def format_tables(summary: dict) -> str:
    """Both tables as Markdown, with the captions that say how to read them."""
    setup = summary["setup"]
    first, second = table_rows(summary)
    draws = len(setup["draws_run"])
    mc = (f"{setup['mc_samples']} MC samples, eval seed {setup['eval_seed']}" if setup["metric"] != "perplexity"
          else "exact")
    return "\n".join([
        f"{Path(setup['model']).name}: {setup['metric']} ({mc}; {summary['dense']['num_tokens']} tokens) after "
        f"pruning; in brackets NLL − dense in nats/token, mean ± spread (sample std) over {draws} disjoint "
        f"calibration draws of {setup['num_samples']} documents x {setup['max_seq_length']} tokens", "",
        _markdown(first), "",
        "Paired differences in nats/token (negative: the first is better): mean ± spread over draws, "
        "[each draw], and the verdict: resolved only when |mean| exceeds the spread over draws and twice the "
        "paired MC standard error", "",
        _markdown(second)])


def write_outputs(summary: dict, directory: Path) -> None:
    """results.json, table.md and table.png in ``directory``."""
    directory = Path(directory)
    (directory / "results.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    (directory / "table.md").write_text(format_tables(summary) + "\n")
    write_png(summary, directory / "table.png")


def write_png(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first, second = table_rows(summary)
    width = max(8.0, 2.2 + 3.6 * (len(first[0]) - 1))
    titles = [f"{Path(summary['setup']['model']).name}: {summary['setup']['metric']} (NLL − dense, nats/token: "
              f"mean ± spread over {len(summary['setup']['draws_run'])} draws)",
              "paired differences (negative: first is better); resolved only beyond the spread over draws"]
    # a table with only its header (one method: no pair to compare) is left out of the picture
    tables = [(rows, title) for rows, title in zip((first, second), titles, strict=True) if len(rows) > 1]
    figure, axes = plt.subplots(len(tables), 1, squeeze=False, height_ratios=[len(rows) for rows, _ in tables],
                                figsize=(width, 0.32 * sum(len(rows) for rows, _ in tables) + 1.6))
    for ax, (rows, title) in zip(axes[:, 0], tables, strict=True):
        ax.axis("off")
        ax.set_title(title, fontsize=9, loc="left")
        table = ax.table(cellText=rows[1:], colLabels=rows[0], loc="upper left", cellLoc="left")
        table.auto_set_font_size(False)
        table.set_fontsize(7)
        table.auto_set_column_width(list(range(len(rows[0]))))
        for (row, _), c in table.get_celld().items():
            text = c.get_text().get_text()
            if row > 0 and ("random" in text or text.endswith("better") or text.endswith("worse")):
                c.set_facecolor("#eef3fb" if "random" in text else "#fdf1e6")
    figure.tight_layout()
    figure.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(figure)
