"""Sink-aware expert pruning through oneshot on DiffusionGemma: the least salient experts go from encoder and
decoder alike, the config says how many are left, and the checkpoint loads with plain transformers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from llmcompressor import oneshot
from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

from conftest import calibration_dataset
from sink_modifier import SinkAwareExpertPruningModifier, SinkAwarePruningModifier
from sink_modifier.errors import UserError
from tests.toy import build_tiny_diffusion_gemma

TEXTS = [
    "A diffusion language model denoises every position of its canvas at once.",
    "Attention sinks are positions that receive far more attention than others.",
]
PROBE = torch.tensor([[2, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]])


@pytest.fixture(scope="module")
def moe_path(tmp_path_factory):
    """The tiny DiffusionGemma with 8 experts per layer (top-2)."""
    return build_tiny_diffusion_gemma(tmp_path_factory.mktemp("diffusion_gemma_8"), num_experts=8)


def load(path) -> DiffusionGemmaForBlockDiffusion:
    return DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32)


def prune(path, out, recipe, **kwargs):
    model = load(path)
    oneshot(model=model, dataset=calibration_dataset(path, TEXTS), processor=AutoTokenizer.from_pretrained(path),
            recipe=recipe, output_dir=None if out is None else str(out), **{"pipeline": "diffusion", **kwargs})
    return model


def decoder_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.model(input_ids=PROBE[:, :4], decoder_input_ids=PROBE[:, 4:]).last_hidden_state


@pytest.mark.slow
def test_experts_removed_from_both_streams_and_reloaded_without_this_package(moe_path, tmp_path):
    dense = load(moe_path)
    modifier = SinkAwareExpertPruningModifier(sparsity=0.25, noise_levels=2)
    out = tmp_path / "experts"
    pruned = prune(moe_path, out, [modifier])
    assert pruned.config.text_config.num_experts == 6
    assert json.loads((out / "config.json").read_text())["text_config"]["num_experts"] == 6
    for index, (enc, dec) in enumerate(zip(pruned.model.encoder.language_model.layers, pruned.model.decoder.layers,
                                           strict=True)):
        record = modifier.pruned_experts[f"model.decoder.layers.{index}"]
        retained, saliency = record["retained"], torch.tensor(record["saliency"])
        assert sorted(saliency[retained].tolist())[0] >= max(s for j, s in enumerate(saliency.tolist())
                                                             if j not in retained)
        assert enc.experts is dec.experts and enc.router is dec.router  # the tie holds
        assert dec.experts.num_experts == 6 and dec.router.proj.weight.shape[0] == 6
        source = dense.model.decoder.layers[index]
        assert torch.equal(dec.router.proj.weight, source.router.proj.weight[retained])
        assert torch.equal(dec.router.per_expert_scale, source.router.per_expert_scale[retained])
        for new, old in enumerate(retained):  # kept experts are untouched
            gate, up = source.experts.gate_up_proj[old].chunk(2)
            assert torch.equal(dec.experts[new].gate_proj.weight, gate)
            assert torch.equal(dec.experts[new].down_proj.weight, source.experts.down_proj[old])
    report = json.loads((out / "sink_report.json").read_text())
    assert report["expert_pruning"]["num_experts_after"] == 6
    assert report["expert_pruning"]["layers"] == json.loads(json.dumps(modifier.pruned_experts))
    expected = decoder_logits(pruned)

    # a fresh interpreter that never imports this package: no missing or unexpected weight, same outputs
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import DiffusionGemmaForBlockDiffusion
        model, info = DiffusionGemmaForBlockDiffusion.from_pretrained({str(out)!r}, dtype=torch.float32,
                                                                      output_loading_info=True)
        assert not any(info.values()), info
        assert "sink_modifier" not in sys.modules
        layers = zip(model.model.encoder.language_model.layers, model.model.decoder.layers)
        assert all(enc.experts.gate_up_proj is dec.experts.gate_up_proj for enc, dec in layers)
        probe = torch.tensor({PROBE.tolist()})
        with torch.no_grad():
            hidden = model.model(input_ids=probe[:, :4], decoder_input_ids=probe[:, 4:]).last_hidden_state
        torch.save(hidden, {str(tmp_path / "reloaded.pt")!r})
        assert model.generate(probe[:, :4], max_new_tokens=8).sequences.shape == (1, 12)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "reloaded.pt"), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_routed_tokens_and_all_experts_give_the_same_choice(moe_path):
    """llm-compressor's all-experts flag changes which rows each expert computes, not the saliency."""
    choices = []
    for all_experts in (True, False):
        modifier = SinkAwareExpertPruningModifier(sparsity=0.5, noise_levels=2)
        prune(moe_path, None, [modifier], moe_calibrate_all_experts=all_experts)
        choices.append(modifier.pruned_experts)
    for name, record in choices[0].items():
        assert record["retained"] == choices[1][name]["retained"]
        torch.testing.assert_close(torch.tensor(record["saliency"]), torch.tensor(choices[1][name]["saliency"]))


@pytest.mark.slow
def test_with_weight_pruning_in_the_same_recipe(moe_path, tmp_path):
    """Experts are scored and removed while Wanda prunes the kept ones, on the same states."""
    out = tmp_path / "both"
    recipe = [SinkAwareExpertPruningModifier(sparsity=0.25, noise_levels=2),
              SinkAwarePruningModifier(sparsity=0.5, noise_levels=2)]
    pruned = prune(moe_path, out, recipe)
    model = load(out)
    assert model.config.text_config.num_experts == 6
    for dec in model.model.decoder.layers:
        assert dec.experts.gate_up_proj.shape[0] == 6
        assert (dec.experts.gate_up_proj == 0).float().mean() == 0.5
    torch.testing.assert_close(decoder_logits(model), decoder_logits(pruned), rtol=1e-5, atol=1e-5)
    report = json.loads((out / "sink_report.json").read_text())  # both modifiers' parts
    assert report["expert_pruning"]["num_experts_after"] == 6 and report["family"] == "diffusion_gemma"


@pytest.mark.parametrize("kwargs, message", [
    (dict(recipe_sparsity=0.9), "fewer than the 2"),
    (dict(pipeline="basic"), "pipeline='diffusion'"),
])
def test_refused_before_calibration(moe_path, kwargs, message):
    sparsity = kwargs.pop("recipe_sparsity", 0.25)
    with pytest.raises(UserError, match=message):
        prune(moe_path, None, [SinkAwareExpertPruningModifier(sparsity=sparsity)], **kwargs)


@pytest.mark.slow
def test_the_shipped_expert_recipe(moe_path, tmp_path):
    recipe = Path(__file__).parents[1] / "recipes" / "sink_experts_25_wanda_50.yaml"
    prune(moe_path, tmp_path / "out", str(recipe))
    model = load(tmp_path / "out")
    assert model.config.text_config.num_experts == 6
    assert all((layer.experts.down_proj == 0).float().mean() == 0.5 for layer in model.model.decoder.layers)
