"""`freecure generate --tiny` and `freecure cost` end to end."""

from __future__ import annotations

import json

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


def test_tiny_models_leave_no_files_in_the_temp_directory(tmp_path, ref, monkeypatch):
    """--tiny saves and reloads its random models through diffusers' files; they go once loaded
    (every run used to leave ≈ 30 MB in /tmp), and the models still run without them."""
    import argparse
    import tempfile

    import torch

    from freecure.cli.eval import TINY_CLIP, _prompt_consistency
    from freecure.tiny import tiny_flux_pipeline

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert generate(tmp_path, tmp_path / "run", "--steps", "2") == 0
    flux = tiny_flux_pipeline()
    scorer = _prompt_consistency(argparse.Namespace(clip_model=TINY_CLIP), torch.device("cpu"))
    assert [p.name for p in scratch.iterdir() if p.name.startswith("freecure-tiny")] == []
    assert flux.transformer.dtype == torch.float32 and scorer.name == TINY_CLIP


def test_generate_never_overwrites_without_asking(tmp_path, ref, capsys):
    out = tmp_path / "run"
    assert generate(tmp_path, out) == 0
    before = (out / "freecure.png").read_bytes()
    assert generate(tmp_path, out, "--seed", "1") == 2
    assert "already exist" in capsys.readouterr().err
    assert (out / "freecure.png").read_bytes() == before
    assert generate(tmp_path, out, "--seed", "1", "--overwrite") == 0
    assert (out / "freecure.png").read_bytes() != before


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
