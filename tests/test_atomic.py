"""Writes that land whole or not at all (freecure.atomic) and their use by `generate` and
`eval` (issue 9, kind 5)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from freecure.atomic import FolderLock, atomic_folder, remove_stale, write_files
from freecure.cli import main
from freecure.errors import InputError


def dead_pid() -> int:
    """The id of a process that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_atomic_folder_lands_whole_or_not_at_all(tmp_path):
    target = tmp_path / "run"
    with pytest.raises(OSError):
        with atomic_folder(target) as staging:
            (staging / "a.png").write_text("a")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []  # neither the run nor its staging folder
    with atomic_folder(target) as staging:
        (staging / "a.png").write_text("old")
        (staging / "old-only.png").write_text("old")
    with pytest.raises(InputError):
        with atomic_folder(target):
            pass
    with atomic_folder(target, replace=True) as staging:
        (staging / "a.png").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["a.png"] and (target / "a.png").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_stale_temporaries_of_dead_writers_are_removed_and_an_interrupted_swap_is_undone(tmp_path):
    pid = dead_pid()
    (tmp_path / f".run.partial-{pid}").mkdir()
    (tmp_path / f".table1.md.partial-{pid}").write_text("half")
    (tmp_path / f".table2.md.partial-{os.getpid()}").write_text("mine, still being written")
    (tmp_path / f".kept.old-{pid}").mkdir()  # died between the two renames of a replacement
    removed = remove_stale(tmp_path)
    assert sorted(p.name for p in removed) == sorted([f".run.partial-{pid}", f".table1.md.partial-{pid}"])
    assert (tmp_path / "kept").is_dir() and (tmp_path / f".table2.md.partial-{os.getpid()}").exists()


def test_write_files_replaces_all_or_none(tmp_path):
    write_files(tmp_path, {"t1.md": "old 1", "t2.md": "old 2", "t3.md": "old 3"})

    def fail(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        write_files(tmp_path, {"t1.md": "new 1", "t2.md": "new 2", "t3.md": fail})
    assert [(tmp_path / f"t{i}.md").read_text() for i in (1, 2, 3)] == ["old 1", "old 2", "old 3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t1.md", "t2.md", "t3.md"]


def test_folder_lock_is_exclusive_and_released(tmp_path):
    lock = tmp_path / ".lock"
    with FolderLock(lock):
        with pytest.raises(InputError, match="in use"):
            FolderLock(lock).acquire()
    with FolderLock(lock):  # released on exit
        pass


# --------------------------------------------------------------------------- generate


def test_generate_overwrite_replaces_the_run_instead_of_merging(tmp_path, astronaut, capsys):
    ref = tmp_path / "ref.png"
    astronaut.resize((64, 64)).save(ref)
    out = tmp_path / "run"

    def generate(prompt, *extra):
        args = ["generate", "--tiny", "--prompt", prompt, "--ref", str(ref), "--steps", "2", "--no-progress"]
        return main([*args, "--out", str(out), *extra])

    assert generate("a man with black curly hair") == 0
    assert (out / "mask_black-curly-hair.png").is_file()
    assert generate("a man with blue eyes", "--overwrite") == 0
    files = sorted(p.name for p in out.iterdir())
    assert "mask_black-curly-hair.png" not in files and "mask_blue-eyes.png" in files
    assert files == sorted(json.loads((out / "manifest.json").read_text())["files"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.png", "run"]  # no staging folder left


# --------------------------------------------------------------------------- eval


def test_eval_lock_and_stale_temporaries(tmp_path, capsys):
    pytest.importorskip("dlib")
    pytest.importorskip("facenet_pytorch")
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt\na <S> with black curly hair\n")
    out = tmp_path / "eval"
    args = ["eval", "--tiny", "--identities", "examples/identities", "--prompts", str(prompts), "--num-seeds", "1",
            "--steps", "2", "--out", str(out), "--no-progress", "--no-report"]
    assert main([*args, "--dry-run"]) == 0
    digest = capsys.readouterr().out.split("settings ")[1].split(";")[0]
    folder = out / f"images/token-fusion-{digest}/astronaut/p000/s0"
    folder.mkdir(parents=True)
    stale = [folder / f".fd.png.partial-{dead_pid()}", folder / f".pd.png.partial-{os.getpid()}"]
    for path in stale:
        path.write_bytes(b"half a png")  # left by a killed run (this process now owns the item)

    with FolderLock(out / ".results.rank0.lock"):  # another `freecure eval` on the same folder
        assert main(args) == 2
    error = capsys.readouterr().err
    assert "another `freecure eval` is writing shard 0" in error and "Traceback" not in error
    assert not list(out.glob("results.rank*.jsonl"))

    assert main(args) == 0
    assert "1 new" in capsys.readouterr().out
    assert not any(path.exists() for path in stale)
    assert not [p for p in out.rglob("*") if ".partial-" in p.name]
