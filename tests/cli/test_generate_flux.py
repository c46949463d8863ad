"""`freecure generate --tiny --tiny-family flux` and `freecure cost --family flux` end to end."""

from __future__ import annotations

import json

import pytest

from freecure.cli import main

PROMPT = "a man with black curly hair, laughing happily"


def test_generate_tiny_flux_runs_every_stage(tmp_path, astronaut, capsys):
    astronaut.resize((64, 64)).save(tmp_path / "ref.png")
    out = tmp_path / "run"
    args = ["generate", "--tiny", "--tiny-family", "flux", "--prompt", PROMPT, "--ref", str(tmp_path / "ref.png")]
    assert main([*args, "--steps", "4", "--out", str(out), "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["stages"] if s["ran"]] == ["same_pass", "masks", "rofa", "expression"]
    settings = manifest["settings"]
    assert settings["family"] == "flux" and settings["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert settings["guidance_scale"] == 3.5  # FLUX.1-dev's embedded guidance by default
    for name in ("fd", "pd", "blended", "freecure", "mask", "attention_black-curly-hair"):
        assert (out / f"{name}.png").is_file(), name
    capsys.readouterr()
    assert main([*args, "--steps", "4", "--out", str(tmp_path / "x"), "--scheduler", "ddim"]) == 2
    assert "flow-euler" in capsys.readouterr().err


def test_cost_flux_counts_one_row_per_lane(capsys):
    assert main(["cost", "--family", "flux", "--steps", "6", "--inject-step", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["settings"]["guidance_scale"] == 3.5 and result["settings"]["family"] == "flux"
    # plain PD: one row per step (guidance is an embedding)
    assert result["plain_pd"] == {"unet_calls": 6, "batch_items": 6}
    # literal: FD and PD runs (2×6), again in ROFA (2×6), inversion 3 + denoising 3
    assert result["literal"] == {"unet_calls": 30, "batch_items": 30}
    # engine: SAME 6 calls (1 row before injection, 2 after), ROFA 4×1, expression 3+3
    assert result["engine"]["unet_calls"] == 6 + 4 + 6
    assert result["engine"]["batch_items"] == 2 * 1 + 4 * 2 + 4 + 6


@pytest.mark.slow
def test_eval_tiny_runs_on_flux(tmp_path, capsys):
    pytest.importorskip("dlib")
    pytest.importorskip("facenet_pytorch")
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt\na <S> with black curly hair\n")
    args = ["eval", "--tiny", "--backend", "infiniteyou", "--identities", "examples/identities"]
    args += ["--prompts", str(prompts), "--num-seeds", "1", "--steps", "3", "--out", str(tmp_path / "eval")]
    assert main([*args, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "1 new" in printed and "infiniteyou + FreeCure" in printed
