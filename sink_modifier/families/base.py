"""What a model family provides, split into the four roles its clients use.

* ``NoiseProcess`` (the trajectory): the states of the forward process and of the model's own sampler.
* ``AttentionMeasurement`` (the trajectory): which attention modules to probe and how to run a state through
  the model so the probe sees it.
* ``CalibrationLayout`` (the pipeline and the modifier): the batches a state becomes, the token streams whose
  rows a forward feeds through shared weights, and the layers that hold each prunable weight once.
* ``CheckpointHooks`` (the modifier and the save path): preparing the model, what must never be pruned, and
  edits around ``save_pretrained``.
* ``LayerWidths`` (the structured modifier): which Linears of a decoder layer form one MLP channel or one
  KV-head group, and the config keys that carry their counts (built per architecture, ``families.structure``).
* ``Scoring`` (``sink-prune eval``, the lm-eval model, the samplers): which likelihood estimator applies, how the
  model's logits line up with the tokens they predict, and how it generates.
* ``ExpertLayout`` (expert pruning, ``families.moe``): where the routed experts are and how to remove some.

The defaults describe a plain transformers model driven by ``model(input_ids=...)`` with one token stream; a
family overrides only what differs. A ``Family`` bundles one implementation of each role under a name; the
registry (``families.registry``) picks one for a model.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from sink_modifier.errors import UserError
from sink_modifier.families.moe import ExpertLayout
from sink_modifier.hooks import removing


class FamilyError(UserError):
    """The model cannot be driven the way the recipe asks; the message says what to change."""


@dataclass(frozen=True)
class DenoisingState:
    """One forward of the trajectory: the tokens the model sees and which positions count.

    ``valid`` marks the positions that are part of this state (as queries and as keys): padding is never valid,
    and the autoregressive control marks only the prefix decoded so far. ``noise_level`` is the share of the
    sequence still to be denoised (1 at the start of generation, falling to 0 in every family).
    """

    input_ids: torch.Tensor  # [T] long
    valid: torch.Tensor  # [T] bool
    step: int
    noise_level: float


def noise_schedule(levels: int, eps: float) -> Iterator[tuple[int, float, float]]:
    """``(k, t_k, p_k)`` for k = 1..K: noise level ``t_k = k / K`` and corruption probability
    ``p_k = (1 - eps) t_k + eps`` (LLaDA's and DiffusionGemma's forward processes, as the reference code)."""
    for k in range(1, levels + 1):
        t = k / levels
        yield k, t, (1.0 - eps) * t + eps


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The backbone without the LM head: its logits are not needed to measure attention."""
    base = getattr(model, "base_model", model)
    return base if isinstance(base, torch.nn.Module) else model


def no_cache_kwargs(module: torch.nn.Module) -> dict:
    """``use_cache=False`` where the forward takes it: a trajectory forward never needs a KV cache."""
    parameters = inspect.signature(module.forward).parameters
    takes = "use_cache" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    return {"use_cache": False} if takes else {}


class NoiseProcess:
    """The states a family's model visits while it denoises one clean, unpadded sample ``tokens`` [T]."""

    #: False for a model driven only as a control (the autoregressive family): recipes that meant a DLM are warned
    is_diffusion: ClassVar[bool] = True

    def forward_noise_states(
        self, tokens: torch.Tensor, *, levels: int, eps: float, seed: int
    ) -> list[DenoisingState]:
        raise NotImplementedError

    def sampler_states(
        self, model: torch.nn.Module, tokens: torch.Tensor, *, steps: int, blocks: int,
        prompt_fraction: float, temperature: float, seed: int,
    ) -> list[DenoisingState]:
        """The states the model's own sampler visits when it completes the sample's prompt (the first
        ``prompt_fraction`` of the sample; the sampler writes the rest, same length)."""
        raise FamilyError(f"{type(self).__name__} has no sampler; use trajectory: forward_noise")


class AttentionMeasurement:
    """How the trajectory phase runs states through the model under the attention probe."""

    #: whether the sampler's own forwards can be measured (one full forward per recorded state) instead of a
    #: second forward per state
    measures_while_sampling: ClassVar[bool] = False

    def attention_modules(self, model: torch.nn.Module) -> dict[str, torch.nn.Module] | None:
        """The attention modules to probe, in order (None: every module named "*Attention")."""
        return None

    @staticmethod
    def split_layers(names: list[str]) -> tuple[list[str], list[str]]:
        """(attention layers whose sinks weight the rows, layers only reported)."""
        return list(names), []

    def query_mask(self, states: list[DenoisingState]) -> torch.Tensor | None:
        """Which query rows count when measuring attention mass (None: all)."""
        return None

    @torch.no_grad()
    def measure(
        self, model: torch.nn.Module, probe, states: list[DenoisingState], batch_size: int, device: torch.device,
    ) -> dict[str | None, torch.Tensor]:
        """Attention mass [S, L, T] of one sample's states (equal lengths, so batched without padding)."""
        backbone = base_model(model)
        no_cache = no_cache_kwargs(backbone)
        masses = []
        for start in range(0, len(states), batch_size):
            batch = states[start : start + batch_size]
            input_ids = torch.stack([s.input_ids for s in batch]).to(device)
            query_mask = self.query_mask(batch)
            probe.query_mask = None if query_mask is None else query_mask.to(device)
            with probe.stopping_after_last_layer():
                backbone(input_ids=input_ids, **no_cache)
            masses.append(probe.pop_masses())
        probe.query_mask = None
        return {None: torch.cat(masses)}

    def measure_while_sampling(
        self, model: torch.nn.Module, probe, sample: Callable[[], list[DenoisingState]],
    ) -> tuple[list[DenoisingState], dict[str | None, torch.Tensor]]:
        """Run ``sample()`` under the probe and keep each forward's masses (for samplers that make exactly one
        full forward per recorded state, on that state's tokens)."""
        masses = []
        with removing(model.register_forward_hook(lambda *_: masses.append(probe.pop_masses()))):
            states = sample()
        if len(masses) != len(states):
            raise RuntimeError(f"the sampler made {len(masses)} forwards for {len(states)} recorded states")
        return states, {None: torch.cat(masses)}


class CalibrationLayout:
    """How recorded states become llm-compressor calibration batches, and whose rows each forward feeds."""

    #: the token streams whose rows a calibration forward feeds through shared weights (None: one stream)
    streams: ClassVar[tuple[str | None, ...]] = (None,)

    @property
    def needs_state_pipeline(self) -> bool:
        """Whether only the ``diffusion`` pipeline can feed this family (several streams per forward)."""
        return len(self.streams) > 1

    def layer_targets(self, model: torch.nn.Module) -> list[str] | None:
        """The layers that hold each prunable weight once (None: llm-compressor's sequential targets)."""
        return None

    def calibration_batches(self, states: list[DenoisingState]) -> list[dict]:
        # States are never padded; an all-ones attention mask would only make transformers build an
        # explicit (slow, vmap-based) mask for every batch.
        return [{"input_ids": state.input_ids.unsqueeze(0)} for state in states]

    @staticmethod
    def stream_scales(state: DenoisingState, scales: torch.Tensor) -> dict[str | None, torch.Tensor]:
        """A state's row scales [G, T] keyed by stream."""
        return {None: scales}

    @contextlib.contextmanager
    def calibrating(
        self, model: torch.nn.Module, states: list[DenoisingState]
    ) -> Iterator[Callable[[], str | None]]:
        """Around the pipeline's forwards over ``states``; yields a function naming the running stream."""
        yield lambda: None


class CheckpointHooks:
    """What a family needs before calibration and around saving."""

    def prepare(self, model: torch.nn.Module) -> None:
        """Bring the model into the form calibration needs (before targets are resolved; idempotent)."""

    def output_head(self, model: torch.nn.Module) -> str | None:
        """The module name of the LM head (no recipe may prune or quantize it): the module that
        ``get_output_embeddings()`` returns (LLaDA's ``model.transformer.ff_out``, most models' ``lm_head``)."""
        getter = getattr(model, "get_output_embeddings", None)
        head = getter() if callable(getter) else None
        return next((name for name, module in model.named_modules() if module is head), None) if head else None

    def check_scope(self, names: list[str]) -> None:
        """Refuse modules of this family that must never be pruned."""

    def saving(self, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        """Context around ``save_pretrained``."""
        return contextlib.nullcontext()

    def finish_checkpoint(self, model: torch.nn.Module, directory) -> None:
        """Last edits to a saved (still staged) checkpoint directory."""


def shift_logits(logits: torch.Tensor, shift: int) -> torch.Tensor:
    """Logits realigned so that position ``i`` holds the prediction of token ``i`` when the model emits it at
    ``i - shift`` (Dream: 1, as its ``generation_utils.py`` does: the first ``shift`` positions repeat position 0,
    which predicts nothing the scorers use)."""
    if shift == 0:
        return logits
    return torch.cat([logits[:, :1].expand(-1, shift, -1), logits[:, :-shift]], dim=1)


class Scoring:
    """How the evaluators score and sample a family's model.

    ``likelihood``: ``"elbo"`` (the masked-diffusion bound, with ``mask_token_id``), ``"causal"`` (exact
    next-token likelihood) or None (no estimator: ``refusal`` says why, in one line). ``generation``:
    ``"masked"`` (``sampling.masked_diffusion_sample``), ``"causal"`` (``model.generate``) or ``"own"`` (the
    model's own ``generate()``, writing whole canvases of ``canvas_length``). ``logit_shift``: how many positions
    the model's logits lag the token they predict (0: logits at ``i`` score token ``i`` for a masked DLM, token
    ``i + 1`` for a causal LM, as usual).
    """

    likelihood: ClassVar[str | None] = "causal"
    generation: ClassVar[str] = "causal"
    logit_shift: ClassVar[int] = 0
    mask_token_id: int | None = None

    @property
    def refusal(self) -> str:
        return f"{type(self).__name__} has no likelihood estimator"

    def token_logits(self, model: torch.nn.Module, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] aligned by ``logit_shift`` (one forward, no KV cache)."""
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
        logits = model(input_ids=input_ids, **kwargs, **no_cache_kwargs(model)).logits
        return shift_logits(logits, self.logit_shift)

    def canvas_length(self, model: torch.nn.Module) -> int | None:
        """Tokens one ``"own"`` generation writes at a time (None: any length)."""
        return None


@dataclass(frozen=True)
class PrunableUnits:
    """The structured units of one decoder layer (MLP channels or KV-head groups): every Linear whose output
    rows (``rows``) or input columns (``columns``) the units own, with how many consecutive rows / columns one
    unit spans in it. Removing unit ``u`` removes those rows and columns in every listed Linear together."""

    count: int
    rows: tuple[tuple[torch.nn.Linear, int], ...]
    columns: tuple[tuple[torch.nn.Linear, int], ...]


class LayerWidths:
    """Structured pruning's view of an architecture (the default knows none and refuses)."""

    def check(self, config, *, channels: bool, heads: bool) -> None:
        """Refuse (one line) a shape change this architecture's config cannot describe."""
        raise FamilyError("structured pruning does not know this model family's layers")

    def sizes(self, config) -> tuple[int, int, int]:
        """(MLP channels, query heads, KV heads) of every layer."""
        raise NotImplementedError

    def channels(self, layer: torch.nn.Module) -> PrunableUnits:
        raise NotImplementedError

    def kv_groups(self, layer: torch.nn.Module, config) -> PrunableUnits:
        raise NotImplementedError

    def rewrite_config(self, config, *, channels: int, heads: int, kv_heads: int) -> dict:
        """Make ``config`` describe layers of the new widths; returns the fields set."""
        raise NotImplementedError


@dataclass(frozen=True)
class Family:
    """One model family: a name and an implementation of each role (one object may play several)."""

    name: str
    noise: NoiseProcess
    attention: AttentionMeasurement
    calibration: CalibrationLayout
    checkpoint: CheckpointHooks
    scoring: Scoring = field(default_factory=Scoring)
    structure: LayerWidths = field(default_factory=LayerWidths)
    experts: ExpertLayout = field(default_factory=ExpertLayout)

    @classmethod
    def of(cls, name: str, implementation, structure: LayerWidths | None = None) -> Family:
        """A family whose roles are all played by ``implementation`` (scoring: the default causal scoring unless
        it implements ``Scoring``; ``structure`` is per architecture; experts: REAP's conventions unless it
        implements ``ExpertLayout``)."""
        scoring = implementation if isinstance(implementation, Scoring) else Scoring()
        experts = implementation if isinstance(implementation, ExpertLayout) else ExpertLayout()
        return cls(name, implementation, implementation, implementation, implementation, scoring=scoring,
                   structure=structure or LayerWidths(), experts=experts)
