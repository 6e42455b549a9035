"""Interruptions never leave a checkpoint that looks valid; runs are deterministic; overflow is reported."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from llmcompressor import oneshot

from conftest import calibration_dataset, load_model
from sink_modifier import SinkAwarePruningModifier
from sink_modifier.calibration.trajectory import TrajectorySettings, run_trajectory
from sink_modifier.families import Family
from sink_modifier.families.masked import MaskedDiffusion
from sink_modifier.saving.publish import MANIFEST, _umask, read_manifest
from sink_modifier.saving.report import save_plan
from tests.toy import MASK_ID

MASKED = Family.of("masked", MaskedDiffusion(MASK_ID))


def pruned(path, seed=0, pipeline="independent"):
    model = load_model(path)
    modifier = SinkAwarePruningModifier(sparsity=0.5, seed=seed, noise_levels=4)
    oneshot(model=model, dataset=calibration_dataset(path), recipe=[modifier], pipeline=pipeline)
    return model, modifier


@pytest.mark.parametrize("pipeline", ["independent", "diffusion"])
@pytest.mark.slow
def test_same_inputs_and_seed_give_identical_masks_and_reports(dlm_path, pipeline):
    (a, ra), (b, rb) = pruned(dlm_path, pipeline=pipeline), pruned(dlm_path, pipeline=pipeline)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert json.dumps(ra.report, sort_keys=True) == json.dumps(rb.report, sort_keys=True)
    _, rc = pruned(dlm_path, seed=1, pipeline=pipeline)
    assert json.dumps(ra.report["samples"]) != json.dumps(rc.report["samples"])  # the seed drives the noise


class DiesWhileSaving(torch.nn.Module):
    """A model whose save is interrupted after the weights are written (Ctrl-C, a full disk, a crash)."""

    def save_pretrained(self, directory, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt


def test_interrupted_save_leaves_no_output_directory(tmp_path):
    model = DiesWhileSaving()
    save_plan(model).report = {"num_samples": 1}
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.iterdir()), "no staging directory is left behind"


@pytest.mark.slow
def test_existing_directory_keeps_other_files_and_gets_a_complete_checkpoint(dlm_path, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    model, _ = pruned(dlm_path)
    model.save_pretrained(out)
    assert (out / "notes.txt").read_text() == "mine"
    assert {"model.safetensors", "config.json", "sink_report.json"} <= {p.name for p in out.iterdir()}
    assert sorted(read_manifest(out)["files"]) == sorted(p.name for p in out.iterdir()
                                                         if p.name not in ("notes.txt", MANIFEST))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    fresh = tmp_path / "fresh"
    model.save_pretrained(fresh)
    assert fresh.stat().st_mode & 0o777 == 0o777 & ~_umask()  # not mkdtemp's private 0700
    assert (fresh / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~_umask()

    # A later run without the sink modifier into the same directory: the old report must not survive next to
    # weights it does not describe (the diffusion pipeline saves through the same staged path).
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    plain = load_model(dlm_path)
    oneshot(model=plain, dataset=calibration_dataset(dlm_path), pipeline="diffusion", output_dir=str(out),
            recipe=[WandaPruningModifier(sparsity=0.5, mask_structure="0:0", targets=["Gemma3DecoderLayer"],
                                         ignore=["re:.*lm_head.*"])])
    assert not (out / "sink_report.json").exists()
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "out"]


def test_overflowing_attention_is_reported_with_the_layer(dlm_path):
    model = load_model(dlm_path)
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight.fill_(math.inf)
    with pytest.raises(FloatingPointError, match=r"layers\.1") as info:
        run_trajectory(model, MASKED, [torch.arange(5, 25)], TrajectorySettings(),
                       progress=False)
    assert "torch.float32" in str(info.value) and "float16" not in str(info.value).replace("float32", "")


def test_overflowing_activation_is_reported_with_the_module(dlm_path):
    model = load_model(dlm_path)
    # an activation that overflows after attention: the trajectory phase sees finite attention
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.fill_(1e38)
    with pytest.raises(FloatingPointError, match=r"layers\.1\.mlp\.down_proj"):
        oneshot(model=model, dataset=calibration_dataset(dlm_path), recipe=[SinkAwarePruningModifier()])


def test_too_short_samples_are_refused(dlm_path):
    with pytest.raises(ValueError, match="at least 2"):
        run_trajectory(load_model(dlm_path), MASKED, [torch.tensor([7])],
                       TrajectorySettings(), progress=False)


def test_per_sample_scores_keep_no_per_layer_copy(dlm_path):
    """In the global scope (masses summed over layers, as the paper) a state's scores are one row, not L."""
    model = load_model(dlm_path)
    result = run_trajectory(model, MASKED, [torch.arange(5, 25), torch.arange(7, 40)],
                            TrajectorySettings(noise_levels=3), progress=False)
    for sample in result.samples:
        assert sample.scores.shape == (3, 1, sample.tokens.numel())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an accelerator: on the CPU every buffer is on "
                    "the model's device, so keeping them off it cannot be checked")
def test_per_sample_buffers_live_on_cpu(dlm_path):
    """What grows with samples x states (token ids, scores, row scales) is kept off the model's device."""
    model = load_model(dlm_path).to("cuda")
    result = run_trajectory(model, MASKED, [torch.arange(5, 25), torch.arange(7, 40)],
                            TrajectorySettings(noise_levels=3), progress=False)
    for sample in result.samples:
        tensors = [sample.tokens, sample.scores, sample.row_scales, sample.mean_row_scales]
        tensors += [t for state in sample.states for t in (state.input_ids, state.valid)]
        assert {t.device.type for t in tensors} == {"cpu"}
