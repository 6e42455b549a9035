"""Trajectory phase: run the dense model over each sample's denoising states and measure its sinks.

For every calibration sample its family produces K states; one batched forward with the attention probe gives
the attention mass every key receives in every layer; ``statistics`` turns that into sink scores, their
temporal behaviour and the per-token row scales the pruning phase applies. Only token ids, row scales and small
per-sample summaries are kept (all on CPU): attention masses are reduced as soon as a sample is done.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
from compressed_tensors.offload.dist_utils import is_distributed
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sink_modifier.calibration import statistics
from sink_modifier.calibration.probe import AttentionProbe, discover_attention_modules
from sink_modifier.compat import routed_experts_only
from sink_modifier.errors import UserError
from sink_modifier.families import DenoisingState, Family
from sink_modifier.seeding import content_generator, content_id


class TrajectorySettings(BaseModel):
    """How states are produced and how their sinks turn into row scales (the modifier's sink fields)."""

    model_config = ConfigDict(extra="forbid")

    trajectory: Literal["forward_noise", "sampler"] = "forward_noise"
    noise_levels: int = Field(10, ge=1)
    noise_eps: float = Field(1e-3, ge=0.0, lt=1.0)
    seed: int = 0
    sink_threshold_std: float = 2.0
    sink_sharpness: float = Field(5.0, gt=0.0)
    sink_score: statistics.ScoreKind = "raw"
    sink_scope: statistics.Scope = "global"
    sink_selection: statistics.Selection = "all"
    unstable_variance: float = Field(0.02, ge=0.0)
    query_chunk_size: int = Field(256, ge=1)
    trajectory_batch_size: int = Field(8, ge=1)
    # trajectory: sampler
    sampler_steps: int = Field(16, ge=1)
    sampler_blocks: int = Field(1, ge=1)
    prompt_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    sampler_temperature: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _steps_fill_blocks(self):
        if self.sampler_steps % self.sampler_blocks:
            raise ValueError(
                f"sampler_steps ({self.sampler_steps}) must be a multiple of sampler_blocks "
                f"({self.sampler_blocks}): every block gets the same number of denoising steps"
            )
        return self


@dataclass
class SampleTrajectory:
    """One calibration sample after the trajectory phase (CPU tensors)."""

    tokens: torch.Tensor  # [T] clean, unpadded
    states: list[DenoisingState]
    scores: torch.Tensor  # [S, G, T] sink score of every position at every state
    row_scales: torch.Tensor  # [S, G, T] per state
    mean_row_scales: torch.Tensor  # [G, T] averaged over the states
    summary: statistics.SinkSummary


@dataclass
class TrajectoryResult:
    samples: list[SampleTrajectory] = field(default_factory=list)
    layer_names: list[str] = field(default_factory=list)  # attention layers whose sinks weight the rows
    reported_layer_names: list[str] = field(default_factory=list)  # recorded and reported only

    def report(self, settings: TrajectorySettings, family: str) -> dict:
        """The content of ``sink_report.json`` (over every rank's samples under torch.distributed)."""
        entries = [
            (
                content_id(s.tokens),
                {"id": content_id(s.tokens), "length": int(s.tokens.numel()),
                 "noise_levels": [st.noise_level for st in s.states], **s.summary.to_dict()},
                s.summary,
            )
            for s in self.samples
        ]
        if is_distributed():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, entries)
            entries = [entry for rank_entries in gathered for entry in rank_entries]
        # Ordered by content, not by the (shuffled) calibration order, so the same data gives the same report.
        entries.sort(key=lambda entry: entry[0])
        samples = [entry[1] for entry in entries]
        summaries = [entry[2] for entry in entries]
        return {
            "family": family,
            "trajectory": settings.trajectory,
            "settings": settings.model_dump(),
            "num_samples": len(samples),
            "num_states": sum(len(s["noise_levels"]) for s in samples),
            "layers": self.layer_names,
            **({"reported_layers": self.reported_layer_names} if self.reported_layer_names else {}),
            "groups": ["all_layers"] if settings.sink_scope == "global" else self.layer_names,
            "aggregate": statistics.aggregate(summaries),
            "samples": samples,
        }


def _execution_device(model: torch.nn.Module) -> torch.device:
    """Where the forward runs: the accelerator when there is one, as in llm-compressor's sequential pipeline.

    A model too large for the accelerator is offloaded module by module (compressed-tensors onloads each module
    for its forward), so the trajectory phase never needs the whole model on the accelerator at once.
    """
    if not torch.accelerator.is_available():
        return next(model.parameters()).device
    from compressed_tensors.offload import set_onload_device
    from llmcompressor.utils.dev import get_main_device

    device = get_main_device()
    set_onload_device(model, device)
    return device


def measure_states(
    model: torch.nn.Module, probe: AttentionProbe, family: Family,
    states: list[DenoisingState], batch_size: int, device: torch.device,
) -> dict[str | None, torch.Tensor]:
    """The family's attention masses [S, L, T] per stream of records, checked for overflow."""
    masses = family.attention.measure(model, probe, states, batch_size, device)
    layer_names = family.attention.split_layers(list(probe.layer_names))  # one list per stream, in order
    for mass, names in zip(masses.values(), layer_names, strict=False):
        if not torch.isfinite(mass).all():
            bad = [names[i] for i in torch.nonzero(~torch.isfinite(mass).all(0).all(-1))[:, 0]]
            dtype = next(model.parameters()).dtype
            hint = ("load it in bfloat16 or float32 instead of float16" if dtype == torch.float16 else
                    "its weights or buffers may be uninitialised: load it with sink_modifier.load_model, "
                    "which repairs the known cases and checks one forward")
            raise FloatingPointError(f"Non-finite attention mass in {bad}: the model ({dtype}) produces "
                                     f"non-finite values on these inputs; {hint}")
    return masses


def _per_step(grouped: torch.Tensor, valid: torch.Tensor, states: list[DenoisingState], threshold_std: float):
    """Per state and group: where the dominant sink is and how many sinks there are."""
    sets = statistics.sink_sets(grouped, valid, threshold_std)
    dominant = grouped.masked_fill(~valid[:, None, :], float("-inf")).argmax(dim=-1)  # [S, G]
    return [
        {"step": state.step, "noise_level": round(float(state.noise_level), 4),
         "dominant_position": dominant[i].tolist(), "num_sinks": sets[i].sum(-1).tolist()}
        for i, state in enumerate(states)
    ]


def _stream_summary(mass: torch.Tensor, valid: torch.Tensor, settings: TrajectorySettings) -> dict:
    """Diagnostics of a stream that is reported but does not weight rows (DiffusionGemma's encoder)."""
    grouped = statistics.scope_mass(mass, settings.sink_scope)
    valid = valid & (grouped.sum(dim=1) > 0)  # positions this stream attends at all
    scores = statistics.sink_scores(grouped, valid, threshold_std=settings.sink_threshold_std,
                                    sharpness=settings.sink_sharpness, kind=settings.sink_score)
    summary = statistics.summarize(grouped, valid, scores, threshold_std=settings.sink_threshold_std,
                                   unstable_variance=settings.unstable_variance).to_dict()
    summary.pop("extra")
    return summary


def analyse_sample(
    tokens: torch.Tensor, states: list[DenoisingState], masses: dict[str | None, torch.Tensor] | torch.Tensor,
    settings: TrajectorySettings,
) -> SampleTrajectory:
    """Sink scores, row scales and diagnostics of one sample from its attention masses.

    ``masses`` maps each stream of attention records to [S, L, T]; the first stream's sinks give the row
    scales (the denoiser's), the others are summarised in ``summary.extra``.
    """
    if isinstance(masses, torch.Tensor):
        masses = {None: masses}
    (_, mass), *others = masses.items()
    valid = torch.stack([s.valid for s in states])
    grouped = statistics.scope_mass(mass, settings.sink_scope)
    scores = statistics.sink_scores(
        grouped, valid, threshold_std=settings.sink_threshold_std,
        sharpness=settings.sink_sharpness, kind=settings.sink_score,
    )
    scales = statistics.row_scales(
        scores, valid, selection=settings.sink_selection,
        unstable_variance=settings.unstable_variance,
        generator=content_generator(tokens, settings.seed) if settings.sink_selection == "random" else None,
    )
    summary = statistics.summarize(
        grouped, valid, scores, threshold_std=settings.sink_threshold_std,
        unstable_variance=settings.unstable_variance,
    )
    # Per group and position: how sink-like the position is on average, and how much that moves across states.
    mean, variance = statistics.temporal_stats(scores, valid)
    summary.extra["score_mean"] = mean.round(decimals=4).tolist()
    summary.extra["score_variance"] = variance.round(decimals=4).tolist()
    summary.extra["per_step"] = _per_step(grouped, valid, states, settings.sink_threshold_std)
    if settings.sink_scope == "global":  # the paper's per-layer diagnostics, whatever scope weights the rows
        summary.extra["per_layer"] = {
            "spatial_variance": statistics.spatial_variance(mass, valid).tolist(),
            "centroid_temporal_variance": statistics.centroid_temporal_variance(
                mass, valid, settings.sink_threshold_std).tolist(),
            "dominant_sink_variance": statistics.dominant_sink_variance(mass, valid).tolist(),
        }
    for stream, stream_mass in others:
        summary.extra[f"{stream}_attention"] = _stream_summary(stream_mass, valid, settings)
    return SampleTrajectory(
        tokens=tokens, states=states, scores=scores, row_scales=scales,
        mean_row_scales=statistics.mean_row_scales(scales, valid), summary=summary,
    )


def _checked(tokens: torch.Tensor) -> torch.Tensor:
    tokens = tokens.to(torch.long).cpu()
    if tokens.numel() < 2:
        raise UserError(
            f"A calibration sample has {tokens.numel()} token(s); sink statistics need at least 2 "
            "positions. Remove empty or one-token samples from the dataset"
        )
    return tokens


def _states(
    model: torch.nn.Module, family: Family, tokens: torch.Tensor, settings: TrajectorySettings,
) -> list[DenoisingState]:
    if settings.trajectory == "sampler":
        return family.noise.sampler_states(
            model, tokens, steps=settings.sampler_steps, blocks=settings.sampler_blocks,
            prompt_fraction=settings.prompt_fraction, temperature=settings.sampler_temperature,
            seed=settings.seed,
        )
    return family.noise.forward_noise_states(tokens, levels=settings.noise_levels, eps=settings.noise_eps,
                                        seed=settings.seed)


def run_trajectory(
    model: torch.nn.Module, family: Family, samples: Iterable[torch.Tensor],
    settings: TrajectorySettings, *, layers: dict[str, torch.nn.Module] | None = None, progress: bool = True,
) -> TrajectoryResult:
    """The trajectory phase over clean, unpadded samples (each a 1-D tensor of token ids).

    ``layers`` (the decoder layers, in order) name the probe's records when the model has no module called
    "*Attention" (LLaDA computes attention inline in its blocks): each decoder layer attends exactly once.
    """
    from tqdm import tqdm

    result = TrajectoryResult()
    was_training = model.training
    model.eval()
    try:
        device = _execution_device(model)
        samples = [_checked(tokens) for tokens in samples]
        single_pass = settings.trajectory == "sampler" and family.attention.measures_while_sampling
        # Other samplers (the autoregressive control's KV-cached decoding) run before the probe is installed,
        # and each recorded state is measured by a forward of its own.
        with routed_experts_only():
            sample_states = [] if single_pass else [(t, _states(model, family, t, settings)) for t in samples]
        attention_modules = family.attention.attention_modules(model)
        if attention_modules is None and not discover_attention_modules(model) and layers:
            attention_modules = layers
        probe = AttentionProbe(model, query_chunk_size=settings.query_chunk_size,
                               attention_modules=attention_modules)
        with probe, routed_experts_only():
            names = list(probe.layer_names)
            result.layer_names, result.reported_layer_names = family.attention.split_layers(names)
            # disable is passed only to switch the bar off, so tqdm's own TQDM_DISABLE (sink-prune -q) applies too
            for index in tqdm(range(len(samples)), desc="Sink trajectory", unit="sample",
                              **({} if progress else {"disable": True})):
                if single_pass:
                    tokens = samples[index]
                    states, masses = family.attention.measure_while_sampling(
                        model, probe, lambda tokens=tokens: _states(model, family, tokens, settings))
                else:
                    tokens, states = sample_states[index]
                    masses = measure_states(model, probe, family, states, settings.trajectory_batch_size, device)
                result.samples.append(analyse_sample(tokens, states, masses, settings))
    finally:
        model.train(was_training)
    if not result.samples:
        raise UserError("The calibration set is empty: the trajectory phase needs at least one sample.")
    logger.info(
        f"Sink trajectory ({settings.trajectory}): {len(result.samples)} samples, "
        f"{sum(len(sample.states) for sample in result.samples)} states, "
        f"{len(result.layer_names)} attention layers probed"
    )
    return result
