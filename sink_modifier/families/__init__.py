"""Model families: what differs between DLM families, one module per family, chosen through a registry.

Adding a dense DLM whose remote code follows LLaDA's or Dream's layout needs no code at all (the ``masked``
family drives it). Adding a family with its own noise, sampler or calibration layout is one module that
implements the roles in ``families.base`` and calls ``register(FamilySpec(...))``; docs/architecture.md says how.
"""

from sink_modifier.families import (  # noqa: F401 (they register)
    autoregressive,
    diffusion_gemma,
    llada2,
    llada_moe,
    masked,
)
from sink_modifier.families.base import (
    AttentionMeasurement,
    CalibrationLayout,
    CheckpointHooks,
    DenoisingState,
    Family,
    FamilyError,
    NoiseProcess,
    Scoring,
    base_model,
    no_cache_kwargs,
    noise_schedule,
    shift_logits,
)
from sink_modifier.families.registry import FamilyOptions, FamilySpec, names, register, resolve, unregister

__all__ = [
    "AttentionMeasurement", "CalibrationLayout", "CheckpointHooks", "DenoisingState", "Family", "FamilyError",
    "FamilyOptions", "FamilySpec", "NoiseProcess", "Scoring", "base_model", "names", "no_cache_kwargs",
    "noise_schedule", "register", "resolve", "shift_logits", "unregister",
]
