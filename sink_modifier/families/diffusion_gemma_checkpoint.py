"""DiffusionGemma's checkpoint side: one copy of every shared weight, in a layout transformers reloads.

* **Two streams over one set of weights.** A causal *encoder* writes the prefix into a KV cache; a
  bidirectional *decoder* denoises a canvas against it. Encoder and decoder layers share every weight.
  llm-compressor's ``linearize_moe`` breaks that tie for the routed experts and would prune encoder and decoder
  copies with different masks, so :meth:`SharedWeights.prepare` makes the encoder *call the decoder's modules*
  (attention projections, MLP, router, experts, norms). Each weight is then one module: its hooks see both
  streams, it is pruned once, and ``save_pretrained`` keeps one copy.
* **Fused 3-D experts.** Saved checkpoints keep llm-compressor's per-expert 2-D keys (the compressed-tensors
  / vLLM MoE layout); :func:`register_checkpoint_conversion` teaches transformers to merge them back into
  ``experts.gate_up_proj`` / ``experts.down_proj`` on ``from_pretrained`` (dequantizing FP8 experts through
  transformers' compressed-tensors ``DecompressExperts``).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch
from loguru import logger

from sink_modifier import compat
from sink_modifier.errors import UserError
from sink_modifier.families.base import CheckpointHooks, FamilyError
from sink_modifier.modifiers.scope import NEVER_PRUNED

MODEL_TYPE = "diffusion_gemma"
ENCODER, DECODER = "encoder", "decoder"

def is_diffusion_gemma(model: torch.nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == MODEL_TYPE


def register_checkpoint_conversion() -> None:
    """Let ``from_pretrained`` fuse per-expert 2-D keys (``experts.{e}.gate_proj.weight``) back into experts.

    transformers 5.17 ships no conversion mapping for ``diffusion_gemma``, so a checkpoint written by
    llm-compressor (per-expert keys) reloads with *randomly initialised* experts. The mapping mirrors
    transformers' own ``qwen2_moe`` one. Checkpoints with fused keys (the published bf16 release) match none
    of its patterns and load as before. It changes transformers' process-wide mapping table, so it runs only
    where a DiffusionGemma is loaded (``load_model``, before ``from_pretrained``) or prepared
    (``SharedWeights.prepare``, ``prepare_model``), never at import; call it yourself before a plain
    ``DiffusionGemmaForBlockDiffusion.from_pretrained`` of a checkpoint with quantized experts (idempotent).
    """
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )
    from transformers.core_model_loading import Concatenate, MergeModulelist

    # Load-only: transformers reverts a model's load conversions when it saves, which would rewrite every
    # DiffusionGemma saved in this process (published fused checkpoints included) with per-expert keys.
    FuseExpertsOnLoad = compat.load_only_weight_converter("FuseExpertsOnLoad")
    existing = get_checkpoint_conversion_mapping(MODEL_TYPE) or []
    if any(type(c).__name__ == FuseExpertsOnLoad.__name__ for c in existing):
        return
    mapping = [
        *existing,
        FuseExpertsOnLoad(
            source_patterns=["experts.*.gate_proj.weight", "experts.*.up_proj.weight"],
            target_patterns="experts.gate_up_proj",
            operations=[MergeModulelist(dim=0), Concatenate(dim=1)],
        ),
        FuseExpertsOnLoad(
            source_patterns="experts.*.down_proj.weight",
            target_patterns="experts.down_proj",
            operations=[MergeModulelist(dim=0)],
        ),
    ]
    register_checkpoint_conversion_mapping(MODEL_TYPE, mapping, overwrite=True)


def _text_layers(model: torch.nn.Module) -> tuple[torch.nn.ModuleList, torch.nn.ModuleList]:
    backbone = model.model
    return backbone.encoder.language_model.layers, backbone.decoder.layers


# compressed-tensors' per-module quantization parameters (FP8, INT4/INT8, NVFP4 layouts).
_QUANTIZATION_PARAMETERS = frozenset({
    "weight_scale", "weight_zero_point", "weight_g_idx", "weight_global_scale", "weight_shape", "weight_packed",
    "input_scale", "input_zero_point", "input_global_scale", "output_scale", "output_zero_point",
})


def _module_path(model: torch.nn.Module, module: torch.nn.Module) -> str:
    for name, candidate in model.named_modules(remove_duplicate=False):
        if candidate is module:
            return name
    raise FamilyError(f"{type(module).__name__} is not part of the model")


def _shared_children(decoder_layer: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """(path, module) of every decoder-layer child the encoder layer has a twin of (all but attention)."""
    for name, child in decoder_layer.named_children():
        if name == "self_attn":  # the attention modules differ (the encoder's writes the cache)
            for sub, grandchild in child.named_children():
                yield f"self_attn.{sub}", grandchild
        else:
            yield name, child


class SharedWeights(CheckpointHooks):
    """Prepare, scope and save a DiffusionGemma whose encoder calls the decoder's modules."""

    @staticmethod
    def prepare(model: torch.nn.Module) -> None:
        """Make every encoder weight *the* decoder module, with the experts linearized (idempotent).

        Layer by layer, the decoder's fused experts become llm-compressor's per-expert Linears and the encoder
        is pointed at them at once, so the model never holds two 2-D copies (llm-compressor's own
        ``linearize_moe`` would linearize the tied encoder and decoder experts separately: +45.7 GB at peak
        for the 26B model; call :func:`sink_modifier.prepare_model` before ``oneshot`` to avoid it). The
        backbone's children are reordered decoder-first so that llm-compressor names each shared module by
        its decoder path (``model.decoder.layers.0.experts.3.down_proj``): the name the checkpoint keeps.
        The per-expert conversion is registered here too, so the checkpoint this process writes reloads in it.
        """
        from llmcompressor.modeling.moe.linear_experts import LinearExperts2D

        register_checkpoint_conversion()

        backbone = model.model
        compat.move_child_first(backbone, DECODER)
        encoder_layers, decoder_layers = _text_layers(model)
        shared = 0
        for encoder_layer, decoder_layer in zip(encoder_layers, decoder_layers, strict=True):
            experts = decoder_layer.experts
            if not isinstance(experts, LinearExperts2D):
                config = getattr(experts, "config", model.config.get_text_config())
                linear = LinearExperts2D.get_linear_experts_cls(type(experts)).from_experts_module(experts, config)
                decoder_layer.experts = linear
            for path, module in _shared_children(decoder_layer):
                if encoder_layer.get_submodule(path) is not module:
                    encoder_layer.set_submodule(path, module)
                    shared += 1
        if shared:
            logger.info(f"DiffusionGemma: encoder layers now call the decoder's modules ({shared} ties restored)")

    @staticmethod
    @contextlib.contextmanager
    def saving(model: torch.nn.Module) -> Iterator[None]:
        """Save each shared weight once, under its decoder name, in a checkpoint transformers reloads.

        * The encoder's shared modules are detached while saving: compressed-tensors refuses a module reachable
          under two names ("Attempted to offload a module twice"), and the published checkpoints store the
          decoder's copy only; ``from_pretrained`` ties the encoder's weights to it.
        * Experts that carry no quantization parameters are written fused (``experts.gate_up_proj`` /
          ``experts.down_proj``, the published layout), so the checkpoint loads with plain transformers;
          quantized experts keep llm-compressor's per-expert keys (the compressed-tensors / vLLM MoE layout),
          which :func:`register_checkpoint_conversion` fuses back on load.
        * transformers ties only the parameters a model has when it is built, not the ``weight_scale`` (and
          other quantization parameters) its compressed-tensors loader adds, so the encoder's copies of those
          small tensors are written too; without them the encoder's quantized Linears reload with random
          scales.
        """
        encoder_layers, decoder_layers = _text_layers(model)
        encoder_prefix = _module_path(model, encoder_layers)
        decoder_prefix = _module_path(model, decoder_layers)
        detached = []
        for encoder_layer, decoder_layer in zip(encoder_layers, decoder_layers, strict=True):
            for path, module in _shared_children(decoder_layer):
                parent_path, _, leaf = path.rpartition(".")
                parent = encoder_layer.get_submodule(parent_path) if parent_path else encoder_layer
                if getattr(parent, leaf, None) is module:
                    delattr(parent, leaf)
                    detached.append((parent, leaf, module))

        def add_encoder_qparams(module, state_dict, prefix, local_metadata):
            for key in list(state_dict):
                name = key[len(prefix):]
                if not name.startswith(f"{decoder_prefix}.") or ".experts." in name:
                    continue
                if name.rpartition(".")[2] not in _QUANTIZATION_PARAMETERS:
                    continue
                twin = f"{prefix}{encoder_prefix}.{name[len(decoder_prefix) + 1:]}"
                state_dict[twin] = state_dict[key].clone()  # own storage: not dropped as a tied duplicate

        handles = [model.register_state_dict_post_hook(add_encoder_qparams),
                   model.register_state_dict_post_hook(partial(fuse_unquantized_experts, decoder_prefix))]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for parent, leaf, module in detached:
                setattr(parent, leaf, module)

    @staticmethod
    def finish_checkpoint(model: torch.nn.Module, directory) -> None:
        """Mirror the quantization config's ``ignore`` entries for the encoder's twins (e.g. its routers).

        compressed-tensors lists the modules it left unquantized by name, and each shared module has only its
        decoder name while saving; on reload the encoder's modules are separate and must be ignored too.
        """
        config_path = Path(directory) / "config.json"
        config = json.loads(config_path.read_text())
        quantization = config.get("quantization_config")
        if not quantization or not quantization.get("ignore"):
            return
        encoder_layers, decoder_layers = _text_layers(model)
        encoder_prefix, decoder_prefix = _module_path(model, encoder_layers), _module_path(model, decoder_layers)
        ignore = list(quantization["ignore"])
        for name in quantization["ignore"]:
            if name.startswith(f"{decoder_prefix}."):
                twin = f"{encoder_prefix}.{name[len(decoder_prefix) + 1:]}"
                if twin not in ignore:
                    ignore.append(twin)
        quantization["ignore"] = ignore
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def check_scope(self, names: list[str]) -> None:
        bad = [n for n in names if any(part in n for part in NEVER_PRUNED)]
        if bad:
            raise UserError(
                f"The recipe would prune {bad[:3]}{'...' if len(bad) > 3 else ''}: DiffusionGemma's router, "
                "vision tower, embeddings and LM head are never pruned; add 're:.*router.*' (and the others) "
                "to ignore"
            )


_PER_EXPERT_KEY = re.compile(r"^(?P<experts>.*\.experts)\.(?P<index>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)"
                             r"\.(?P<leaf>.+)$")


def fuse_unquantized_experts(decoder_prefix: str, module, state_dict, prefix, local_metadata) -> None:
    """State-dict hook: per-expert 2-D weights of an unquantized experts module -> the fused 3-D parameters.

    The fused layout is ``DiffusionGemmaTextExperts``' own (``gate_up_proj[e] = [gate; up]``, as llm-compressor's
    ``ExpertMLPWithGate.copy_to_experts_module`` packs it). An experts module with any other per-expert key
    (``weight_scale``, packed or compressed weights) is left in the per-expert layout.
    """
    groups: dict[str, dict[int, dict[str, str]]] = {}
    foreign: set[str] = set()
    for key in state_dict:
        match = _PER_EXPERT_KEY.match(key)
        if match is None or not match["experts"].startswith(f"{prefix}{decoder_prefix}."):
            continue
        if match["leaf"] != "weight":
            foreign.add(match["experts"])
        groups.setdefault(match["experts"], {}).setdefault(int(match["index"]), {})[match["proj"]] = key
    for experts, by_index in groups.items():
        if experts in foreign or sorted(by_index) != list(range(len(by_index))):
            continue
        ordered = [by_index[index] for index in range(len(by_index))]
        if any(set(keys) != {"gate_proj", "up_proj", "down_proj"} for keys in ordered):
            continue
        state_dict[f"{experts}.gate_up_proj"] = torch.stack(
            [torch.cat([state_dict[keys["gate_proj"]], state_dict[keys["up_proj"]]]) for keys in ordered])
        state_dict[f"{experts}.down_proj"] = torch.stack([state_dict[keys["down_proj"]] for keys in ordered])
        for keys in ordered:
            for key in keys.values():
                del state_dict[key]


def prepare_model(model: torch.nn.Module) -> torch.nn.Module:
    """Prepare a DiffusionGemma model for ``oneshot`` before calling it (other models are returned as they are).

    oneshot linearizes MoE experts itself when it finds them fused, which for DiffusionGemma means separate
    2-D copies for the tied encoder and decoder experts until the modifier re-ties them; preparing first keeps
    one copy throughout. The modifier prepares the model anyway, so this only saves memory.
    """
    if is_diffusion_gemma(model):
        SharedWeights.prepare(model)
    return model
