"""Pictures of sink dynamics (PNG) and one self-contained HTML page for ``sink-prune inspect``.

The paper's argument is visual: a DLM's attention sink wanders across denoising steps while an autoregressive
model's sits on the first token. ``SinkDynamics`` keeps what the pictures need from a trajectory (one pictured
sample's per-state scores, per-sample temporal variances and the JSON report); the ``plot_*`` functions draw it
with matplotlib's object API (no pyplot, so nothing global such as the backend is touched).
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from sink_modifier.calibration import statistics
from sink_modifier.calibration.trajectory import TrajectoryResult

__all__ = [
    "SinkDynamics",
    "plot_heatmaps",
    "plot_layer_statistics",
    "plot_side_by_side",
    "plot_temporal_variance",
    "render_inspection",
    "write_html",
]

_DPI = 110
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")
# (report key, panel title, what it means): the diagnostics the paper compares between DLMs and AR models.
_DIAGNOSTICS = (
    ("spatial_variance", "Spatial variance", "how concentrated attention mass is on few positions"),
    ("centroid_temporal_variance", "Centroid temporal variance", "how far the sink's centre moves across steps"),
    ("dominant_sink_variance", "Dominant-sink-position variance", "how often the top sink changes position"),
)


@dataclass
class SinkDynamics:
    """One model's trajectory, reduced to what the pictures and the HTML table need (numpy, CPU)."""

    name: str
    family: str
    trajectory: str
    layers: list[str]
    scores: np.ndarray  # [S, G, T] pictured sample, states in denoising order, NaN where a position is absent
    step_labels: list[str]  # one per state, in denoising order
    temporal_variance: np.ndarray  # [G, T] pictured sample: variance of each position's score over the states
    mean_temporal_variance: np.ndarray  # [N, G] per sample: mean over positions of that variance
    sample_index: int
    report: dict

    @classmethod
    def from_trajectory(
        cls, name: str, result: TrajectoryResult, report: dict, sample_index: int = 0,
    ) -> SinkDynamics:
        if not 0 <= sample_index < len(result.samples):
            raise ValueError(f"sample {sample_index} is out of range: the trajectory has {len(result.samples)}")
        per_sample = []
        for sample in result.samples:
            valid = torch.stack([s.valid for s in sample.states])
            _, var = statistics.temporal_stats(sample.scores, valid)
            per_sample.append(_mean_over_positions(var, valid))
        sample = result.samples[sample_index]
        valid = torch.stack([s.valid for s in sample.states])
        order, labels = _denoising_order(sample.states)
        scores = sample.scores.double().numpy().copy()
        scores[~valid.unsqueeze(1).expand_as(sample.scores).numpy()] = np.nan
        _, var = statistics.temporal_stats(sample.scores, valid)
        groups = report.get("groups") or result.layer_names
        return cls(
            name=name, family=report["family"],
            trajectory=report.get("trajectory", "forward_noise"),
            layers=list(groups), scores=scores[order], step_labels=labels,
            temporal_variance=var.double().numpy(), mean_temporal_variance=np.stack(per_sample),
            sample_index=sample_index, report=report,
        )


def _denoising_order(states) -> tuple[list[int], list[str]]:
    """States in the order the model denoises (noise level falling from 1 in every family), so step 1 is the
    first row of every heatmap. Labelled by noise level, or by tokens decoded when states differ in length (the
    autoregressive control's prefixes)."""
    order = sorted(range(len(states)), key=lambda i: -states[i].noise_level)
    if len({int(state.valid.sum()) for state in states}) == 1:
        return order, [f"{j + 1} (t={states[i].noise_level:.2f})" for j, i in enumerate(order)]
    return order, [f"{j + 1} ({int(states[i].valid.sum())} tok)" for j, i in enumerate(order)]


def short_layer_name(name: str) -> str:
    """``model.layers.12.self_attn`` -> ``layer 12``; names without an index are kept."""
    if name == "all_layers":
        return "all layers"
    numbers = re.findall(r"\.(\d+)\.", f".{name}.")
    return f"layer {numbers[-1]}" if numbers else name


def _ticks(n: int, most: int = 10) -> list[int]:
    step = max(1, int(np.ceil(n / most)))
    return list(range(0, n, step))


def plot_heatmaps(dyn: SinkDynamics, path: str | Path) -> Path:
    """One panel per layer: sink score over (denoising step x position) for the pictured sample."""
    num_states, groups, length = dyn.scores.shape
    absent = bool(np.isnan(dyn.scores).any())
    cols = 3 if groups > 4 and groups % 4 and groups % 3 == 0 else min(groups, 4)
    rows = int(np.ceil(groups / cols))
    panel_w = float(np.clip(length / 24, 3.6, 5.0))
    panel_h = float(np.clip(num_states / 3.5, 2.4, 3.6))
    fig = Figure(figsize=(cols * panel_w + 1.4, rows * panel_h + 1.5), dpi=_DPI, layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    cmap = _cmap("magma")
    image = None
    for g in range(groups):
        ax = axes[g]
        image = ax.imshow(
            np.ma.masked_invalid(dyn.scores[:, g, :]), aspect="auto", interpolation="nearest",
            cmap=cmap, vmin=0.0, vmax=1.0,
        )
        ax.set_title(short_layer_name(dyn.layers[g]), fontsize=11)
        ax.set_xlabel("token position")
        ax.set_ylabel("denoising step")
        ax.set_yticks(_ticks(num_states, 12))
        ax.set_yticklabels([dyn.step_labels[i] for i in _ticks(num_states, 12)], fontsize=8)
        ax.set_xticks(_ticks(length))
    for ax in axes[groups:]:
        ax.set_visible(False)
    colorbar = fig.colorbar(image, ax=list(axes[:groups]), shrink=0.9, pad=0.02)
    colorbar.set_label("sink score (0 = ordinary token, 1 = sink)")
    fig.suptitle(
        f"Sink score per layer: {dyn.name}\n{dyn.trajectory} trajectory, {dyn.family} family, "
        f"sample {dyn.sample_index} ({length} tokens" + ("; grey = not decoded yet)" if absent else ")"),
        fontsize=12,
    )
    return _save(fig, path)


def plot_side_by_side(dynamics: list[SinkDynamics], path: str | Path, layer: int | None = None) -> Path:
    """The paper's contrast in one picture: the same layer's sink score of every model, side by side.

    ``layer`` defaults to the middle layer (the same index in every model).
    """
    groups = min(d.scores.shape[1] for d in dynamics)
    layer = groups // 2 if layer is None else layer
    if not 0 <= layer < groups:
        raise ValueError(f"layer {layer} is out of range: the models have {groups} layers")
    fig = Figure(figsize=(5.2 * len(dynamics) + 1.2, 4.2), dpi=_DPI, layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(dynamics), squeeze=False)).ravel()
    image = None
    for ax, dyn in zip(axes, dynamics, strict=True):
        num_states, _, length = dyn.scores.shape
        image = ax.imshow(np.ma.masked_invalid(dyn.scores[:, layer, :]), aspect="auto", interpolation="nearest",
                          cmap=_cmap("magma"), vmin=0.0, vmax=1.0)
        ax.set_title(f"{dyn.name} ({dyn.family}), {short_layer_name(dyn.layers[layer])}", fontsize=11)
        ax.set_xlabel("token position")
        ax.set_ylabel("denoising step")
        ax.set_yticks(_ticks(num_states, 12))
        ax.set_yticklabels([dyn.step_labels[i] for i in _ticks(num_states, 12)], fontsize=8)
        ax.set_xticks(_ticks(length))
    colorbar = fig.colorbar(image, ax=list(axes), shrink=0.9, pad=0.02)
    colorbar.set_label("sink score")
    fig.suptitle("Where the attention sink sits at each denoising step "
                 f"({dynamics[0].trajectory} trajectory, sample {dynamics[0].sample_index})", fontsize=12)
    return _save(fig, path)


def plot_temporal_variance(dynamics: list[SinkDynamics], path: str | Path) -> Path:
    """Left: each position's score variance over the denoising steps, per layer (pictured sample). Right: per
    layer, that variance averaged over positions and samples, for every model side by side."""
    n = len(dynamics)
    groups = max(d.temporal_variance.shape[0] for d in dynamics)
    fig = Figure(figsize=(13, max(3.4, 2.2 * n + 1.6)), dpi=_DPI, layout="constrained")
    grid = fig.add_gridspec(n, 2, width_ratios=(1.35, 1.0))
    vmax = max(0.25, max(float(d.temporal_variance.max()) for d in dynamics))
    image = None
    for row, dyn in enumerate(dynamics):
        ax = fig.add_subplot(grid[row, 0])
        image = ax.imshow(dyn.temporal_variance, aspect="auto", interpolation="nearest",
                          cmap=_cmap("viridis"), vmin=0.0, vmax=vmax)
        ax.set_yticks(range(len(dyn.layers)))
        ax.set_yticklabels([short_layer_name(x) for x in dyn.layers], fontsize=8)
        ax.set_xticks(_ticks(dyn.temporal_variance.shape[1]))
        ax.set_xlabel("token position")
        ax.set_title(f"{dyn.name} ({dyn.family}), sample {dyn.sample_index}", fontsize=10)
    colorbar = fig.colorbar(image, ax=[fig.axes[i] for i in range(n)], pad=0.02)
    colorbar.set_label("Var over steps of sink score")
    bars = fig.add_subplot(grid[:, 1])
    width = 0.8 / n
    x = np.arange(groups)
    for i, dyn in enumerate(dynamics):
        values = dyn.mean_temporal_variance
        bars.bar(x[: values.shape[1]] + (i - (n - 1) / 2) * width, values.mean(0), width,
                 yerr=_error_bars(values.mean(0), values.std(0)) if values.shape[0] > 1 else None, capsize=3,
                 color=_COLORS[i % len(_COLORS)], label=f"{dyn.name} ({dyn.family})")
    bars.set_xticks(x)
    bars.set_xticklabels([short_layer_name(name) for name in dynamics[0].layers], rotation=_rotation(groups))
    bars.set_ylabel("mean over positions of Var over steps")
    bars.set_title("Sink-score temporal variance per layer\n(mean ± std over samples)", fontsize=10)
    bars.legend(fontsize=8, loc="best")
    fig.suptitle("How much each position's sink score changes while the model denoises", fontsize=12)
    return _save(fig, path)


def plot_layer_statistics(dynamics: list[SinkDynamics], path: str | Path) -> Path:
    """The paper's DLM-vs-AR diagnostics per layer (mean ± std over samples), every model side by side."""
    n = len(dynamics)
    groups = max(len(d.layers) for d in dynamics)
    fig = Figure(figsize=(15, 4.6), dpi=_DPI, layout="constrained")
    axes = fig.subplots(1, len(_DIAGNOSTICS))
    x = np.arange(groups)
    width = 0.8 / n
    for ax, (key, title, meaning) in zip(axes, _DIAGNOSTICS, strict=True):
        for i, dyn in enumerate(dynamics):
            stats = dyn.report["aggregate"][key]
            mean, std = np.asarray(stats["mean"]), np.asarray(stats["std"])
            bars = ax.bar(x[: len(mean)] + (i - (n - 1) / 2) * width, mean, width, yerr=_error_bars(mean, std),
                          capsize=3,
                          color=_COLORS[i % len(_COLORS)], label=f"{dyn.name} ({dyn.family})")
            if groups * n <= 16:
                ax.bar_label(bars, labels=[_fmt(float(v)) for v in mean], fontsize=7, padding=2)
        ax.set_xticks(x)
        ax.set_xticklabels([short_layer_name(name) for name in dynamics[0].layers], rotation=_rotation(groups))
        ax.set_title(f"{title}\n({meaning})", fontsize=10)
        ax.set_ylabel("positions²" if key != "spatial_variance" else "(attention mass)²")
        ax.margins(y=0.12)
        ax.set_ylim(bottom=0)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=n, fontsize=9)
    kinds = " vs ".join(f"{d.name} ({d.family})" for d in dynamics)
    fig.suptitle(f"Sink statistics per layer: {kinds}", fontsize=12)
    return _save(fig, path)


def render_inspection(
    dynamics: list[SinkDynamics], output_dir: str | Path, *, title: str | None = None,
) -> dict[str, Path]:
    """Every picture plus ``report.html`` into ``output_dir``; returns name -> path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    pictures: dict[str, Path] = {}
    if len(dynamics) > 1:
        pictures["side_by_side"] = plot_side_by_side(dynamics, output_dir / "sink_side_by_side.png")
    for i, dyn in enumerate(dynamics):
        suffix = "" if i == 0 else "_compare" if i == 1 else f"_{i}"
        pictures[f"heatmap{suffix}"] = plot_heatmaps(dyn, output_dir / f"sink_heatmap{suffix}.png")
    pictures["temporal_variance"] = plot_temporal_variance(dynamics, output_dir / "sink_temporal_variance.png")
    pictures["layer_statistics"] = plot_layer_statistics(dynamics, output_dir / "sink_layer_statistics.png")
    pictures["html"] = write_html(dynamics, pictures, output_dir / "report.html", title=title)
    return pictures


_CAPTIONS = {
    "side_by_side": "The same layer of every model: a DLM's sink moves from step to step, an autoregressive "
    "model's stays where it is, usually on one of the first tokens.",
    "heatmap": "Sink score of every position at every denoising step, one panel per layer.",
    "temporal_variance": "Variance of each position's sink score over the denoising steps: 0 means a position is "
    "a sink (or not) at every step; high values mean the sink moves.",
    "layer_statistics": "Per-layer diagnostics from the paper, mean ± std over samples. A DLM's sink centroid "
    "and dominant sink move between steps (high variances); an autoregressive model's stay put (near zero).",
}

_HEADINGS = {
    "side_by_side": "The contrast: the same layer, side by side",
    "heatmap": "Sink score along the denoising trajectory",
    "temporal_variance": "Temporal variance of the sink score",
    "layer_statistics": "Sink statistics per layer",
}

_STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1500px;
       color: #222; background: #fff; padding: 0 16px; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
figure { margin: 12px 0 24px; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 13px; margin-top: 4px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0 16px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
code { background: #f5f5f5; padding: 1px 4px; }
"""


def write_html(
    dynamics: list[SinkDynamics], pictures: dict[str, Path], path: str | Path, *, title: str | None = None,
) -> Path:
    """A single HTML file (PNGs embedded as base64, no external resources) with the pictures and numbers."""
    esc = html.escape
    title = title or "Sink dynamics: " + " vs ".join(d.name for d in dynamics)
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{esc(title)}</h1>"]
    parts.append("<table><tr><th class='l'>model</th><th class='l'>family</th><th class='l'>trajectory</th>"
                 "<th>samples</th><th>states</th><th>layers</th><th class='l'>sink scope</th></tr>")
    for dyn in dynamics:
        r = dyn.report
        parts.append(
            f"<tr><td class='l'>{esc(dyn.name)}</td><td class='l'>{esc(dyn.family)}</td>"
            f"<td class='l'>{esc(dyn.trajectory)}</td><td>{r['num_samples']}</td><td>{r['num_states']}</td>"
            f"<td>{len(r['layers'])}</td><td class='l'>{esc(str(r['settings'].get('sink_scope')))}</td></tr>")
    parts.append("</table>")
    for name, picture in pictures.items():
        if picture.suffix != ".png":
            continue
        data = base64.b64encode(Path(picture).read_bytes()).decode("ascii")
        kind = "heatmap" if name.startswith("heatmap") else name
        heading = _HEADINGS.get(kind, picture.stem)
        if kind == "heatmap":
            heading += f": {dynamics[{'heatmap': 0, 'heatmap_compare': 1}.get(name, 0)].name}"
        caption = f"{esc(_CAPTIONS.get(kind, ''))} <code>{esc(picture.name)}</code>"
        parts.append(f"<h2>{esc(heading)}</h2><figure>"
                     f"<img alt='{esc(picture.stem)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{caption}</figcaption></figure>")
    parts.append("<h2>Numbers per layer (mean over samples)</h2>")
    parts.append(_numbers_table(dynamics))
    settings = dynamics[0].report["settings"]
    rows = "".join(f"<tr><td class='l'>{esc(k)}</td><td class='l'>{esc(str(v))}</td></tr>"
                   for k, v in sorted(settings.items()))
    parts.append(f"<h2>Settings</h2><table>{rows}</table></body></html>")
    path = Path(path)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _numbers_table(dynamics: list[SinkDynamics]) -> str:
    esc = html.escape
    columns = [(key, title) for key, title, _ in _DIAGNOSTICS] + [
        ("mean_num_sinks", "Sinks per step"), ("num_unstable_sinks", "Unstable sinks")]
    head = "".join(f"<th>{esc(title)}</th>" for _, title in columns)
    rows = [f"<table><tr><th class='l'>model</th><th class='l'>layer</th>{head}"
            "<th>Score temporal variance</th></tr>"]
    for dyn in dynamics:
        aggregate = dyn.report["aggregate"]
        for g, layer in enumerate(dyn.layers):
            cells = "".join(f"<td>{_fmt(aggregate[key]['mean'][g])}</td>" for key, _ in columns)
            rows.append(f"<tr><td class='l'>{esc(dyn.name)}</td><td class='l'>{esc(short_layer_name(layer))}</td>"
                        f"{cells}<td>{_fmt(float(dyn.mean_temporal_variance[:, g].mean()))}</td></tr>")
    rows.append("</table>")
    return "".join(rows)


def _mean_over_positions(var: torch.Tensor, valid: torch.Tensor) -> np.ndarray:
    """Mean of [G, T] over the positions seen in at least two states (others have no temporal variance)."""
    seen = valid.sum(dim=0) >= 2
    if not bool(seen.any()):
        return np.zeros(var.shape[0])
    return var[:, seen].mean(dim=-1).double().numpy()


def _error_bars(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """± std, cut at zero below: every quantity drawn is a variance or a count, never negative."""
    mean, std = np.asarray(mean, dtype=float), np.asarray(std, dtype=float)
    return np.stack([np.minimum(std, mean), std])


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if 1e3 <= abs(value) < 1e6:
        return f"{value:.0f}"
    return f"{value:.3g}"


def _rotation(groups: int) -> int:
    return 0 if groups <= 8 else 60


def _cmap(name: str):
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad="#d9d9d9")


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=_DPI, facecolor="white")
    return path
