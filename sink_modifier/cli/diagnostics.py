"""Does sink-awareness matter on *this* model? A cheap answer before an expensive comparison.

Sink weighting only changes a pruning decision when the rows it down-weights carry a real share of a Linear
input's energy. On small models with norm-equalising blocks (QK-norm, post-sublayer norms) sinks carry none,
and sink-aware Wanda is plain Wanda under another name; on models with massive activations on their sink
tokens it can change many decisions. Three measurements per decoder layer, over the trajectory's states:

* **moved decisions**: the share of weights whose keep/prune decision differs between Wanda on the states
  with and without the sink row scales, at the recipe's sparsity and structure (llm-compressor's own mask
  selection, ``sparsify_weight``, run twice);
* **sink input share**: the share of each Linear input's squared norm that comes from sink rows;
* **sink norm ratio**: the mean hidden-state norm of sink tokens over the median token's, at the layer output
  (massive activations show as ratios of 100 and more).

Sink rows are a state's hard sink set (score above 0.5, i.e. attention mass above the sink threshold).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from sink_modifier.calibration.trajectory import TrajectoryResult
from sink_modifier.compat import sparsify_weight
from sink_modifier.families import base_model, no_cache_kwargs

__all__ = ["diagnose", "moved_decisions", "verdict"]

QUIET_BELOW = 0.01  # below 1% of decisions moved, sink-aware and plain Wanda prune nearly the same weights


def moved_decisions(module: torch.nn.Linear, plain: torch.Tensor, weighted: torch.Tensor, *, sparsity: float,
                    prune_n: int = 0, prune_m: int = 0) -> float:
    """Share of ``module``'s weights pruned by one Wanda statistic and kept by the other (column statistics
    ``plain`` and ``weighted``, sums of squared input rows; their scale does not matter)."""
    masks = [sparsify_weight(module, {module: stat.float()}, sparsity, prune_n, prune_m) == 0
             for stat in (plain, weighted)]
    return float((masks[0] != masks[1]).float().mean())


class _Accumulator:
    """Per Linear: column sums of x^2 without and with the row scales, and the squared norm of sink rows."""

    def __init__(self):
        self.plain: dict[torch.nn.Module, torch.Tensor] = {}
        self.weighted: dict[torch.nn.Module, torch.Tensor] = {}
        self.sink = defaultdict(float)
        self.total = defaultdict(float)
        self.scales: torch.Tensor | None = None  # [B, T] for the current batch and layer group
        self.sinks: torch.Tensor | None = None  # [B, T] bool
        self.valid: torch.Tensor | None = None  # [B, T] bool

    def linear_hook(self, module, args, output):
        x = args[0].float()
        valid = self.valid.to(x.device)
        rows = x * valid.unsqueeze(-1)
        squared = rows.pow(2)
        plain = squared.sum(dim=(0, 1))
        weighted = (squared * self.scales.to(x.device).pow(2).unsqueeze(-1)).sum(dim=(0, 1))
        self.plain[module] = self.plain.get(module, 0) + plain.cpu()
        self.weighted[module] = self.weighted.get(module, 0) + weighted.cpu()
        row_energy = squared.sum(-1)
        self.sink[module] += float(row_energy[self.sinks.to(x.device)].sum())
        self.total[module] += float(row_energy.sum())


@torch.no_grad()
def diagnose(
    model: torch.nn.Module, result: TrajectoryResult, layers: dict[str, torch.nn.Module], *, sparsity: float = 0.5,
    mask_structure: str = "0:0", batch_size: int = 8,
) -> dict:
    """The three measurements per decoder layer over ``result``'s states (one dense forward per state).

    ``layers`` are the decoder layers in order; every ``nn.Linear`` inside them is measured. With
    ``sink_scope: layer`` results, layer ``i`` uses group ``i``'s scales and sinks; otherwise group 0's.
    """
    prune_n, prune_m = (int(v) for v in mask_structure.split(":"))
    names = list(layers)
    linears = {module: (index, f"{names[index]}.{name}") for index, layer in enumerate(layers.values())
               for name, module in layer.named_modules() if isinstance(module, torch.nn.Linear)}
    accumulators = [_Accumulator() for _ in names]
    norm_ratios: list[list[float]] = [[] for _ in names]
    groups = result.samples[0].row_scales.shape[1]
    current: dict = {}

    def layer_output(index):
        def hook(module, args, output):
            hidden = (output[0] if isinstance(output, tuple | list) else output).float()
            norms = hidden.norm(dim=-1).cpu()
            sinks, valid = current["sinks"][:, _group(index, groups)], current["valid"]
            for row, row_norms in enumerate(norms):
                if sinks[row].any():
                    ratio = row_norms[sinks[row]].mean() / row_norms[valid[row]].median()
                    norm_ratios[index].append(float(ratio))
        return hook

    def linear_hook(module, args, output):
        index, _ = linears[module]
        accumulator = accumulators[index]
        group = _group(index, groups)
        accumulator.scales, accumulator.sinks = current["scales"][:, group], current["sinks"][:, group]
        accumulator.valid = current["valid"]
        accumulator.linear_hook(module, args, output)

    backbone = base_model(model)
    device = next(model.parameters()).device
    handles = [module.register_forward_hook(linear_hook) for module in linears]
    handles += [layer.register_forward_hook(layer_output(i)) for i, layer in enumerate(layers.values())]
    was_training = model.training
    model.eval()
    try:
        for sample in result.samples:
            for start in range(0, len(sample.states), batch_size):
                batch = sample.states[start : start + batch_size]
                current["scales"] = sample.row_scales[start : start + batch_size]
                current["sinks"] = sample.scores[start : start + batch_size] > 0.5
                current["valid"] = torch.stack([s.valid for s in batch])
                input_ids = torch.stack([s.input_ids for s in batch]).to(device)
                backbone(input_ids=input_ids, **no_cache_kwargs(backbone))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    per_layer, moved_total, weights_total = [], 0.0, 0
    for index, name in enumerate(names):
        accumulator = accumulators[index]
        entries = {}
        for module, (layer_index, full_name) in linears.items():
            if layer_index != index or module not in accumulator.plain:
                continue
            moved = moved_decisions(module, accumulator.plain[module], accumulator.weighted[module],
                                    sparsity=sparsity, prune_n=prune_n, prune_m=prune_m)
            share = accumulator.sink[module] / accumulator.total[module] if accumulator.total[module] else 0.0
            entries[full_name] = {"moved_decisions": moved, "sink_input_share": share}
            moved_total += moved * module.weight.numel()
            weights_total += module.weight.numel()
        layer_weights = {n: m.weight.numel() for m, (i, n) in linears.items() if i == index and n in entries}
        size = sum(layer_weights.values()) or 1
        ratios = norm_ratios[index]
        per_layer.append({
            "layer": name,
            "moved_decisions": sum(e["moved_decisions"] * layer_weights[n] for n, e in entries.items()) / size,
            "sink_input_share": sum(e["sink_input_share"] for e in entries.values()) / max(len(entries), 1),
            "sink_norm_ratio": sum(ratios) / len(ratios) if ratios else None,
            "linears": entries,
        })
    moved = moved_total / weights_total if weights_total else 0.0
    return {"sparsity": sparsity, "mask_structure": mask_structure, "moved_decisions": moved,
            "verdict": verdict(moved), "layers": per_layer}


def _group(index: int, groups: int) -> int:
    return index if groups > 1 else 0


def verdict(moved: float) -> str:
    """One line for the summary."""
    if moved < QUIET_BELOW:
        return (f"sink weighting moves {moved:.1%} of Wanda's mask decisions on this model: expect little "
                "difference from plain Wanda on the same states")
    return (f"sink weighting moves {moved:.1%} of Wanda's mask decisions on this model: sink-aware and plain "
            "Wanda prune noticeably different weights; compare them on held-out data before choosing")
