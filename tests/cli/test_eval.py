"""`freecure eval --tiny` and `freecure report` end to end: tiny SD1.5 + token fusion + layout parser,
a tiny random CLIP for PC, real MTCNN + dlib for IF (the noise images have no face: failures)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from freecure.cli import main
from freecure.evaluation.store import read_jsonl, shard_paths

pytest.importorskip("dlib")
pytest.importorskip("facenet_pytorch")

PROMPTS = 'prompt\na <S> with black curly hair\n"a <S> with blue eyes, laughing happily"\n'


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.csv"
    path.write_text(PROMPTS)
    return path


def eval_args(out, prompts, seeds=2, *extra):
    return [
        "eval",
        "--tiny",
        "--identities",
        "examples/identities",
        "--prompts",
        str(prompts),
        "--num-seeds",
        str(seeds),
        "--steps",
        "3",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def rows_of(out) -> list[dict]:
    return [row for path in shard_paths(out) for row in read_jsonl(path)]


@pytest.mark.slow
def test_eval_tiny_end_to_end_and_rerun(tmp_path, prompts, capsys):
    out = tmp_path / "eval"
    assert main(eval_args(out, prompts)) == 0
    printed = capsys.readouterr().out
    assert "4 new, 0 already done" in printed and "items/s" in printed
    assert "no face found in fd 4, pd 4, freecure 4" in printed

    rows = rows_of(out)
    assert len(rows) == 4 and len({row["key"] for row in rows}) == 4
    assert {(row["prompt_index"], row["seed"]) for row in rows} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert {row["n_attributes"] for row in rows} == {1, 2}
    for row in rows:
        assert row["identity"] == "astronaut" and row["class_word"] == "woman"
        for method in ("fd", "pd", "freecure"):
            metrics = row["metrics"][method]
            assert -100 <= metrics["pc"] <= 100
            assert metrics["if"] is None and metrics["face_found"] is False  # noise: an IF failure, recorded
            assert (out / row["images"][method]).is_file()
        assert (out / row["images"]["mask_overlay"]).is_file()
    settings = json.loads(next((out / "settings").glob("*.json")).read_text())
    assert settings["tiny"] and settings["steps"] == 3 and settings["identity_model"] == "dlib"

    report = out / "report"
    table1 = json.loads((report / "table1.json").read_text())
    assert [e["label"] for e in table1] == ["token-fusion (FD)", "token-fusion (PD)", "token-fusion + FreeCure"]
    assert all(e["n_images"] == 4 and e["if_no_face"] == 4 and e["if"] is None for e in table1)
    assert "4/4" in (report / "table1.md").read_text()
    table2 = json.loads((report / "table2.json").read_text())
    assert all(set(e["pc"]) == {"1", "2"} for e in table2)
    assert (report / "table2.csv").read_text().startswith("run,backend,settings_hash,method,label,pc_1_attr")
    page = (report / "index.html").read_text()
    assert "--tiny" in page and page.count("<img ") == 4 * 4

    # the same command again: nothing to do, no row written twice
    assert main(eval_args(out, prompts)) == 0
    assert "0 new, 4 already done" in capsys.readouterr().out
    assert len(rows_of(out)) == 4


class Crash(RuntimeError):
    pass


@pytest.mark.slow
def test_eval_interrupted_part_way_resumes_with_no_duplicate_and_no_gap(tmp_path, prompts, capsys, monkeypatch):
    from freecure.evaluation.runner import Evaluator

    out = tmp_path / "eval"
    original = Evaluator.run
    calls = []

    def crash_on_third(self, item):
        calls.append(item.key)
        if len(calls) == 3:
            raise Crash("killed")
        return original(self, item)

    monkeypatch.setattr(Evaluator, "run", crash_on_third)
    with pytest.raises(Crash):
        main(eval_args(out, prompts, 2, "--no-report"))
    assert len(rows_of(out)) == 2
    monkeypatch.setattr(Evaluator, "run", original)
    assert main(eval_args(out, prompts, 2, "--no-report")) == 0
    assert "2 new, 2 already done" in capsys.readouterr().out
    keys = [row["key"] for row in rows_of(out)]
    assert len(keys) == 4 and len(set(keys)) == 4
    assert {(row["prompt_index"], row["seed"]) for row in rows_of(out)} == {(p, s) for p in (0, 1) for s in range(2)}


@pytest.mark.slow
def test_eval_dry_run_and_two_simulated_ranks_merged_by_report(tmp_path, prompts, capsys, monkeypatch):
    out = tmp_path / "eval"
    assert main(eval_args(out, prompts, 1, "--dry-run")) == 0
    assert "2 work items" in capsys.readouterr().out and not out.exists()

    import accelerate

    class FakeState:
        """What accelerate's PartialState reports in process `rank` of 2."""

        def __init__(self, rank):
            self.process_index, self.num_processes, self.device = rank, 2, "cpu"
            self.is_main_process = rank == 0

        def wait_for_everyone(self):
            pass

    for rank in (1, 0):  # rank 0, the main process, writes the report once both shards exist
        monkeypatch.setattr(accelerate, "PartialState", lambda rank=rank, **kwargs: FakeState(rank))
        assert main(eval_args(out, prompts, 1)) == 0
        assert f"[process {rank}/2]: 1 new" in capsys.readouterr().out
    shards = [read_jsonl(path) for path in shard_paths(out)]
    assert [path.name for path in shard_paths(out)] == ["results.rank0.jsonl", "results.rank1.jsonl"]
    assert [[row["prompt_index"] for row in rows] for rows in shards] == [[0], [1]]  # round-robin
    assert len((out / "report" / "results.jsonl").read_text().splitlines()) == 2
    # `freecure report` on its own, into another folder
    assert main(["report", str(out), "--out", str(tmp_path / "r2"), "--no-progress", "--no-diversity"]) == 0
    assert "2 work items from 2 shard(s)" in capsys.readouterr().out
    assert (tmp_path / "r2" / "index.html").is_file()


def test_each_process_gets_its_own_gpu(monkeypatch):
    from argparse import Namespace

    from freecure.cli.eval import launcher_device

    monkeypatch.setenv("LOCAL_RANK", "3")
    assert str(launcher_device(Namespace(device="cuda"))) == "cuda:3"
    assert str(launcher_device(Namespace(device="cuda:1"))) == "cuda:1"
    assert str(launcher_device(Namespace(device="cpu"))) == "cpu"
