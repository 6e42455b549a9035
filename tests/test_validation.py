"""Bad input fails early with a message that says what to change."""

from __future__ import annotations

import pytest
import torch
from llmcompressor import oneshot
from llmcompressor.modifiers.factory import ModifierFactory
from llmcompressor.recipe import Recipe
from pydantic import ValidationError
from torch.utils.data import DataLoader

import sink_modifier
from conftest import calibration_dataset, load_model
from sink_modifier import SinkAwarePruningModifier, families
from sink_modifier.families import FamilyError, FamilyOptions
from tests.toy import build_toy_model


def parse(fields: str):
    return Recipe.create_instance(
        "sparsity_stage:\n  sparsity_modifiers:\n    SinkAwarePruningModifier:\n" + fields
    )


def test_import_registers_under_class_name():
    ModifierFactory.refresh()
    assert ModifierFactory._registered_registry["SinkAwarePruningModifier"] is SinkAwarePruningModifier
    recipe = parse("      sparsity: 0.6\n      mask_structure: '2:4'\n      method: sparsegpt\n")
    (modifier,) = recipe.modifiers
    assert isinstance(modifier, SinkAwarePruningModifier)
    assert (modifier.sparsity, modifier.mask_structure, modifier.method) == (0.6, "2:4", "sparsegpt")
    from llmcompressor.pipelines.registry import CalibrationPipeline

    assert CalibrationPipeline.get_value_from_registry("diffusion") is sink_modifier.DiffusionPipeline


@pytest.mark.parametrize(
    "fields, message",
    [
        ("sparsity: 1.0", "sparsity must be in [0, 1)"),
        ("sparsity: -0.1", "sparsity must be in [0, 1)"),
        ("sparsity: [0.5, 1.5]", "sparsity must be in [0, 1)"),
        ("mask_structure: '2-4'", "mask_structure must be"),
        ("mask_structure: '4:2'", "0 < N < M"),
        ("mask_structure: '0:4'", "0 < N < M"),
        ("method: magnitude", "wanda"),
        ("sink_score: softmax", "raw"),
        ("sink_scope: head", "global"),
        ("noise_levels: 0", "greater than or equal to 1"),
        ("noise_eps: 1.0", "less than 1"),
        ("sink_sharpness: 0", "greater than 0"),
        ("trajectory: reverse", "forward_noise"),
        ("sparsity_profile: owl", "not supported"),
        ("sparsty: 0.5", "Extra inputs are not permitted"),
        ("owl_m: 5", "Extra inputs are not permitted"),
        ("adapter: masked", "Extra inputs are not permitted"),
    ],
)
def test_invalid_recipe_fails_at_parse_time(fields, message):
    with pytest.raises(ValidationError, match=r"(?s)" + _escape(message)):
        parse(f"      {fields}\n")


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_unstructured_alias():
    assert SinkAwarePruningModifier(mask_structure="unstructured").mask_structure == "0:0"


def test_model_without_mask_token(tmp_path):
    path = build_toy_model(tmp_path / "nomask", bidirectional=True)
    model = load_model(path)
    del model.config.mask_token_id
    (path / "tokenizer_config.json").unlink()
    (path / "tokenizer.json").unlink()
    with pytest.raises(FamilyError, match="needs a mask token"):
        families.resolve(model)
    assert families.resolve(model, options=FamilyOptions(mask_token_id=4)).noise.mask_token_id == 4


def test_masked_adapter_refuses_a_causal_model(ar_path):
    with pytest.raises(FamilyError, match="attends causally"):
        families.resolve(load_model(ar_path), "masked")


def test_per_layer_sparsity_of_wrong_length(dlm_path):
    model = load_model(dlm_path)
    with pytest.raises(ValueError, match="sparsities values"):
        oneshot(model=model, dataset=calibration_dataset(dlm_path),
                recipe=[SinkAwarePruningModifier(sparsity=[0.5, 0.5, 0.5])])


def test_targets_matching_nothing(dlm_path):
    with pytest.raises(ValueError, match="matched no module"):
        oneshot(model=load_model(dlm_path), dataset=calibration_dataset(dlm_path),
                recipe=[SinkAwarePruningModifier(targets=["NoSuchLayer"])])


def test_lm_head_never_pruned_silently(dlm_path):
    with pytest.raises(ValueError, match="LM head"):
        oneshot(model=load_model(dlm_path), dataset=calibration_dataset(dlm_path),
                recipe=[SinkAwarePruningModifier(targets=["Linear"], ignore=[])])


@pytest.mark.parametrize("pipeline", ["independent", "diffusion"])
def test_empty_calibration_set(dlm_path, pipeline):
    empty = DataLoader([], batch_size=1)
    with pytest.raises(ValueError, match="empty"):
        oneshot(model=load_model(dlm_path), dataset=empty, pipeline=pipeline,
                recipe=[SinkAwarePruningModifier()])


def test_all_padding_sample(dlm_path):
    loader = DataLoader(
        [{"input_ids": torch.tensor([0, 0, 0]), "attention_mask": torch.tensor([0, 0, 0])}], batch_size=1
    )
    with pytest.raises(ValueError, match="all padding"):
        oneshot(model=load_model(dlm_path), dataset=loader, recipe=[SinkAwarePruningModifier()])
