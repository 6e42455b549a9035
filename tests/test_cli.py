"""``sink-prune``: every subcommand on tiny models, the files it promises, and the errors a user meets first."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from transformers import AutoModelForCausalLM

from conftest import CALIBRATION_TEXTS, calibration_dataset
from sink_modifier.cli.main import CLIError, main
from sink_modifier.cli.workflows import token_samples
from sink_modifier.saving.publish import MANIFEST, read_manifest

REPO = Path(__file__).parents[1]
RECIPE = REPO / "recipes" / "sink_wanda_unstructured_50.yaml"
PICTURES = ("sink_side_by_side.png", "sink_heatmap.png", "sink_heatmap_compare.png", "sink_temporal_variance.png",
            "sink_layer_statistics.png")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_picture(path: Path):
    """A real picture: decodes as PNG, has a sensible size, and is not one flat colour."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    pixels = imread(path)[..., :3]
    assert pixels.shape[0] > 200 and pixels.shape[1] > 400, (path, pixels.shape)
    assert float(pixels.std()) > 0.05, f"{path.name} is (nearly) one flat colour"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20, path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text("\n\n".join(CALIBRATION_TEXTS[:3]) + "\n")
    return path


@pytest.mark.parametrize("command", [[], ["run"], ["inspect"], ["eval"], ["demo"]])
def test_help(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: sink-prune {' '.join(command)}".rstrip())
    expected = {(): ["run", "inspect", "eval", "demo"], ("run",): ["--recipe", "--pipeline", "--overwrite"],
                ("inspect",): ["--compare", "--noise-levels", "--trajectory"],
                ("eval",): ["--num-mc-samples", "--text-file"], ("demo",): ["--quick", "--output"]}[tuple(command)]
    for option in expected + (["--quiet"] if command else []):
        assert option in out


def test_no_command_prints_usage(capsys):
    assert main([]) == 2
    assert "usage: sink-prune" in capsys.readouterr().err


# --------------------------------------------------------------------------- run


def test_run_writes_a_complete_checkpoint(capsys, dlm_path, text_file, tmp_path):
    output = tmp_path / "pruned"
    code, out, err = run_cli(capsys, "run", dlm_path, "--recipe", RECIPE, "--text-file", text_file,
                             "--num-samples", 2, "--max-seq-length", 48, "--seed", 3, "--output", output)
    assert code == 0, err
    assert "seed: 3" in (output / "recipe.yaml").read_text(), "--seed overrides the recipe's sink seed"
    for name in ("config.json", "model.safetensors", "recipe.yaml", "sink_report.json", "tokenizer.json"):
        assert (output / name).is_file(), name
    assert set(read_manifest(output)["files"]) == {p.name for p in output.iterdir()} - {MANIFEST}
    assert f"checkpoint:  {output}/  (recipe.yaml inside" in out
    assert f"sink report: {output / 'sink_report.json'}" in out
    assert "50.0% of the Linear weights" in out and len(out.splitlines()) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"], "a staging directory or lock was left behind"
    # progress bars (with their rates) and INFO logs went to stderr, not into the results
    assert "Sink trajectory" in err and ("it/s" in err or "s/sample" in err)
    assert "INFO" in err and "INFO" not in out
    assert "(1/3): Calibrating" in err, "llm-compressor's own bars are shown by default, as it draws them"
    assert "METRIC" not in err and "Sparsifying" not in err, "llm-compressor's per-module lines need --verbose"
    assert ".partial-" not in err, "staging paths stay out of the logs"

    model = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32)
    weights = [m.weight for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in name]
    assert weights and all((w == 0).float().mean().item() == pytest.approx(0.5, abs=0.02) for w in weights)
    report = json.loads((output / "sink_report.json").read_text())
    assert report["family"] == "masked" and report["num_samples"] == 2


def test_run_refuses_a_non_empty_output(capsys, dlm_path, text_file, tmp_path):
    output = tmp_path / "taken"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    code, out, err = run_cli(capsys, "run", dlm_path, "--recipe", RECIPE, "--text-file", text_file,
                             "--output", output)
    assert code == 1
    assert "is not empty; pass --overwrite" in err and "Traceback" not in err
    assert [p.name for p in output.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--recipe", "missing.yaml", "--text-file", "{text}"], "--recipe missing.yaml: no such file"),
        (["--recipe", str(RECIPE), "--text-file", "missing.txt"], "--text-file missing.txt: no such file"),
        (["--recipe", str(RECIPE)], "no calibration text"),
    ],
)
def test_run_bad_input_fails_with_one_line(capsys, dlm_path, text_file, tmp_path, argv, message):
    argv = [a.replace("{text}", str(text_file)) for a in argv]
    code, _, err = run_cli(capsys, "run", dlm_path, *argv, "--output", tmp_path / "out")
    assert code == 1
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_offline_hub_id_says_so(tmp_path):
    """The installed console script (or ``python -m``) with no network and an empty cache."""
    script = shutil.which("sink-prune")
    command = [script] if script else [sys.executable, "-m", "sink_modifier.cli.main"]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "TRANSFORMERS_CACHE")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run(
        [*command, "run", "someone/not-a-cached-model", "--recipe", str(RECIPE), "--text-file", __file__,
         "--output", str(tmp_path / "out"), "--quiet"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert ("could not load someone/not-a-cached-model from the Hugging Face Hub: it cannot be reached from this "
            "machine and the model is not in the local cache; pass a local directory") in result.stderr
    assert "Traceback" not in result.stderr


def test_local_path_that_does_not_exist(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "./no/such/model", "--recipe", RECIPE, "--text-file", __file__,
                           "--output", tmp_path / "out")
    assert code == 1 and "./no/such/model: no such directory" in err
    code, _, err = run_cli(capsys, "run", "no_such_model", "--recipe", RECIPE, "--text-file", __file__,
                           "--output", tmp_path / "out")  # a typo, not a Hub id (those are org/name)
    assert code == 1 and "no_such_model: no such directory" in err


def test_a_typo_fails_before_torch_is_imported(tmp_path):
    """The installed script checks MODEL before importing torch, transformers or llm-compressor (seconds of
    imports): Python's import log of the real process must not name them."""
    command = [shutil.which("sink-prune")] if shutil.which("sink-prune") else [sys.executable, "-m", "sink_prune"]
    result = subprocess.run([*command, "run", "no_such_model", "--recipe", str(RECIPE), "--text-file", __file__,
                             "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    imports = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "import time:" in line]
    errors = [line for line in result.stderr.splitlines() if "import time:" not in line]
    assert "argparse" in imports  # the import log is really on
    assert not {"torch", "transformers", "llmcompressor"} & set(imports)
    assert result.returncode == 1 and errors == [
        "sink-prune run: error: no_such_model: no such directory (a Hugging Face Hub id has the form org/name)"]
    assert not (tmp_path / "out").exists()


def test_calibration_samples_from_a_saved_dataset(dlm_path, tmp_path):
    from argparse import Namespace

    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(dlm_path)
    args = Namespace(dataset=None, text_file=None, num_samples=2, max_seq_length=10)
    texts = Dataset.from_dict({"text": ["", *CALIBRATION_TEXTS]})
    for name, dataset in [("ids", calibration_dataset(dlm_path)), ("text", texts)]:
        dataset.save_to_disk(tmp_path / name)
        args.dataset = str(tmp_path / name)
        samples = token_samples(args, tokenizer)
        assert len(samples) == 2 and all(0 < len(s) <= 10 for s in samples)
        assert samples[0] == tokenizer(CALIBRATION_TEXTS[0])["input_ids"][:10]
    Dataset.from_dict({"other": ["x"]}).save_to_disk(tmp_path / "bad")
    args.dataset = str(tmp_path / "bad")
    with pytest.raises(CLIError, match="needs an 'input_ids' or a 'text' column"):
        token_samples(args, tokenizer)


# --------------------------------------------------------------------------- inspect


@pytest.fixture(scope="module")
def inspected(dlm_path, ar_path, text_file, tmp_path_factory) -> tuple[Path, str, str]:
    """One ``inspect --compare`` run shared by the tests below (module fixtures cannot use capsys)."""
    output = tmp_path_factory.mktemp("inspect") / "sinks"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["inspect", str(dlm_path), "--compare", str(ar_path), "--text-file", str(text_file),
                     "--num-samples", "2", "--noise-levels", "4", "--max-seq-length", "40", "--quiet",
                     "--output", str(output)])
    assert code == 0, err.getvalue()
    return output, out.getvalue(), err.getvalue()


@pytest.mark.slow
def test_inspect_writes_report_pictures_and_html(inspected, dlm_path, ar_path):
    output, out, err = inspected
    assert sorted(p.name for p in output.iterdir()) == sorted(
        [*PICTURES, "report.html", "sink_report.json", "sink_report_compare.json", MANIFEST])
    dlm = json.loads((output / "sink_report.json").read_text())
    ar = json.loads((output / "sink_report_compare.json").read_text())
    assert (dlm["family"], ar["family"]) == ("masked", "autoregressive")
    assert dlm["settings"]["sink_scope"] == "layer" and dlm["groups"] == dlm["layers"] and len(dlm["layers"]) == 2
    assert dlm["num_states"] == 2 * 4 and dlm["model"] == str(dlm_path)
    # the paper's contrast, visible even on random toy weights: the AR sink stays on the first token
    assert ar["aggregate"]["dominant_sink_variance"]["mean"] == [0.0, 0.0]
    assert min(dlm["aggregate"]["dominant_sink_variance"]["mean"]) > 0.0
    for name in PICTURES:
        assert_picture(output / name)
    page = (output / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == len(PICTURES)
    assert "http://" not in page and "https://" not in page, "the page must be self-contained"
    for text in ("Sink statistics per layer", "layer 1", "masked", "autoregressive", "Centroid temporal variance"):
        assert text in page
    for name in ("report.html", "sink_report.json", "sink_heatmap.png"):
        assert name in out
    assert "masked" in out and "autoregressive" in out
    # the mask-decision diagnostic: in both reports, one verdict line per model, a column of the table
    for report in (dlm, ar):
        diagnostic = report["diagnostic"]
        assert (diagnostic["sparsity"], diagnostic["mask_structure"]) == (0.5, "0:0")
        assert [layer["layer"] for layer in diagnostic["layers"]] == ["model.layers.0", "model.layers.1"]
        # every layer of the toy has the same Linears, so the model's share is the layers' plain mean
        layer_shares = [layer["moved_decisions"] for layer in diagnostic["layers"]]
        assert diagnostic["moved_decisions"] == pytest.approx(sum(layer_shares) / len(layer_shares))
        assert diagnostic["verdict"] in out
    assert "Wanda decisions moved" in out and f"{dlm['diagnostic']['moved_decisions']:.2%}" in out


def test_inspect_sampler_trajectory(capsys, dlm_path, text_file, tmp_path):
    code, out, err = run_cli(capsys, "inspect", dlm_path, "--trajectory", "sampler", "--sampler-steps", 2,
                             "--text-file", text_file, "--num-samples", 1, "-q", "--output", tmp_path / "s")
    assert code == 0, err
    report = json.loads((tmp_path / "s" / "sink_report.json").read_text())
    assert (report["trajectory"], report["num_states"]) == ("sampler", 2)
    assert_picture(tmp_path / "s" / "sink_heatmap.png")
    assert "1 samples, 2 states" in out


def test_quiet_silences_progress_and_info(inspected):
    _, _, err = inspected
    assert "%|" not in err and "it/s" not in err, "progress bars with --quiet"
    assert "| INFO -" not in err


@pytest.mark.slow
def test_report_html_renders_in_chromium(inspected, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        # .ci/run installs chromium and exports SINK_PRUNE_REQUIRE_BROWSER: there a missing browser is a failure
        if os.environ.get("SINK_PRUNE_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed although .ci/run installs it (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from render_report import screenshot
    finally:
        sys.path.pop(0)
    shot = screenshot(inspected[0] / "report.html", tmp_path / "shot.png", browser=browser)
    assert_picture(shot)


# --------------------------------------------------------------------------- eval


@pytest.mark.parametrize("kind", ["dlm", "ar"])
def test_eval_prints_perplexity(capsys, request, text_file, kind):
    path = request.getfixturevalue(f"{kind}_path")
    code, out, err = run_cli(capsys, "eval", path, "--text-file", text_file, "--num-mc-samples", 2, "--json", "-q")
    assert code == 0, err
    result = json.loads(out)
    assert np.isfinite(result["perplexity"]) and result["perplexity"] > 1
    assert result["num_mc_samples"] == (2 if kind == "dlm" else 0)
    code, out, _ = run_cli(capsys, "eval", path, "--text-file", text_file, "--num-mc-samples", 2, "-q")
    assert ("ELBO perplexity" in out) == (kind == "dlm") and "tokens" in out


# --------------------------------------------------------------------------- demo


def bundled_or_skip():
    try:
        from sink_modifier.bundled import bundled_model_path, eval_slice_path

        return bundled_model_path("dlm"), bundled_model_path("ar"), eval_slice_path()
    except (ImportError, FileNotFoundError) as error:
        pytest.skip(f"the bundled models are not installed: {error}")


@pytest.mark.slow
def test_demo_quick_end_to_end(capsys, tmp_path):
    bundled_or_skip()
    output = tmp_path / "demo"
    code, out, err = run_cli(capsys, "demo", "--quick", "--output", output, "--quiet")
    assert code == 0, err
    assert sorted(p.name for p in output.iterdir()) == [
        MANIFEST, "results.json", "sink_aware_wanda", "sink_structured", "wanda"]
    summary = json.loads((output / "results.json").read_text())
    results = summary["results"]
    assert list(results) == ["dense", "wanda", "sink_aware_wanda", "sink_structured"]
    structured = summary["structured"]
    assert structured["widths"] == [384, 2, 1] and structured["parameters_ratio"] < 0.6
    assert json.loads((output / "sink_structured" / "config.json").read_text())["intermediate_size"] == 384
    assert "structured (50% of MLP channels and KV-head groups removed" in out
    assert results["dense"]["sparsity"] == 0.0
    for name in ("wanda", "sink_aware_wanda"):
        assert results[name]["sparsity"] == pytest.approx(0.5, abs=0.01)
        assert np.isfinite(results[name]["perplexity"]) and results[name]["num_mc_samples"] == 2
        assert (output / name / "recipe.yaml").is_file() and (output / name / "model.safetensors").is_file()
    assert (output / "sink_aware_wanda" / "sink_report.json").is_file()
    assert "WandaPruningModifier" in (output / "wanda" / "recipe.yaml").read_text()
    assert "SinkAwarePruningModifier" in (output / "sink_aware_wanda" / "recipe.yaml").read_text()
    for text in ("dense", "Wanda (llm-compressor)", "sink-aware Wanda", "50.0%", str(output / "results.json")):
        assert text in out
    cloze = json.loads((output / "results.json").read_text())["bundled_cloze_accuracy"]
    assert list(cloze) == ["dense", "wanda", "sink_aware_wanda", "sink_structured"]
    if all(value is not None for value in cloze.values()):  # lm-eval installed (the eval extra)
        assert all(value * 8 == round(value * 8) for value in cloze.values())  # k of the 8 items
        assert "bundled_cloze accuracy (lm-eval, 8 items, chance 0.25): dense " in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_demo_refuses_a_non_empty_output(capsys, tmp_path):
    bundled_or_skip()
    (tmp_path / "x").write_text("mine")
    code, _, err = run_cli(capsys, "demo", "--quick", "--output", tmp_path)
    assert code == 1 and "is not empty; pass --overwrite" in err


def test_quiet_switches_tqdm_off_through_its_environment_for_the_command_only(monkeypatch):
    """``--quiet`` sets ``TQDM_DISABLE`` (read by tqdm at its first import, under ``sink-prune``) while the command
    runs and puts back what was there; tqdm's class is never edited."""
    from tqdm import std
    from transformers.utils import logging as hf_logging

    from sink_modifier.cli import console

    init = std.tqdm.__dict__["__init__"]
    assert hf_logging.is_progress_bar_enabled()
    for before in (None, "0"):
        if before is None:
            monkeypatch.delenv("TQDM_DISABLE", raising=False)
        else:
            monkeypatch.setenv("TQDM_DISABLE", before)
        with console.bars_off_before_import(True), console.progress_bars(False):
            assert os.environ["TQDM_DISABLE"] == "1"
            assert std.tqdm.__dict__["__init__"] is init and not hf_logging.is_progress_bar_enabled()
        assert os.environ.get("TQDM_DISABLE") == before and hf_logging.is_progress_bar_enabled()
    with console.bars_off_before_import(False):
        assert os.environ.get("TQDM_DISABLE") == "0"
