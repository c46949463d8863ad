"""`freecure report` on hostile result rows: malformed rows are skipped with a note, every
field is escaped in the HTML page, and the tables are replaced all at once (issue 9)."""

from __future__ import annotations

import errno
import json
import pathlib

import pytest

from freecure.cli import main
from freecure.evaluation.report import write_report

METHODS = ("fd", "pd", "freecure")
HOSTILE = '<script>alert("x")</script>&<img src=x onerror=alert(1)>'


def good_row(seed: int = 0, identity: str = "astronaut", backend: str = "token-fusion") -> dict:
    return {
        "key": f"{backend}|h|{identity}|p000|s{seed}",
        "backend": backend,
        "settings_hash": "h",
        "identity": identity,
        "class_word": "woman",
        "prompt_index": 0,
        "prompt_template": "a <S> with black curly hair",
        "prompt": "a woman with black curly hair",
        "n_attributes": 1,
        "attributes": ["black curly hair"],
        "seed": seed,
        "metrics": {m: {"pc": 20.0 + i, "if": None, "face_found": False} for i, m in enumerate(METHODS)},
        "images": {m: f"images/{m}.png" for m in METHODS} | {"mask_overlay": None},
        "faces": {m: None for m in METHODS},
        "mask_coverage": 0.25,
    }


def write_rows(folder: pathlib.Path, rows: list[dict], raw_lines: list[str] = ()) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row) + "\n" for row in rows) + "".join(line + "\n" for line in raw_lines)
    (folder / "results.rank0.jsonl").write_text(text)


def malformed_rows() -> list[dict]:
    rows = []
    for path, value in [
        (("seed",), "0"),
        (("prompt_index",), None),
        (("identity",), ["list"]),
        (("metrics", "pd", "pc"), "high"),
        (("metrics", "fd"), None),
        (("images",), "fd.png"),
        (("images", "fd"), "../../etc/passwd"),
        (("attributes",), "black curly hair"),
        (("n_attributes",), 1.5),
    ]:
        row = good_row(seed=len(rows) + 1)
        target = row
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        rows.append(row)
    return rows


def test_report_skips_malformed_rows_in_type_or_shape(tmp_path, capsys):
    results = tmp_path / "eval"
    write_rows(results, [good_row(0), *malformed_rows()], raw_lines=['{"key": "k", "seed": NaN}', "[1, 2]"])
    assert main(["report", str(results), "--no-diversity", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "1 work items" in printed and "skipped 11 torn or malformed line(s)" in printed
    table1 = json.loads((results / "report" / "table1.json").read_text())
    assert [entry["n_images"] for entry in table1] == [1, 1, 1]


def test_report_of_only_malformed_rows_is_one_clear_error(tmp_path, capsys):
    results = tmp_path / "eval"
    write_rows(results, malformed_rows())
    assert main(["report", str(results), "--no-diversity", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no results" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_html_report_escapes_every_field(tmp_path):
    results = tmp_path / "eval"
    row = good_row(identity=HOSTILE, backend=HOSTILE)
    row["prompt_template"] = HOSTILE + " <S>"
    row["attributes"] = [HOSTILE]
    row["images"]["fd"] = 'images/"><script>alert(2)</script>.png'
    write_rows(results, [row])
    (results / "settings").mkdir()
    (results / "settings" / "h.json").write_text(json.dumps({"backend": HOSTILE}))
    report = write_report([results], tmp_path / "report")
    page = (report.out_dir / "index.html").read_text()
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "<img src=x" not in page


def test_report_tables_are_all_new_or_all_old(tmp_path, monkeypatch):
    results = tmp_path / "eval"
    write_rows(results, [good_row(0)])
    out = tmp_path / "report"
    write_report([results], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write_rows(results, [good_row(0), good_row(1)])  # new results: every table changes

    original = pathlib.Path.write_bytes

    def full_disk(self, data):
        if self.name.startswith(".table2.csv"):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return original(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", full_disk)
    with pytest.raises(OSError):
        write_report([results], out)
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after == before  # all old: no table1 of the new results next to a table2 of the old
    monkeypatch.undo()
    write_report([results], out)
    assert json.loads((out / "table1.json").read_text())[0]["n_images"] == 2
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no temporaries left


def test_report_refuses_an_unusable_out(tmp_path, capsys):
    results = tmp_path / "eval"
    write_rows(results, [good_row(0)])
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["report", str(results), "--out", str(blocker), "--no-diversity"]) == 2
    assert "must be a folder" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "absent"), "--no-diversity"]) == 2
    assert "results folder not found" in capsys.readouterr().err
