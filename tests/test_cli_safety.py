"""``sink-prune`` never loses a user's files or a finished run: dangerous outputs, kills, locks, one-line errors,
checks before the expensive work, and output that fits a terminal."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CALIBRATION_TEXTS
from sink_modifier.cli.main import CLIError, main
from sink_modifier.saving.publish import MANIFEST, read_manifest

REPO = Path(__file__).parents[1]
RECIPE = REPO / "recipes" / "sink_wanda_unstructured_50.yaml"
SMALL = ["--num-samples", "2", "--max-seq-length", "32", "--threads", "1"]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def script() -> list[str]:
    found = Path(sys.executable).parent / "sink-prune"
    fallback = [sys.executable, "-c", "import sink_prune, sys; sys.exit(sink_prune.main())"]
    return [str(found)] if found.exists() else fallback


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text("\n\n".join(CALIBRATION_TEXTS[:3]) + "\n")
    return path


def one_line_error(code: int, err: str, message: str) -> None:
    assert code == 1, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sink-prune") and ": error: " in lines[0], err
    assert message in lines[0], err


# --------------------------------------------------------------------------- 1. --overwrite and dangerous outputs


@pytest.mark.parametrize("output, why", [("", "is the current directory"), (".", "is the current directory"),
                                         ("..", "is an ancestor of the current directory"),
                                         ("~", "is the home directory"), ("/", "is the root directory")])
def test_overwrite_never_replaces_the_working_home_or_root_directory(capsys, monkeypatch, tmp_path, dlm_path,
                                                                     text_file, output, why):
    """``-o "$UNSET" --overwrite`` used to replace the current directory with the checkpoint."""
    work = tmp_path / "home" / "projects" / "work"
    work.mkdir(parents=True)
    (work / "thesis.tex").write_text("years of work")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    code, out, err = run_cli(capsys, "run", dlm_path, "--recipe", RECIPE, "--text-file", text_file, "-o", output,
                             "--overwrite", "-q")
    one_line_error(code, err, why)
    assert (work / "thesis.tex").read_text() == "years of work" and os.listdir(work) == ["thesis.tex"]
    assert out == ""


def test_overwrite_refuses_a_directory_sink_prune_did_not_write(capsys, dlm_path, text_file, tmp_path):
    output = tmp_path / "data"
    output.mkdir()
    (output / "results.csv").write_text("mine")
    code, _, err = run_cli(capsys, "run", dlm_path, "--recipe", RECIPE, "--text-file", text_file, "-o", output,
                           "--overwrite")
    one_line_error(code, err, "was not written by sink-prune")
    assert os.listdir(output) == ["results.csv"]


# --------------------------------------------------------------------------- 2 and 5. W4A16, reruns, stale files


def test_w4a16_recipe_then_a_rerun_with_a_plain_recipe_over_it(capsys, dlm_path, text_file, tmp_path):
    """The shipped W4A16 recipe crashed after saving (packed weights have no .weight); a rerun was refused. The
    rerun with a recipe without the sink modifier must not leave the first run's sink_report.json behind."""
    output = tmp_path / "out"
    code, out, err = run_cli(capsys, "run", dlm_path, "--recipe", REPO / "recipes" / "sink_2of4_w4a16.yaml",
                             "--text-file", text_file, *SMALL, "-o", output, "-q")
    assert code == 0, err
    assert "50.0% of the Linear weights outside the LM head are zero" in out
    config = json.loads((output / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    assert (output / "sink_report.json").is_file()
    plain = tmp_path / "wanda.yaml"
    plain.write_text("pruning_stage:\n  pruning_modifiers:\n    WandaPruningModifier:\n      sparsity: 0.5\n"
                     "      mask_structure: '0:0'\n      targets: ['re:.*layers\\.\\d+$']\n"
                     "      ignore: ['re:.*lm_head.*']\n")
    code, out, err = run_cli(capsys, "run", dlm_path, "--recipe", plain, "--text-file", text_file, *SMALL,
                             "-o", output, "--overwrite", "-q")
    assert code == 0, err
    assert "sink report: none" in out
    assert not (output / "sink_report.json").exists(), "a stale report from the previous run"
    assert "quantization_config" not in json.loads((output / "config.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "wanda.yaml"]


# --------------------------------------------------------------------------- 3. outputs that cannot be renamed


def mount_tmpfs(path: Path, *options: str) -> bool:
    path.mkdir()
    try:
        command = ["mount", "-t", "tmpfs", *(["-o", ",".join(options)] if options else []), "tmpfs", str(path)]
        return subprocess.run(command, capture_output=True).returncode == 0
    except OSError:
        return False


def test_an_empty_mount_point_as_output(capsys, monkeypatch, dlm_path, text_file, tmp_path):
    """Every container volume is one; its final rename failed with EBUSY and discarded the whole result. A real
    tmpfs mount where the test may mount one, else a rename that fails as a mount point's does."""
    import errno

    from sink_modifier.saving import publish

    output = tmp_path / "volume"
    mounted = mount_tmpfs(output)
    if not mounted:
        def busy(a, b):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(b))

        monkeypatch.setattr(publish, "_exchange", busy)
    try:
        code, out, err = run_cli(capsys, "run", dlm_path, "--recipe", RECIPE, "--text-file", text_file, *SMALL,
                                 "-o", output, "-q")
        assert code == 0, err
        assert (output / "model.safetensors").is_file() and read_manifest(output)["complete"]
        assert {p.name for p in output.iterdir()} == set(read_manifest(output)["files"]) | {MANIFEST}
        assert sorted(p.name for p in tmp_path.iterdir()) == ["volume"]
    finally:
        if mounted:
            subprocess.run(["umount", str(output)], check=False)


def test_an_unwritable_location_fails_before_the_model_loads(capsys, dlm_path, text_file, tmp_path):
    parent = tmp_path / "readonly"
    if not mount_tmpfs(parent, "ro"):
        if os.geteuid() == 0:
            pytest.skip("root ignores permissions and cannot mount a read-only tmpfs here")
        parent.chmod(0o555)
    try:
        code, _, err = run_cli(capsys, "run", dlm_path, "--recipe", RECIPE, "--text-file", text_file,
                               "-o", parent / "out")
        one_line_error(code, err, str(parent))
        assert "Loaded" not in err
    finally:
        subprocess.run(["umount", str(parent)], check=False, capture_output=True)
        parent.chmod(0o755)


# --------------------------------------------------------------------------- 4 and 9. signals, locks, leftovers


def start_run(dlm_path, text_file, output: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    """A real ``sink-prune run`` process, returned once its staging directory exists (before the model loads)."""
    process = subprocess.Popen(
        [*script(), "run", str(dlm_path), "--recipe", str(RECIPE), "--text-file", str(text_file),
         "--num-samples", "3", "--threads", "1", "-o", str(output), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        staging = list(output.parent.glob(f".{output.name}.partial-{process.pid}-*"))
        if staging:
            return process, staging[0]
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"no staging directory appeared: {process.communicate()}")


@pytest.mark.slow
def test_sigterm_sigkill_and_a_second_run_into_the_same_output(capsys, dlm_path, text_file, tmp_path):
    """SIGTERM (Slurm, docker stop) cleans up like Ctrl-C and leaves the --overwrite target intact; a second run
    fails at once naming the first; SIGKILL (the OOM killer) leaves staging and lock behind, and the next run
    removes them and says so."""
    from sink_modifier.saving.publish import staged

    output = tmp_path / "out"
    with staged(output) as previous:  # an earlier result of sink-prune
        (previous / "model.safetensors").write_bytes(b"the previous checkpoint")
    first, staging = start_run(dlm_path, text_file, output, "--overwrite")
    code, _, err = run_cli(capsys, "run", dlm_path, "--recipe", RECIPE, "--text-file", text_file, "-o", output,
                           "--overwrite")
    one_line_error(code, err, f"is being written by another sink-prune run (pid {first.pid}")
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, err
    assert "terminated; nothing was published" in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["out"], "SIGTERM must remove the staging directory and the lock"
    assert (output / "model.safetensors").read_bytes() == b"the previous checkpoint"

    second, staging = start_run(dlm_path, text_file, output, "--overwrite")
    second.kill()
    second.communicate(timeout=60)
    assert staging.exists() and (tmp_path / ".out.lock").exists()
    assert (output / "model.safetensors").read_bytes() == b"the previous checkpoint"
    code, out, err = run_cli(capsys, "run", dlm_path, "--recipe", RECIPE, "--text-file", text_file, *SMALL,
                             "-o", output, "--overwrite")
    assert code == 0, err
    assert f"Removed the lock of a run that died (pid {second.pid})" in err
    assert f"Removed 1 staging leftover of runs that died, next to {output}: {staging.name}" in err
    assert sorted(os.listdir(tmp_path)) == ["out"]


# --------------------------------------------------------------------------- 6. one-line errors


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    stage = b"sparsity_stage:\n  sparsity_modifiers:\n    "
    files = {
        "latin1.txt": "Caf\xe9 au lait, pr\xeat \xe0 partir.\n".encode("latin-1"),
        "broken.yaml": b"sparsity_stage: [1, 2\n",
        "plain.yaml": b"hello: world\n",
        "typo.yaml": stage + b"SinkAwarePrunngModifier:\n      sparsity: 0.5\n",
        "range.yaml": stage + b"SinkAwarePruningModifier:\n      sparsity: 1.5\n",
        "adapter.yaml": stage + b"SinkAwarePruningModifier:\n      adapter: masked\n",
        "owl.yaml": stage + b"SinkAwarePruningModifier:\n      owl_m: 5\n",
        "targets.yaml": stage + b"SinkAwarePruningModifier:\n      targets: [NoSuchLayer]\n",
        "head.yaml": stage + b"SinkAwarePruningModifier:\n      targets: [Linear]\n      ignore: []\n",
        "file": b"not a directory",
    }
    for name, content in files.items():
        (root / name).write_bytes(content)
    return {name: root / name for name in files}


@pytest.mark.parametrize("case, message", [
    ("latin1.txt", "is not UTF-8 text (byte 0xe9 at offset 3)"),
    ("broken.yaml", "is not valid YAML: expected ',' or ']'"),
    ("plain.yaml", "defines no modifier"),
    ("typo.yaml", "there is no modifier called 'SinkAwarePrunngModifier'"),
    ("range.yaml", "sparsity must be in [0, 1)"),
    ("adapter.yaml", "invalid SinkAwarePruningModifier: adapter: unknown field; check its spelling"),
    ("owl.yaml", "invalid SinkAwarePruningModifier: owl_m: unknown field; check its spelling"),
    ("under_a_file", "is a file"),
    ("targets.yaml", "targets ['NoSuchLayer'] matched no module"),
    ("head.yaml", "the model's LM head or an embedding"),
    ("one_token", "sink statistics need at least 2 positions"),
])
def test_user_errors_are_one_line(capsys, dlm_path, text_file, tmp_path, inputs, case, message):
    recipe, text, output, extra = RECIPE, text_file, tmp_path / "out", []
    if case.endswith(".yaml"):
        recipe = inputs[case]
    elif case.endswith(".txt"):
        text = inputs[case]
    elif case == "under_a_file":
        output = inputs["file"] / "out"
    elif case == "one_token":
        extra = ["--max-seq-length", "1"]
    code, _, err = run_cli(capsys, "run", dlm_path, "--recipe", recipe, "--text-file", text, "-o", output, "-q",
                           *extra)
    one_line_error(code, err, message)
    if case in ("latin1.txt", "broken.yaml", "typo.yaml", "under_a_file"):
        assert "Loaded" not in err  # checked before the model loads (and -q would hide it anyway)
    assert not output.exists() and sorted(os.listdir(tmp_path)) == []


def test_debug_shows_the_traceback(dlm_path, text_file, tmp_path, inputs):
    with pytest.raises(CLIError, match="is not valid YAML"):
        main(["run", str(dlm_path), "--recipe", str(inputs["broken.yaml"]), "--text-file", str(text_file),
              "-o", str(tmp_path / "out"), "--debug"])


# --------------------------------------------------------------------------- 8. output that respects the user


def bundled_dlm() -> Path:
    try:
        from sink_modifier.bundled import bundled_model_path

        return bundled_model_path("dlm")
    except (ImportError, FileNotFoundError) as error:
        pytest.skip(f"the bundled models are not installed: {error}")


def test_version_and_help_answer_without_importing_torch_or_llm_compressor():
    probe = ("import sys, sink_prune\nsys.argv = ['sink-prune', '{arg}']\n"
             "try:\n    sink_prune.main()\nexcept SystemExit:\n    pass\n"
             "heavy = {{m.split('.')[0] for m in sys.modules}} & {{'torch', 'llmcompressor', 'transformers'}}\n"
             "heavy = sorted(heavy)\n"
             "print('HEAVY', heavy)")
    for arg in ("--version", "--help"):
        result = subprocess.run([sys.executable, "-c", probe.format(arg=arg)], capture_output=True, text=True,
                                timeout=60, cwd=REPO)
        assert result.returncode == 0, result.stderr
        assert "HEAVY []" in result.stdout, result.stdout
        assert result.stderr == ""
        first = result.stdout.splitlines()[0]
        assert first == "sink-prune 0.1.0" if arg == "--version" else first.startswith("usage: sink-prune")


@pytest.mark.slow
def test_default_and_quiet_runs_of_the_bundled_dlm_fit_on_a_screen(tmp_path):
    """Real processes, as a user sees them: at most 30 lines by default, at most 4 with --quiet, and stdout
    holds only the summary (llm-compressor's import-time "No accelerator" line included)."""
    dlm = bundled_dlm()
    from sink_modifier.cli.demo import CALIBRATION_TEXT

    lines = {}
    for mode in ("default", "quiet"):
        result = subprocess.run(
            [*script(), "run", str(dlm), "--recipe", str(RECIPE), "--text-file", str(CALIBRATION_TEXT),
             "--num-samples", "4", "--max-seq-length", "64", "--threads", "1", "-o", str(tmp_path / mode),
             *(["--quiet"] if mode == "quiet" else [])],
            capture_output=True, timeout=300,
        )
        out, err = result.stdout.decode(), result.stderr.decode()
        assert result.returncode == 0, err
        assert out.startswith("Pruned dlm in ") and out.count("\n") == 3, out
        lines[mode] = (out + err).count("\n")  # a bar's updates end in "\r": they redraw one line
        assert ".partial-" not in err
    # default: every library's bars as drawn, llm-compressor's two per decoder layer (6 here) included;
    # quiet: the summary, plus compressed-tensors' "Dispatching model" bar while saving (it passes its own
    # disable= and has no switch: docs/cli.md)
    assert lines["default"] <= 30 and lines["quiet"] <= 4, lines
    quiet_err = err  # the last run
    assert "Sink trajectory" not in quiet_err and "Calibrating" not in quiet_err, "bars with -q"


# --------------------------------------------------------------------------- 10. surprises made visible


def test_an_autoregressive_model_and_a_text_without_blank_lines_are_warned_about(capsys, ar_path, tmp_path):
    text = tmp_path / "one_paragraph.txt"
    text.write_text("\n".join(CALIBRATION_TEXTS[:4]) + "\n")
    code, _, err = run_cli(capsys, "run", ar_path, "--recipe", RECIPE, "--text-file", text, *SMALL,
                           "-o", tmp_path / "out", "-q")
    assert code == 0, err
    assert "WARNING" in err and "it is an autoregressive model, not a diffusion LM" in err
    assert "has no blank line, so all of it is one sample" in err


# --------------------------------------------------------------------------- hang-ups, double Ctrl-C (issue 20)


def start_signalled_run(dlm_path, text_file, output: Path, *, nohup: bool) -> tuple[subprocess.Popen, Path]:
    """``start_run`` with SIGINT and SIGHUP at their defaults, as a terminal's foreground job has them, or SIGHUP
    ignored by a real ``nohup`` (and what ``setsid`` and systemd give a service)."""

    def defaults():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)

    prefix = []
    if nohup:
        prefix = [shutil.which("nohup")] if shutil.which("nohup") else [
            sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
            "os.execvp(sys.argv[1], sys.argv[1:])"]
    process = subprocess.Popen(
        [*prefix, *script(), "run", str(dlm_path), "--recipe", str(RECIPE), "--text-file", str(text_file), *SMALL,
         "-o", str(output), "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=defaults)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        staging = list(output.parent.glob(f".{output.name}.partial-{process.pid}-*"))
        if staging:
            return process, staging[0]
        time.sleep(0.02)
    process.kill()
    raise AssertionError(f"no staging directory appeared: {process.communicate()}")


@pytest.mark.slow
def test_a_run_under_nohup_survives_a_hang_up_and_a_foreground_one_stops_cleanly(dlm_path, text_file, tmp_path):
    """The SIGHUP handler replaced nohup's ignore, so logging out killed a long prune (exit 129)."""
    kept = tmp_path / "kept"
    process, _ = start_signalled_run(dlm_path, text_file, kept, nohup=True)
    process.send_signal(signal.SIGHUP)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert out.startswith("Pruned ") and read_manifest(kept)["complete"] and (kept / "model.safetensors").is_file()

    stopped = tmp_path / "stopped"
    process, staging = start_signalled_run(dlm_path, text_file, stopped, nohup=False)
    process.send_signal(signal.SIGHUP)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGHUP, err
    assert "terminated; nothing was published" in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["kept"]


@pytest.mark.slow
def test_two_ctrl_c_10_ms_apart_stop_the_run_without_a_traceback(dlm_path, text_file, tmp_path):
    stopped = 0
    for attempt, delay in enumerate([0, 0.3, 0.6, 1.0]):  # the imports, the model loading, the calibration
        output = tmp_path / f"out{attempt}"
        process, _ = start_signalled_run(dlm_path, text_file, output, nohup=False)
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
        if process.returncode in (0, -signal.SIGINT) and output.is_dir() and read_manifest(output)["complete"]:
            continue  # published before the signals came (-2: Python had already restored SIGINT while exiting)
        stopped += 1
        assert process.returncode == 128 + signal.SIGINT, err
        assert "Traceback" not in err and err.strip().splitlines() == [
            "sink-prune run: interrupted; nothing was published"], err
        assert not output.exists()
    assert stopped, "no attempt stopped the run"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# --------------------------------------------------------------------------- symlinked, mounted outputs (issue 20)


def test_an_output_through_a_symlink_is_written_into_its_target(capsys, dlm_path, text_file, tmp_path):
    real = tmp_path / "disk" / "run1"
    real.mkdir(parents=True)
    link = tmp_path / "out"
    link.symlink_to(real)
    code, out, err = run_cli(capsys, "run", dlm_path, "--recipe", RECIPE, "--text-file", text_file, *SMALL,
                             "-o", link, "-q")
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert (real / "model.safetensors").is_file() and read_manifest(real)["complete"]
    assert f"checkpoint:  {link}/" in out
    assert sorted(os.listdir(tmp_path)) == ["disk", "out"] and os.listdir(real.parent) == ["run1"]

    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    code, _, err = run_cli(capsys, "run", dlm_path, "--recipe", RECIPE, "--text-file", text_file, "-o", dangling)
    one_line_error(code, err, f"--output {dangling} is a symbolic link to {tmp_path / 'nowhere'}, which does "
                   "not exist")
    assert "Loaded" not in err and dangling.is_symlink() and not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("entry", ["../victim.txt", "ABSOLUTE", "sub/x"])
def test_overwrite_refuses_a_mounted_output_whose_manifest_points_outside(capsys, dlm_path, text_file, tmp_path,
                                                                          entry):
    """An empty mount point filled in place, whose manifest was edited to list a file outside it: --overwrite
    used to unlink that file."""
    import hashlib

    victim = tmp_path / "victim.txt"
    victim.write_text("not sink-prune's")
    volume = tmp_path / "volume"
    mounted = mount_tmpfs(volume)
    try:
        (volume / "sub").mkdir()
        (volume / "sub" / "x").write_text("below the top level")
        (volume / MANIFEST).write_text(json.dumps({"writer": "sink-aware-pruning", "complete": True, "files": [
            str(victim) if entry == "ABSOLUTE" else entry]}))
        def hashes():
            return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.rglob("*") if p.is_file()}

        before = hashes()
        code, _, err = run_cli(capsys, "run", dlm_path, "--recipe", RECIPE, "--text-file", text_file, "-o", volume,
                               "--overwrite")
        one_line_error(code, err, "which is not a file directly inside")
        assert "the manifest is refused, not followed" in err and "Loaded" not in err
        assert hashes() == before
    finally:
        if mounted:
            subprocess.run(["umount", str(volume)], check=False)
