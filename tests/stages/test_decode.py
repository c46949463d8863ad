"""A run never succeeds with an image that is none (issue 20): NaN or infinity in the latents or
the VAE's output, or one colour everywhere, fail with one clear message; ``analyze``'s
``summary.json`` never carries a bare ``NaN``."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from freecure.backends import BACKENDS, TokenFusionBackend
from freecure.cli import main
from freecure.core.errors import BlankImageError, FreeCureError
from freecure.pipeline import FreeCurePipeline
from freecure.stages.decode import decode_latents

PROMPT = "a man with black curly hair, laughing happily"


def _latents(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_noise_latents_decode_as_before(tiny_sd15):
    images = decode_latents(tiny_sd15, _latents())
    assert len(images) == 2 and all(isinstance(image, Image.Image) for image in images)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_latents_are_a_failed_run(tiny_sd15, value):
    latents = _latents()
    latents[1, 0, 3, 3] = value
    with pytest.raises(BlankImageError, match="non-finite image: 1 of 2 latents hold NaN or infinity") as error:
        decode_latents(tiny_sd15, latents)
    assert isinstance(error.value, FreeCureError) and "guidance scale" in str(error.value)


def test_a_vae_output_with_nan_is_a_failed_run(tiny_sd15):
    def poison(module, args, output):  # half of the image overflows, as an fp16 VAE can
        output = output.clone()
        output[..., : output.shape[-1] // 2] = float("nan")
        return output

    hook = tiny_sd15.vae.decoder.register_forward_hook(poison)
    try:
        with pytest.raises(BlankImageError, match="the VAE's output holds NaN or infinity"):
            decode_latents(tiny_sd15, _latents())
    finally:
        hook.remove()


def test_an_image_of_one_colour_is_a_failed_run(tiny_sd15, monkeypatch):
    def constant(latent, return_dict=False):
        return (torch.zeros(len(latent), 3, 64, 64),)

    monkeypatch.setattr(tiny_sd15.vae, "decode", constant)
    with pytest.raises(BlankImageError, match=r"blank image: image 1 of 2 is one colour \(128, 128, 128\)"):
        decode_latents(tiny_sd15, _latents())


def test_an_overflowing_identity_fails_the_run_instead_of_a_black_image(tiny_sd15, astronaut):
    """Through the library (the CLI refuses such a file before loading): an identity of 3e38
    overflows PD's attention to NaN; the run raises instead of returning a black PD image."""
    from freecure.families.tiny import LayoutFaceParser

    backend = TokenFusionBackend(tiny_sd15, torch.full((32,), 3e38))
    freecure = FreeCurePipeline(backend, LayoutFaceParser())
    freecure.set_progress_bar_config(disable=True)
    with pytest.raises(BlankImageError, match="non-finite image"):
        freecure(PROMPT, reference_images=[astronaut], class_word="man", num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0))


def test_analyze_refuses_a_summary_with_nan(tmp_path, astronaut, capsys, monkeypatch):
    import freecure.analysis as analysis

    real = analysis.attention_study

    def with_nan(*args, **kwargs):
        study = real(*args, **kwargs)
        group = next(iter(study.summary["groups"]))
        study.summary["groups"][group]["nan_field"] = float("nan")
        return study

    monkeypatch.setattr(analysis, "attention_study", with_nan)
    astronaut.resize((64, 64)).save(tmp_path / "ref.png")
    out = tmp_path / "attention"
    argv = ["analyze", "attention", "--tiny", "--prompt", PROMPT, "--ref", str(tmp_path / "ref.png"), "--steps", "2",
            "--out", str(out), "--no-progress", "--cell", "32"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "not writing NaN or infinity as JSON" in err and "nan_field" in err, err
    assert not (out / "summary.json").exists()


@pytest.mark.slow
def test_tiny_runs_of_every_family_pass_the_check(tmp_path, capsys):
    """Random tiny models make noise, never a constant image: the check leaves them alone."""
    Image.new("RGB", (64, 64), (120, 90, 60)).save(tmp_path / "ref.png")
    for family in ("sd15", "flux"):
        out = tmp_path / family
        argv = ["generate", "--tiny", "--tiny-family", family, "--backend", "token-fusion", "--prompt", PROMPT,
                "--ref", str(tmp_path / "ref.png"), "--steps", "2", "--out", str(out), "--no-progress"]
        assert main(argv) == 0, capsys.readouterr().err
        assert json.loads((out / "manifest.json").read_text())
    assert "token-fusion" in BACKENDS
