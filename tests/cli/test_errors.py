"""Hostile but fair input: one clear line and exit code 2, never a traceback, and nothing
loaded or computed before the input is known to be usable (issue 9, kinds 1–3)."""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from freecure.cli import main
from freecure.core import checkpoints
from freecure.core.errors import InputError, WeightsNotFoundError
from tests.factories import token_fusion_backend

PROMPT = "a man with black curly hair, laughing happily"


@pytest.fixture
def ref(tmp_path, astronaut):
    path = tmp_path / "ref.png"
    astronaut.resize((64, 64)).save(path)
    return path


@pytest.fixture
def no_models(monkeypatch):
    """Fail the test if any model is built: the input must be refused before."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the input was checked")

    import freecure.families.tiny
    from freecure.backends import BACKENDS

    for name in ("tiny_sd15_pipeline", "tiny_sdxl_pipeline"):
        monkeypatch.setattr(freecure.families.tiny, name, refuse)
    for backend in BACKENDS.values():
        monkeypatch.setattr(backend, "from_options", classmethod(refuse))


def one_line_error(capsys) -> str:
    """The one error line on stderr (model-loading progress bars of --tiny aside)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("freecure")]
    assert len(lines) == 1 and "error:" in lines[0], err
    return lines[0]


def tiny_generate(ref, out, *extra) -> list[str]:
    args = ["generate", "--tiny", "--prompt", PROMPT, "--ref", str(ref), "--steps", "2", "--no-progress"]
    return args + ["--out", str(out), *extra]


# --------------------------------------------------------------------------- option types


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--steps", "5000"], "--steps"),  # more than the scheduler's 1000 training steps
        (["--steps", "nan"], "--steps"),
        (["--seed", str(2**64)], "--seed"),  # torch generators take 64-bit seeds
        (["--seed", "-1"], "--seed"),
        (["--height", "0"], "--height"),  # zero was silently replaced by the default
        (["--width", "1000000"], "--width"),
        (["--height", "100"], "--height"),  # not a multiple of 8
        (["--guidance-scale", "nan"], "finite"),
        (["--guidance-scale", "inf"], "finite"),
        (["--guidance-scale", "1e30"], "--guidance-scale"),
        (["--gamma", "nan"], "finite"),
        (["--expression-guidance-scale", "nan"], "finite"),
        (["--inject-fraction", "nan"], "finite"),
        (["--device", "nonsense"], "--device"),
        (["--device", "cuda:99"], "--device"),
        (["--dtype", "float8"], "--dtype"),
    ],
)
def test_numeric_and_device_options_are_refused_at_parse_time(tmp_path, ref, capsys, no_models, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_generate(ref, tmp_path / "out", *extra))
    assert exit_info.value.code == 2
    error = one_line_error(capsys)
    assert error.startswith("freecure generate: error:") and message in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["cost", "--steps", "5000"], "--steps"),
        (["cost", "--gamma", "inf"], "finite"),
        (["eval", "--identities", "x", "--out", "y", "--num-seeds", "0"], "--num-seeds"),
        (["eval", "--identities", "x", "--out", "y", "--seed-offset", str(2**64)], "--seed-offset"),
        (["report", "x", "--grid-rows", "-1"], "--grid-rows"),
        (["parse", "x.png", "--out", "y", "--device", "tpu"], "--device"),
    ],
)
def test_every_command_validates_its_numbers(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in one_line_error(capsys)


def test_out_is_checked_before_any_model_loads(tmp_path, ref, capsys, no_models):
    blocker = tmp_path / "file.txt"
    blocker.write_text("")
    assert main(tiny_generate(ref, blocker / "run")) == 2
    assert "is a file" in one_line_error(capsys)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert main(tiny_generate(ref, taken)) == 2
    assert "already exist" in one_line_error(capsys)
    assert (taken / "notes.txt").read_text() == "mine"


def test_references_too_small_or_too_large_are_refused_before_models_load(tmp_path, capsys, no_models, monkeypatch):
    small = tmp_path / "small.png"
    Image.new("RGB", (8, 8), "white").save(small)
    assert main(tiny_generate(small, tmp_path / "out")) == 2
    assert "too small to hold a face" in one_line_error(capsys)
    big = tmp_path / "big.png"
    Image.new("RGB", (64, 64), "white").save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 px > 2 × the limit: a decompression bomb
    assert main(tiny_generate(big, tmp_path / "out")) == 2
    assert "too large to decode safely" in one_line_error(capsys)


def test_options_that_would_be_ignored_are_refused(tmp_path, ref, capsys, no_models):
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"x")
    cases = [
        (["--photomaker-weights", str(weights)], "belongs to the photomaker backend"),
        (["--backend", "photomaker", "--photomaker-weights", str(weights)], "--photomaker-weights would be ignored"),
        (["--parser-weights", str(weights)], "--parser-weights would be ignored"),
        (["--base-model", "some/model"], "--base-model would be ignored"),
        (["--backend", "pulid-sdxl", "--eva-clip-weights", str(weights)], "--eva-clip-weights would be ignored"),
        (["--inject-step", "2"], "--inject-step must lie in 0..1"),
    ]
    for extra, message in cases:
        assert main(tiny_generate(ref, tmp_path / "out", *extra)) == 2
        assert message in one_line_error(capsys)


def test_tokenizer_folder_without_tokenizer_files_is_an_error(tmp_path, capsys):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "config.json").write_text("{}")
    argv = ["attributes", "a man with black hair", "--class-word", "man", "--tokenizer", str(tmp_path / "tok")]
    assert main(argv) == 2
    assert "no CLIP tokenizer files" in one_line_error(capsys)
    assert main(["--debug", *argv]) == 2  # --debug: the same message, with the traceback
    assert "Traceback" in capsys.readouterr().err


def test_long_prompts_are_shortened_in_messages(capsys):
    prompt = "a dog " + "with a very long tail " * 500
    assert main(["attributes", prompt, "--class-word", "man", "--no-tokens"]) == 2
    error = one_line_error(capsys)
    assert "does not occur" in error and len(error) < 400 and "characters)" in error


def test_words_past_the_token_limit_are_named(caplog):
    from freecure.core.attributes import parse_prompt
    from freecure.core.tokenization import load_clip_tokenizer

    prompt = "a man with black hair, " + "standing still, " * 40 + "holding a zebra"
    with caplog.at_level("WARNING", logger="freecure.core.attributes"):
        parse_prompt(prompt, "man", tokenizer=load_clip_tokenizer())
    warning = " ".join(r.getMessage() for r in caplog.records if r.name == "freecure.core.attributes")
    assert "cut" in warning and "zebra" in warning and "77" in warning


# --------------------------------------------------------------------------- weights files


def _weight_files(tmp_path) -> dict[str, object]:
    """Broken files of every format a weights option accepts."""
    from safetensors.torch import save_file

    good_st = tmp_path / "good.safetensors"
    save_file({"identity": torch.ones(4)}, str(good_st))
    good_pt = tmp_path / "good.pth"
    torch.save({"w": torch.ones(64, 64)}, good_pt)
    files = {
        "truncated.safetensors": good_st.read_bytes()[: len(good_st.read_bytes()) // 2],
        "garbage.safetensors": b"\x00" * 3 + b"not a header",
        "empty.safetensors": b"",
        "truncated.pth": good_pt.read_bytes()[: len(good_pt.read_bytes()) // 2],
        "garbage.bin": b"PK\x03\x04 this is not a zip archive",
        "empty.pt": b"",
    }
    paths = {}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths[name] = tmp_path / name
    return paths


def test_corrupt_weight_files_of_every_format_name_the_file(tmp_path):
    for name, path in _weight_files(tmp_path).items():
        with pytest.raises(WeightsNotFoundError) as error:
            checkpoints.read_tensors(path, "a test checkpoint")
        message = str(error.value)
        assert str(path) in message and "truncated" in message and "\n" not in message, name


def test_weights_options_report_corrupt_files_in_one_line(tmp_path, ref, capsys):
    broken = _weight_files(tmp_path)
    cases = [  # every weights option of the CLI reads through checkpoints.read_tensors
        (tiny_generate(ref, tmp_path / "a", "--identity-embedding", str(broken["truncated.safetensors"]))),
        (["parse", str(ref), "--out", str(tmp_path / "p"), "--weights", str(broken["truncated.pth"])]),
        (tiny_generate(ref, tmp_path / "b", "--backend", "fastcomposer", "--fastcomposer-checkpoint",
                       str(broken["garbage.bin"]))),
    ]
    for argv in cases:
        assert main(argv) == 2
        error = one_line_error(capsys)
        assert "cannot read" in error and str(tmp_path) in error, error


def test_token_fusion_reads_a_saved_identity_embedding(tmp_path, ref):
    """The README's token-fusion path: the embedding file is read, and it changes PD."""
    from safetensors.torch import save_file

    from freecure.backends.token_fusion.backend import load_identity_embedding

    path = tmp_path / "emb.safetensors"
    save_file({"identity": torch.full((32,), 0.5)}, str(path))
    assert torch.equal(load_identity_embedding(path), torch.full((32,), 0.5))
    save_file({"identity": torch.full((32,), math.nan)}, str(path))
    with pytest.raises(InputError, match="NaN"):
        load_identity_embedding(path)


# --------------------------------------------------------------------------- expected errors


def test_full_disk_is_one_line_and_leaves_no_half_run(tmp_path, ref, capsys, monkeypatch):
    out = tmp_path / "run"
    original = Image.Image.save

    def full_disk(self, fp, *args, **kwargs):
        if str(fp).endswith("pd.png"):
            raise OSError(errno.ENOSPC, "No space left on device", str(fp))
        return original(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full_disk)
    assert main(tiny_generate(ref, out)) == 2
    assert "no space left" in one_line_error(capsys)
    assert not out.exists() and list(tmp_path.glob(".run*")) == []  # nothing half-written


# --------------------------------------------------------------------------- Python API


def test_python_api_rejects_non_finite_numbers(tiny_sd15):
    from freecure.families.tiny import LayoutFaceParser
    from freecure.pipeline import FreeCureConfig, FreeCurePipeline

    for bad in (dict(gamma=math.nan), dict(expression_guidance_scale=math.nan), dict(expression_guidance_scale=1e400)):
        with pytest.raises(InputError):
            FreeCureConfig(**bad)
    backend = token_fusion_backend(tiny_sd15)
    freecure = FreeCurePipeline(backend, LayoutFaceParser())
    image = Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
    for bad in (
        dict(guidance_scale=math.nan),
        dict(guidance_scale=math.inf),
        dict(guidance_rescale=math.nan),
        dict(num_inference_steps=5000),
        dict(height=0),
        dict(num_inference_steps=4, inject_step=math.nan),
    ):
        with pytest.raises(InputError):
            freecure(PROMPT, reference_images=[image], num_inference_steps=bad.pop("num_inference_steps", 2), **bad)


def test_json_is_written_strictly(tmp_path):
    from freecure.core.atomic import NonFiniteError, json_text, write_json

    with pytest.raises(NonFiniteError, match=r"settings\.guidance_scale"):
        write_json(tmp_path / "m.json", {"settings": {"guidance_scale": math.nan}, "ok": 1.0})
    assert not (tmp_path / "m.json").exists() and list(tmp_path.iterdir()) == []
    assert json_text({"a": [1.5, None]}) == '{\n  "a": [\n    1.5,\n    null\n  ]\n}\n'


# --------------------------------------------------------------------------- issue 20: options and files
# Each case: one line, exit code 2, no traceback, and no model built (``no_models``).


def exit_code(argv) -> int:
    """``main``'s exit code, whether argparse (SystemExit) or a check (return value) refused."""
    try:
        return main(argv)
    except SystemExit as exit_info:
        return exit_info.code


@pytest.fixture
def no_models_at_all(no_models, monkeypatch):
    """``no_models``, and the tiny FLUX pipeline and the analyze/eval builders refused too."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the input was checked")

    import freecure.cli.analyze
    import freecure.cli.eval
    import freecure.cli.generate
    import freecure.families.tiny

    monkeypatch.setattr(freecure.families.tiny, "tiny_flux_pipeline", refuse)
    monkeypatch.setattr(freecure.families.tiny, "tiny_pipeline", refuse)
    for module in (freecure.cli.generate, freecure.cli.analyze, freecure.cli.eval):
        monkeypatch.setattr(module, "build_freecure", refuse)


IGNORED_OPTIONS = [
    # --tiny-family the backend cannot build: a UNet (or FLUX) run followed
    *[(["--tiny-family", "flux", "--backend", b], "runs on") for b in
      ("fastcomposer", "ip-adapter-faceid", "instantid", "pulid-sdxl")],
    (["--tiny-family", "sdxl", "--backend", "infiniteyou"], "runs on flux only"),
    # FLUX reads a negative prompt only with true CFG (it was recorded in the manifest as if used)
    (["--tiny-family", "flux", "--negative-prompt", "blurry"], "pass --true-cfg-scale > 1"),
    (["--backend", "pulid-flux", "--negative-prompt", "blurry"], "pass --true-cfg-scale > 1"),
    (["--tiny-family", "flux", "--approximate-shared-uncond"], "--approximate-shared-uncond would be ignored"),
    (["--compile-mode", "default"], "--compile-mode would be ignored"),
    (["--compile", "--compile-mode", "bogus-mode"], "not a torch.compile mode"),  # was: after loading
    (["--fasa-layers", "up"], "--fasa-layers would be ignored with --method rofa"),  # the default, given
    (["--fasa-mask", "same"], "--fasa-mask would be ignored"),
    (["--fasa-mask-weight", "2"], "--fasa-mask-weight would be ignored"),
    (["--fasa-uncond"], "--fasa-uncond would be ignored"),
    (["--backend", "ip-adapter-faceid", "--face-keypoints", "kps.json"], "belongs to the instantid backend"),
    (["--true-cfg-scale", "2"], "--guidance-scale"),  # Stable Diffusion: was refused after loading
    (["--true-cfg-scale", "0.5", "--tiny-family", "flux"], "--true-cfg-scale"),
    # --faceid-family won silently over a different --tiny-family
    (["--backend", "ip-adapter-faceid", "--tiny-family", "sd15", "--faceid-family", "sdxl"], "disagree"),
]


@pytest.mark.parametrize("extra, message", IGNORED_OPTIONS)
def test_options_a_run_would_ignore_are_refused_before_any_model_loads(
    tmp_path, ref, capsys, no_models_at_all, extra, message
):
    assert exit_code(tiny_generate(ref, tmp_path / "out", *extra)) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_tiny_family_without_tiny_is_refused(tmp_path, ref, capsys, no_models_at_all):
    argv = ["generate", "--prompt", PROMPT, "--ref", str(ref), "--out", str(tmp_path / "out"), "--tiny-family", "sdxl"]
    assert exit_code(argv) == 2 and "only --tiny builds tiny models" in one_line_error(capsys)


def analyze_args(ref, out, *extra, study="attention"):
    return ["analyze", study, "--tiny", "--prompt", PROMPT, "--ref", str(ref), "--steps", "2", "--out", str(out),
            "--no-progress", *extra]


def eval_args(tmp_path, *extra, identities="examples/identities", prompts=None):
    if prompts is None:
        prompts = tmp_path / "prompts.csv"
        prompts.write_text("prompt\na <S> with black curly hair\n")
    return ["eval", "--tiny", "--identities", str(identities), "--prompts", str(prompts), "--num-seeds", "1",
            "--steps", "2", "--out", str(tmp_path / "eval"), "--no-progress", "--no-report", *extra]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tiny-family", "flux", "--backend", "fastcomposer"], "runs on sd15 only"),
        (["--fasa-layers", "late"], "--method rofa"),
        (["--compile-mode", "reduce-overhead"], "--compile-mode would be ignored"),
        (["--backend", "ip-adapter-faceid", "--face-keypoints", "kps.json"], "belongs to the instantid backend"),
        (["--backend", "infiniteyou", "--negative-prompt", "blurry"], "pass --true-cfg-scale > 1"),
    ],
)
@pytest.mark.parametrize("command", ["analyze", "eval"])
def test_analyze_and_eval_refuse_the_same_options_as_generate(
    tmp_path, ref, capsys, no_models_at_all, command, extra, message
):
    argv = analyze_args(ref, tmp_path / "out", *extra) if command == "analyze" else eval_args(tmp_path, *extra)
    assert exit_code(argv) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "out").exists() and not (tmp_path / "eval" / "settings").exists()


@pytest.mark.parametrize(
    "extra, message, study",
    [
        (["--cell", "0"], "--cell", "attention"),  # was: a traceback after the whole study ran
        (["--cell", "60000"], "at most 512", "attention"),  # was: past 10 GB
        (["--cell", "15"], "at least 16", "interpolate"),
        (["--seed", str(2**70)], "--seed", "attention"),  # was: a traceback
        (["--seed", "-1"], "--seed", "interpolate"),
        (["--heads", "-1"], "--heads", "attention"),
        (["--analysis-steps", "x"], "--analysis-steps", "attention"),
        (["--alpha", "nan"], "finite", "interpolate"),
        (["--ref", "missing.png"], "does not exist", "attention"),
    ],
)
def test_analyze_options_are_typed_like_every_command(tmp_path, ref, capsys, no_models_at_all, extra, message, study):
    assert exit_code(analyze_args(ref, tmp_path / "out", *extra, study=study)) == 2
    assert message in one_line_error(capsys)


def test_analyze_help_states_the_cell_bound(capsys):
    with pytest.raises(SystemExit):
        main(["analyze", "attention", "--help"])
    assert "16 … 512" in " ".join(capsys.readouterr().out.split())


def _identity_files(tmp_path) -> dict:
    """Identity manifests and prompt files that used to end in a traceback."""
    photo = tmp_path / "me.png"
    Image.new("RGB", (64, 64)).save(photo)
    files = {
        "strings.json": json.dumps({"identities": ["astronaut", "bob"]}).encode(),
        "list-of-strings.json": json.dumps(["astronaut"]).encode(),
        "reference-object.json": json.dumps(
            {"identities": [{"id": "me", "class_word": "man", "references": [{"path": "me.png"}]}]}
        ).encode(),
        "references-number.json": json.dumps(
            {"identities": [{"id": "me", "class_word": "man", "references": 3}]}
        ).encode(),
        "class-word-list.json": json.dumps(
            {"identities": [{"id": "me", "class_word": ["man"], "references": ["me.png"]}]}
        ).encode(),
        "latin1.json": json.dumps(
            {"identities": [{"id": "me", "class_word": "garçon", "references": ["me.png"]}]}, ensure_ascii=False
        ).encode("latin-1"),
        "latin1.csv": "id,class_word,references\n# mine\nme,garçon,me.png\n".encode("latin-1"),
        "prompts-latin1.csv": "prompt\na <S> in a café\n".encode("latin-1"),
        "prompts-latin1.txt": "a <S> in a café\n".encode("latin-1"),
        "paper-group.csv": b"paper_group,prompt\n1,a <S> with black hair\none,a <S> with blue eyes\n",
        "n-attributes.csv": b"# mine\nprompt,n_attributes\na <S> with black hair,1.5\n",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return {name: tmp_path / name for name in files}


@pytest.mark.parametrize(
    "identities, prompts, message",
    [
        ("strings.json", None, "strings.json entry 1: each identity is an object"),
        ("list-of-strings.json", None, "entry 1: each identity is an object"),
        ("reference-object.json", None, "reference 1 of 'me' must be the path of a photo"),
        ("references-number.json", None, "references of 'me' must be a list"),
        ("class-word-list.json", None, "class_word must be a string"),
        ("latin1.json", None, "latin1.json line 1: byte 0xe7 is not UTF-8"),
        ("latin1.csv", None, "latin1.csv line 3: byte 0xe7 is not UTF-8"),
        (None, "prompts-latin1.csv", "prompts-latin1.csv line 2: byte 0xe9 is not UTF-8"),
        (None, "prompts-latin1.txt", "line 1: byte 0xe9 is not UTF-8"),
        (None, "paper-group.csv", "paper-group.csv line 3: paper_group 'one' is not a whole number"),
        (None, "n-attributes.csv", "n-attributes.csv line 3: n_attributes '1.5' is not a whole number"),
    ],
)
def test_eval_identity_and_prompt_files_are_checked_in_one_line(
    tmp_path, capsys, no_models_at_all, identities, prompts, message
):
    files = _identity_files(tmp_path)
    kwargs = {}
    if identities:
        kwargs["identities"] = files[identities]
    if prompts:
        kwargs["prompts"] = files[prompts]
    assert exit_code(eval_args(tmp_path, **kwargs)) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "eval" / "settings").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["cost", "--backend", "pulid-sdxl", "--family", "sd15"], "runs on sdxl only"),  # was: SDXL silently
        (["cost", "--backend", "instantid", "--family", "flux"], "runs on sdxl only"),
        (["cost", "--family", "flux", "--approximate-shared-uncond"], "--approximate-shared-uncond would be ignored"),
        (["cost", "--faceid-fd-lora", "off"], "ip-adapter-faceid backend"),
        (["cost", "--backend", "ip-adapter-faceid", "--instantid-fd", "no-identitynet"], "instantid backend"),
        (["cost", "--true-cfg-scale", "2"], "--guidance-scale"),
    ],
)
def test_cost_refuses_what_it_would_ignore_before_building(capsys, no_models_at_all, argv, message):
    assert exit_code(argv) == 2 and message in one_line_error(capsys)


# --------------------------------------------------------------------------- what stays accepted


def _parsed(argv):
    from freecure.cli import build_parser
    from freecure.cli.generate import check_model_arguments

    args = build_parser().parse_args(argv)
    check_model_arguments(args)
    return args


@pytest.mark.parametrize(
    "extra, tiny_family",
    [
        ([], "sd15"),
        (["--backend", "infiniteyou"], "flux"),  # the backend's own family when none is given
        (["--backend", "photomaker"], "sdxl"),
        (["--backend", "ip-adapter-faceid", "--tiny-family", "sdxl"], "sdxl"),
        (["--tiny-family", "flux", "--negative-prompt", "blurry", "--true-cfg-scale", "2"], "flux"),
        (["--tiny-family", "flux", "--approximate-shared-uncond", "--true-cfg-scale", "2"], "flux"),
        (["--backend", "instantid", "--face-keypoints", "kps.json"], "sdxl"),
        (["--negative-prompt", "blurry", "--approximate-shared-uncond"], "sd15"),
        (["--method", "fasa", "--fasa-layers", "up", "--fasa-uncond"], "sd15"),
        (["--compile", "--compile-mode", "reduce-overhead"], "sd15"),
    ],
)
def test_options_a_run_reads_are_accepted(extra, tiny_family):
    args = _parsed(["generate", "--tiny", "--prompt", PROMPT, *extra])
    assert args.tiny_family == tiny_family


def test_fasa_options_not_given_are_fasa_configs_defaults():
    from freecure.cli.generate import fasa_config
    from freecure.stages.fasa import FasaConfig

    assert fasa_config(_parsed(["generate", "--tiny", "--prompt", PROMPT, "--method", "fasa"])) == FasaConfig()
    given = _parsed(["generate", "--tiny", "--prompt", PROMPT, "--method", "fasa", "--fasa-layers", "a*", "b*",
                     "--fasa-mask", "same", "--fasa-mask-weight", "2", "--fasa-uncond"])
    assert fasa_config(given) == FasaConfig(layers=("a*", "b*"), mask_source="same", mask_weight=2.0, uncond=True)


def test_every_backend_declares_its_families():
    from freecure.backends import BACKENDS

    for name, backend in BACKENDS.items():
        assert "families" in vars(backend), name  # declared by the backend itself, not inherited
        assert backend.families and set(backend.families) <= {"sd15", "sdxl", "flux", "flux2-klein", "flux2"}, name


def test_compile_modes_come_from_torch():
    from torch._inductor import list_mode_options

    from freecure.core.errors import InputError as Refused
    from freecure.core.runtime import compile_denoiser, compile_modes

    assert set(compile_modes()) == set(list_mode_options()) >= {"default", "reduce-overhead", "max-autotune"}
    with pytest.raises(Refused, match="bogus-mode"):
        compile_denoiser(torch.nn.Linear(1, 1), mode="bogus-mode")


# --------------------------------------------------------------------------- nothing of the user's is lost (issue 20)


def _fake_run(folder, files):
    """A folder as an earlier freecure run leaves it: files listed by a manifest."""
    import json

    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    manifest = {"freecure_version": "0.1.0", "files": [*files, "manifest.json"]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_overwrite_refuses_a_folder_that_is_not_an_earlier_run(tmp_path, ref, capsys, no_models):
    """`--overwrite` into a folder of the user's used to exit 0 with the files gone."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.docx").write_text("years of work")
    (mine / "holiday.jpg").write_bytes(ref.read_bytes())
    assert main(tiny_generate(ref, mine, "--overwrite")) == 2
    error = one_line_error(capsys)
    assert "no freecure manifest.json" in error and "replaces only an earlier freecure run" in error
    run = _fake_run(tmp_path / "run", {"fd.png": b"png"})
    (run / "notes.txt").write_text("mine")  # the user's file in an earlier run's folder
    assert main(tiny_generate(ref, run, "--overwrite", "--num-images", "2")) == 2
    assert "notes.txt is not part of the freecure run there" in one_line_error(capsys)
    assert (mine / "thesis.docx").read_text() == "years of work" and (mine / "holiday.jpg").is_file()
    assert (run / "notes.txt").read_text() == "mine" and (run / "fd.png").is_file()


def test_inputs_inside_the_folder_a_run_replaces_are_refused(tmp_path, ref, capsys, no_models):
    """`--ref DIR/me.png --out DIR --overwrite` used to delete the reference photo."""
    run = _fake_run(tmp_path / "run", {"me.png": ref.read_bytes(), "face.safetensors": b"x"})
    assert main(tiny_generate(run / "me.png", run, "--overwrite")) == 2
    assert f"--ref {run / 'me.png'} lies inside {run}" in one_line_error(capsys)
    (tmp_path / "link").symlink_to(run)  # the same photo through a link: resolved
    assert main(tiny_generate(tmp_path / "link" / "me.png", run, "--overwrite")) == 2
    assert "lies inside" in one_line_error(capsys)
    embedding = ["--backend", "pulid-sdxl", "--face-embedding", str(run / "face.safetensors")]
    assert main(tiny_generate(ref, run, "--overwrite", *embedding)) == 2
    assert "--face-embedding" in one_line_error(capsys)
    assert (run / "me.png").read_bytes() == ref.read_bytes() and (run / "face.safetensors").is_file()


def test_analyze_refuses_an_input_it_would_overwrite(tmp_path, ref, capsys, no_models):
    out = tmp_path / "study"
    out.mkdir()
    (out / "fd.png").write_bytes(ref.read_bytes())  # the user's photo, named like an output
    argv = ["analyze", "attention", "--tiny", "--prompt", PROMPT, "--ref", str(out / "fd.png"), "--steps", "2"]
    assert main([*argv, "--out", str(out), "--overwrite", "--no-progress"]) == 2
    assert "a file this run would overwrite" in one_line_error(capsys)
    assert (out / "fd.png").read_bytes() == ref.read_bytes()


def test_eval_refuses_identity_photos_where_it_writes(tmp_path, capsys, astronaut):
    import json

    out = tmp_path / "eval"
    photo = out / "report" / "me.png"
    photo.parent.mkdir(parents=True)
    astronaut.resize((64, 64)).save(photo)
    (tmp_path / "identities.json").write_text(
        json.dumps({"identities": [{"id": "me", "class_word": "man", "references": [str(photo)]}]})
    )
    argv = ["eval", "--tiny", "--identities", str(tmp_path / "identities.json"), "--num-seeds", "1", "--dry-run"]
    assert main([*argv, "--out", str(out)]) == 2
    assert f"identity 'me''s photo {photo} lies inside {out / 'report'}" in one_line_error(capsys)
    assert main([*argv, "--out", str(tmp_path / "elsewhere")]) == 0  # the same identity, another --out


def test_out_is_never_the_current_folder(tmp_path, ref, capsys, monkeypatch, no_models):
    """`generate --out .` ended in a traceback after the models loaded; the folders written in
    place (eval, parse, report, analyze) may be the current folder."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for out in (".", "..", str(work), "./"):
        assert main(tiny_generate(ref, out)) == 2
        assert "current folder" in one_line_error(capsys)
        assert main(tiny_generate(ref, out, "--overwrite")) == 2
        assert "current folder" in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.png", "work"] and not any(work.iterdir())
    identities = str(Path(__file__).parents[2] / "examples" / "identities")
    assert main(["eval", "--tiny", "--identities", identities, "--num-seeds", "1", "--dry-run", "--out", "."]) == 0


def test_num_images_is_bounded_before_anything_loads(tmp_path, ref, capsys, no_models):
    """`--num-images 10000` ran into the out-of-memory killer (exit 137, no message)."""
    from freecure.cli.options import MAX_NUM_IMAGES

    for count in (str(MAX_NUM_IMAGES + 1), "10000"):
        with pytest.raises(SystemExit) as refused:
            main(tiny_generate(ref, tmp_path / "out", "--num-images", count))
        assert refused.value.code == 2
        assert f"at most {MAX_NUM_IMAGES}" in one_line_error(capsys)
    with pytest.raises(SystemExit):
        main(["eval", "--identities", "x", "--out", "y", "--batch-size", "10000"])
    assert f"at most {MAX_NUM_IMAGES}" in one_line_error(capsys)
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert f"At most {MAX_NUM_IMAGES}" in " ".join(capsys.readouterr().out.split())
    assert not (tmp_path / "out").exists()


def test_an_overlong_prompt_is_refused_before_any_model_loads_also_with_a_class_word(
    tmp_path, ref, capsys, no_models_at_all
):
    """With --class-word the prompt was first measured by the pipeline, after the models loaded."""
    from freecure.core.attributes import MAX_PROMPT_CHARS

    prompt = "a man with red hair " * (MAX_PROMPT_CHARS // 20 + 1)
    generate = ["generate", "--tiny", "--prompt", prompt, "--class-word", "man", "--ref", str(ref),
                "--out", str(tmp_path / "out")]
    analyze = ["analyze", "attention", "--tiny", "--prompt", prompt, "--class-word", "man", "--ref", str(ref),
               "--out", str(tmp_path / "out")]
    for argv in (generate, analyze):
        assert exit_code(argv) == 2
        assert f"at most {MAX_PROMPT_CHARS:,} are accepted" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()
