"""Publishing outputs: old or new, never a mix; nothing of the user's is deleted; locks; leftovers of dead runs."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sink_modifier import publish
from sink_modifier.publish import MANIFEST, OutputError, check_output, read_manifest, staged

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
    assert read_manifest(target)["files"] == sorted(OLD) and read_manifest(target)["complete"]
    write(target, USER)
    inode = (target / "notes.txt").stat().st_ino
    publish_files(target, NEW)
    assert view(target) == {**NEW, **USER}, "old sink_report.json and sub/extra.json go, notes stay"
    assert (target / "notes.txt").stat().st_ino == inode, "the user's file is the same file, not a copy"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no staging, lock or old directory is left"


def test_a_checkpoint_without_a_manifest_loses_its_stale_weights_and_report(tmp_path):
    """A directory written by plain transformers: the new checkpoint must not sit next to old shards."""
    target = tmp_path / "out"
    write(target, {"model-00001-of-00002.safetensors": b"a", "model.safetensors.index.json": b"{}",
                   "sink_report.json": b"old", **USER})
    publish_files(target, NEW)
    assert view(target) == {**NEW, **USER}


@pytest.mark.parametrize("mode", ["exchange", "two_renames", "in_place"])
def test_a_crash_between_any_two_steps_leaves_the_old_or_the_new_output(tmp_path, monkeypatch, mode):
    """Stop the publish at every filesystem step in turn; what a reader sees at that moment is the old complete
    output or the new one (or, in place, a manifest that says incomplete); never new weights with an old
    config. The next save then completes."""
    if mode == "two_renames":
        monkeypatch.setattr(publish, "_exchange", lambda a, b: False)
    if mode == "in_place":
        monkeypatch.setattr(publish, "_fill_in_place_needed", lambda target: True)
    old, new = {**OLD, **USER}, {**NEW, **USER}
    allowed = [old, new] + {"exchange": [], "two_renames": ["absent"], "in_place": ["incomplete"]}[mode]

    class Crash(BaseException):
        pass

    step = 0
    while True:
        target = tmp_path / f"out{step}"
        publish_files(target, OLD)
        write(target, USER)
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
                publish_files(target, NEW)
            except Crash:
                pass
        if not seen:  # the publish made fewer steps than this: every moment has been checked
            assert view(target) == new
            break
        assert seen[0] in allowed, (step, seen[0])
        assert view(target) in allowed, step
        publish_files(target, NEW)  # recovery
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
    from sink_modifier.console import command_console

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
