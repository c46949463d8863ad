"""`freecure demo`: the request checks, the model cache, the runner and its zip, the progress hook,
and the Gradio page driven in a real headless Chromium (Debian's package, via Playwright) against
`freecure demo --tiny`."""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

if importlib.util.find_spec("gradio") is None:  # not imported here: the server subprocess imports it
    pytest.skip("the demo needs the `demo` extra: pip install 'freecure[demo]' (Gradio)", allow_module_level=True)

from freecure.core.errors import InputError
from freecure.demo import METHODS  # noqa: E402
from freecure.demo.service import (  # noqa: E402
    MAX_PAGE_PROMPT_CHARS,
    MAX_UPLOAD_BYTES,
    DemoFiles,
    FaceCheck,
    ModelCache,
    Runner,
    check_request,
    preview_attributes,
    read_upload,
    zip_folder,
)
from tests.factories import token_fusion_backend

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "astronaut.png"
PROMPT = "a woman with red hair, laughing happily"


def demo_args(**changes) -> argparse.Namespace:
    from freecure.cli import build_parser

    args = build_parser().parse_args(["demo", "--tiny"])
    for key, value in changes.items():
        setattr(args, key, value)
    return args


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- request checks


def test_preview_shows_kinds_and_unknown_words_and_explains_a_missing_subject():
    parsed = preview_attributes("a woman with red hair, laughing happily next to a zebra", trigger=None)
    assert parsed["ok"] and parsed["class_word"] == "woman"
    assert [(a["text"], a["kind"]) for a in parsed["attributes"]] == [
        ("red hair", "localized"),
        ("laughing happily", "abstract"),
    ]
    assert "zebra" in parsed["unknown_words"]
    missing = preview_attributes("a cat with red hair", trigger=None)
    assert not missing["ok"] and "names no subject" in missing["error"] and "--class-word" not in missing["error"]
    assert not preview_attributes("   ", trigger=None)["ok"]
    # PhotoMaker's trigger word is not an unknown word
    assert preview_attributes("a woman img with red hair", trigger="img")["unknown_words"] == []


@pytest.mark.parametrize(
    "form, uploads, message",
    [
        ({"prompt": ""}, [("a.png", None)], "prompt is empty"),
        ({"prompt": "a cat with red hair"}, [("a.png", None)], "names no subject"),
        ({"prompt": PROMPT}, [("notes.txt", b"not an image")], "notes.txt is not an image"),
        ({"prompt": PROMPT, "steps": "1"}, [("a.png", None)], "steps must lie in"),
        ({"prompt": PROMPT, "gamma": "nan"}, [("a.png", None)], "must be finite"),
        ({"prompt": PROMPT, "gamma": "0"}, [("a.png", None)], "γ must lie in (0, 1]"),
        ({"prompt": PROMPT, "steps": "4", "inject_step": "4"}, [("a.png", None)], "injection step must lie in"),
        ({"prompt": PROMPT, "guidance_scale": "x"}, [("a.png", None)], "must be a number"),
        ({"prompt": PROMPT, "backend": "nope"}, [("a.png", None)], "unknown backend"),
        ({"prompt": PROMPT, "method": "nope"}, [("a.png", None)], "unknown method"),
        ({"prompt": PROMPT, "use_example": "0"}, [], "upload at least one reference photo"),
    ],
)
def test_bad_requests_are_refused_with_one_line(form, uploads, message, grey_image):
    uploads = [(name, png_bytes(grey_image) if data is None else data) for name, data in uploads]
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_request(form, uploads, EXAMPLE, demo_args())


def test_a_good_request_uses_the_example_and_the_backend_trigger():
    request = check_request(
        {"prompt": "a woman img with red hair", "backend": "photomaker", "use_example": "1", "steps": "3"},
        [],
        EXAMPLE,
        demo_args(),
    )
    assert request.reference_names == ("astronaut.png",) and request.references[0].mode == "RGB"
    assert request.trigger == "img" and request.class_word == "woman" and request.steps == 3
    assert request.method in METHODS and request.guidance_scale is None and request.inject_step is None


def test_read_upload_refuses_non_images_and_keeps_real_ones(astronaut):
    assert read_upload("a.png", png_bytes(astronaut)).size == astronaut.size
    with pytest.raises(InputError, match="x.jpg is not an image"):
        read_upload("x.jpg", b"\xff\xd8 truncated")


def test_prompts_over_the_page_limit_are_refused_in_one_line(grey_image):
    """The page's API refuses a prompt over MAX_PAGE_PROMPT_CHARS before parsing it (a 1 MB
    prompt kept the single worker busy for a minute); so does the preview while typing."""
    prompt = PROMPT + ", smiling" * ((MAX_PAGE_PROMPT_CHARS - len(PROMPT)) // 9 + 1)
    assert len(prompt) > MAX_PAGE_PROMPT_CHARS
    message = f"at most {MAX_PAGE_PROMPT_CHARS:,} are accepted"
    with pytest.raises(InputError, match=message):
        check_request({"prompt": prompt}, [("a.png", png_bytes(grey_image))], EXAMPLE, demo_args())
    preview = preview_attributes(prompt, trigger=None)
    assert not preview["ok"] and message in preview["error"]
    # at the limit: accepted
    check_request({"prompt": prompt[:MAX_PAGE_PROMPT_CHARS]}, [("a.png", png_bytes(grey_image))], EXAMPLE, demo_args())


def test_read_upload_refuses_files_over_the_limit():
    with pytest.raises(InputError, match="big.png is larger than 20 MB"):
        read_upload("big.png", b"\0" * (MAX_UPLOAD_BYTES + 1))


def test_face_check_refuses_a_photo_without_a_face(astronaut, grey_image):
    pytest.importorskip("facenet_pytorch", reason="MTCNN comes with `pip install --no-deps facenet-pytorch`")
    check = FaceCheck()
    check([astronaut], ["astronaut.png"])  # a face: passes
    with pytest.raises(InputError, match="no face found in the reference photo grey.png"):
        check([astronaut, grey_image], ["astronaut.png", "grey.png"])


def test_the_pages_backend_options_are_checked_by_their_declarations():
    form = {"prompt": PROMPT, "backend": "token-fusion", "use_example": "1", "option:inject_fraction": "0.7"}
    request = check_request(form, [], EXAMPLE, demo_args())
    assert request.backend_options == (("inject_fraction", 0.7),)
    with pytest.raises(InputError, match=r"--inject-fraction: 2 is outside \[0, 0.999\]"):
        check_request({**form, "option:inject_fraction": "2"}, [], EXAMPLE, demo_args())
    photomaker = {"prompt": "a woman img with red hair", "backend": "photomaker", "use_example": "1"}
    switched = check_request({**photomaker, "option:photomaker_cpu_offload": "true"}, [], EXAMPLE, demo_args())
    assert switched.backend_options == (("photomaker_cpu_offload", True),)
    # files and folders are the server's: the page cannot name one
    weights = {**photomaker, "option:photomaker_weights": "/etc/passwd"}
    assert check_request(weights, [], EXAMPLE, demo_args()).backend_options == ()


@pytest.mark.slow  # imports Gradio
def test_every_backend_has_a_control_for_each_of_its_declared_options():
    import gradio as gr

    from freecure.backends import BACKENDS
    from freecure.demo.app import backend_controls

    with gr.Blocks():
        groups, controls = backend_controls(demo_args())
    assert set(groups) == set(BACKENDS)
    expected = {(n, o.flag) for n, b in BACKENDS.items() for o in b.options if o.control != "path"}
    assert {(name, option.flag) for name, option, _ in controls} == expected
    kinds = {type(control).__name__ for _, _, control in controls}
    assert {"Number", "Dropdown", "Checkbox"} <= kinds


# --------------------------------------------------------------------------- models and queue


def test_models_load_once_per_backend(monkeypatch):
    built = []
    monkeypatch.setattr("freecure.build.build_freecure", lambda args: built.append(args.backend) or object())
    cache = ModelCache(demo_args())
    first = cache.get("token-fusion")
    assert cache.get("token-fusion") is first and cache.get("photomaker") is not first
    assert built == ["token-fusion", "photomaker"] and cache.loaded() == ["photomaker", "token-fusion"]
    other = cache.get("token-fusion", (("inject_fraction", 0.7),))  # other options: another model, built once
    assert other is not first and cache.get("token-fusion", (("inject_fraction", 0.7),)) is other


def test_runner_writes_the_generate_folder_reports_progress_and_zips_it(monkeypatch, tmp_path, tiny_sd15):
    from freecure.families.tiny import LayoutFaceParser
    from freecure.pipeline import FreeCurePipeline

    loaded = FreeCurePipeline(token_fusion_backend(tiny_sd15), LayoutFaceParser())
    monkeypatch.setattr("freecure.build.build_freecure", lambda args: loaded)
    runner = Runner(demo_args(), tmp_path)
    monkeypatch.setattr(FaceCheck, "__call__", lambda self, references, names: None)  # MTCNN: tested above
    request = check_request({"prompt": PROMPT, "use_example": "1", "steps": "2", "seed": "7"}, [], EXAMPLE, demo_args())
    seen = []
    result = runner.run(request, lambda stage, done, total: seen.append((stage, done, total)))
    assert seen[0][0] == "checking the reference photos" and seen[-1][0] == "writing the output folder"
    assert ("SAME: FD+PD", 2, 2) in seen
    manifest = json.loads((result.out_dir / "manifest.json").read_text())
    assert list(result.files) == manifest["files"] and manifest["seed"] == 7 and manifest["method"] == "rofa"
    assert [caption for caption, _ in result.attribute_files] == [
        "mask: red hair",
        "attention: red hair",
        "attention: laughing happily",
    ]
    assert all(result.path(name) is not None for _, name in result.attribute_files)
    with zipfile.ZipFile(zip_folder(result, request)) as archive:
        assert sorted(archive.namelist()) == [f"freecure-token-fusion-seed7/{name}" for name in result.files]


def test_progress_callback_reports_every_step_of_every_stage(tiny_sd15, astronaut):
    import torch

    from freecure.families.tiny import LayoutFaceParser
    from freecure.pipeline import FreeCurePipeline

    freecure = FreeCurePipeline(token_fusion_backend(tiny_sd15), LayoutFaceParser())
    seen = []
    freecure.set_progress_bar_config(
        disable=True, callback=lambda stage, done, total: seen.append((stage, done, total))
    )
    output = freecure(PROMPT, [astronaut], num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    stages = list(dict.fromkeys(stage for stage, _, _ in seen))
    assert [s.name for s in output.stages if s.ran] == ["same_pass", "masks", "rofa", "expression"]
    assert stages == ["SAME: FD+PD", "ROFA: blend", "Expression: invert+denoise"]
    for stage in stages:
        counts = [(done, total) for name, done, total in seen if name == stage]
        total = counts[0][1]
        assert counts == [(done, total) for done in range(total + 1)], stage


# --------------------------------------------------------------------------- the demo's files


def _make_run(files: DemoFiles) -> tuple[Path, Path]:
    out_dir, zip_dir = files.new_run()
    for folder in (out_dir, zip_dir):
        folder.mkdir()
        (folder / "fd.png").write_bytes(b"png")
    return out_dir, zip_dir


def _upload(cache: Path, digest: str, name: str = "me.png") -> Path:
    path = cache / digest / name  # Gradio keeps each upload in a folder of its own
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"photo")
    return path


def test_a_pages_run_folders_go_once_superseded_or_the_page_closes(tmp_path):
    files = DemoFiles(tmp_path / "runs", tmp_path / "cache")
    (tmp_path / "runs").mkdir()
    first, second = _make_run(files), _make_run(files)
    files.hold("a", "run", first)
    assert all(path.is_dir() for path in first)
    files.hold("a", "run", second)  # the page shows its next run: the first is no longer needed
    assert not any(path.exists() for path in first) and all(path.is_dir() for path in second)
    other = _make_run(files)
    files.hold("b", "run", other)
    files.end("a")  # the page was closed
    assert not any(path.exists() for path in second) and all(path.is_dir() for path in other)
    failed = _make_run(files)
    files.release(failed)  # a failed run: nobody holds it
    assert not any(path.exists() for path in failed)
    files.release(other)  # held by page b: kept
    assert all(path.is_dir() for path in other)


def test_uploads_go_when_no_page_holds_them(tmp_path):
    cache = tmp_path / "cache"
    files = DemoFiles(tmp_path / "runs", cache)
    shared, own = _upload(cache, "1a2b"), _upload(cache, "3c4d", "you.png")
    files.hold("a", "uploads", [shared])
    files.hold("b", "uploads", [shared, own])  # the same photo uploaded twice is one cache file
    files.end("a")
    assert shared.is_file()
    files.hold("b", "uploads", [own])  # page b replaced its uploads
    assert not shared.exists() and not shared.parent.exists() and own.is_file()
    files.end("b")
    assert not own.exists() and cache.is_dir()
    # Gradio's stray empty temp files at the top of the cache go once a minute old
    stray, fresh, kept = cache / "tmpold", cache / "tmpnew", cache / "tmpfull"
    for path in (stray, fresh, kept):
        path.write_bytes(b"" if path != kept else b"data")
    os.utime(stray, (time.time() - 120, time.time() - 120))
    os.utime(kept, (time.time() - 120, time.time() - 120))
    files.sweep()
    assert not stray.exists() and fresh.exists() and kept.exists()


def test_the_oldest_run_goes_when_too_many_are_kept(tmp_path):
    files = DemoFiles(tmp_path, max_runs=2)
    runs = [_make_run(files) for _ in range(3)]
    for session, run in zip("abc", runs):
        files.hold(session, "run", run)
    assert [run[0].is_dir() for run in runs] == [False, True, True]


def test_demo_files_never_delete_what_the_demo_did_not_make(tmp_path, monkeypatch):
    workdir, cache, outside = tmp_path / "runs", tmp_path / "cache", tmp_path / "outside"
    workdir.mkdir()
    outside.mkdir()
    files = DemoFiles(workdir, cache, own_workdir=True)
    users = [workdir / "notes.txt", outside / "photo.png", workdir / "0001-photos" / "me.png"]
    for path in users:
        path.parent.mkdir(exist_ok=True)
        path.write_text("the user's")
    # a folder where the demo would have put its first run: the demo names another
    (workdir / "0001-00000000").mkdir()
    files._ids = iter([1, 1, 2])  # the first name taken twice
    with monkeypatch.context() as patch:
        patch.setattr("freecure.demo.service.time.time", lambda: 0.0)
        run = _make_run(files)
    assert run[0].name == "0002-00000000" and (workdir / "0001-00000000").is_dir()
    link = _upload(cache, "5e6f", "link.png")
    link.unlink()
    link.symlink_to(outside / "photo.png")  # a link inside the cache to a file outside it
    for path in [*users, workdir, outside, workdir / "0001-00000000", link, cache, tmp_path]:
        files.hold("a", "uploads", [path])
        files.hold("a", "uploads", [])
        files.release([path])
    files.hold("a", "run", run)
    files.end("a")
    files.close()
    assert all(path.read_text() == "the user's" for path in users)
    assert (workdir / "0001-00000000").is_dir() and workdir.is_dir()  # not empty: kept
    assert not cache.exists() and not run[0].exists()
    # a workdir the demo made and that is empty at exit goes; one it did not make stays
    for own in (True, False):
        folder = tmp_path / f"own-{own}"
        folder.mkdir()
        made = DemoFiles(folder, own_workdir=own)
        made.hold("a", "run", _make_run(made))
        made.close()
        assert folder.exists() is not own


def test_runner_leaves_no_folder_of_a_failed_run_and_removes_its_runs_at_close(monkeypatch, tmp_path, tiny_sd15):
    from freecure.families.tiny import LayoutFaceParser
    from freecure.pipeline import FreeCurePipeline

    loaded = FreeCurePipeline(token_fusion_backend(tiny_sd15), LayoutFaceParser())
    monkeypatch.setattr("freecure.build.build_freecure", lambda args: loaded)
    monkeypatch.setattr(FaceCheck, "__call__", lambda self, references, names: None)
    (tmp_path / "mine.txt").write_text("the user's")
    runner = Runner(demo_args(), tmp_path)
    request = check_request({"prompt": PROMPT, "use_example": "1", "steps": "2"}, [], EXAMPLE, demo_args())
    result = runner.run(request)
    zip_folder(result, request)
    assert all(folder.is_dir() for folder in result.folders)

    def fail(stage, done, total):
        if stage == "writing the output folder":
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        runner.run(request, fail)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["mine.txt", *(f.name for f in result.folders)])
    runner.close()  # at exit
    assert [path.name for path in tmp_path.iterdir()] == ["mine.txt"]


# --------------------------------------------------------------------------- the page in Chromium

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
INSTALL_CHROMIUM = "apt-get update && apt-get install -y chromium"


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's Chromium; the browser tests skip without it (and fail when
    FREECURE_REQUIRE_BROWSER=1, as in .ci/run, which installs it)."""
    missing = None
    if CHROMIUM is None:
        missing = f"Debian's chromium is not installed: `{INSTALL_CHROMIUM}` (.ci/run does this)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            missing = "Playwright is not installed: pip install playwright (never `playwright install`)"
    if missing and os.environ.get("FREECURE_REQUIRE_BROWSER") == "1":
        pytest.fail(missing)
    if missing:
        pytest.skip(missing)
    return CHROMIUM


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Runs `python -m freecure` with every socket connection or name lookup off this machine refused
# and logged: the demo (Gradio included) must start and serve offline, without telemetry.
NETWORK_GUARD = """
import runpy, socket, sys
LOCAL = ("127.0.0.1", "::1", "localhost", "0.0.0.0", "")
def refuse(what):
    print(f"NETWORK ATTEMPT: {what}", file=sys.stderr, flush=True)
    raise OSError(f"network disabled in the test: {what}")
def is_local(address):
    return not isinstance(address, tuple) or str(address[0]) in LOCAL
connect, connect_ex, getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo
socket.socket.connect = lambda self, a: connect(self, a) if is_local(a) else refuse(a)
socket.socket.connect_ex = lambda self, a: connect_ex(self, a) if is_local(a) else refuse(a)
socket.getaddrinfo = lambda host, *a, **k: getaddrinfo(host, *a, **k) if str(host) in LOCAL else refuse(host)
sys.argv = ["freecure", *sys.argv[1:]]
runpy.run_module("freecure", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """`freecure demo --tiny` as a subprocess on a free localhost port, offline: its URL, log,
    process, workdir (which also holds a user's file and folder) and GRADIO_TEMP_DIR."""
    port = free_port()
    workdir = tmp_path_factory.mktemp("demo-runs")
    gradio_temp = tmp_path_factory.mktemp("gradio-temp")
    (workdir / "notes.txt").write_text("the user's\n")  # not the demo's: must survive it
    (workdir / "0001-photos").mkdir()
    (workdir / "0001-photos" / "me.png").write_bytes(png_bytes(Image.new("RGB", (8, 8))))
    log_path = workdir / "server.log"
    log = log_path.open("w")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("GRADIO_ANALYTICS_ENABLED", None)  # the demo must turn telemetry off itself
    env["GRADIO_TEMP_DIR"] = str(gradio_temp)  # the demo makes its uploads folder inside
    command = [sys.executable, "-c", NETWORK_GUARD, "demo", "--tiny", "--port", str(port), "--steps", "3"]
    server = subprocess.Popen([*command, "--workdir", str(workdir)], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240  # importing Gradio takes ~30 s on 2 busy cores
        while True:
            try:
                with urllib.request.urlopen(f"{url}/config", timeout=2) as response:
                    assert json.load(response)["title"] == "FreeCure demo"
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail(f"freecure demo did not start: {log_path.read_text()[-2000:]}")
                time.sleep(0.5)
        yield argparse.Namespace(
            url=url, port=port, log=log_path, process=server, workdir=workdir, gradio_temp=gradio_temp
        )
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def page(chromium, demo_server, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),  # a fresh --user-data-dir
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 1000},
        )
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def open_page(page, url):
    page.goto(url)
    page.wait_for_selector("#prompt textarea")


def wait_for_results(page, timeout=120_000):
    page.locator("#stages tr.fc-stage").first.wait_for(timeout=timeout)


def run_folder(page) -> Path:
    """The folder of the run the page shows, from its zip's link (``…/file=<run>.zip/<name>.zip``)."""
    href = page.locator("#download a[download]").first.get_attribute("href")
    zip_path = Path(urllib.parse.unquote(href.split("file=", 1)[1]))
    return zip_path.parent.with_name(zip_path.parent.name.removesuffix(".zip"))


@pytest.mark.slow
def test_page_runs_freecure_and_shows_every_result(page, demo_server, tmp_path):
    open_page(page, demo_server.url)
    page.set_input_files("#references input[type=file]", str(EXAMPLE))
    page.locator("#references").get_by_text("astronaut").first.wait_for()
    page.fill("#prompt textarea", PROMPT)
    chips = page.locator("#attributes .fc-chip")
    chips.filter(has_text="laughing happily · abstract").wait_for()
    assert chips.all_inner_texts() == ["red hair · localized", "laughing happily · abstract"]
    page.fill("#steps input", "3")
    # the backend's own options, generated from its declarations: token fusion's injection fraction
    page.locator("#backend-options").get_by_text("backend options").first.click()
    fraction = page.locator("#option-token-fusion-inject_fraction input")
    fraction.wait_for(state="visible")
    page.wait_for_timeout(500)  # the accordion mounts its fields when it opens: let it settle first
    fraction.fill("0.7")
    fraction.press("Tab")
    page.wait_for_function("el => el.value === '0.7'", arg=fraction.element_handle())
    page.click("#run")
    wait_for_results(page)

    for name in ("fd", "pd", "freecure", "overlay"):  # FD, PD, FreeCure, merged mask on PD
        image = page.locator(f"#{name} img").first
        image.wait_for()
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    maps = page.locator("#maps .caption-label")
    maps.first.wait_for()
    assert maps.all_inner_texts() == ["mask: red hair", "attention: red hair", "attention: laughing happily"]
    stages = page.locator("#stages tr.fc-stage")
    assert [row.get_attribute("data-stage") for row in stages.all()] == ["same_pass", "masks", "rofa", "expression"]
    assert all(text.split("\t")[1] == "ran" for text in stages.all_inner_texts())
    kinds = page.locator("#attribute-table tr.fc-attribute").all_inner_texts()
    assert [row.split("\t")[:2] for row in kinds] == [["red hair", "localized"], ["laughing happily", "abstract"]]

    # the zip holds the folder `freecure generate` writes, manifest included
    link = page.locator("#download a[download]").first
    assert link.get_attribute("download") == "freecure-token-fusion-seed0.zip"
    archive = zipfile.ZipFile(io.BytesIO(page.request.get(link.get_attribute("href")).body()))
    manifest_name = next(name for name in archive.namelist() if name.endswith("manifest.json"))
    manifest = json.loads(archive.read(manifest_name))
    assert sorted(Path(name).name for name in archive.namelist()) == sorted(manifest["files"])
    assert manifest["settings"]["num_inference_steps"] == 3 and manifest["method"] == "rofa"
    assert manifest["settings"]["inject_step"] == 2  # int(0.7 × 3): the page's option reached the backend
    assert manifest["references"] == ["astronaut.png"]
    assert np.asarray(Image.open(io.BytesIO(archive.read(manifest_name.replace("manifest.json", "fd.png"))))).std() > 0
    if os.environ.get("FREECURE_DEMO_SCREENSHOT"):
        page.screenshot(path=os.environ["FREECURE_DEMO_SCREENSHOT"], full_page=True)


@pytest.mark.slow
def test_page_says_what_is_wrong_with_a_text_upload(page, demo_server, tmp_path):
    open_page(page, demo_server.url)
    text = tmp_path / "notes.txt"
    text.write_text("this is not a photo\n")
    page.set_input_files("#references input[type=file]", str(text))
    page.locator("#references").get_by_text("notes").first.wait_for()
    page.fill("#prompt textarea", PROMPT)
    page.click("#run")
    # the message stays on the page, in the status line, until the next run: no pop-up that
    # fades after 10 s, no "Error" badge on each output
    error = page.locator("#status .fc-status-error")
    error.wait_for(timeout=30_000)
    assert error.inner_text().startswith("notes.txt is not an image")
    assert page.get_by_text("Error", exact=True).count() == 0
    assert page.locator("[data-testid=toast-text]").count() == 0
    assert "Traceback" not in page.content()
    assert page.locator("#stages tr.fc-stage").count() == 0
    # an upload no longer in the box is removed from the server
    upload = next(demo_server.gradio_temp.rglob("notes.txt"))
    page.locator("#references button[aria-label='Clear']").click()
    deadline = time.time() + 30
    while upload.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert not upload.exists() and not upload.parent.exists()
    # the next run clears the message; the run folder the page shows is on disk
    page.set_input_files("#references input[type=file]", str(EXAMPLE))
    page.locator("#references").get_by_text("astronaut").first.wait_for()
    page.fill("#steps input", "2")
    page.click("#run")
    wait_for_results(page)
    assert page.locator("#status .fc-status-error").count() == 0
    first = run_folder(page)
    assert (first / "manifest.json").is_file() and first.parent == demo_server.workdir
    # a later run replaces it on the page: the earlier run's folders are removed
    page.fill("#seed input", "1")
    page.click("#run")
    page.locator("#download a[download='freecure-token-fusion-seed1.zip']").wait_for(timeout=120_000)
    second = run_folder(page)
    assert second != first and (second / "manifest.json").is_file()
    assert not first.exists() and not first.with_name(f"{first.name}.zip").exists()
    image = page.locator("#fd img").first  # served from the run folder
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    # a prompt without a class word is flagged while typing
    page.fill("#prompt textarea", "a cat with red hair")
    page.locator("#attributes .fc-error").filter(has_text="names no subject").wait_for()
    # choosing PhotoMaker: its trigger word is expected, and its own guidance is the default shown
    page.fill("#prompt textarea", "a woman img with red hair")
    page.locator("#attributes .fc-unknown").filter(has_text="img").wait_for()
    page.locator("#backend input").click()
    page.get_by_role("option", name="photomaker").click()
    page.locator("#guidance").get_by_placeholder("empty: the backend's own (5.0)").wait_for()
    page.locator("#attributes .fc-chip").filter(has_text="red hair · localized").wait_for()
    assert page.locator("#attributes .fc-unknown").count() == 0


@pytest.mark.slow
def test_page_and_server_bound_what_a_user_sends(page, demo_server):
    """The prompt box takes at most MAX_PAGE_PROMPT_CHARS characters (the API refuses more, see
    above); the server refuses an upload over MAX_UPLOAD_BYTES before storing it."""
    open_page(page, demo_server.url)
    assert page.get_attribute("#prompt textarea", "maxlength") == str(MAX_PAGE_PROMPT_CHARS)
    page.fill("#prompt textarea", "a woman " + "x" * MAX_PAGE_PROMPT_CHARS)
    assert len(page.input_value("#prompt textarea")) == MAX_PAGE_PROMPT_CHARS
    big = {"name": "big.png", "mimeType": "image/png", "buffer": b"\0" * (MAX_UPLOAD_BYTES + 1)}
    response = page.request.post(f"{demo_server.url}/gradio_api/upload", multipart={"files": big})
    assert response.status == 413, response.text()[:300]
    small = {"name": "small.png", "mimeType": "image/png", "buffer": png_bytes(Image.new("RGB", (8, 8)))}
    assert page.request.post(f"{demo_server.url}/gradio_api/upload", multipart={"files": small}).ok


@pytest.mark.slow
def test_page_warns_when_an_attribute_is_in_neither_image(page, demo_server):
    # the tiny runs' layout parser labels hair, face, ears… but never eyeglasses
    open_page(page, demo_server.url)
    page.fill("#prompt textarea", "a woman wearing sunglasses")
    page.fill("#steps input", "2")
    page.click("#run")  # no upload: the bundled example is used
    wait_for_results(page)
    warning = page.locator("#notes .fc-note").filter(has_text="sunglasses")
    assert "not blended" in warning.inner_text()
    rofa = page.locator("#stages tr[data-stage='rofa']").inner_text()
    assert "skipped: no localized attribute was found in both the FD and the PD image" in rofa


@pytest.mark.parametrize(
    "options, message",
    [
        (["--port", "0"], "--port must lie in 1..65535"),
        (["--steps", "1"], "argument --steps: 1 is out of range"),  # the shared option types, at parse time
        (["--steps", "300"], "--steps must lie in 2..200"),  # the page's own limit
        (["--gamma", "nan"], "argument --gamma: 'nan' is not a finite number"),
        (["--guidance-scale", "inf"], "argument --guidance-scale: 'inf' is not a finite number"),
        (["--steps", "4", "--inject-step", "4"], "--inject-step must lie in 0..3"),
    ],
)
def test_demo_command_refuses_bad_defaults_before_serving(options, message, capsys):
    from freecure.cli import main

    try:
        code = main(["demo", "--tiny", *options])
    except SystemExit as refused:  # argparse's one-line refusal
        code = refused.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_demo_command_refuses_a_busy_port(capsys, tmp_path):
    from freecure.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["demo", "--tiny", "--port", str(port), "--workdir", str(tmp_path)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.slow
def test_page_shows_stage_progress_and_a_second_user_their_place_in_the_queue(page, demo_server):
    """Gradio's queue runs one generation at a time (concurrency 1): while the first tab's run
    reports its stage steps, the second tab's run waits and Gradio shows its place."""
    second = page.context.new_page()
    try:
        for tab, steps in ((page, "8"), (second, "2")):
            open_page(tab, demo_server.url)
            tab.fill("#prompt textarea", "a woman with red hair")
            tab.fill("#steps input", steps)
        page.click("#run")
        page.locator("#fd").get_by_text(re.compile(r"(SAME: FD\+PD|ROFA: blend): step \d/8")).first.wait_for()
        second.click("#run")
        second.locator("#fd .progress-text").filter(has_text=re.compile(r"queue: 1/1")).first.wait_for()
        wait_for_results(second)
        wait_for_results(page)
    finally:
        second.close()


def test_server_prints_its_url_and_never_reaches_the_network(page, demo_server):
    """Runs last: after every page case, the server (Gradio included) tried no connection off this
    machine — no telemetry, no version check, no share link — and printed its localhost URL."""
    log = demo_server.log.read_text()
    assert f"freecure demo: http://127.0.0.1:{demo_server.port}/" in log
    assert "NETWORK ATTEMPT" not in log, log[-2000:]
    assert "gradio.live" not in log and "share=True" not in log


@pytest.mark.slow
def test_server_exit_removes_what_the_demo_made_and_nothing_else(page, demo_server):
    """Runs after every page case: stopped with SIGTERM (as `kill` or a service manager does),
    the demo removes its run folders and its uploads folder; the user's files in --workdir stay."""
    assert any(demo_server.gradio_temp.iterdir())  # the demo's uploads folder, while it runs
    demo_server.process.send_signal(signal.SIGTERM)
    assert demo_server.process.wait(timeout=60) == 0
    assert sorted(path.name for path in demo_server.workdir.iterdir()) == ["0001-photos", "notes.txt", "server.log"]
    assert (demo_server.workdir / "0001-photos" / "me.png").is_file()
    assert list(demo_server.gradio_temp.iterdir()) == []  # Gradio's own files went there too
    assert "Traceback" not in demo_server.log.read_text()


def test_fasa_method_runs_the_authors_correction_with_the_pages_progress(tiny_sd15, astronaut):
    import torch

    from freecure.families.tiny import LayoutFaceParser
    from freecure.pipeline import FreeCurePipeline

    freecure = FreeCurePipeline(token_fusion_backend(tiny_sd15), LayoutFaceParser())
    seen = []
    freecure.set_progress_bar_config(disable=True, callback=lambda stage, done, total: seen.append(stage))
    output = METHODS["fasa"].run(
        freecure, prompt=PROMPT, reference_images=[astronaut], num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
    )
    assert [s.name for s in output.stages if s.ran] == ["same_pass", "masks", "fasa"]
    assert output.settings["method"] == "fasa" and freecure.config.method == "rofa"  # the cached pipeline is untouched
    assert "SAME: FD+PD" in seen
