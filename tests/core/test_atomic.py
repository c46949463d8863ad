"""Writes that land whole or not at all (freecure.atomic) and their use by `generate` and
`eval` (issue 9, kind 5)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from freecure.cli import main
from freecure.core.atomic import FolderLock, atomic_folder, remove_stale, write_files
from freecure.core.errors import InputError


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


@pytest.mark.slow
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


@pytest.mark.slow
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


# --------------------------------------------------------------------------- replace only what may be (issue 20)


def test_atomic_folder_keeps_a_folder_filled_while_it_worked(tmp_path):
    """Another writer fills the target between the start check and the final rename: this write
    fails, and the other writer's files stay (the swap used to replace them whole)."""
    target = tmp_path / "run"
    with pytest.raises(InputError, match="filled by another process"):
        with atomic_folder(target) as staging:
            (staging / "a.png").write_text("mine")
            target.mkdir()
            (target / "a.png").write_text("theirs")
    assert (target / "a.png").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging folder left
    with atomic_folder(tmp_path / "empty") as staging:  # an empty folder holds nothing to lose
        (tmp_path / "empty").mkdir()
        (staging / "a.png").write_text("new")
    assert (tmp_path / "empty" / "a.png").read_text() == "new"


def test_atomic_folder_checks_the_replaced_folder_again_at_the_swap(tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    (target / "old.png").write_text("old run")
    seen = []

    def only_old_runs(folder):
        seen.append(sorted(p.name for p in folder.iterdir()))
        if (folder / "notes.txt").exists():
            raise InputError(f"{folder} holds notes.txt")

    with pytest.raises(InputError, match="notes.txt"):
        with atomic_folder(target, replace=True, check=only_old_runs) as staging:
            (staging / "new.png").write_text("new")
            (target / "notes.txt").write_text("the user's, written meanwhile")
    assert seen == [["old.png"], ["notes.txt", "old.png"]]  # at the start and at the swap
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt", "old.png"]
    (target / "notes.txt").unlink()
    with atomic_folder(target, replace=True, check=only_old_runs) as staging:
        (staging / "new.png").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.png"]


def test_atomic_folder_refuses_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    for target in (".", "..", str(tmp_path)):
        with pytest.raises(InputError, match="current folder"):
            with atomic_folder(target, replace=True):
                pass
    assert (tmp_path / "work").is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_folder_lock_on_a_folder_waits_for_its_holder(tmp_path):
    """Writers of one parent folder take turns at their final renames (a lock on the folder
    itself: nothing is written into it)."""
    import threading
    import time

    holder = FolderLock(tmp_path).acquire()
    with pytest.raises(InputError, match="in use"):
        FolderLock(tmp_path).acquire()
    done = threading.Event()

    def write():
        with atomic_folder(tmp_path / "run") as staging:
            (staging / "a.png").write_text("a")
        done.set()

    thread = threading.Thread(target=write)
    thread.start()
    time.sleep(0.5)
    assert not done.is_set() and not (tmp_path / "run").exists()  # waiting for the lock
    holder.release()
    thread.join(10)
    assert done.is_set() and (tmp_path / "run" / "a.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no lock file


def _run_folder(folder, files=("fd.png", "pd.png"), **manifest):
    folder.mkdir(parents=True)
    for name in files:
        (folder / name).write_bytes(b"png")
    manifest = {"freecure_version": "0.1.0", "files": [*files, "manifest.json"], **manifest}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _batch_folder(folder, top_manifest=True):
    for seed in (3, 4):
        _run_folder(folder / f"seed{seed}")
    if top_manifest:  # --num-images today; before, only the seed folders
        (folder / "manifest.json").write_text(json.dumps({"freecure_version": "0.1.0", "runs": ["seed3", "seed4"]}))
    return folder


def test_only_an_earlier_freecure_run_is_recognised(tmp_path):
    from freecure.outputs import check_earlier_run, not_a_run

    empty = tmp_path / "empty"
    empty.mkdir()
    recognised = [empty, _run_folder(tmp_path / "run"), _batch_folder(tmp_path / "batch")]
    recognised.append(_batch_folder(tmp_path / "older", top_manifest=False))
    for folder in recognised:
        assert not_a_run(folder) is None, folder
        check_earlier_run(folder)

    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.docx").write_text("years of work")

    def write(path, text="mine"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)

    def relink(folder):
        (folder / "pd.png").unlink()
        (folder / "pd.png").symlink_to(user / "thesis.docx")

    def refolder(folder):
        (folder / "pd.png").unlink()
        (folder / "pd.png").mkdir()

    cases = {
        "extra-file": (_run_folder, lambda f: write(f / "notes.txt")),
        "hidden-file": (_run_folder, lambda f: write(f / ".DS_Store")),
        "folder-named-like-a-file": (_run_folder, refolder),
        "link": (_run_folder, relink),
        "not-json": (_run_folder, lambda f: write(f / "manifest.json", "not json")),
        "no-version": (_run_folder, lambda f: write(f / "manifest.json", json.dumps({"files": ["fd.png", "pd.png"]}))),
        "unlisted-seed-folder": (_run_folder, lambda f: _run_folder(f / "seed9")),
        "batch-extra-file": (_batch_folder, lambda f: write(f / "photo.png")),
        "batch-seed-extra-file": (_batch_folder, lambda f: write(f / "seed4" / "notes.txt")),
        "older-extra-file": (lambda f: _batch_folder(f, False), lambda f: write(f / "photo.png")),
        "older-seed-extra-file": (lambda f: _batch_folder(f, False), lambda f: write(f / "seed3" / "notes.txt")),
        "older-other-folder": (lambda f: _batch_folder(f, False), lambda f: write(f / "seeds-copy" / "fd.png")),
        "older-seed-without-manifest": (lambda f: _batch_folder(f, False), lambda f: write(f / "seed5" / "fd.png")),
    }
    assert "no freecure manifest.json" in not_a_run(user)
    for name, (make, spoil) in cases.items():
        folder = make(tmp_path / name)
        spoil(folder)
        assert not_a_run(folder) is not None, name
        with pytest.raises(InputError, match="--overwrite replaces only an earlier freecure run") as refused:
            check_earlier_run(folder)
        assert "\n" not in str(refused.value), name
