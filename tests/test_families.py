"""The family registry: a family defined only here prunes end to end, and recipes name families safely."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from llmcompressor import oneshot
from pydantic import ValidationError

from conftest import calibration_dataset, load_model
from sink_modifier import SinkAwarePruningModifier, SinkAwareStructuredPruningModifier, families
from sink_modifier.families import (
    AttentionMeasurement,
    CalibrationLayout,
    CheckpointHooks,
    DenoisingState,
    Family,
    FamilyError,
    FamilyOptions,
    FamilySpec,
    NoiseProcess,
)
from tests.toy import MASK_ID


class SpanMasking(NoiseProcess, AttentionMeasurement, CalibrationLayout):
    """A made-up family: state k masks the last k/K of the sequence as one span (block-causal-like noise)."""

    def __init__(self):
        self.calls = 0

    def forward_noise_states(self, tokens, *, levels, eps, seed):
        self.calls += 1
        length = tokens.numel()
        states = []
        for k in range(1, levels + 1):
            start = length - max(1, round(k * length / levels))
            noisy = tokens.clone()
            noisy[start:] = MASK_ID
            states.append(DenoisingState(noisy, torch.ones(length, dtype=torch.bool), step=k - 1,
                                         noise_level=k / levels))
        return states


class MarksCheckpoints(CheckpointHooks):
    def finish_checkpoint(self, model, directory):
        (directory / "span_family.txt").write_text("written by the test family")


@pytest.fixture
def span_family():
    noise = SpanMasking()

    def build(model, options: FamilyOptions, chosen_by_match: bool) -> Family:
        return Family("span", noise, noise, noise, MarksCheckpoints())

    families.register(FamilySpec("span", build, matches=lambda m: getattr(m.config, "span_noise", False),
                                 priority=50, claims=True, description="toy models with span noise"))
    try:
        yield noise
    finally:
        families.unregister("span")


def test_a_family_defined_in_the_tests_prunes_end_to_end(span_family, dlm_path, tmp_path):
    model = load_model(dlm_path)
    model.config.span_noise = True
    modifier = SinkAwarePruningModifier(sparsity=0.5, noise_levels=3)
    out = tmp_path / "out"
    oneshot(model=model, dataset=calibration_dataset(dlm_path), recipe=[modifier], pipeline="diffusion",
            output_dir=str(out))
    assert span_family.calls == 8  # every calibration sample went through the family's noise process
    report = json.loads((out / "sink_report.json").read_text())
    assert report["family"] == "span" and report["num_states"] == 8 * 3
    assert (out / "span_family.txt").exists()  # its checkpoint hook ran inside the save path
    weight = load_model(out).model.layers[0].mlp.up_proj.weight
    assert (weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_a_claimed_model_refuses_other_families(span_family, dlm_path):
    model = load_model(dlm_path)
    model.config.span_noise = True
    with pytest.raises(FamilyError, match="is a span model"):
        families.resolve(model, "masked")
    assert families.resolve(model).name == "span"
    with pytest.raises(FamilyError, match="family: span is for toy models with span noise"):
        families.resolve(load_model(dlm_path), "span")


def test_recipes_name_families_and_refuse_unknown_ones():
    with pytest.raises(ValueError, match="family must be auto or one of"):
        SinkAwarePruningModifier(family="llada2_moe")
    assert SinkAwarePruningModifier(family="masked").family == "masked"


def test_noise_level_is_the_share_still_to_denoise_in_every_family(dlm_path):
    """1 at the start of generation, falling to 0: masked states by mask rate, AR states by undecoded share."""
    tokens = torch.arange(5, 25)
    masked = families.resolve(load_model(dlm_path)).noise.forward_noise_states(tokens, levels=4, eps=0, seed=0)
    assert [s.noise_level for s in masked] == [0.25, 0.5, 0.75, 1.0]
    from sink_modifier.families.autoregressive import AutoregressiveControl

    prefixes = AutoregressiveControl().forward_noise_states(tokens, levels=4, eps=0, seed=0)
    assert [s.noise_level for s in prefixes] == [0.75, 0.5, 0.25, 0.0]
    assert [int(s.valid.sum()) for s in prefixes] == [5, 10, 15, 20]


def test_masked_states_never_mask_bos_or_padding_unless_the_recipe_says_so(dlm_path):
    model = load_model(dlm_path)
    bos, pad = model.config.bos_token_id, model.config.pad_token_id
    tokens = torch.tensor([bos, *range(10, 40), pad])
    states = families.resolve(model).noise.forward_noise_states(tokens, levels=4, eps=0, seed=0)
    assert all(s.input_ids[0] == bos and s.input_ids[-1] == pad for s in states)
    assert (states[-1].input_ids[1:-1] == MASK_ID).all()  # t = 1 masks everything else
    everything = families.resolve(model, options=FamilyOptions(never_mask_token_ids=()))
    assert (everything.noise.forward_noise_states(tokens, levels=1, eps=0, seed=0)[0].input_ids == MASK_ID).all()


@pytest.mark.parametrize("field", ["adapter: masked", "owl_m: 5", "owl_lmbda: 0.08", "sequential_update: true"])
def test_fields_removed_before_release_are_refused_by_name(field):
    """0.1's ``adapter`` (now ``family``) and llm-compressor's OWL / ``sequential_update`` fields, which this
    modifier never used: a recipe that still carries one names the field instead of running without it."""
    key = field.split(":")[0]
    for modifier in (SinkAwarePruningModifier, SinkAwareStructuredPruningModifier):
        with pytest.raises(ValidationError, match=rf"{key}\n  Extra inputs are not permitted"):
            modifier(**yaml.safe_load(field))


def test_a_saved_recipe_parses_back_to_the_same_modifier():
    """recipe.yaml next to a checkpoint holds ``model_dump()``: it must parse back to the same settings."""
    modifier = SinkAwarePruningModifier(family="masked", mask_structure="2:4", noise_levels=4)
    again = SinkAwarePruningModifier(**yaml.safe_load(yaml.safe_dump(modifier.model_dump())))
    assert again.model_dump() == modifier.model_dump()
    assert (again.family, again.mask_structure, again.noise_levels) == ("masked", "2:4", 4)


