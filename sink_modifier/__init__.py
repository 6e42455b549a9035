"""Sink-aware pruning for diffusion language models, as an llm-compressor plugin.

``import sink_modifier`` registers ``SinkAwarePruningModifier``, ``SinkAwareStructuredPruningModifier`` and
``SinkAwareExpertPruningModifier`` with llm-compressor's ``ModifierFactory`` (under their class names, so recipes
and the ``recipe.yaml`` saved next to a checkpoint both parse) and the ``diffusion`` calibration pipeline. It
changes no table of transformers: the conversion that reloads per-expert DiffusionGemma checkpoints is registered
where such a model is loaded (``load_model``) or prepared (``prepare_model``, the modifiers), or by calling
``register_checkpoint_conversion()``.
"""

from llmcompressor.modifiers.factory import ModifierFactory

from sink_modifier.calibration.pipeline import DiffusionPipeline
from sink_modifier.families.diffusion_gemma_checkpoint import prepare_model, register_checkpoint_conversion
from sink_modifier.loading.checkpoints import load_model, load_model_and_tokenizer
from sink_modifier.modifiers.experts import SinkAwareExpertPruningModifier
from sink_modifier.modifiers.structured import SinkAwareStructuredPruningModifier
from sink_modifier.modifiers.weight_pruning import SinkAwarePruningModifier

__all__ = [
    "SinkAwarePruningModifier", "SinkAwareStructuredPruningModifier", "SinkAwareExpertPruningModifier",
    "DiffusionPipeline", "load_model", "load_model_and_tokenizer", "prepare_model",
    "register_checkpoint_conversion", "__version__",
]
__version__ = "0.1.0"

ModifierFactory.register(SinkAwarePruningModifier.__name__, SinkAwarePruningModifier)
ModifierFactory.register(SinkAwareStructuredPruningModifier.__name__, SinkAwareStructuredPruningModifier)
ModifierFactory.register(SinkAwareExpertPruningModifier.__name__, SinkAwareExpertPruningModifier)
