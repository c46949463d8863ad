"""Evaluation data and bookkeeping: prompts, identities, the JSONL store, work items, sharding,
resuming, the tables and the HTML report — with stand-in models, so each test takes a moment."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from freecure.core.attributes import parse_prompt
from freecure.core.errors import InputError
from freecure.evaluation.identities import Identity, load_identities
from freecure.evaluation.metrics.diversity import diversity_groups
from freecure.evaluation.metrics.identity import Face
from freecure.evaluation.prompts import EvalPrompt, load_prompts, read_prompts
from freecure.evaluation.report import write_report
from freecure.evaluation.runner import (
    METHODS,
    Evaluator,
    done_keys,
    load_rows,
    plan_items,
    run_shard,
    settings_hash,
    shard,
)
from freecure.evaluation.store import ResultStore, merge_rows, read_jsonl, read_results, shard_path
from freecure.evaluation.tables import relative_change, table1, table1_csv, table1_markdown, table2, table2_markdown

# --------------------------------------------------------------------------- prompts


def test_table3_prompts_and_their_attribute_counts():
    prompts = load_prompts()
    assert len(prompts) == 20
    assert prompts[0].template == "a <S> with black curly hair"
    counts = [prompt.n_attributes("woman") for prompt in prompts]
    # §5.1: eight prompts with one attribute, eight with two, four with three
    assert [counts.count(n) for n in (1, 2, 3)] == [8, 8, 4]
    assert all(prompt.n_attributes("man") == count for prompt, count in zip(prompts, counts))


def test_prompt_render_with_class_and_trigger():
    prompt = EvalPrompt(0, "a <S> with blonde hair and blue eyes")
    assert prompt.render("woman") == "a woman with blonde hair and blue eyes"
    assert prompt.render("man", trigger="img") == "a man img with blonde hair and blue eyes"
    parsed = parse_prompt(prompt.render("man", "img"), "man", trigger="img")
    assert parsed.foundation_prompt == prompt.render("man")


def test_custom_prompt_files(tmp_path, caplog):
    text = tmp_path / "prompts.txt"
    text.write_text("# my prompts\na <S> wearing sunglasses\n\na <S> laughing happily, with red hair\n")
    prompts = load_prompts(text)
    assert [p.template for p in prompts] == ["a <S> wearing sunglasses", "a <S> laughing happily, with red hair"]
    assert [p.index for p in prompts] == [0, 1]
    assert [p.n_attributes() for p in prompts] == [1, 2]
    table = read_prompts("prompt,n_attributes,note\na <S> with blue eyes,2,wrong count\n")
    assert table[0].note == "wrong count" and table[0].n_attributes() == 1
    assert "the attribute parser finds 1" in caplog.text
    with pytest.raises(InputError, match="placeholder <S>"):
        read_prompts("a man with blue eyes\n")
    with pytest.raises(InputError, match="not found"):
        load_prompts(tmp_path / "missing.csv")


# --------------------------------------------------------------------------- identities


def test_example_identity_manifest():
    (identity,) = load_identities("examples/identities")
    assert identity.id == "astronaut" and identity.class_word == "woman"
    assert identity.references[0].resolve() == Path("examples/astronaut.png").resolve()


def test_identity_manifests_json_csv_and_errors(tmp_path, grey_image):
    grey_image.save(tmp_path / "a.png")
    grey_image.save(tmp_path / "b.png")
    (tmp_path / "identities.csv").write_text("id,class_word,references\nann,woman,a.png;b.png\nbob,man,b.png\n")
    ann, bob = load_identities(tmp_path)
    assert ann.references == (tmp_path / "a.png", tmp_path / "b.png") and bob.class_word == "man"
    bad = tmp_path / "bad.json"
    for entries, message in [
        ([{"id": "x", "class_word": "man", "references": ["nope.png"]}], "not found"),
        ([{"id": "x y", "class_word": "man", "references": ["a.png"]}], "letters, digits"),
        ([{"id": "x", "references": ["a.png"]}], "class_word"),
        ([{"id": "x", "class_word": "man", "references": ["a.png"]}] * 2, "appears twice"),
    ]:
        bad.write_text(json.dumps({"identities": entries}))
        with pytest.raises(InputError, match=message):
            load_identities(bad)
    with pytest.raises(InputError, match="no identities.json"):
        load_identities(tmp_path / "..")


# --------------------------------------------------------------------------- the store


def test_store_appends_whole_lines_and_reads_them_back(tmp_path):
    store = ResultStore(shard_path(tmp_path, 0))
    for index in range(3):
        store.append({"key": f"k{index}", "value": index})
    assert store.path.read_text().count("\n") == 3
    assert [row["value"] for row in read_jsonl(store.path)] == [0, 1, 2]


def test_torn_last_line_is_skipped_then_cut_before_the_next_append(tmp_path, caplog):
    path = shard_path(tmp_path, 0)
    ResultStore(path).append({"key": "a"})
    with path.open("ab") as file:
        file.write(b'{"key": "b", "val')  # a write killed half-way
    assert [row["key"] for row in read_jsonl(path)] == ["a"]
    assert "torn last line" in caplog.text
    store = ResultStore(path)  # the shard's owner reopens it
    store.append({"key": "c"})
    assert [row["key"] for row in read_jsonl(path)] == ["a", "c"]
    assert path.read_bytes().endswith(b"\n")


def test_malformed_lines_and_duplicates_are_reported(tmp_path):
    shard_path(tmp_path, 0).write_text('{"key": "a", "v": 1}\nnot json\n{"no_key": 1}\n')
    shard_path(tmp_path, 1).write_text('{"key": "a", "v": 2}\n{"key": "b", "v": 3}\n')
    from freecure.evaluation.store import ReadReport

    report = ReadReport()
    rows = read_results([tmp_path], report)
    merged = merge_rows(rows, report)
    assert sorted(merged) == ["a", "b"] and report.duplicates == 1
    assert len(report.skipped_lines) == 2 and len(report.files) == 2


# --------------------------------------------------------------------------- work items and shards


def _items(n_identities=2, n_prompts=3, n_seeds=4, digest="h"):
    identities = [Identity(f"id{i}", "woman", (Path("examples/astronaut.png"),)) for i in range(n_identities)]
    prompts = [
        EvalPrompt(i, t)
        for i, t in enumerate(["a <S> with red hair", "a <S> laughing", "a <S> wearing sunglasses"][:n_prompts])
    ]
    return plan_items(identities, prompts, list(range(n_seeds)), "token-fusion", digest)


def test_work_item_keys_are_unique_and_name_every_part():
    items = _items()
    assert len(items) == 24 and len({item.key for item in items}) == 24
    key = items[5].key
    assert key.startswith("token-fusion|h|id0|p001-") and key.endswith("|s1")
    assert _items(digest="other")[5].key != key
    edited = plan_items([items[0].identity], [EvalPrompt(0, "a <S> with blue hair")], [0], "token-fusion", "h")
    assert edited[0].key != items[0].key  # same index, new text: a new item


def test_settings_hash_is_order_free_and_sensitive():
    assert settings_hash({"a": 1, "b": 2}) == settings_hash({"b": 2, "a": 1})
    assert settings_hash({"a": 1, "b": 2}) != settings_hash({"a": 1, "b": 3})


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_shards_are_disjoint_and_cover_everything(world_size):
    items = _items()
    shards = [shard(items, rank, world_size) for rank in range(world_size)]
    keys = [item.key for part in shards for item in part]
    assert sorted(keys) == sorted(item.key for item in items)
    assert len(keys) == len(set(keys))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError):
        shard(items, world_size, world_size)


# --------------------------------------------------------------------------- stand-in models


class StubFreeCure:
    """Returns an FD/PD/FreeCure triple without a diffusion model: face photos or noise."""

    def __init__(self, faces: list[Image.Image] | None = None):
        self.faces = faces
        self.calls = 0

    def __call__(self, prompt, reference_images, class_word, trigger_word, generator, **kwargs):
        self.calls += 1
        seed = int(generator.initial_seed())
        if self.faces:
            images = {m: self.faces[(seed + i) % len(self.faces)] for i, m in enumerate(METHODS)}
        else:
            rng = np.random.RandomState(seed)
            images = {m: Image.fromarray(rng.randint(0, 256, (64, 64, 3), np.uint8)) for m in METHODS}
        images["blended"] = images["freecure"]
        mask = torch.zeros(64, 64)
        mask[:32] = 1.0
        return SimpleNamespace(
            images=images,
            parsed=parse_prompt(prompt, class_word, trigger=trigger_word),
            mask=mask,
            notes=["stub"],
            stages=[],
        )


class StubPC:
    def __call__(self, images, text):
        return torch.tensor([float(np.asarray(image).mean()) / 2.55 for image in images])


class StubIF:
    """A face is 'found' in every image whose mean brightness is above 100."""

    def face(self, image):
        value = float(np.asarray(image).mean())
        if value < 100:
            return None
        return Face((0, 0, 8, 8), torch.tensor([1.0, value / 255.0]), image.resize((160, 160)))

    def reference(self, images):
        return [torch.tensor([1.0, 0.5])]

    similarity = staticmethod(
        lambda embedding, reference: float(100 * torch.nn.functional.cosine_similarity(embedding, reference[0], dim=0))
    )


def _evaluator(tmp_path, freecure=None, fidelity=None):
    return Evaluator(freecure or StubFreeCure(), StubPC(), fidelity or StubIF(), tmp_path, call_kwargs={})


def test_evaluator_row_has_every_method_and_saved_images(tmp_path):
    item = _items(1, 1, 1)[0]
    row = _evaluator(tmp_path).run(item)
    assert row["key"] == item.key and row["prompt"] == "a woman with red hair"
    assert row["n_attributes"] == 1 and row["attributes"] == ["red hair"]
    for method in METHODS:
        assert (tmp_path / row["images"][method]).is_file()
        metrics = row["metrics"][method]
        assert metrics["face_found"] == (metrics["if"] is not None)
        if metrics["face_found"]:
            assert (tmp_path / row["faces"][method]).is_file()
        else:
            assert row["faces"][method] is None
    assert (tmp_path / row["images"]["mask_overlay"]).is_file()
    assert row["mask_coverage"] == pytest.approx(0.5)
    json.dumps(row, allow_nan=False)


def test_trigger_word_goes_to_the_backend_not_to_pc(tmp_path):
    seen = []

    class Recording(StubFreeCure):
        def __call__(self, prompt, *args, **kwargs):
            seen.append(prompt)
            return super().__call__(prompt, *args, **kwargs)

    evaluator = Evaluator(Recording(), StubPC(), StubIF(), tmp_path, call_kwargs={}, trigger="img")
    row = evaluator.run(_items(1, 1, 1)[0])
    assert seen == ["a woman img with red hair"]
    assert row["generation_prompt"] == "a woman img with red hair" and row["prompt"] == "a woman with red hair"


def test_reference_without_a_face_names_the_identity(tmp_path):
    class NoFace(StubIF):
        def reference(self, images):
            raise InputError("no face found in reference photo 1")

    evaluator = Evaluator(StubFreeCure(), StubPC(), NoFace(), tmp_path, call_kwargs={})
    with pytest.raises(InputError, match="identity 'id0': no face found"):
        evaluator.run(_items(1, 1, 1)[0])


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_without_duplicates_or_gaps(tmp_path):
    items = _items(1, 3, 3)
    done = []

    def stop_after_four(row):
        done.append(row["key"])
        if len(done) == 4:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_shard(_evaluator(tmp_path), items, progress=False, on_item_done=stop_after_four)
    assert len(read_jsonl(shard_path(tmp_path, 0))) == 4
    freecure = StubFreeCure()
    summary = run_shard(_evaluator(tmp_path, freecure), items, progress=False)
    assert (summary.skipped, summary.completed, freecure.calls) == (4, 5, 5)
    keys = [row["key"] for row in read_jsonl(shard_path(tmp_path, 0))]
    assert sorted(keys) == sorted(item.key for item in items) and len(keys) == len(set(keys))
    again = run_shard(_evaluator(tmp_path), items, progress=False)
    assert again.completed == 0 and again.skipped == len(items)


def test_two_ranks_write_their_own_shards_and_merge(tmp_path):
    items = _items(2, 2, 3)
    for rank in (0, 1):
        summary = run_shard(_evaluator(tmp_path), items, rank=rank, world_size=2, progress=False)
        assert summary.completed == 6
    shards = [read_jsonl(shard_path(tmp_path, rank)) for rank in (0, 1)]
    assert {row["rank"] for row in shards[0]} == {0} and {row["rank"] for row in shards[1]} == {1}
    assert not {row["key"] for row in shards[0]} & {row["key"] for row in shards[1]}
    assert sorted(row["key"] for row in load_rows([tmp_path])) == sorted(item.key for item in items)
    # a later single-process run of the same work finds everything done, in any shard
    assert done_keys(tmp_path) == {item.key for item in items}
    assert run_shard(_evaluator(tmp_path), items, progress=False).completed == 0


KILL_SCRIPT = """
import sys, time
sys.path.insert(0, "tests")
from tests.evaluation.test_runner import StubFreeCure, StubIF, StubPC, _items
from freecure.evaluation.runner import Evaluator, run_shard

class Slow(StubFreeCure):
    def __call__(self, *args, **kwargs):
        time.sleep(0.2)
        return super().__call__(*args, **kwargs)

run_shard(Evaluator(Slow(), StubPC(), StubIF(), sys.argv[1], call_kwargs={}), _items(1, 3, 4), progress=False)
"""


@pytest.mark.slow
def test_killed_process_resumes_with_no_duplicate_and_no_gap(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(["src", os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path)], env=env)
    path = shard_path(tmp_path, 0)
    try:
        deadline = time.monotonic() + 60
        while not (path.is_file() and len(read_jsonl(path)) >= 2):
            assert process.poll() is None, "the run ended before it was killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)  # no clean-up of any kind
        process.wait()
    written = len(read_jsonl(path))
    assert 2 <= written < 12
    items = _items(1, 3, 4)
    summary = run_shard(_evaluator(tmp_path), items, progress=False)
    assert summary.skipped == written and summary.completed == 12 - written
    keys = [row["key"] for row in read_jsonl(path)]
    assert sorted(keys) == sorted(item.key for item in items) and len(set(keys)) == 12


# --------------------------------------------------------------------------- tables


def _row(backend, digest, identity, prompt, seed, n_attr, pc, fidelity):
    return {
        "key": f"{backend}|{digest}|{identity}|{prompt}|{seed}",
        "backend": backend,
        "settings_hash": digest,
        "identity": identity,
        "prompt_index": prompt,
        "prompt_template": f"prompt {prompt} with <S>",
        "seed": seed,
        "n_attributes": n_attr,
        "metrics": {
            m: {"pc": pc[i], "if": fidelity[i], "face_found": fidelity[i] is not None} for i, m in enumerate(METHODS)
        },
    }


def test_tables_by_hand():
    rows = [
        _row("pm", "h", "a", 0, 0, 1, [26, 20, 24], [10, 50, 40]),
        _row("pm", "h", "a", 0, 1, 1, [28, 22, 26], [12, 60, None]),
        _row("pm", "h", "a", 1, 0, 3, [24, 16, 20], [None, 40, 44]),
    ]
    diversity = [
        {"backend": "pm", "settings_hash": "h", "method": m, "face_div": v, "missing_faces": 0}
        for m, v in (("fd", 50.0), ("pd", 40.0), ("freecure", 42.0))
    ]
    t1 = {e["method"]: e for e in table1(rows, diversity)}
    assert t1["pd"]["pc"] == pytest.approx(58 / 3)
    assert t1["pd"]["if"] == pytest.approx(50.0)
    assert t1["freecure"]["if"] == pytest.approx(42.0) and t1["freecure"]["if_no_face"] == 1
    assert t1["fd"]["if"] == pytest.approx(11.0) and t1["fd"]["if_no_face"] == 1
    assert t1["freecure"]["pc_x_if"] == pytest.approx(t1["freecure"]["pc"] * 42.0 / 100)
    assert t1["freecure"]["change"]["pc"] == pytest.approx(100 * (70 / 3 - 58 / 3) / (58 / 3))
    assert t1["freecure"]["change"]["face_div"] == pytest.approx(5.0)
    assert t1["pd"]["change"] == {} and t1["freecure"]["label"] == "pm + FreeCure"
    t2 = {e["method"]: e for e in table2(rows)}
    assert t2["fd"]["pc"] == {"1": 27.0, "3": 24.0}
    assert t2["freecure"]["change"]["3"] == pytest.approx(25.0)
    markdown = table1_markdown(table1(rows, diversity))
    assert "| pm (PD) | 19.33 | 50.00 | 40.00 | 9.67 | 0/3 |" in markdown
    assert "(+5.00%)" in markdown
    assert "PC (3 Attr.)" in table2_markdown(table2(rows))
    csv_lines = table1_csv(table1(rows, diversity)).splitlines()
    assert csv_lines[0].startswith("run,backend,settings_hash,method,label,pc,pc_change_pct")
    assert len(csv_lines) == 4


def test_relative_change():
    assert relative_change(24.60, 22.97) == pytest.approx(7.096, abs=1e-3)  # Table 1, PhotoMaker PC
    assert relative_change(1.0, 0.0) is None and relative_change(None, 1.0) is None


def test_runs_with_several_settings_get_their_hash_in_the_label():
    rows = [_row("pm", "h1", "a", 0, 0, 1, [1, 2, 3], [1, 2, 3]), _row("pm", "h2", "a", 0, 0, 1, [1, 2, 3], [1, 2, 3])]
    assert {e["run"] for e in table1(rows)} == {"pm [h1]", "pm [h2]"}


# --------------------------------------------------------------------------- report


@pytest.fixture(scope="module")
def face_results(tmp_path_factory, astronaut):
    """A results folder whose 'generated' images are real face photos, scored by real dlib."""
    pytest.importorskip("dlib")
    from freecure.evaluation.metrics import DlibEmbedder, IdentityFidelity

    out = tmp_path_factory.mktemp("face-results")
    small = astronaut.resize((160, 160))
    faces = [small, small.transpose(Image.FLIP_LEFT_RIGHT), small.rotate(8), Image.new("RGB", (160, 160), "grey")]

    class MemoFidelity(IdentityFidelity):
        """Real MTCNN + dlib, run once per distinct image (the stub repeats four images)."""

        memo: dict = {}

        def face(self, image):
            key = image.tobytes()
            if key not in self.memo:
                self.memo[key] = super().face(image)
            return self.memo[key]

    fidelity = MemoFidelity(DlibEmbedder.from_pretrained())
    identity = Identity("astronaut", "woman", (Path("examples/astronaut.png"),))
    prompts = [EvalPrompt(0, "a <S> with blonde curly hair"), EvalPrompt(1, "a <S> wearing sunglasses, laughing")]
    items = plan_items([identity], prompts, list(range(6)), "token-fusion", "abc")
    evaluator = Evaluator(StubFreeCure(faces), StubPC(), fidelity, out, call_kwargs={})
    evaluator._references["astronaut"] = ([small], fidelity.reference([small]))
    run_shard(evaluator, items, progress=False)
    (out / "settings").mkdir()
    (out / "settings" / "abc.json").write_text(json.dumps({"tiny": False, "steps": 50}))
    return out


def test_report_writes_tables_and_a_self_contained_page(tmp_path, face_results):
    from freecure.evaluation.metrics import LPIPS

    lpips = LPIPS.from_pretrained()
    report = write_report([face_results], tmp_path / "report", lpips=lpips, grid_rows=3)
    names = {path.name for path in report.files}
    for stem in ("table1", "table2"):
        assert {f"{stem}.md", f"{stem}.csv", f"{stem}.json"} <= names
    assert {"index.html", "results.jsonl", "diversity.jsonl"} <= names
    t1 = {e["method"]: e for e in report.table1}
    # the grey image has no face: each failure is counted, IF is over the faces found
    greys = sum(3 in {(seed + i) % 4 for i in range(3)} for seed in range(6)) * 2
    assert sum(e["if_no_face"] for e in t1.values()) == greys == 8
    assert all(e["if"] is not None and e["if"] > 90 for e in t1.values())
    assert all(e["face_div"] is not None and e["face_div"] > 0 for e in t1.values())
    assert json.loads((tmp_path / "report" / "table1.json").read_text())[0]["label"] == "token-fusion (FD)"
    assert len((tmp_path / "report" / "results.jsonl").read_text().splitlines()) == 12

    page = (tmp_path / "report" / "index.html").read_text()
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert page.count("<svg") == 5  # four Table 1 metrics, one Table 2 chart per run
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == 2 * 3 * 4  # two prompts × three rows × (FD, PD, mask, FreeCure)
    for source in sources:
        assert not source.startswith("/") and (tmp_path / "report" / source).resolve().is_file()
    assert "a &lt;S&gt; wearing sunglasses, laughing" in page


def test_report_reuses_cached_diversity(tmp_path, face_results):
    from freecure.evaluation.metrics import LPIPS

    first = write_report([face_results], tmp_path, lpips=LPIPS.from_pretrained())
    second = write_report([face_results], tmp_path, lpips=None)  # no LPIPS: only the cache can answer
    assert [d["face_div"] for d in second.diversity] == [d["face_div"] for d in first.diversity]
    assert len(read_jsonl(tmp_path / "diversity.jsonl")) == len(first.diversity)


def test_diversity_uses_the_same_five_seeds_for_every_method(face_results):
    tasks = diversity_groups(load_rows([face_results]))
    assert len(tasks) == 2 * 3
    for prompt in (0, 1):
        seeds = {tuple(t["seeds"]) for t in tasks if t["prompt_index"] == prompt}
        assert len(seeds) == 1 and len(next(iter(seeds))) == 5
    assert all(t["missing_faces"] + len(t["crops"]) == 5 for t in tasks)


def test_report_without_results_says_so(tmp_path):
    with pytest.raises(InputError, match="no results"):
        write_report([tmp_path], tmp_path / "report")


# --------------------------------------------------------------------------- batches of seeds


class BatchStubFreeCure(StubFreeCure):
    """The stub with FreeCurePipeline's batch interface: one generator per image, a list back."""

    def __init__(self):
        super().__init__()
        self.batch_sizes = []

    def __call__(self, prompt, reference_images, class_word, trigger_word, generator, num_images_per_prompt=1, **kw):
        self.batch_sizes.append(num_images_per_prompt)
        if num_images_per_prompt == 1:
            return super().__call__(prompt, reference_images, class_word, trigger_word, generator, **kw)
        assert len(generator) == num_images_per_prompt
        single = super().__call__
        return [single(prompt, reference_images, class_word, trigger_word, g) for g in generator]


def _rows_without_times(directory):
    drop = {"seconds", "finished", "batch_keys", "stages"}
    return {row["key"]: {k: v for k, v in row.items() if k not in drop} for row in read_jsonl(shard_path(directory, 0))}


def test_batched_seeds_give_the_rows_of_one_at_a_time(tmp_path):
    from freecure.evaluation.runner import batches

    items = _items(1, 2, 3)
    assert [[i.seed for i in batch] for batch in batches(items, 2)] == [[0, 1], [2], [0, 1], [2]]
    freecure = BatchStubFreeCure()
    summary = run_shard(_evaluator(tmp_path / "batched", freecure), items, progress=False, batch_size=2)
    assert summary.completed == 6 and freecure.batch_sizes == [2, 1, 2, 1]
    run_shard(_evaluator(tmp_path / "single"), items, progress=False)
    assert _rows_without_times(tmp_path / "batched") == _rows_without_times(tmp_path / "single")
    row = read_jsonl(shard_path(tmp_path / "batched", 0))[0]
    assert row["batch_keys"] == [items[0].key, items[1].key]


def test_a_batch_that_landed_in_part_is_rerun_whole(tmp_path):
    items = _items(1, 1, 2)
    run_shard(_evaluator(tmp_path, BatchStubFreeCure()), items, progress=False, batch_size=2)
    path = shard_path(tmp_path, 0)
    first, second = path.read_text().splitlines()
    path.write_text(first + "\n")  # only one row of the batch stored
    assert done_keys(tmp_path) == set()
    freecure = BatchStubFreeCure()
    summary = run_shard(_evaluator(tmp_path, freecure), items, progress=False, batch_size=2)
    assert freecure.batch_sizes == [2] and summary.completed == 2
    assert done_keys(tmp_path) == {item.key for item in items}
