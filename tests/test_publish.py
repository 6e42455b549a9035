"""Publishing outputs: old or new, never a mix; nothing of the user's is deleted; locks; leftovers of dead runs."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sink_modifier.saving import publish
from sink_modifier.saving.publish import MANIFEST, ManifestError, OutputError, check_output, read_manifest, staged

OLD = {"model.safetensors": b"old weights", "config.json": b"old fp8 config", "sink_report.json": b"old report",
       "sub/extra.json": b"old extra"}
NEW = {"model.safetensors": b"new weights", "config.json": b"new bf16 config", "tokenizer.json": b"tokenizer"}
USER = {"notes.txt": b"mine", "data/keep.txt": b"also mine"}


def write(directory: Path, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(content)


def view(directory: Path) -> dict[str, bytes] | str:
    """What a reader that trusts the manifest sees: the files of a complete output, or why there are none."""
    if not directory.is_dir():
        return "absent"
    manifest = read_manifest(directory)
    if manifest is None or not manifest["complete"]:
        return "incomplete"
    files = publish._files(directory)
    assert set(manifest["files"]) <= files
    return {name: (directory / name).read_bytes() for name in files}


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def publish_files(target: Path, files: dict[str, bytes], **kwargs) -> None:
    with staged(target, **kwargs) as staging:
        write(staging, files)


def test_new_output_then_merge_keeps_the_users_files_and_drops_the_old_outputs(tmp_path):
    target = tmp_path / "out"
    publish_files(target, OLD)
    manifest = read_manifest(target)
    assert manifest["files"] == ["config.json", "model.safetensors", "sink_report.json"] and manifest["complete"]
    assert manifest["directories"] == ["sub"], "top-level names only: a directory is listed whole"
    write(target, USER)
    inode = (target / "notes.txt").stat().st_ino
    publish_files(target, NEW)
    assert view(target) == {**NEW, **USER}, "old sink_report.json and sub/extra.json go, notes stay"
    assert (target / "notes.txt").stat().st_ino == inode, "the user's file is the same file, not a copy"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no staging, lock or old directory is left"


def test_a_save_into_someone_elses_directory_keeps_their_files_or_refuses(tmp_path):
    """A directory written by plain transformers and the user: nothing in it is replaced or deleted. Their
    sink_report.json / recipe.yaml stay and the new ones get names that say so; a taken config.json refuses the
    save before any file there changes."""
    target = tmp_path / "out"
    theirs = {"model-00001-of-00002.safetensors": b"a", "model.safetensors.index.json": b"{}",
              "sink_report.json": b"theirs", "recipe.yaml": b"their recipe", **USER}
    write(target, theirs)
    before = hashes(target)
    publish_files(target, {"model.safetensors": b"w", "sink_report.json": b"ours", "recipe.yaml": b"r"})
    after = hashes(target)
    assert {name: after[name] for name in before} == before
    assert (target / "sink_report.sink-prune.json").read_bytes() == b"ours"
    assert (target / "recipe.sink-prune.yaml").read_bytes() == b"r"
    assert read_manifest(target)["files"] == ["model.safetensors", "recipe.sink-prune.yaml",
                                              "sink_report.sink-prune.json"]
    publish_files(target, {"model.safetensors": b"w2", "sink_report.json": b"ours2"})  # a later save of ours
    assert hashes(target, but=["model.safetensors", "sink_report.sink-prune.json"]) == before
    assert not (target / "recipe.sink-prune.yaml").exists(), "the earlier save's recipe goes with it"
    write(target, {"config.json": b"their config"})
    before = hashes(target)
    with pytest.raises(OutputError, match=r"already holds config.json, which sink-aware-pruning did not write; "
                                          "nothing was saved"):
        publish_files(target, {"model.safetensors": b"w3", "config.json": b"new"})
    assert hashes(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def hashes(directory: Path, but: list[str] = ()) -> dict[str, str]:
    """sha256 of every file under ``directory`` (bookkeeping and ``but`` left out)."""
    import hashlib

    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
            for name in publish._files(directory) if name not in but and (directory / name).is_file()}


@pytest.mark.parametrize("mode", ["exchange", "two_renames", "in_place"])
def test_a_crash_between_any_two_steps_leaves_the_old_or_the_new_output(tmp_path, monkeypatch, mode):
    """Stop the publish at every filesystem step in turn; what a reader sees at that moment is the old complete
    output or the new one (or, in place, a manifest that says incomplete); never new weights with an old
    config. The next save then completes."""
    if mode == "two_renames":
        monkeypatch.setattr(publish, "_exchange", lambda a, b: False)
    if mode == "in_place":
        monkeypatch.setattr(publish, "_fill_in_place_needed", lambda target: True)
    user = USER if mode == "in_place" else {}  # --overwrite (swaps) replaces only what is all ours
    existing = "merge" if mode == "in_place" else "replace"
    old, new = {**OLD, **user}, {**NEW, **user}
    allowed = [old, new] + {"exchange": [], "two_renames": ["absent"], "in_place": ["incomplete"]}[mode]

    class Crash(BaseException):
        pass

    step = 0
    while True:
        target = tmp_path / f"out{step}"
        publish_files(target, OLD)
        write(target, user)
        seen, calls = [], {"n": 0}

        def crash_at(function, step=step, target=target, seen=seen, calls=calls):
            def wrapped(*args):
                calls["n"] += 1
                if calls["n"] == step + 1:
                    seen.append(view(target))
                    raise Crash
                return function(*args)
            return wrapped

        with monkeypatch.context() as patch:
            for name in ("_rename", "_remove", "_exchange"):
                patch.setattr(publish, name, crash_at(getattr(publish, name)))
            try:
                publish_files(target, NEW, existing=existing)
            except Crash:
                pass
        if not seen:  # the publish made fewer steps than this: every moment has been checked
            assert view(target) == new
            break
        assert seen[0] in allowed, (step, seen[0])
        assert view(target) in allowed, step
        publish_files(target, NEW, existing=existing)  # recovery
        assert view(target) == new, step
        step += 1
    assert step >= 2


@pytest.mark.parametrize("output, why", [("", "the current directory"), (".", "the current directory"),
                                         ("..", "an ancestor of the current directory"),
                                         ("~", "the home directory"), ("/", "the root directory")])
def test_check_output_never_replaces_the_working_home_or_root_directory(tmp_path, monkeypatch, output, why):
    work = tmp_path / "home" / "projects" / "work"
    work.mkdir(parents=True)
    (work / "precious.txt").write_text("x")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for overwrite in (False, True):
        with pytest.raises(OutputError, match=why):
            check_output(Path(output), overwrite=overwrite)


def test_check_output_replaces_only_what_sink_prune_wrote(tmp_path):
    foreign = tmp_path / "foreign"
    write(foreign, USER)
    with pytest.raises(OutputError, match="is not empty; pass --overwrite"):
        check_output(foreign, overwrite=False)
    with pytest.raises(OutputError, match="was not written by sink-prune"):
        check_output(foreign, overwrite=True)
    ours = tmp_path / "ours"
    publish_files(ours, OLD)
    assert check_output(ours, overwrite=True) == ours
    (ours / "notes.txt").write_text("added by the user")
    with pytest.raises(OutputError, match=r"holds files sink-prune did not write \(notes.txt\)"):
        check_output(ours, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        check_output(tmp_path / "file" / "out", overwrite=False)
    with pytest.raises(OutputError, match="exists and is not a directory"):
        check_output(tmp_path / "file", overwrite=True)


def test_a_live_lock_fails_at_once_naming_the_holder_and_a_dead_ones_is_reclaimed(tmp_path):
    target = tmp_path / "out"
    lock = tmp_path / ".out.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{holder.pid} {os.uname().nodename}\n")
        with pytest.raises(OutputError, match=f"being written by another sink-prune run \\(pid {holder.pid}"):
            publish_files(target, NEW)
        assert not target.exists() and lock.exists()
    finally:
        holder.kill()
        holder.wait()
    publish_files(target, NEW)  # the holder died: its lock is stale
    assert view(target) == NEW and not lock.exists()


def test_leftovers_of_dead_runs_are_removed_and_an_output_moved_aside_is_restored(tmp_path, capfd):
    from sink_modifier.cli.console import command_console

    target = tmp_path / "out"
    pid = dead_pid()
    write(tmp_path / f".out.partial-{pid}-abc", {"model.safetensors": b"a whole checkpoint"})
    write(tmp_path / f"..out.partial-{pid}-abc.partial-{pid}-def", {"config.json": b"{}"})
    write(tmp_path / f".out.old-{pid}-ghi", OLD)  # a two-rename swap killed between its renames
    mine = tmp_path / f".out.partial-{os.getpid()}-xyz"  # a live run's (this process's) staging stays
    mine.mkdir()
    with command_console(quiet=False):
        with staged(target, existing="merge"):
            assert {p: (target / p).read_bytes() for p in publish._files(target)} == OLD
    err = capfd.readouterr().err
    assert f"Restored {target}" in err
    assert "Removed 2 staging leftovers of runs that died" in err and f".out.partial-{pid}-abc" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", mine.name])


def mount_tmpfs(path: Path) -> bool:
    path.mkdir()
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(path)], capture_output=True).returncode == 0
    except OSError:
        return False


def test_an_empty_mount_point_is_filled_in_place(tmp_path, monkeypatch):
    """Every container volume: the directory itself cannot be renamed (EBUSY). A real tmpfs mount where the
    test may mount one, else a rename that fails as a mount point's does."""
    target = tmp_path / "volume"
    mounted = mount_tmpfs(target)
    if not mounted:
        real = publish._exchange

        def busy(a, b):
            if Path(b) == target:
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(b))
            return real(a, b)

        monkeypatch.setattr(publish, "_exchange", busy)
    try:
        publish_files(target, NEW, existing="refuse")
        assert view(target) == NEW
        pid = dead_pid()  # a run killed while it saved into its staging directory inside the volume
        write(target / f"..sink-prune.partial-{pid}-abc.partial-{pid}-def", {"model.safetensors": b"x"})
        (target / f"..sink-prune.partial-{pid}-abc.lock").write_text(f"{pid}\n")
        publish_files(target, OLD, existing="replace")
        assert view(target) == OLD
        assert sorted(os.listdir(target)) == sorted([MANIFEST, "config.json", "model.safetensors",
                                                     "sink_report.json", "sub"])
        assert sorted(p.name for p in tmp_path.iterdir()) == ["volume"]
    finally:
        if mounted:
            subprocess.run(["umount", str(target)], check=False)


# --------------------------------------------------------------------------- the manifest is data from disk


@pytest.mark.parametrize("entry", ["../victim.txt", "ABSOLUTE", "sub/x", "link", "fifo"])
def test_a_manifest_naming_anything_but_its_own_top_level_files_is_refused_never_followed(tmp_path, entry):
    """An output filled in place (an empty mount point) whose manifest lists ``../victim.txt`` had the victim
    unlinked by ``--overwrite``. Now the manifest is refused with one line and no file anywhere changes."""
    victim = tmp_path / "victim.txt"
    victim.write_text("not yours")
    target = tmp_path / "out"
    publish_files(target, NEW)
    write(target, {"sub/x": b"x"})
    os.symlink(victim, target / "link")
    os.mkfifo(target / "fifo")
    manifest = json.loads((target / MANIFEST).read_text())
    manifest["files"].append(str(victim) if entry == "ABSOLUTE" else entry)
    (target / MANIFEST).write_text(json.dumps(manifest))
    before = hashes(tmp_path)
    with pytest.raises(ManifestError, match=r"lists '.*', which is not a file directly inside .*; the manifest "
                                            "is refused") as refused:
        check_output(target, overwrite=True)
    assert "\n" not in str(refused.value)
    with pytest.MonkeyPatch.context() as patch:  # as on a mount point, where the old files are removed one by one
        patch.setattr(publish, "_fill_in_place_needed", lambda path: True)
        with pytest.raises(ManifestError):
            publish_files(target, OLD, existing="replace")
    assert hashes(tmp_path) == before and victim.read_text() == "not yours"
    with pytest.raises(OutputError, match="already holds config.json, model.safetensors"):
        publish_files(target, OLD)  # the Python save path: an untrusted manifest makes nothing in it ours
    assert hashes(tmp_path) == before and victim.read_text() == "not yours"


@pytest.mark.parametrize("text, why", [("{not json", "is corrupt (not JSON"), ('{"files": "a"}', "is corrupt"),
                                       ("[]", "is corrupt")])
def test_a_corrupt_manifest_is_called_corrupt_not_missing(tmp_path, text, why):
    target = tmp_path / "out"
    publish_files(target, NEW)
    (target / MANIFEST).write_text(text)
    with pytest.raises(ManifestError, match=re.escape(why)):
        check_output(target, overwrite=True)


# --------------------------------------------------------------------------- symbolic links, parents


def test_an_output_through_a_symlink_is_written_into_its_target_and_a_dangling_one_is_refused(tmp_path):
    real = tmp_path / "disk" / "checkpoints"
    real.mkdir(parents=True)
    link = tmp_path / "out"
    link.symlink_to(real)
    assert check_output(link, overwrite=False) == real
    publish_files(link, OLD, existing="refuse")
    assert link.is_symlink() and os.readlink(link) == str(real) and view(real) == OLD
    assert check_output(link, overwrite=True) == real
    publish_files(link, NEW, existing="replace")
    assert link.is_symlink() and view(real) == NEW
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "out"]
    assert sorted(p.name for p in real.parent.iterdir()) == ["checkpoints"], "no .partial- or .lock left"
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    for attempt in (lambda: check_output(dangling, overwrite=False), lambda: publish_files(dangling, NEW)):
        with pytest.raises(OutputError, match=r"is a symbolic link to .*nowhere, which does not exist"):
            attempt()
    assert not (tmp_path / "nowhere").exists() and dangling.is_symlink()


def test_a_failed_save_removes_the_empty_parents_it_created(tmp_path):
    target = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError, match="calibration failed"):
        with staged(target):
            raise RuntimeError("calibration failed")
    assert sorted(os.listdir(tmp_path)) == []
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "mine.txt").write_text("x")
    with pytest.raises(RuntimeError):
        with staged(target):
            raise RuntimeError("calibration failed")
    assert sorted(os.listdir(tmp_path / "a")) == ["mine.txt"]


# --------------------------------------------------------------------------- the Python save path, for real


@pytest.mark.slow
def test_oneshot_into_a_users_folder_touches_nothing_of_theirs(tmp_path):
    """Issue 20, item 1, exactly: oneshot on the bundled DLM with recipes/sink_wanda_unstructured_50.yaml into a
    folder with an adapter, another model below it and the user's recipe.yaml and sink_report.json deleted the
    safetensors at any depth and replaced the two files. Real processes, hashes before and after."""
    folder = tmp_path / "project"
    write(folder, {"my_adapter.safetensors": b"adapter", "sub/othermodel/model.safetensors": b"other model",
                   "recipe.yaml": b"my recipe", "sink_report.json": b'{"mine": 1}'})
    before = hashes(folder)
    for _ in range(2):  # the second save replaces what the first wrote, and only that
        result = subprocess.run([sys.executable, "-c", ONESHOT, str(folder)], capture_output=True, text=True,
                                timeout=300, cwd=Path(__file__).parents[1])
        assert result.returncode == 0, result.stderr[-3000:]
        after = hashes(folder)
        assert {name: after.get(name) for name in before} == before
        ours = set(read_manifest(folder)["files"])
        assert ours == {"config.json", "generation_config.json", "model.safetensors", "recipe.sink-prune.yaml",
                        "sink_report.sink-prune.json"}
        assert set(after) == set(before) | ours | {"tokenizer.json", "tokenizer_config.json"}
    assert "SinkAwarePruningModifier" in (folder / "recipe.sink-prune.yaml").read_text()
    assert "is not this package's: kept, and the new one written as recipe.sink-prune.yaml" in (
        result.stdout + result.stderr)


ONESHOT = """
import sys, torch
from datasets import Dataset
from llmcompressor import oneshot
from transformers import AutoModelForCausalLM, AutoTokenizer
import sink_modifier
from sink_modifier.bundled import bundled_model_path

torch.set_num_threads(1)
path = bundled_model_path("dlm")
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(path)
ids = [tokenizer(text)["input_ids"][:48] for text in (
    "The quick brown fox jumps over the lazy dog and runs far away into the woods.",
    "A second sample about rivers, mountains and the weather in the north of the country.")]
dataset = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]})
oneshot(model=model, processor=tokenizer, dataset=dataset, recipe="recipes/sink_wanda_unstructured_50.yaml",
        output_dir=sys.argv[1], num_calibration_samples=2, max_seq_length=48)
"""


@pytest.mark.slow
def test_oneshot_into_a_folder_holding_another_config_is_refused_and_the_model_can_be_saved_elsewhere(tmp_path):
    """The refusal comes at save time (llm-compressor never tells a modifier where it will save): nothing in
    the folder changes, and the pruned model, still in memory, saves into another directory."""
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sink_modifier.bundled import bundled_model_path

    folder = tmp_path / "project"
    write(folder, {"config.json": b'{"model_type": "theirs"}', "notes.txt": b"mine"})
    before = hashes(folder)
    path = bundled_model_path("dlm")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = [tokenizer(text)["input_ids"][:48] for text in (
        "The quick brown fox jumps over the lazy dog and runs far away into the woods.",
        "A second sample about rivers, mountains and the weather in the north of the country.")]
    from datasets import Dataset

    dataset = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]})
    recipe = str(Path(__file__).parents[1] / "recipes" / "sink_wanda_unstructured_50.yaml")
    with pytest.raises(OutputError, match=f"{folder} already holds config.json, which sink-aware-pruning did not "
                                          "write; nothing was saved"):
        oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=recipe, output_dir=str(folder),
                num_calibration_samples=2, max_seq_length=48)
    assert hashes(folder) == before and sorted(os.listdir(folder)) == ["config.json", "notes.txt"]
    model.save_pretrained(tmp_path / "elsewhere")
    assert read_manifest(tmp_path / "elsewhere")["complete"]
    assert (tmp_path / "elsewhere" / "sink_report.json").is_file()
