"""`freecure generate --tiny` and `freecure cost` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from freecure.cli import main

PROMPT = "a man with black curly hair, laughing happily"


def generate(tmp_path, out, *extra):
    return main(
        [
            "generate",
            "--tiny",
            "--prompt",
            PROMPT,
            "--ref",
            str(tmp_path / "ref.png"),
            "--steps",
            "4",
            "--out",
            str(out),
            "--no-progress",
            *extra,
        ]
    )


@pytest.fixture
def ref(tmp_path, astronaut):
    astronaut.resize((64, 64)).save(tmp_path / "ref.png")
    return tmp_path / "ref.png"


@pytest.mark.slow
def test_generate_tiny_writes_every_stage_and_a_manifest(tmp_path, ref, capsys):
    out = tmp_path / "run"
    assert generate(tmp_path, out) == 0
    printed = capsys.readouterr().out
    assert "random" in printed
    for name in (
        "fd",
        "pd",
        "blended",
        "freecure",
        "strip",
        "mask",
        "mask_overlay",
        "parse_fd",
        "parse_pd",
        "mask_black-curly-hair",
        "attention_black-curly-hair",
        "attention_laughing-happily",
    ):
        assert (out / f"{name}.png").is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["weights"].startswith("random")
    assert manifest["seed"] == 0 and manifest["settings"]["num_inference_steps"] == 4
    assert [s["name"] for s in manifest["stages"]] == ["same_pass", "masks", "rofa", "expression"]
    assert manifest["unet_calls"] == sum(s["unet_calls"] for s in manifest["stages"])
    assert sorted(manifest["files"]) == sorted(p.name for p in out.iterdir())
    strip = Image.open(out / "strip.png")
    assert strip.width > 3 * 64


@pytest.mark.slow
def test_tiny_models_leave_no_files_in_the_temp_directory(tmp_path, ref, monkeypatch):
    """--tiny saves and reloads its random models through diffusers' files; they go once loaded
    (every run used to leave ≈ 30 MB in /tmp), and the models still run without them."""
    import argparse
    import tempfile

    import torch

    from freecure.cli.eval import TINY_CLIP, _prompt_consistency
    from freecure.families.tiny import tiny_flux_pipeline

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert generate(tmp_path, tmp_path / "run", "--steps", "2") == 0
    flux = tiny_flux_pipeline()
    scorer = _prompt_consistency(argparse.Namespace(clip_model=TINY_CLIP), torch.device("cpu"))
    assert [p.name for p in scratch.iterdir() if p.name.startswith("freecure-tiny")] == []
    assert flux.transformer.dtype == torch.float32 and scorer.name == TINY_CLIP


@pytest.mark.slow
def test_generate_never_overwrites_without_asking(tmp_path, ref, capsys):
    out = tmp_path / "run"
    assert generate(tmp_path, out) == 0
    before = (out / "freecure.png").read_bytes()
    assert generate(tmp_path, out, "--seed", "1") == 2
    assert "already exist" in capsys.readouterr().err
    assert (out / "freecure.png").read_bytes() == before
    assert generate(tmp_path, out, "--seed", "1", "--overwrite") == 0
    assert (out / "freecure.png").read_bytes() != before


@pytest.mark.slow
def test_generate_same_seed_same_files(tmp_path, ref):
    generate(tmp_path, tmp_path / "a")
    generate(tmp_path, tmp_path / "b")
    for name in ("fd", "pd", "freecure"):
        a = np.asarray(Image.open(tmp_path / "a" / f"{name}.png"))
        b = np.asarray(Image.open(tmp_path / "b" / f"{name}.png"))
        assert np.array_equal(a, b)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--gamma", "0"], "--gamma"),
        (["--steps", "1"], "at least 2"),
        (["--scheduler", "nope"], "invalid choice"),
    ],
)
def test_generate_bad_options(tmp_path, ref, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:  # refused by argparse, before anything loads
        generate(tmp_path, tmp_path / "x", *extra)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_generate_bad_reference_and_missing_class_word(tmp_path, capsys):
    (tmp_path / "ref.png").write_text("not an image")
    assert generate(tmp_path, tmp_path / "x") == 2
    assert "cannot read" in capsys.readouterr().err
    code = main(["generate", "--tiny", "--prompt", "a dog with a hat", "--ref", str(tmp_path / "ref.png")])
    assert code == 2 and "--class-word" in capsys.readouterr().err


@pytest.mark.slow
def test_cost_counts_by_running(capsys):
    assert main(["cost", "--steps", "6", "--inject-step", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    # plain PD: one [uncond, cond] call per step
    assert result["plain_pd"] == {"unet_calls": 6, "batch_items": 12}
    # literal: FD and PD runs (2×6 calls), again in ROFA (2×6), inversion 3 + denoising 3 (with CFG)
    assert result["literal"] == {"unet_calls": 30, "batch_items": 12 + 12 + 24 + 3 + 6}
    # engine: SAME 6 calls (2 rows before injection, 4 after), ROFA 4 calls ×2, expression:
    # inversion 3 calls ×1 row (w = 1), re-denoising 3 calls ×2 rows (guided at the run's w)
    assert result["engine"]["unet_calls"] == 6 + 4 + 6
    assert result["engine"]["batch_items"] == 2 * 2 + 4 * 4 + 4 * 2 + 3 + 6
    assert result["engine"]["stages"]["expression"]["batch_items"] == 3 + 6
    assert result["settings"]["expression_guidance_scale"] == 7.5
    assert result["settings"]["inversion_guidance_scale"] == 1.0


def test_token_fusion_cli_options_parse_as_documented():
    import argparse

    from freecure.backends import TokenFusionBackend

    parser = argparse.ArgumentParser()
    TokenFusionBackend.add_cli_arguments(parser)
    assert parser.parse_args([]).inject_fraction == 0.2  # "(default 0.2)" in its help
    assert parser.parse_args(["--inject-fraction", "0.3"]).inject_fraction == 0.3


@pytest.mark.slow
def test_of_two_runs_into_one_out_the_second_to_finish_fails_and_the_first_stays(tmp_path, ref, capsys, monkeypatch):
    """Two `generate --num-images 2` into one --out at once used to both exit 0, the folder
    ending with the second's images although the first had printed where it wrote. Run B
    starts and finishes while run A computes; A must fail at its final rename, B's stay."""
    from freecure.pipeline import FreeCurePipeline

    out = tmp_path / "shared"
    original = FreeCurePipeline.__call__
    other = []

    def meanwhile(self, *args, **kwargs):
        if not other:  # run A computes: run B starts and finishes meanwhile
            other.append(None)
            other[0] = generate(tmp_path, out, "--num-images", "2", "--seed", "10", "--steps", "2")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FreeCurePipeline, "__call__", meanwhile)
    assert generate(tmp_path, out, "--num-images", "2", "--seed", "0", "--steps", "2") == 2
    assert other == [0]
    captured = capsys.readouterr()
    assert f"wrote 2 runs to {out / 'seed10'}" in captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("freecure")]
    assert len(errors) == 1 and "was filled by another process (another run?) while this run worked" in errors[0]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "seed10", "seed11"]
    assert json.loads((out / "manifest.json").read_text())["seeds"] == [10, 11]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.png", "shared"]  # no staging folder left


@pytest.mark.slow
def test_overwrite_replaces_an_earlier_batch_run_recognised_by_its_manifest(tmp_path, ref, capsys):
    out = tmp_path / "batch"
    assert generate(tmp_path, out, "--num-images", "2", "--steps", "2") == 0
    top = json.loads((out / "manifest.json").read_text())
    assert top["runs"] == ["seed0", "seed1"] and top["seeds"] == [0, 1] and "freecure_version" in top
    assert generate(tmp_path, out, "--steps", "2") == 2  # the same rule as one image: not without --overwrite
    assert "already exists" in capsys.readouterr().err
    assert generate(tmp_path, out, "--steps", "2", "--overwrite") == 0  # a one-image run replaces it whole
    assert (out / "freecure.png").is_file() and not (out / "seed0").exists()
    (out / "notes.txt").write_text("mine")
    assert generate(tmp_path, out, "--steps", "2", "--overwrite", "--num-images", "2") == 2
    assert "notes.txt is not part of the freecure run there" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine" and (out / "freecure.png").is_file()


def test_eval_tiny_clip_uses_the_tiny_scratch_folder_that_start_up_cleans(tmp_path, monkeypatch):
    """eval's tiny CLIP was saved under freecure-tiny-clip-XXXX, a name the stale-folder cleanup
    cannot attribute to a process: a killed eval leaked it. It now uses freecure-tiny-PID-*."""
    import argparse
    import os
    import re
    import tempfile
    from pathlib import Path

    import torch

    import freecure.evaluation.metrics as metrics
    from freecure.cli.eval import TINY_CLIP, _prompt_consistency
    from freecure.families.tiny import remove_stale_tiny_folders

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen = []
    build = metrics.build_tiny_clip

    def spy(directory):
        seen.append(Path(directory))
        return build(directory)

    monkeypatch.setattr(metrics, "build_tiny_clip", spy)
    _prompt_consistency(argparse.Namespace(clip_model=TINY_CLIP), torch.device("cpu"))
    (folder,) = seen
    assert folder.parent == tmp_path and re.fullmatch(rf"freecure-tiny-{os.getpid()}-[a-z0-9_]{{8}}", folder.name)
    assert not folder.exists()  # removed once loaded
    dead = folder.with_name(folder.name.replace(f"-{os.getpid()}-", "-999999999-"))
    dead.mkdir()
    assert remove_stale_tiny_folders(tmp_path) == [dead]  # one a killed eval left is removed


@pytest.mark.slow
def test_preset_and_expression_options(tmp_path, capsys):
    base = ["generate", "--tiny", "--prompt", "a man with black curly hair, laughing", "--steps", "3", "--no-progress"]
    base += ["--ref", str(Path(__file__).resolve().parents[2] / "examples" / "astronaut.png")]
    assert main([*base, "--preset", "arxiv-v1", "--fasa-mask", "same", "--out", str(tmp_path / "a")]) == 2
    assert "--fasa-mask would be ignored with --preset arxiv-v1 (method rofa)" in capsys.readouterr().err
    assert main([*base, "--expression", "off", "--out", str(tmp_path / "b")]) == 0
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    stages = {stage["name"]: stage for stage in manifest["stages"]}
    assert manifest["settings"]["expression"] is False and not stages["expression"]["ran"]
    assert "--expression off" in stages["expression"]["reason"]
    # a preset's option given beside it wins
    out = tmp_path / "c"
    assert main([*base, "--preset", "official-code", "--fasa-mask-weight", "0.5", "--out", str(out)]) == 0
    settings = json.loads((out / "manifest.json").read_text())["settings"]
    assert (settings["method"], settings["fasa"]["mask_weight"], settings["expression"]) == ("fasa", 0.5, False)
