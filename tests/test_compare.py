"""``sink-prune compare`` and the controls it runs through the modifier: ``sink_selection`` ``random`` and
``none``, and the forward noise's never-masked tokens."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from pydantic import ValidationError

from conftest import CALIBRATION_TEXTS, load_model
from sink_modifier import families
from sink_modifier.calibration.statistics import permute_valid, row_scales
from sink_modifier.calibration.trajectory import TrajectorySettings, analyse_sample
from sink_modifier.cli.compare_table import _over_draws, comparisons_for, difference
from sink_modifier.families import FamilyOptions
from sink_modifier.families.masked import MaskedDiffusion
from tests.toy import BOS_ID, MASK_ID, PAD_ID

# --------------------------------------------------------------------------- row scales


def scores_and_valid(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(4, 2, 9, generator=g, dtype=torch.float64)
    valid = torch.ones(4, 9, dtype=torch.bool)
    valid[1, 6:] = False  # a prefix state (the AR control)
    valid[2, 0] = False
    valid[3, ::2] = False
    return scores, valid


def columns(x: torch.Tensor, keep: torch.Tensor) -> list[tuple]:
    return sorted(map(tuple, x[:, keep].T.tolist()))


def test_random_selection_permutes_each_state_over_its_valid_positions():
    scores, valid = scores_and_valid()
    paper = row_scales(scores, valid, selection="all")
    shuffled = row_scales(scores, valid, selection="random", generator=torch.Generator().manual_seed(1))
    assert not torch.equal(shuffled, paper)
    for s in range(scores.shape[0]):
        inside, outside = valid[s], ~valid[s]
        assert torch.equal(shuffled[s][:, outside], torch.zeros_like(shuffled[s][:, outside]))
        # the same multiset of scales per state, and one permutation shared by both groups (columns move)
        assert columns(shuffled[s], inside) == columns(paper[s], inside)
    # the same amount of down-weighting: equal sums of scales and of squared scales per state
    assert torch.allclose(shuffled.sum(-1), paper.sum(-1)) and torch.allclose((shuffled**2).sum(-1),
                                                                              (paper**2).sum(-1))
    again = row_scales(scores, valid, selection="random", generator=torch.Generator().manual_seed(1))
    assert torch.equal(again, shuffled)


def test_permute_valid_leaves_invalid_entries_alone():
    x = torch.arange(2 * 1 * 5, dtype=torch.float64).view(2, 1, 5)
    valid = torch.tensor([[True, False, True, False, True], [False] * 5])
    out = permute_valid(x, valid, torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :, [1, 3]], x[:, :, [1, 3]]) and torch.equal(out[1], x[1])
    assert sorted(out[0, 0, [0, 2, 4]].tolist()) == [0.0, 2.0, 4.0]


def test_none_selection_is_validity_alone():
    scores, valid = scores_and_valid()
    none = row_scales(scores, valid, selection="none")
    assert torch.equal(none, valid.unsqueeze(1).expand_as(scores).to(none.dtype))


def test_selections_are_validated():
    assert TrajectorySettings(sink_selection="random").sink_selection == "random"
    assert TrajectorySettings(sink_selection="none").sink_selection == "none"
    with pytest.raises(ValidationError):
        TrajectorySettings(sink_selection="shuffle")
    with pytest.raises(ValueError, match="unknown selection"):
        row_scales(*scores_and_valid(), selection="shuffle")


def test_trajectory_random_control_is_seeded_by_content_and_seed():
    """analyse_sample draws the permutation from the sample's tokens and the recipe seed: reproducible whatever
    order the samples come in, different for another seed."""
    tokens = torch.arange(5, 17)
    states = MaskedDiffusion(MASK_ID).forward_noise_states(tokens, levels=3, eps=1e-3, seed=0)
    mass = torch.rand(3, 2, 12, generator=torch.Generator().manual_seed(0)) * 4
    mass[:, :, 3] += 30  # a sink
    def scales(selection, seed=0):
        settings = TrajectorySettings(sink_selection=selection, seed=seed)
        return analyse_sample(tokens, states, mass, settings).row_scales

    random, paper = scales("random"), scales("all")
    assert torch.equal(random, scales("random")) and not torch.equal(random, scales("random", seed=1))
    assert torch.allclose(random.sort(-1).values, paper.sort(-1).values)
    assert torch.equal(scales("none"), torch.ones_like(paper))


# --------------------------------------------------------------------------- never-masked tokens


def test_forward_noise_never_masks_protected_tokens():
    tokens = torch.tensor([BOS_ID, 7, 8, 9, 10, 11, 12, PAD_ID])
    protected = MaskedDiffusion(MASK_ID, (BOS_ID, PAD_ID)).forward_noise_states(
        tokens, levels=4, eps=1e-3, seed=0)
    plain = MaskedDiffusion(MASK_ID).forward_noise_states(tokens, levels=4, eps=1e-3, seed=0)
    for a, b in zip(protected, plain, strict=True):
        assert int(a.input_ids[0]) == BOS_ID and int(a.input_ids[-1]) == PAD_ID
        assert torch.equal(a.input_ids[1:-1], b.input_ids[1:-1])  # the other positions draw the same masks
    assert int(plain[-1].input_ids[0]) == MASK_ID  # at t = 1 everything is masked without protection


def test_adapter_protects_bos_and_pad_by_default(dlm_path):
    model = load_model(dlm_path)
    def never(ids):
        return families.resolve(model, options=FamilyOptions(never_mask_token_ids=ids)).noise.never_mask_token_ids

    assert never(None) == (PAD_ID, BOS_ID)
    assert never(()) == ()
    assert never((9,)) == (9,)


# --------------------------------------------------------------------------- the comparison's numbers


def test_difference_is_paired_per_mc_sample_or_exact():
    a = {"sample_nlls": [1.0, 2.0, 3.0], "nll_per_token": 2.0}
    b = {"sample_nlls": [0.5, 1.5, 2.0], "nll_per_token": 4 / 3}
    mean, se = difference(a, b)
    assert mean == pytest.approx(2 / 3) and se == pytest.approx(math.sqrt(1 / 12) / math.sqrt(3))
    assert difference({"sample_nlls": [], "nll_per_token": 2.0}, {"sample_nlls": [], "nll_per_token": 1.5}) \
        == (0.5, 0.0)


def test_resolved_only_beyond_the_spread_over_draws():
    assert _over_draws([(0.00055, 0.00008), (-0.00049, 0.00014)])["verdict"] == "not resolved"
    worse = _over_draws([(0.0010, 0.0001), (0.0012, 0.0001)])
    assert worse["resolved"] and worse["verdict"] == "worse" and worse["spread"] == pytest.approx(0.0002 / 2**0.5)
    assert _over_draws([(-0.0010, 0.0), (-0.0012, 0.0)])["verdict"] == "better"  # exact (AR): no MC error
    assert _over_draws([(0.0010, 0.0008), (0.0012, 0.0008)])["verdict"] == "not resolved"  # within 2 MC se
    assert not _over_draws([(0.0010, 0.0001)])["resolved"]  # one draw has no spread


def test_comparisons_include_the_random_control():
    methods = ["wanda_noised", "sink_wanda_all", "sink_wanda_random"]
    assert comparisons_for(methods) == [("sink_wanda_all", "wanda_noised"), ("sink_wanda_random", "wanda_noised"),
                                        ("sink_wanda_all", "sink_wanda_random")]


@pytest.mark.slow
def test_ablation_equals_plain_wanda_on_the_noised_states(dlm_path):
    """``sink_selection: none`` (the compare ablation) prunes exactly what llm-compressor's own Wanda prunes when
    it calibrates on the same noised states of a DLM."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.utils.pytorch.module import infer_sequential_targets

    from conftest import calibration_dataset
    from sink_modifier.cli.compare import recipe
    from sink_modifier.modifiers.scope import never_pruned_ignore

    weights = []
    for method in ("plain", "wanda_noised"):
        model = load_model(dlm_path)
        targets = sorted(infer_sequential_targets(model))
        ignore = never_pruned_ignore("lm_head", "embed")
        modifiers = ([WandaPruningModifier(sparsity=0.5, mask_structure="0:0", targets=targets, ignore=ignore)]
                     if method == "plain" else recipe(method, "0.5", targets)[0])
        oneshot(model=model, dataset=calibration_dataset(dlm_path, CALIBRATION_TEXTS[:2]), recipe=modifiers,
                pipeline="diffusion", num_calibration_samples=2, output_dir=None)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name


# --------------------------------------------------------------------------- the command


def test_compare_with_one_method_writes_its_table(capsys, dlm_path, tmp_path):
    """One method leaves nothing to pair: the results, the markdown and the picture are still written."""
    from sink_modifier.cli.main import main

    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(CALIBRATION_TEXTS) + "\n")
    output = tmp_path / "compare"
    code = main(["compare", str(dlm_path), "--methods", "wanda", "--sparsities", "0.5", "--draws", "2",
                 "--num-samples", "2", "--max-seq-length", "32", "--text-file", str(text),
                 "--eval-file", str(text), "--eval-documents", "2", "--num-mc-samples", "2",
                 "--output", str(output), "--quiet"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((output / "results.json").read_text())
    assert list(summary["methods"]) == ["wanda"] and summary["comparisons"] == []
    assert (output / "table.png").stat().st_size > 1000


def test_compare_command_on_a_toy_dlm(capsys, dlm_path, tmp_path):
    from sink_modifier.cli.main import main

    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(CALIBRATION_TEXTS) + "\n")
    output = tmp_path / "compare"
    code = main(["compare", str(dlm_path), "--methods", "wanda_noised,sink_wanda_all,sink_wanda_random",
                 "--sparsities", "0.5", "--draws", "2", "--num-samples", "2", "--max-seq-length", "32",
                 "--text-file", str(text), "--eval-file", str(text), "--eval-documents", "2",
                 "--num-mc-samples", "2", "--noise-levels", "3", "--output", str(output), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert sorted(p.name for p in output.iterdir() if not p.name.startswith(".")) == [
        "results.json", "table.md", "table.png"]
    summary = json.loads((output / "results.json").read_text())
    assert set(summary) == {"setup", "dense", "methods", "comparisons", "cells"}
    assert len(summary["cells"]) == 1 + 3 * 2 and summary["setup"]["draws_run"] == [0, 1]
    first, second = summary["setup"]["draw_documents"]
    assert len(first) == len(second) == 2 and not set(first) & set(second)  # disjoint draws
    control = summary["methods"]["sink_wanda_random"]["0.5"]
    assert control["zeros"] == pytest.approx(0.5, abs=0.01) and len(control["minus_dense"]["draws"]) == 2
    names = [(c["a"], c["b"]) for c in summary["comparisons"]]
    assert ("sink_wanda_random", "wanda_noised") in names and ("sink_wanda_all", "sink_wanda_random") in names
    for entry in summary["comparisons"]:
        r = entry["sparsity"]["0.5"]
        assert len(r["draws"]) == 2
        mean, spread = statistics.fmean(r["draws"]), statistics.stdev(r["draws"])
        assert (r["mean"], r["spread"]) == pytest.approx((mean, spread))
        resolved = abs(mean) > spread and not abs(mean) <= 2 * r["mc_se"]  # the rule docs/cli.md states
        assert r["verdict"] == (("better" if mean < 0 else "worse") if resolved else "not resolved")
    assert "sink_wanda_random (random-row control)" in out and "sink_wanda_all − sink_wanda_random" in out
    assert "wanda_noised (ablation)" in out and (output / "table.png").stat().st_size > 10_000


def test_compare_help_is_fast_and_complete(capsys):
    from sink_modifier.cli.main import main

    with pytest.raises(SystemExit) as exit_:
        main(["compare", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in ("--quick", "--draws", "--sparsities", "--methods", "random-row control", "MODEL"):
        assert option in out
