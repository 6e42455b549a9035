"""SinkAwareStructuredPruningModifier: the importance formula by hand, exact slicing, real oneshot round trips
in both pipelines (alone and with FP8 / W4A16), reload in a fresh process without this package, and every
refusal before calibration."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from llmcompressor import oneshot
from llmcompressor.core import active_session
from llmcompressor.modifiers.quantization import QuantizationModifier
from pydantic import ValidationError

from conftest import calibration_dataset, load_model
from sink_modifier import SinkAwarePruningModifier, SinkAwareStructuredPruningModifier
from sink_modifier.calibration.handoff import SinkCalibration
from sink_modifier.calibration.scales import StateScales
from sink_modifier.calibration.trajectory import TrajectorySettings
from sink_modifier.errors import UserError
from sink_modifier.families import Family, FamilyError
from sink_modifier.families.base import PrunableUnits
from sink_modifier.families.masked import MaskedDiffusion
from sink_modifier.families.structure import DREAM, HF_DECODER, LLADA
from sink_modifier.modifiers.slicing import keep_units
from sink_modifier.modifiers.unit_scores import ColumnMoments, kept_count, kept_units, unit_importance
from tests.toy import MASK_ID

FAST = dict(noise_levels=2)


def _prune(path, pipeline="independent", extra=(), **fields):
    model = load_model(path)
    modifier = SinkAwareStructuredPruningModifier(**{**FAST, **fields})
    oneshot(model=model, dataset=calibration_dataset(path), recipe=[modifier, *extra], pipeline=pipeline,
            shuffle_calibration_samples=False)
    return model, modifier


# ---- the math ----

def test_importance_is_structured_wanda_on_sink_weighted_rows():
    """I(u) = sum over the unit's columns c of ||W[:, c]||_1 * sqrt(sum_t (r_t x_tc)^2 / samples)."""
    torch.manual_seed(0)
    down = torch.nn.Linear(6, 3, bias=False)  # 6 columns: 3 units of 2 columns (a KV group's o_proj columns)
    x = torch.randn(2, 5, 6)  # 2 samples of 5 tokens
    scales = torch.rand(2, 1, 5)  # [B, G, T] row scales of the batch
    session = active_session()
    session.reset()
    modifier = SinkAwareStructuredPruningModifier()
    modifier._module_names[down] = "o_proj"
    modifier._calibration = SinkCalibration(
        Family.of("masked", MaskedDiffusion(MASK_ID)), TrajectorySettings(), StateScales([{None: scales}]))
    session.state.current_batch_idx = 0
    moments = ColumnMoments(down)
    moments.add(down, modifier._weighted_rows(down, x))
    units = PrunableUnits(3, (), ((down, 2),))
    got = unit_importance(units, {down: moments})

    weighted = x * scales[:, 0, :, None]
    second_moment = (weighted**2).sum(dim=(0, 1)) / 2  # llm-compressor averages over samples
    per_column = down.weight.detach().abs().sum(dim=0) * second_moment.sqrt()
    expected = per_column.reshape(3, 2).sum(dim=1)
    torch.testing.assert_close(got, expected)
    magnitude = down.weight.detach().abs().sum(dim=0).reshape(3, 2).sum(dim=1)
    torch.testing.assert_close(unit_importance(units, None), magnitude)
    assert kept_units(torch.tensor([3.0, 1.0, 2.0, 1.0]), 2).tolist() == [0, 2]
    assert kept_units(torch.tensor([1.0, 1.0, 1.0]), 2).tolist() == [0, 1]  # ties keep the earlier unit


@pytest.mark.parametrize("total, sparsity, multiple, kept", [
    (768, 0.5, 8, 384), (768, 0.25, 8, 576), (768, 0.25, 128, 512), (768, 0.3, 128, 512), (100, 0.5, 8, 48),
    (256, 0.9, 128, 0),
])
def test_kept_count_rounds_down_to_the_multiple(total, sparsity, multiple, kept):
    assert kept_count(total, sparsity, multiple) == kept


@torch.no_grad()
def test_slicing_equals_dropping_the_removed_units(dlm_path):
    """The shrunk model computes exactly what the dense one computes with the removed channels' and heads'
    contributions dropped (their down_proj / o_proj columns zeroed)."""
    dense, sliced = load_model(dlm_path), load_model(dlm_path)
    config = dense.config
    tokens = torch.tensor([[2, 10, 11, 12, 13, 14, 15, 16, 4, 4, 17, 1]])
    generator = torch.Generator().manual_seed(0)
    for dense_layer, layer in zip(dense.model.layers, sliced.model.layers, strict=True):
        channels = torch.randperm(config.intermediate_size, generator=generator)[:96].sort().values
        groups = torch.tensor([1])  # keep KV group 1 (query heads 2, 3)
        keep_units(HF_DECODER.channels(layer), channels)
        keep_units(HF_DECODER.kv_groups(layer, config), groups)
        removed = torch.ones(config.intermediate_size, dtype=torch.bool)
        removed[channels] = False
        dense_layer.mlp.down_proj.weight[:, removed] = 0
        dense_layer.self_attn.o_proj.weight[:, : 2 * config.head_dim] = 0
        assert layer.mlp.gate_proj.weight.shape == (96, config.hidden_size)
        assert layer.self_attn.k_proj.weight.shape == (config.head_dim, config.hidden_size)
        assert layer.self_attn.q_proj.weight.shape == (2 * config.head_dim, config.hidden_size)
        assert layer.self_attn.o_proj.in_features == 2 * config.head_dim
    HF_DECODER.rewrite_config(sliced.config, channels=96, heads=2, kv_heads=1)
    torch.testing.assert_close(sliced(input_ids=tokens).logits, dense(input_ids=tokens).logits)


@torch.no_grad()
def test_rows_take_their_bias_and_columns_keep_it():
    from sink_modifier.modifiers.slicing import keep_columns, keep_rows

    torch.manual_seed(0)
    x = torch.randn(3, 6)
    producer, consumer = torch.nn.Linear(6, 5), torch.nn.Linear(5, 4)
    kept = torch.tensor([0, 2, 3])
    expected_rows = producer(x)[:, kept]
    dropped = consumer.weight.clone()
    dropped[:, [1, 4]] = 0
    expected = torch.nn.functional.linear(producer(x), dropped, consumer.bias)
    keep_rows(producer, kept)
    keep_columns(consumer, kept)
    torch.testing.assert_close(producer(x), expected_rows)
    torch.testing.assert_close(consumer(producer(x)), expected)
    assert (producer.out_features, consumer.in_features, consumer.bias.shape) == (3, 3, (4,))


# ---- real runs ----

RELOAD = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    model, info = AutoModelForCausalLM.from_pretrained(sys.argv[1], output_loading_info=True)
    assert "sink_modifier" not in sys.modules
    bad = {k: sorted(map(str, v)) for k, v in info.items() if v}
    assert not bad, bad
    c = model.config
    layer = model.model.layers[0]
    logits = model(input_ids=torch.tensor([[2, 10, 11, 12]])).logits
    print(json.dumps([c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
                      layer.mlp.down_proj.in_features, layer.self_attn.o_proj.in_features,
                      bool(torch.isfinite(logits).all())]))
""")


def reload_fresh(path) -> list:
    """Load ``path`` with plain transformers in a new interpreter that never imports this package."""
    done = subprocess.run([sys.executable, "-c", RELOAD, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("pipeline", ["independent", "diffusion"])
@pytest.mark.slow
def test_oneshot_round_trip_reloads_without_the_package(dlm_path, tmp_path, pipeline):
    model, modifier = _prune(dlm_path, pipeline, sparsity=0.5, head_sparsity=0.5)
    summary = modifier.summary()
    assert summary["channels"] == [256, 128] and summary["kv_heads"] == [2, 1] and summary["heads"] == [4, 2]
    assert all(len(kept["channels"]) == 128 and len(kept["kv_groups"]) == 1 for kept in summary["kept"].values())
    assert len(summary["kept"]) == model.config.num_hidden_layers
    model.save_pretrained(tmp_path / "out")
    report = json.loads((tmp_path / "out" / "sink_report.json").read_text())
    assert report["structured"]["channels"] == [256, 128]
    assert reload_fresh(tmp_path / "out") == [128, 2, 1, 128, 64, True]


def test_sink_selection_none_and_magnitude_choose_differently(dlm_path):
    """The sink weights reach the statistics: the no-sink ablation keeps other channels than sink-aware, and
    magnitude (no activations) keeps others again."""
    kept = {}
    variants = {"all": {}, "none": dict(sink_selection="none"), "magnitude": dict(method="magnitude")}
    for name, fields in variants.items():
        _, modifier = _prune(dlm_path, sparsity=0.5, **fields)
        kept[name] = modifier.summary()["kept"]
    assert kept["all"] != kept["none"] != kept["magnitude"]


@pytest.mark.parametrize("pipeline, scheme, head_sparsity", [
    ("independent", "W4A16", 0.0), ("diffusion", "FP8", 0.5), ("independent", "FP8_DYNAMIC", 0.5),
])
@pytest.mark.slow
def test_combines_with_quantization(dlm_path, tmp_path, pipeline, scheme, head_sparsity):
    quantize = QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"])
    model, _ = _prune(dlm_path, pipeline, extra=[quantize], sparsity=0.5, head_sparsity=head_sparsity)
    down = model.model.layers[0].mlp.down_proj
    assert down.weight.shape[1] == 128
    assert down.weight_scale.abs().sum() > 0  # observed on the shrunk weight
    model.save_pretrained(tmp_path / "out", save_compressed=True)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    heads = 2 if head_sparsity else 4
    assert reload_fresh(tmp_path / "out")[:3] == [128, heads, heads // 2]


def test_structured_then_unstructured_composes_in_the_independent_pipeline(dlm_path):
    unstructured = SinkAwarePruningModifier(sparsity=0.5, **FAST)
    model, _ = _prune(dlm_path, extra=[unstructured], sparsity=0.5)
    down = model.model.layers[0].mlp.down_proj
    assert down.weight.shape[1] == 128
    assert (down.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_llada_channels_shrink_and_reload(published_llada, tmp_path):
    """The published LLaDA code: channels only (its code derives the head width), mlp_hidden_size rewritten."""
    from sink_modifier.loading.checkpoints import load_model as load_repaired

    model = load_repaired(published_llada, trust_remote_code=True)
    texts = ["t5 t6 t7 t8 t9 t10 t11 t12", "t20 t21 t22 t23 t24 t25 t26 t27"]
    dataset = calibration_dataset(published_llada, texts)
    with pytest.raises(FamilyError, match="LLaDA's code sizes q_proj"):
        oneshot(model=model, dataset=dataset, trust_remote_code_model=True,
                recipe=[SinkAwareStructuredPruningModifier(sparsity=0.5, head_sparsity=0.5, **FAST)])
    model = load_repaired(published_llada, trust_remote_code=True)
    oneshot(model=model, dataset=dataset, recipe=[SinkAwareStructuredPruningModifier(sparsity=0.5, **FAST)],
            trust_remote_code_model=True, shuffle_calibration_samples=False)
    assert model.config.mlp_hidden_size == 128
    model.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["mlp_hidden_size"] == 128
    reloaded = load_repaired(tmp_path / "out", trust_remote_code=True)
    assert reloaded.model.transformer.blocks[0].ff_out.in_features == 128


@pytest.mark.slow
def test_dream_channels_shrink_and_heads_are_refused(published_dream):
    """The Hub's Dream code: channels only (its code derives head_dim from the head count)."""
    from sink_modifier.loading.checkpoints import load_model as load_repaired

    dataset = calibration_dataset(published_dream, ["The cat sat on the mat and looked at the door for a while.",
                                                    "A small boat crossed the lake before the storm arrived."],
                                  trust_remote_code=True)
    model = load_repaired(published_dream, trust_remote_code=True)
    with pytest.raises(FamilyError, match="Dream's code derives head_dim"):
        oneshot(model=model, dataset=dataset, trust_remote_code_model=True,
                recipe=[SinkAwareStructuredPruningModifier(sparsity=0.5, head_sparsity=0.5, **FAST)])
    model = load_repaired(published_dream, trust_remote_code=True)
    oneshot(model=model, dataset=dataset, trust_remote_code_model=True, shuffle_calibration_samples=False,
            recipe=[SinkAwareStructuredPruningModifier(sparsity=0.5, **FAST)])
    layer = model.model.layers[0]
    assert model.config.intermediate_size == 128 and layer.mlp.down_proj.in_features == 128
    assert layer.mlp.gate_proj.weight.shape[0] == layer.mlp.up_proj.weight.shape[0] == 128


# ---- refusals, all before calibration ----

@pytest.fixture
def no_calibration(monkeypatch):
    """Any calibration (the trajectory phase) fails the test: refusals must come first."""
    import sink_modifier.calibration.pipeline
    import sink_modifier.modifiers.sink_rows

    def fail(*args, **kwargs):
        raise AssertionError("calibration ran before the refusal")

    for module in (sink_modifier.modifiers.sink_rows, sink_modifier.calibration.pipeline):
        monkeypatch.setattr(module, "run_trajectory", fail)


@pytest.mark.parametrize("fields, message", [
    (dict(sparsity=0.9, round_to=128), "fewer than the rounding multiple 128"),
    (dict(sparsity=0.5, head_sparsity=0.25), "is 0.5 groups"),
    (dict(sparsity=0.0, head_sparsity=0.0), "nothing would be removed"),
    (dict(sparsity=0.5, targets=["model.layers.0"]), "leave out model.layers.1"),
    (dict(sparsity=0.5, ignore=["re:.*up_proj"]), "excluded by ignore"),
])
def test_impossible_widths_are_refused(dlm_path, no_calibration, fields, message):
    with pytest.raises(UserError, match=message):
        _prune(dlm_path, **fields)


def test_head_sparsity_must_leave_a_group():
    with pytest.raises(ValidationError, match="head_sparsity"):
        SinkAwareStructuredPruningModifier(head_sparsity=1.0)


def test_quantization_group_must_divide_the_kept_width(dlm_path, no_calibration):
    quantize = QuantizationModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    with pytest.raises(UserError, match="groups of 128, which does not divide the kept attention width 64"):
        _prune(dlm_path, extra=[quantize], sparsity=0.5, head_sparsity=0.5)


@pytest.mark.parametrize("first", [
    lambda: SinkAwarePruningModifier(sparsity=0.5),
    lambda: QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"]),
])
def test_modifiers_before_the_structured_one_are_refused(dlm_path, no_calibration, first):
    model = load_model(dlm_path)
    recipe = [first(), SinkAwareStructuredPruningModifier(sparsity=0.5, **FAST)]
    with pytest.raises(UserError, match="put the structured one first"):
        oneshot(model=model, dataset=calibration_dataset(dlm_path), recipe=recipe)


def test_unstructured_in_the_same_pass_is_refused(dlm_path):
    model = load_model(dlm_path)
    recipe = [SinkAwareStructuredPruningModifier(sparsity=0.5, **FAST),
              SinkAwarePruningModifier(sparsity=0.5, **FAST)]
    with pytest.raises(UserError, match="same pass"):
        oneshot(model=model, dataset=calibration_dataset(dlm_path), recipe=recipe, pipeline="diffusion")


def test_architectures_whose_config_cannot_say_fewer_heads_are_refused():
    from tests.toy import toy_config

    llada = type("LLaDAConfig", (), dict(d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=128))()
    with pytest.raises(FamilyError, match="head_dim = d_model // n_heads"):
        LLADA.check(llada, channels=True, heads=True)
    LLADA.check(llada, channels=True, heads=False)
    with pytest.raises(FamilyError, match="Dream's code derives head_dim"):
        DREAM.check(toy_config(), channels=True, heads=True)
    derived = SimpleNamespace(intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(FamilyError, match="derives the head width"):
        HF_DECODER.check(derived, channels=False, heads=True)


def test_diffusion_gemma_is_refused_in_one_line(diffusion_gemma_path):
    from sink_modifier import families
    from sink_modifier.loading.checkpoints import load_model as load_any

    model = load_any(str(diffusion_gemma_path), dtype="float32")
    structure = families.resolve(model).structure
    with pytest.raises(FamilyError, match="DiffusionGemma: structured pruning does not yet") as refused:
        structure.check(model.config, channels=True, heads=False)
    assert "\n" not in str(refused.value)


def test_compare_structured_runs_every_method_over_draws(capsys, dlm_path, tmp_path):
    from conftest import CALIBRATION_TEXTS
    from sink_modifier.cli.compare import STRUCTURED_METHODS
    from sink_modifier.cli.main import main

    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(CALIBRATION_TEXTS) + "\n")
    output = tmp_path / "compare"
    code = main(["compare", str(dlm_path), "--structured", "--sparsities", "0.5/0.5", "--draws", "2",
                 "--num-samples", "2", "--max-seq-length", "32", "--text-file", str(text),
                 "--eval-file", str(text), "--eval-documents", "2", "--num-mc-samples", "2", "--noise-levels", "3",
                 "--output", str(output), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "50% ch + 50% KV" in out
    summary = json.loads((output / "results.json").read_text())
    assert len(summary["cells"]) == 1 + 1 + 5 * 2  # dense, magnitude once, five data methods x two draws
    assert set(summary["methods"]) == set(STRUCTURED_METHODS)
    dense_parameters = summary["cells"]["dense|-|0"]["parameters"]
    for key, cell in summary["cells"].items():
        if not key.startswith("dense"):
            assert cell["parameters"] < 0.8 * dense_parameters, key
    names = {(c["a"], c["b"]) for c in summary["comparisons"]}
    assert ("sink_structured-wanda_all", "structured-wanda_noised") in names
    assert ("sink_structured-wanda_all", "sink_structured-wanda_random") in names


def test_cli_run_eval_inspect_on_a_structured_checkpoint(capsys, dlm_path, tmp_path):
    from pathlib import Path

    from conftest import CALIBRATION_TEXTS
    from sink_modifier.cli.main import main

    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(CALIBRATION_TEXTS) + "\n")
    recipe = Path(__file__).parents[1] / "recipes" / "sink_structured_50.yaml"
    output = tmp_path / "pruned"
    assert main(["run", str(dlm_path), "--recipe", str(recipe), "--text-file", str(text), "--num-samples", "4",
                 "--max-seq-length", "48", "--output", str(output), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "parameters:" in out and "remain" in out  # the run summary says what structured pruning removed
    assert "are zero" not in out  # and no "0.0% of the weights are zero" line for a run that zeroed nothing
    assert json.loads((output / "config.json").read_text())["intermediate_size"] == 128
    assert json.loads((output / "sink_report.json").read_text())["structured"]["heads"] == [4, 2]
    assert main(["eval", str(output), "--text-file", str(text), "--num-samples", "2", "--num-mc-samples", "2",
                 "--quiet"]) == 0
    assert "ELBO perplexity" in capsys.readouterr().out
    assert main(["inspect", str(output), "--text-file", str(text), "--num-samples", "2", "--noise-levels", "2",
                 "--output", str(tmp_path / "sinks"), "--quiet"]) == 0
    assert (tmp_path / "sinks" / "sink_report.json").is_file()
