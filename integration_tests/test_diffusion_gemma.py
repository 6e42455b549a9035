"""DiffusionGemma end to end: its own sampler as the forward loop, shared encoder/decoder weights, experts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from llmcompressor import oneshot
from safetensors import safe_open
from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion
from transformers.utils.quantization_config import CompressedTensorsConfig

from conftest import calibration_dataset
from sink_modifier import SinkAwarePruningModifier, families
from sink_modifier.calibration.probe import AttentionProbe
from sink_modifier.calibration.trajectory import TrajectorySettings, run_trajectory
from sink_modifier.families.diffusion_gemma import DiffusionGemma
from sink_modifier.families.diffusion_gemma_checkpoint import SharedWeights

RECIPE = Path(__file__).parents[1] / "recipes" / "diffusiongemma_sink_2of4_fp8.yaml"
SAMPLER = dict(trajectory="sampler", sampler_steps=6, sampler_blocks=2, prompt_fraction=0.5)
TEXTS = [  # 3 short samples keep the suite fast; each is longer than the sliding window (16) plus the canvas
    "A diffusion language model denoises every position of its canvas at once.",
    "Attention sinks are positions that receive far more attention than others.",
    "Two of every four weights are zero in the semi-structured pattern.",
]


def load(path, **kwargs) -> DiffusionGemmaForBlockDiffusion:
    return DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32, **kwargs)


def run_oneshot(path, out, recipe, **kwargs):
    model = load(path)
    oneshot(model=model, dataset=calibration_dataset(path, TEXTS), processor=AutoTokenizer.from_pretrained(path),
            recipe=recipe, pipeline="diffusion", output_dir=str(out), **kwargs)
    return model


def layers(model):
    return model.model.encoder.language_model.layers, model.model.decoder.layers


def assert_2_of_4(weight: torch.Tensor, name: str):
    groups = (weight.reshape(-1, 4) == 0).sum(-1)
    assert bool((groups >= 2).all()), f"{name}: {int((groups < 2).sum())} groups of 4 break 2:4"


def test_sampler_states_follow_generate_and_are_reproducible(diffusion_gemma_path):
    model = load(diffusion_gemma_path)
    adapter = DiffusionGemma(model)
    tokens = torch.arange(10, 42)
    kwargs = dict(steps=6, blocks=2, prompt_fraction=0.5, temperature=0.0, seed=3)
    first = adapter.sampler_states(model, tokens, **kwargs)
    second = adapter.sampler_states(model, tokens, **kwargs)
    assert 2 <= len(first) <= 6  # up to 6 / 2 steps per canvas; the entropy-bound early stop may end one sooner
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and a.prefix_length == b.prefix_length
        assert (a.self_conditioning is None) == (b.self_conditioning is None)
        if a.self_conditioning is not None:
            assert torch.equal(a.self_conditioning, b.self_conditioning)
    # the prompt never changes; the second canvas sees the first one in its prefix
    assert all(torch.equal(s.prefix[:16], tokens[:16]) for s in first)
    assert {s.prefix_length for s in first} == {16, 24}
    # every block starts without self-conditioning and feeds each later step the previous step's signal
    starts = {i for i, s in enumerate(first) if i == 0 or s.prefix_length != first[i - 1].prefix_length}
    assert all(first[i].self_conditioning is None for i in starts)
    assert all(s.self_conditioning.shape == (8, model.config.text_config.hidden_size)
               for i, s in enumerate(first) if i not in starts)
    # recording does not disturb generation: the same seed outside the recorder gives the same tokens
    from sink_modifier.seeding import content_generator

    torch.manual_seed(content_generator(tokens, 3).initial_seed())
    sequence = model.generate(tokens[None, :16], max_new_tokens=16, max_denoising_steps=3).sequences[0]
    last_block = [s for s in first if s.prefix_length == 24]
    assert torch.equal(sequence[:24], last_block[0].prefix)


def test_decoder_masses_sit_at_absolute_positions(diffusion_gemma_path):
    """Sliding layers see only the last window - 1 prefix keys; the probe's mass equals eager attention's."""
    model = load(diffusion_gemma_path)
    adapter = DiffusionGemma(model)
    tokens = torch.arange(10, 50)  # prefix 32 > window 16
    (state,) = adapter.forward_noise_states(tokens, levels=1, eps=0.0, seed=0)
    probe = AttentionProbe(model, attention_modules=adapter.attention_modules(model))
    with probe:
        masses = adapter.measure(model, probe, [state], 1, torch.device("cpu"))
    decoder = masses["decoder"][0]  # [L, T]
    prefix, length = state.prefix_length, tokens.numel()
    heads = model.config.text_config.num_attention_heads
    torch.testing.assert_close(decoder.sum(-1), torch.full((2,), 8.0 * heads))  # canvas queries x heads
    window = model.config.text_config.sliding_window
    assert decoder[0, : prefix - (window - 1)].abs().sum() == 0 and decoder[0, prefix - (window - 1):].gt(0).all()
    assert decoder[1].gt(0).all()  # the full-attention layer sees the whole prefix
    encoder = masses["encoder"][0]
    assert encoder[:, prefix:].abs().sum() == 0 and encoder[:, :prefix].sum(-1).allclose(
        torch.full((2,), float(prefix * heads)))
    # eager attention weights over the same forward, columns summed
    model.set_attn_implementation("eager")
    out = model.model(**adapter.model_inputs(state, torch.device("cpu")), output_attentions=True)
    for layer, weights in enumerate(out.attentions):
        expected = torch.zeros(length)
        column_mass = weights[0].sum(dim=(0, 1))
        expected[length - column_mass.numel():] = column_mass
        torch.testing.assert_close(decoder[layer], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_sampler_trajectory_through_oneshot(diffusion_gemma_path, tmp_path):
    """Pruned through oneshot on generate()'s own states, saved, reloaded, generating; same seed, same masks."""
    dense = load(diffusion_gemma_path)
    reloaded = []
    for run in range(2):
        out = tmp_path / f"out{run}"
        pruned = run_oneshot(diffusion_gemma_path, out, [
            SinkAwarePruningModifier(sparsity=0.5, mask_structure="2:4", method="sparsegpt", **SAMPLER)])
        model = load(out)
        encoder, decoder = layers(model)
        for linear_experts, dec in zip((layer.experts for layer in layers(pruned)[1]), decoder, strict=True):
            # the fused experts reloaded: exactly the pruned weights
            experts = list(linear_experts)[: linear_experts.num_experts]
            assert torch.equal(dec.experts.down_proj, torch.stack([e.down_proj.weight for e in experts]))
            assert torch.equal(dec.experts.gate_up_proj, torch.stack(
                [torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in experts]))
        for enc, dec in zip(encoder, decoder, strict=True):
            # one weight, two streams: still the same tensors after reload
            assert enc.experts.gate_up_proj is dec.experts.gate_up_proj
            assert enc.self_attn.q_proj.weight is dec.self_attn.q_proj.weight
            for name in ("gate_up_proj", "down_proj"):  # fused experts, pruned 2:4 along the input dim
                assert_2_of_4(getattr(dec.experts, name), name)
                assert (getattr(dec.experts, name) == 0).float().mean() == 0.5
            for name in ("q_proj", "k_proj", "o_proj"):
                assert_2_of_4(getattr(dec.self_attn, name).weight, name)
            assert_2_of_4(dec.mlp.down_proj.weight, "mlp.down_proj")
        for i, dec in enumerate(decoder):  # the router is never pruned
            assert torch.equal(dec.router.proj.weight, layers(dense)[1][i].router.proj.weight)
        assert torch.equal(model.lm_head.weight, dense.lm_head.weight)
        sequence = model.generate(torch.tensor([[2, 10, 11, 12]]), max_new_tokens=8).sequences
        assert sequence.shape == (1, 12)
        report = json.loads((out / "sink_report.json").read_text())
        assert report["family"] == "diffusion_gemma" and report["trajectory"] == "sampler"
        assert report["layers"] == ["model.decoder.layers.0.self_attn", "model.decoder.layers.1.self_attn"]
        assert len(report["reported_layers"]) == 2  # the encoder's attention, reported separately
        for sample in report["samples"]:
            steps = sample["extra"]["per_step"]
            assert len(steps) == len(sample["noise_levels"]) <= 6
            assert all({"dominant_position", "num_sinks", "noise_level"} <= set(s) for s in steps)
            assert "spatial_variance" in sample["extra"]["encoder_attention"]
            assert len(sample["extra"]["per_layer"]["centroid_temporal_variance"]) == 2  # decoder layers
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            keys = list(f.keys())
        assert not [k for k in keys if "encoder.language_model.layers" in k and "layer_scalar" not in k]
        # unquantized experts are written fused (the published layout: plain transformers reloads them)
        assert "model.decoder.layers.0.experts.gate_up_proj" in keys
        assert not [k for k in keys if ".experts.3." in k]
        reloaded.append(({k: v.clone() for k, v in model.state_dict().items()}, report))
    (first, first_report), (second, second_report) = reloaded
    assert first_report == second_report  # same states, same sink statistics
    for name, tensor in first.items():  # same masks (SparseGPT's updates follow llm-compressor's shuffled order)
        assert torch.equal(tensor == 0, second[name] == 0), name


@pytest.mark.slow
def test_fp8_recipe_reloads_experts_exactly(diffusion_gemma_path, tmp_path):
    """The shipped recipe: 2:4 + FP8_DYNAMIC, per-expert FP8 keys fused back by from_pretrained, bit for bit."""
    out = tmp_path / "fp8"
    run_oneshot(diffusion_gemma_path, out, str(RECIPE))
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "float-quantized"
    assert "model.encoder.language_model.layers.0.router.proj" in config["ignore"]
    model = load(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    encoder, decoder = layers(model)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        def dequantized(key):
            return f.get_tensor(f"{key}.weight").float() * f.get_tensor(f"{key}.weight_scale").float()

        for index, dec in enumerate(decoder):
            prefix = f"model.decoder.layers.{index}.experts"
            experts = range(model.config.text_config.num_experts)
            gate_up = torch.stack([torch.cat([dequantized(f"{prefix}.{e}.gate_proj"),
                                              dequantized(f"{prefix}.{e}.up_proj")]) for e in experts])
            down = torch.stack([dequantized(f"{prefix}.{e}.down_proj") for e in experts])
            # transformers' DecompressExperts hands fused experts back in bfloat16
            assert torch.equal(dec.experts.gate_up_proj, gate_up.to(dec.experts.gate_up_proj.dtype))
            assert torch.equal(dec.experts.down_proj, down.to(dec.experts.down_proj.dtype))
            assert_2_of_4(dec.experts.gate_up_proj, "gate_up_proj")
            assert torch.equal(encoder[index].experts.gate_up_proj, dec.experts.gate_up_proj)
            assert torch.equal(encoder[index].self_attn.q_proj.weight, dec.self_attn.q_proj.weight)
    assert model.generate(torch.tensor([[2, 10, 11]]), max_new_tokens=8).sequences.shape == (1, 11)


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an accelerator "
                                                  "to check that buffers leave the model's device")),
])
def test_trajectory_buffers_stay_off_the_model_device(diffusion_gemma_path, device):
    """What grows with samples x steps (states, self-conditioning, scores, row scales) lives on the CPU (only
    checkable with the model on an accelerator), and self-conditioning is kept as [canvas, hidden] signals,
    never [canvas, vocabulary] logits."""
    model = load(diffusion_gemma_path).to(device)
    SharedWeights.prepare(model)
    settings = TrajectorySettings(**SAMPLER)
    samples = [torch.arange(10, 42), torch.arange(50, 90)]
    result = run_trajectory(model, families.resolve(model), samples, settings, progress=False)
    hidden = model.config.text_config.hidden_size
    for sample in result.samples:
        for tensor in (sample.scores, sample.row_scales, sample.mean_row_scales):
            assert tensor.device.type == "cpu"
        for state in sample.states:
            assert state.input_ids.device.type == "cpu"
            if state.self_conditioning is not None:
                assert state.self_conditioning.device.type == "cpu"
                assert state.self_conditioning.shape == (8, hidden)


def test_default_pipeline_is_refused(diffusion_gemma_path):
    model = load(diffusion_gemma_path)
    with pytest.raises(ValueError, match="pipeline='diffusion'"):
        oneshot(model=model, dataset=calibration_dataset(diffusion_gemma_path, TEXTS),
                processor=AutoTokenizer.from_pretrained(diffusion_gemma_path),
                recipe=[SinkAwarePruningModifier(sparsity=0.5)])


def test_router_is_never_pruned(diffusion_gemma_path, tmp_path):
    with pytest.raises(ValueError, match="router"):
        run_oneshot(diffusion_gemma_path, tmp_path / "out",
                    [SinkAwarePruningModifier(sparsity=0.5, ignore=["re:.*lm_head.*"], noise_levels=2)])


def test_prefix_rows_count_once_per_block(diffusion_gemma_path):
    model = load(diffusion_gemma_path)
    adapter = DiffusionGemma(model)
    states = adapter.forward_noise_states(torch.arange(10, 40), levels=4, eps=0.0, seed=0)
    scales = torch.rand(1, 30)
    streams = adapter.stream_scales(states[0], scales)
    torch.testing.assert_close(streams["encoder"], scales[:, :22] * 0.5)  # sqrt(1/4): 4 states share a prefix
    torch.testing.assert_close(streams["decoder"], scales[:, 22:30])


def test_sparsegpt_refuses_hessians_that_cannot_fit(diffusion_gemma_path, tmp_path, monkeypatch):
    import psutil

    class Tiny:
        available = 1024  # bytes: far less than the tiny model's Hessians

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tiny())

    def no_trajectory(*args, **kwargs):
        raise AssertionError("the refusal must come before the trajectory phase")

    monkeypatch.setattr("sink_modifier.calibration.pipeline.run_trajectory", no_trajectory)
    with pytest.raises(ValueError, match="Hessian.*method: wanda"):
        run_oneshot(diffusion_gemma_path, tmp_path / "out",
                    [SinkAwarePruningModifier(sparsity=0.5, method="sparsegpt", noise_levels=2)])


@pytest.mark.slow
def test_command_line_prunes_diffusion_gemma(diffusion_gemma_path, tmp_path, capsys):
    """`sink-prune run` picks DiffusionGemma's model class and the diffusion pipeline by itself."""
    from sink_modifier.cli.main import main

    text_file = tmp_path / "calib.txt"
    text_file.write_text("\n".join(TEXTS))
    output = tmp_path / "pruned"
    code = main(["run", str(diffusion_gemma_path), "--recipe", str(RECIPE), "--text-file", str(text_file),
                 "--num-samples", "2", "--output", str(output)])
    out = capsys.readouterr().out
    assert code == 0 and f"load with import sink_modifier; sink_modifier.load_model({str(output)!r})" in out
    report = json.loads((output / "sink_report.json").read_text())
    assert report["family"] == "diffusion_gemma" and report["trajectory"] == "sampler"


@pytest.mark.slow
def test_quantization_only_recipe_saves_through_the_diffusion_pipeline(diffusion_gemma_path, tmp_path):
    """Without a SinkAwarePruningModifier the pipeline still ties the streams and saves each weight once."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    out = tmp_path / "fp8"
    run_oneshot(diffusion_gemma_path, out, [QuantizationModifier(
        scheme="FP8_DYNAMIC", targets=["Linear"],
        ignore=["re:.*lm_head", "re:.*router.*", "re:.*vision.*", "re:.*embed.*", "re:.*self_conditioning.*"])])
    assert not (out / "sink_report.json").exists()
    model = load(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    encoder, decoder = layers(model)
    assert torch.equal(encoder[0].self_attn.q_proj.weight, decoder[0].self_attn.q_proj.weight)
    assert model.generate(torch.tensor([[2, 10, 11]]), max_new_tokens=8).sequences.shape == (1, 11)


def test_prepare_model_keeps_one_copy_and_the_outputs(diffusion_gemma_path):
    import sink_modifier

    model = load(diffusion_gemma_path)
    inputs = dict(input_ids=torch.tensor([[2, 10, 11, 12, 13]]), decoder_input_ids=torch.arange(20, 28)[None])
    with torch.no_grad():
        before = model(**inputs).logits
    parameters = sum(p.numel() for p in model.parameters())
    sink_modifier.prepare_model(model)
    with torch.no_grad():
        after = model(**inputs).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in model.parameters()) == parameters  # experts linearized without a copy
    encoder, decoder = layers(model)
    assert all(e.experts is d.experts and e.mlp is d.mlp for e, d in zip(encoder, decoder, strict=True))
    names = [n for n, m in model.named_modules() if m is decoder[0].experts[0].down_proj]
    assert names == ["model.decoder.layers.0.experts.0.down_proj"]


def test_fused_checkpoints_stay_fused_when_saved(diffusion_gemma_path, tmp_path):
    """The per-expert load mapping is load-only: a fused model saved in this process keeps its native keys."""
    model = load(diffusion_gemma_path)
    model.save_pretrained(tmp_path / "resaved")
    with safe_open(str(tmp_path / "resaved" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "model.decoder.layers.0.experts.gate_up_proj" in keys
    assert not [k for k in keys if ".experts.0." in k]
    again = load(tmp_path / "resaved")
    assert torch.equal(layers(again)[1][1].experts.down_proj, layers(model)[1][1].experts.down_proj)


def test_wrong_inputs_are_refused_with_what_to_change(diffusion_gemma_path, dlm_path):
    from conftest import load_model
    from sink_modifier.families import FamilyError

    model = load(diffusion_gemma_path)
    with pytest.raises(FamilyError, match="no prefix before a 8-token canvas"):
        DiffusionGemma(model).forward_noise_states(torch.arange(10, 18), levels=2, eps=0.0, seed=0)
    with pytest.raises(FamilyError, match="set family: auto or diffusion_gemma, not 'masked'"):
        families.resolve(model, "masked")
    with pytest.raises(FamilyError, match="family: diffusion_gemma is for .*DiffusionGemma, not Gemma3"):
        families.resolve(load_model(dlm_path), "diffusion_gemma")


@pytest.mark.slow
def test_generate_is_measured_in_its_own_forwards(diffusion_gemma_path):
    """One decoder forward per state and one encoder forward per canvas; the masses equal a second pass that
    re-encodes each state's whole prefix (chunked causal prefill is exact)."""
    from sink_modifier.calibration.trajectory import analyse_sample, measure_states

    model = load(diffusion_gemma_path)
    adapter = DiffusionGemma(model)
    settings = TrajectorySettings(**SAMPLER)
    tokens = torch.arange(10, 50)  # prompt 20 > sliding window 16
    calls = {"encoder": 0, "decoder": 0}
    handles = [getattr(model.model, part).register_forward_hook(
        lambda *_, part=part: calls.__setitem__(part, calls[part] + 1)) for part in calls]
    single = run_trajectory(model, families.resolve(model), [tokens], settings, progress=False).samples[0]
    for handle in handles:
        handle.remove()
    assert calls["decoder"] == len(single.states) and calls["encoder"] <= 2  # the prompt, then canvas 1
    states = adapter.sampler_states(model, tokens, steps=6, blocks=2, prompt_fraction=0.5, temperature=0.0,
                                    seed=0)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(single.states, states, strict=True))
    with AttentionProbe(model, attention_modules=adapter.attention_modules(model)) as probe:
        masses = measure_states(model, probe, families.resolve(model), states, 1, torch.device("cpu"))
    expected = analyse_sample(tokens, states, masses, settings)
    torch.testing.assert_close(single.scores, expected.scores, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(single.row_scales, expected.row_scales, atol=1e-4, rtol=1e-4)
    encoder = single.summary.extra["encoder_attention"]
    expected_encoder = expected.summary.extra["encoder_attention"]
    assert encoder["sinks"] == expected_encoder["sinks"]
    assert encoder["spatial_variance"] == pytest.approx(expected_encoder["spatial_variance"], rel=1e-4)


def test_command_line_refuses_another_pipeline_for_diffusion_gemma(diffusion_gemma_path, tmp_path, capsys):
    from sink_modifier.cli.main import main

    text_file = tmp_path / "calib.txt"
    text_file.write_text("\n".join(TEXTS))
    code = main(["run", str(diffusion_gemma_path), "--recipe", str(RECIPE), "--text-file", str(text_file),
                 "--pipeline", "sequential", "--output", str(tmp_path / "out")])
    assert code != 0 and "--pipeline diffusion" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
