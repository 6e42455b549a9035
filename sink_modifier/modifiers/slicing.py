"""Shrinking Linears in place: keep some output rows or input columns, drop the rest.

Written here because neither torch (``torch.nn.utils.prune`` only masks) nor llm-compressor (REAP removes whole
expert modules) shrinks a Linear. A Linear that a QuantizationModifier of the same recipe has already set up
(its quantization parameters are created when the recipe initializes, for the dense shape) gets its
parameters re-created by compressed-tensors for the new shape; their values are computed later, when that
modifier observes the smaller weight.
"""

from __future__ import annotations

import torch
from compressed_tensors.quantization import QuantizationMetadata, initialize_qparams

from sink_modifier.families.base import PrunableUnits

__all__ = ["keep_columns", "keep_rows", "keep_units", "unit_indices"]


def unit_indices(kept_units: torch.Tensor, span: int) -> torch.Tensor:
    """The rows (or columns) of ``kept_units`` when every unit spans ``span`` consecutive ones."""
    return (kept_units.reshape(-1, 1) * span + torch.arange(span, device=kept_units.device)).reshape(-1)


@torch.no_grad()
def keep_rows(linear: torch.nn.Linear, rows: torch.Tensor) -> None:
    """Keep output rows ``rows`` (sorted) of ``linear``: its weight rows and bias entries."""
    rows = rows.to(linear.weight.device)
    _replace(linear, "weight", linear.weight.index_select(0, rows))
    if linear.bias is not None:
        _replace(linear, "bias", linear.bias.index_select(0, rows))
    linear.out_features = int(rows.numel())
    _reinitialize_qparams(linear)


@torch.no_grad()
def keep_columns(linear: torch.nn.Linear, columns: torch.Tensor) -> None:
    """Keep input columns ``columns`` (sorted) of ``linear``; its bias is per output row and stays."""
    columns = columns.to(linear.weight.device)
    _replace(linear, "weight", linear.weight.index_select(1, columns))
    linear.in_features = int(columns.numel())
    _reinitialize_qparams(linear)


def keep_units(units: PrunableUnits, kept: torch.Tensor) -> None:
    """Keep units ``kept`` (sorted indices) in every Linear that ``units`` spans."""
    for linear, span in units.rows:
        keep_rows(linear, unit_indices(kept, span))
    for linear, span in units.columns:
        keep_columns(linear, unit_indices(kept, span))


def _replace(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, torch.nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def _reinitialize_qparams(linear: torch.nn.Linear) -> None:
    """Re-create the quantization parameters of a quantization-ready Linear for its new shape."""
    scheme = getattr(linear, "quantization_scheme", None)
    if scheme is None:
        return
    weight = linear.weight
    observed = {"input": weight.shape[-1:], "weight": weight.shape, "output": weight.shape[:-1]}
    for base, args in (("input", scheme.input_activations), ("weight", scheme.weights),
                       ("output", scheme.output_activations)):
        if args is None:
            continue
        force_zero_point = hasattr(linear, f"{base}_zero_point")
        for key in QuantizationMetadata.all_qparam_names():
            if key.startswith(f"{base}_") and hasattr(linear, key):
                delattr(linear, key)
        initialize_qparams(linear, base, args, observed_shape=observed[base], observed_dtype=weight.dtype,
                           force_zero_point=force_zero_point)
