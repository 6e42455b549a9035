"""``SinkAwareExpertPruningModifier``: remove whole routed experts of a mixture-of-experts diffusion LM.

The criterion is llm-compressor 0.14's REAP (``REAPPruningModifier``): an expert's saliency is the router weight
times the norm of its output, ``g_j(x) ||f_j(x)||``, averaged over the tokens routed to it, and the least salient
experts of every MoE layer go. What a DLM needs on top, and why this is not REAP itself:

* **Denoising states, sink-weighted tokens.** The tokens are the ``diffusion`` pipeline's recorded states, and
  each token counts with its sink row scale ``r = 1 - s`` (``calibration.handoff``), so the average is a weighted
  mean, ``sum r g ||f|| / sum r``: with every ``r = 1`` it is REAP's mean exactly. (Wanda's statistics are
  quadratic in a row, so a row scaled by ``r`` counts ``r^2`` there; REAP's are linear in the norm, so ``r``.)
* **The family's experts.** Where experts and routers live, how a router is shrunk (DiffusionGemma's
  ``router.proj`` and ``per_expert_scale``; LLaDA2's expert bias) and which config keys count experts are the
  family's ``experts`` role (``families.moe``), not REAP's name lists; DiffusionGemma's encoder calls the
  decoder's experts, so one module per layer is scored and pruned and the tie holds.
* **Routing constraints refused before calibration**, in one line: fewer experts left than ``top_k``, or groups
  left uneven under group-limited routing (REAP rounds and prunes a different share).

REAP's saliency accumulator, its selection (per group when routing is group-limited) and its cross-rank
reduction are reused as they are (``SinkWeightedSaliency`` only adds the token weights).
"""

from __future__ import annotations

from functools import partial

import torch
from compressed_tensors.offload.dist_utils import is_distributed
from llmcompressor.core import Event, State, active_session
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.pruning.reap.utils import REAPSaliencyTracker
from loguru import logger
from pydantic import Field, PrivateAttr

from sink_modifier import families
from sink_modifier.compat import make_saveable
from sink_modifier.errors import UserError
from sink_modifier.families.moe import MoeBlock, RoutingLimits
from sink_modifier.modifiers.sink_rows import SinkFamilySettings
from sink_modifier.saving.report import save_plan

__all__ = ["SinkAwareExpertPruningModifier", "SinkWeightedSaliency"]


class SinkWeightedSaliency(REAPSaliencyTracker):
    """REAP's per-expert accumulator with a weight per token: ``sum w g ||f||`` and ``sum w`` over routed
    tokens."""

    @torch.no_grad()
    def add(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
            outputs: dict[int, tuple[torch.Tensor, torch.Tensor]], token_weights: torch.Tensor) -> None:
        """One forward: routing ``[N, k]``, each expert's (routed tokens, outputs for them) and token weights
        ``[N]`` (see ``families.moe.Observer``)."""
        if not outputs:
            return
        device = top_k_weights.device
        if self.sum_saliency is None:
            self.sum_saliency = torch.zeros(self.num_experts, dtype=torch.float64, device=device)
            self.count = torch.zeros(self.num_experts, dtype=torch.float64, device=device)
        token_weights = token_weights.to(device=device, dtype=torch.float64)
        for expert, (tokens, rows) in outputs.items():
            tokens = tokens.to(device)
            gate = (top_k_weights.double() * (top_k_index == expert)).sum(dim=-1)[tokens]
            norms = torch.linalg.vector_norm(rows.to(device).float(), dim=-1).double()  # as REAP
            weights = token_weights[tokens]
            self.sum_saliency[expert] += (weights * gate * norms).sum()
            self.count[expert] += weights.sum()

    @property
    def mean_saliency(self) -> torch.Tensor:
        """The weighted mean; 0 for an expert whose routed tokens weigh nothing (REAP clamps counts at 1, which
        would shrink a mean over weights below 1)."""
        if self.sum_saliency is None:
            return torch.zeros(self.num_experts, dtype=torch.float64)
        total, weight = self.sum_saliency.cpu(), self.count.cpu()
        return torch.where(weight > 0, total / weight.clamp(min=torch.finfo(torch.float64).tiny), 0.0)


class SinkAwareExpertPruningModifier(Modifier, SinkFamilySettings):
    """Remove ``sparsity`` of the routed experts of every MoE layer, least salient on the denoising states first.

    ```yaml
    expert_stage:
      expert_modifiers:
        SinkAwareExpertPruningModifier:
          sparsity: 0.25
    ```
    Run it with ``oneshot(..., pipeline="diffusion")``; every field is documented in docs/recipes.md.
    """

    requires_calibration_data: bool = True
    sparsity: float = Field(gt=0.0, lt=1.0)

    _limits: RoutingLimits | None = PrivateAttr(None)
    _drop: int = PrivateAttr(0)
    _blocks: dict[str, MoeBlock] = PrivateAttr(default_factory=dict)
    _trackers: dict[str, SinkWeightedSaliency] = PrivateAttr(default_factory=dict)
    _pruned: dict[str, dict] = PrivateAttr(default_factory=dict)
    _group: object = PrivateAttr(None)

    # ---- lifecycle ----

    def on_initialize(self, state: State, **kwargs) -> bool:
        model = state.model
        calib = state.data.calib
        if calib is None or (hasattr(calib, "__len__") and len(calib) == 0):
            raise UserError("SinkAwareExpertPruningModifier needs calibration data; the calibration set is empty")
        make_saveable(model)
        self._family = families.resolve(model, *self.family_selection())
        self._family.checkpoint.prepare(model)
        self._limits = self._family.experts.routing_limits(model)
        self._drop = self._limits.experts_to_drop(self.sparsity)  # refuses what would break routing
        self._blocks = {block.name: block for block in self._family.experts.moe_blocks(model)}
        if not self._blocks:
            raise UserError(f"{type(model).__name__} has no MoE layer with routed experts to prune")
        for block in self._blocks.values():
            count = sum(name.isdigit() for name, _ in block.experts.named_children())
            if count != self._limits.num_experts:
                raise UserError(f"{block.name} holds {count} experts but the config says "
                                f"{self._limits.num_experts}; was this checkpoint pruned by another tool?")
        if is_distributed():
            import torch.distributed as dist

            self._group = dist.new_group(backend="gloo")
        self._save = save_plan(model, self._family.checkpoint)
        logger.info(f"Expert pruning: {len(self._blocks)} MoE layers, {self._limits.num_experts} routed experts "
                    f"each, {self._drop} to remove per layer")
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        self._calibration = self._handed
        if self._calibration is None:
            raise UserError("SinkAwareExpertPruningModifier scores experts on the recorded denoising states, "
                            "which only the diffusion pipeline feeds: pass pipeline='diffusion' to oneshot "
                            "(sink-prune run --pipeline diffusion)")
        for name, block in self._blocks.items():
            self._trackers[name] = SinkWeightedSaliency(self._limits.num_experts)
            self._family.experts.watch(block, partial(self._observed, name), self.register_hook)

    def on_sequential_epoch_end(self, state: State, event: Event, **kwargs):
        """Remove the experts of every layer that finished calibrating (all at once under the basic pipeline)."""
        for name in sorted(self._trackers):
            tracker = self._trackers[name]
            if tracker.count is None:  # not calibrated yet (a later layer of the sequential pipeline)
                continue
            retained = self._retained(tracker)
            saliency = tracker.mean_saliency
            self._family.experts.remove_experts(state.model, self._blocks[name], retained)
            self._pruned[name] = {"retained": retained, "saliency": [round(float(s), 6) for s in saliency]}
            del self._trackers[name]

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        self.remove_hooks()

    def on_finalize(self, state: State, **kwargs) -> bool:
        missing = sorted(set(self._blocks) - set(self._pruned))
        if missing:
            raise RuntimeError(f"MoE layers {missing[:3]} saw no calibration tokens, so their experts could not "
                               "be scored; the model would be left with uneven layers")
        left = self._limits.num_experts - self._drop
        self._family.experts.rewrite_config(state.model, left)
        report = {"sparsity": self.sparsity, "num_experts_before": self._limits.num_experts,
                  "num_experts_after": left, "layers": dict(sorted(self._pruned.items()))}
        if self._save is not None:
            if self._save.report is None and self._calibration is not None:
                self._save.report = self._calibration.report()
            self._save.sections["expert_pruning"] = report
        self._trackers = {}
        if self._group is not None:
            import torch.distributed as dist

            dist.destroy_process_group(group=self._group)
            self._group = None
        return True

    @property
    def pruned_experts(self) -> dict[str, dict]:
        """Per MoE layer: the experts kept (old indices, in their new order) and every expert's saliency."""
        return dict(self._pruned)

    # ---- hooks ----

    def _observed(self, name: str, top_k_index, top_k_weights, outputs):
        tracker = self._trackers.get(name)
        if tracker is not None:  # None: this layer is pruned already
            tracker.add(top_k_index, top_k_weights, outputs, self._token_weights(name, top_k_index.shape[0]))

    def _token_weights(self, name: str, tokens: int) -> torch.Tensor:
        """This forward's row scales, one per token routed by ``name`` ([B, G, T] of the batch, flattened)."""
        session = active_session().state
        scales = self._calibration.scales.batch_scales(session.current_batch_idx,
                                                       self._calibration.current_stream())
        group = 0 if scales.shape[1] == 1 else self._blocks[name].layer_index
        if group >= scales.shape[1]:
            raise UserError(f"sink_scope 'layer' has {scales.shape[1]} layer groups but {name} is MoE layer "
                            f"{group}; use sink_scope: global")
        weights = scales[:, group].reshape(-1)
        if weights.numel() != tokens:
            raise UserError(f"{name} routed {tokens} tokens but its batch has {weights.numel()} row scales, so "
                            "its tokens cannot be sink-weighted")
        return weights

    # ---- helpers ----

    def _retained(self, tracker: SinkWeightedSaliency) -> list[int]:
        """REAP's selection (per group when routing is group-limited), made on one rank and broadcast."""
        per_group = None if self._limits.n_group is None else self._drop // self._limits.n_group
        if not is_distributed():
            return tracker.compute_retained_experts(self._drop, per_group, self._limits).tolist()
        import torch.distributed as dist
        from compressed_tensors.distributed import get_source_rank, is_source_process

        tracker.reduce_saliency_stats(torch.device("cpu"), group=self._group)
        retained = (tracker.compute_retained_experts(self._drop, per_group, self._limits) if is_source_process()
                    else torch.empty(self._limits.num_experts - self._drop, dtype=torch.int))
        dist.broadcast(retained, src=get_source_rank(), group=self._group)
        return retained.tolist()
