"""``trajectory: sampler``: the model's own reverse sampler drives calibration."""

from __future__ import annotations

import json

import pytest
import torch
from llmcompressor import oneshot
from transformers import AutoModelForCausalLM

from conftest import calibration_dataset, load_model
from sink_modifier import SinkAwarePruningModifier
from sink_modifier.calibration.probe import AttentionProbe
from sink_modifier.calibration.trajectory import TrajectorySettings, analyse_sample, measure_states, run_trajectory
from sink_modifier.families import Family
from sink_modifier.families.autoregressive import AutoregressiveControl
from sink_modifier.families.masked import MaskedDiffusion
from sink_modifier.families.sampling import masked_diffusion_sample
from tests.toy import MASK_ID

SAMPLER = dict(trajectory="sampler", sampler_steps=8, sampler_blocks=2, prompt_fraction=0.5)


def test_masked_sampler_states_unmask_step_by_step(dlm_path):
    model = load_model(dlm_path)
    tokens = torch.arange(10, 42)
    states = MaskedDiffusion(MASK_ID).sampler_states(
        model, tokens, steps=8, blocks=2, prompt_fraction=0.5, temperature=0.0, seed=0)
    assert len(states) == 8
    masked = [int((s.input_ids == MASK_ID).sum()) for s in states]
    assert masked[0] == 16 and masked == sorted(masked, reverse=True) and masked[-1] > 0
    assert all(torch.equal(s.input_ids[:16], tokens[:16]) for s in states)  # the prompt is never touched
    assert [s.noise_level for s in states][0] == 1.0


def test_sampler_trajectory_is_reproducible(dlm_path):
    model = load_model(dlm_path)
    adapter = MaskedDiffusion(MASK_ID)
    tokens = torch.arange(10, 42)
    kwargs = dict(steps=8, blocks=2, prompt_fraction=0.5, temperature=0.7, seed=3)
    a = adapter.sampler_states(model, tokens, **kwargs)
    b = adapter.sampler_states(model, tokens, **kwargs)
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("pipeline", ["independent", "diffusion"])
@pytest.mark.slow
def test_sampler_trajectory_through_oneshot(dlm_path, tmp_path, pipeline):
    weights = []
    for run in range(2):
        model = load_model(dlm_path)
        out = tmp_path / f"out{run}"
        oneshot(model=model, dataset=calibration_dataset(dlm_path), pipeline=pipeline, output_dir=str(out),
                recipe=[SinkAwarePruningModifier(sparsity=0.5, mask_structure="2:4", **SAMPLER)])
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        weights.append({n: p for n, p in reloaded.named_parameters() if "layers" in n})
        # the pruned model still generates with the same sampler
        generated = masked_diffusion_sample(reloaded, torch.arange(10, 26), answer_length=8, steps=4,
                                            mask_token_id=MASK_ID).tokens
        assert generated.shape[-1] == 24 and not (generated == MASK_ID).any()
        report = json.loads((out / "sink_report.json").read_text())
        assert report["trajectory"] == "sampler"
        assert report["num_states"] == 8 * 8
        assert all(sample["noise_levels"][0] == 1.0 for sample in report["samples"])
    for name, weight in weights[0].items():
        assert torch.equal(weight, weights[1][name]), name  # same seed, same states, same masks
        if name.endswith("proj.weight"):
            assert bool(((weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1) >= 2).all()), name


def test_autoregressive_sampler_decodes_greedily(ar_path):
    model = load_model(ar_path)
    tokens = torch.arange(10, 30)
    states = AutoregressiveControl().sampler_states(
        model, tokens, steps=5, blocks=1, prompt_fraction=0.5, temperature=0.0, seed=0)
    assert [int(s.valid.sum()) for s in states] == [12, 14, 16, 18, 20]
    assert torch.equal(states[0].input_ids[:10], tokens[:10])
    modifier = SinkAwarePruningModifier(sparsity=0.5, trajectory="sampler", sampler_steps=5)
    oneshot(model=model, dataset=calibration_dataset(ar_path), recipe=[modifier])
    assert modifier.report["family"] == "autoregressive"
    assert modifier.report["aggregate"]["dominant_sink_variance"]["mean"] == [0.0]


def test_sampler_steps_must_fill_blocks():
    with pytest.raises(ValueError, match="multiple of sampler_blocks"):
        SinkAwarePruningModifier(trajectory="sampler", sampler_steps=9, sampler_blocks=2)


def test_masked_sampler_is_measured_in_its_own_forwards(dlm_path):
    """One forward per state: the sampler's forwards are probed, and give what a second pass would."""
    model = load_model(dlm_path)
    adapter = MaskedDiffusion(MASK_ID)
    settings = TrajectorySettings(trajectory="sampler", sampler_steps=8, sampler_blocks=2, prompt_fraction=0.5)
    tokens = torch.arange(10, 42)
    forwards = []
    handle = model.register_forward_hook(lambda *_: forwards.append(1))
    single = run_trajectory(model, Family.of("masked", adapter), [tokens], settings, progress=False).samples[0]
    handle.remove()
    assert len(forwards) == len(single.states) == 8
    states = adapter.sampler_states(model, tokens, steps=8, blocks=2, prompt_fraction=0.5, temperature=0.0, seed=0)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(single.states, states, strict=True))
    with AttentionProbe(model) as probe:
        masses = measure_states(model, probe, Family.of("masked", adapter), states, 8, torch.device("cpu"))
    expected = analyse_sample(tokens, states, masses, settings)
    torch.testing.assert_close(single.scores, expected.scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(single.row_scales, expected.row_scales, atol=1e-5, rtol=1e-5)
