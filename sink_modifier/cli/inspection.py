"""``sink-prune inspect``: the trajectory phase alone (sink scores per layer along the denoising trajectory),
written as sink_report.json, pictures and report.html, with a table of the paper's diagnostics on stdout."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from sink_modifier.cli.workflows import (
    calibration_source,
    default_text,
    display_name,
    load_model,
    print_table,
    seed_everything,
    token_samples,
)
from sink_modifier.errors import CLIError

if TYPE_CHECKING:
    import torch

    from sink_modifier.cli.plots import SinkDynamics

__all__ = ["inspect_command", "measure_sinks", "write_inspection"]


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

    from sink_modifier import families
    from sink_modifier.calibration.trajectory import TrajectorySettings, run_trajectory
    from sink_modifier.cli.diagnostics import diagnose
    from sink_modifier.cli.plots import SinkDynamics

    settings = TrajectorySettings(sink_scope="layer", trajectory=trajectory, noise_levels=noise_levels,
                                  sampler_steps=sampler_steps, seed=0 if seed is None else seed)
    family = families.resolve(model)
    tensors = [torch.tensor(s, dtype=torch.long) for s in samples]
    # The decoder layers name the probe's records where no module is called "*Attention" (LLaDA), as in a run.
    layers = dict(match_named_modules(model, infer_sequential_targets(model, None)))
    result = run_trajectory(model, family, tensors, settings, layers=layers, progress=progress)
    report = {"model": name, **result.report(settings, family.name)}
    if diagnostic is not None and not family.calibration.needs_state_pipeline:
        if len(layers) == len(result.layer_names):  # per-layer sinks weight their own layer's rows
            report["diagnostic"] = diagnose(model, result, layers, sparsity=diagnostic[0],
                                            mask_structure=diagnostic[1])
    return SinkDynamics.from_trajectory(display_name(name), result, report)


def write_inspection(dynamics: list, directory: Path) -> dict[str, Path]:
    """sink_report.json (first model), sink_report_compare.json (second), the pictures and report.html."""
    from sink_modifier.cli.plots import render_inspection
    from sink_modifier.saving.report import write_report

    directory.mkdir(parents=True, exist_ok=True)
    write_report(dynamics[0].report, directory)
    if len(dynamics) > 1:
        compare = json.dumps(dynamics[1].report, indent=2, sort_keys=True)
        (directory / "sink_report_compare.json").write_text(compare)
    return render_inspection(dynamics, directory)


def inspect_command(args: argparse.Namespace) -> int:
    """``sink-prune inspect``: the sinks of MODEL (and ``--compare``) measured, drawn and published."""
    from sink_modifier.saving.publish import check_output, staged

    output = check_output(args.output, overwrite=args.overwrite)
    if args.dataset is not None and not Path(args.dataset).expanduser().exists():
        raise CLIError(f"--dataset {args.dataset}: inspect reads only datasets saved to disk; no such directory")
    if not 0 <= args.sparsity < 1:
        raise CLIError(f"--sparsity {args.sparsity}: use a value in [0, 1), such as 0.5")
    structure = _mask_structure(args.mask_structure)
    source = calibration_source(args, default_text=default_text())
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
    rows = [["model", "family", "centroid temporal var", "dominant-sink var", "score temporal var",
             "Wanda decisions moved"]]
    for dyn in dynamics:
        centroid, dominant = (_layer_mean(dyn.report, key) for key in ("centroid_temporal_variance",
                                                                        "dominant_sink_variance"))
        moved = dyn.report.get("diagnostic", {}).get("moved_decisions")
        rows.append([dyn.name, dyn.family, f"{centroid:.3g}", f"{dominant:.3g}",
                     f"{float(dyn.mean_temporal_variance.mean()):.3g}",
                     "n/a" if moved is None else f"{moved:.2%}"])
    return rows


def _layer_mean(report: dict, key: str) -> float:
    values = report["aggregate"][key]["mean"]
    return sum(values) / len(values)

