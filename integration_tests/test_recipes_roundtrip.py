"""Every shipped recipe through real ``oneshot`` runs, saved and reloaded with transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from llmcompressor import oneshot
from llmcompressor.recipe import Recipe
from transformers import AutoModelForCausalLM
from transformers.utils.quantization_config import CompressedTensorsConfig

from conftest import calibration_dataset, load_model
from sink_modifier import SinkAwarePruningModifier

# DiffusionGemma's recipe needs a DiffusionGemma model: integration_tests/test_diffusion_gemma.py runs it.
# Structured recipes write smaller models: test_structured_recipe_roundtrip below.
RECIPES = sorted(p for p in (Path(__file__).parents[1] / "recipes").glob("*.yaml")
                 if not p.stem.startswith(("diffusiongemma", "sink_structured"))  # DiffusionGemma: its own test
                 and "experts" not in p.stem)  # needs an MoE: test_expert_pruning.py
STRUCTURED_RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("sink_structured*.yaml"))
pytestmark = pytest.mark.slow  # a real oneshot, save and reload per recipe and pipeline
PRUNED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def pruned_weights(model) -> dict[str, torch.Tensor]:
    return {
        name: param.detach().float().clone()
        for name, param in model.named_parameters()
        if name.endswith(".weight") and any(p in name for p in PRUNED)
    }


def assert_n_of_m(weight: torch.Tensor, n: int, m: int):
    groups = (weight.reshape(weight.shape[0], -1, m) == 0).sum(-1)
    assert bool((groups >= n).all()), f"{int((groups < n).sum())} groups of {m} break {n}:{m}"


def recipe_modifier(path: Path) -> SinkAwarePruningModifier:
    modifiers = Recipe.create_instance(str(path)).modifiers
    (modifier,) = [m for m in modifiers if isinstance(m, SinkAwarePruningModifier)]
    return modifier


@pytest.mark.parametrize("pipeline", ["independent", "diffusion"])
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_roundtrip(dlm_path, tmp_path, recipe, pipeline):
    sink = recipe_modifier(recipe)
    model = load_model(dlm_path)
    dense = pruned_weights(model)
    out = tmp_path / "out"
    oneshot(
        model=model, dataset=calibration_dataset(dlm_path), recipe=str(recipe), pipeline=pipeline,
        output_dir=str(out))

    quantized = "quantization_stage" in recipe.read_text()
    kwargs = {"quantization_config": CompressedTensorsConfig(run_compressed=False)} if quantized else {}
    reloaded = pruned_weights(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **kwargs))
    assert reloaded.keys() == dense.keys()
    n, m = map(int, sink.mask_structure.split(":"))
    for name, weight in reloaded.items():
        if n:
            assert_n_of_m(weight, n, m)
        else:
            sparsity = (weight == 0).float().mean().item()
            assert sparsity == pytest.approx(sink.sparsity, abs=0.02), name
        assert not torch.equal(weight, dense[name])

    report = json.loads((out / "sink_report.json").read_text())
    assert report["family"] == "masked"
    assert report["num_samples"] == 8
    assert report["num_states"] == 8 * sink.noise_levels
    assert set(report["aggregate"]) >= {"spatial_variance", "centroid_temporal_variance"}
    for sample in report["samples"]:  # per position: mean and variance of the sink score across states
        assert len(sample["extra"]["score_variance"][0]) == sample["length"]
    # the recipe saved next to the checkpoint parses again (the modifier is registered under its class name)
    assert recipe_modifier(out / "recipe.yaml").mask_structure == sink.mask_structure


@pytest.fixture(scope="module")
def wide_head_dlm(tmp_path_factory):
    """A toy DLM whose kept widths (128 channels, 2 heads of 64) fit W4A16's group of 128."""
    from tests.toy import build_toy_model

    return build_toy_model(tmp_path_factory.mktemp("wide"), hidden_size=256, intermediate_size=256)


@pytest.mark.parametrize("pipeline", ["independent", "diffusion"])
@pytest.mark.parametrize("recipe", STRUCTURED_RECIPES, ids=lambda p: p.stem)
def test_structured_recipe_roundtrip(wide_head_dlm, tmp_path, recipe, pipeline):
    from sink_modifier import SinkAwareStructuredPruningModifier

    model = load_model(wide_head_dlm)
    out = tmp_path / "out"
    oneshot(model=model, dataset=calibration_dataset(wide_head_dlm), recipe=str(recipe), pipeline=pipeline,
            output_dir=str(out))
    quantized = "quantization_stage" in recipe.read_text()
    kwargs = {"quantization_config": CompressedTensorsConfig(run_compressed=False)} if quantized else {}
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True,
                                                          **kwargs)
    assert not any(info.values()), info
    config = reloaded.config
    assert (config.intermediate_size, config.num_attention_heads, config.num_key_value_heads) == (128, 2, 1)
    assert reloaded.model.layers[0].mlp.down_proj.weight.shape == (256, 128)
    assert "structured" in json.loads((out / "sink_report.json").read_text())
    (parsed,) = [m for m in Recipe.create_instance(str(out / "recipe.yaml")).modifiers
                 if isinstance(m, SinkAwareStructuredPruningModifier)]
    assert parsed.head_sparsity == 0.5


@pytest.mark.parametrize("pipeline", ["independent", "diffusion"])
def test_unquantized_checkpoint_reloads_bit_identical(dlm_path, tmp_path, pipeline):
    model = load_model(dlm_path)
    oneshot(model=model, dataset=calibration_dataset(dlm_path), pipeline=pipeline,
            recipe=[SinkAwarePruningModifier(sparsity=0.5, mask_structure="2:4")])
    in_memory = {n: p.detach().clone() for n, p in model.state_dict().items()}
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "sink_report.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).state_dict()
    for name, tensor in in_memory.items():
        assert torch.equal(reloaded[name], tensor), name
    assert not list(Path(tmp_path / "ckpt").glob("*.bin")), "checkpoints are safetensors only"


def test_autoregressive_control_has_stable_sinks(dlm_path, ar_path):
    reports = {}
    for name, path in (("dlm", dlm_path), ("ar", ar_path)):
        modifier = SinkAwarePruningModifier(sparsity=0.5)
        oneshot(model=load_model(path), dataset=calibration_dataset(path), recipe=[modifier])
        reports[name] = modifier.report
    assert reports["ar"]["family"] == "autoregressive"
    assert reports["dlm"]["family"] == "masked"
    ar, dlm = (reports[k]["aggregate"]["dominant_sink_variance"]["mean"][0] for k in ("ar", "dlm"))
    assert ar == 0.0  # the first token dominates every decoding step
    assert dlm > ar
