"""How the stages are joined, at the pipeline level: what each stage receives (spies), a
non-square run with a known spatial pattern, FD against diffusers' own pipelines (SDXL size
conditioning, guidance rescale), and which batch row the attention capture records."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

import freecure.stages.expression as expression_module
import freecure.stages.rofa as rofa_module
import freecure.stages.sampling as sampling_module
from freecure.backends import RandomProjectionIdentityEncoder, TokenFusionBackend
from freecure.core.attributes import parse_prompt
from freecure.core.conditioning import FD, PD
from freecure.core.guidance import FD_LANE, PD_LANE
from freecure.core.labels import CLASS_TO_ID
from freecure.families.tiny import LayoutFaceParser
from freecure.parsing import ParseResult
from freecure.pipeline import FreeCureConfig, FreeCurePipeline
from freecure.stages.masks import to_latent_resolution
from freecure.stages.sampling import same_layout
from tests.factories import token_fusion_backend

HAIR_AND_LAUGH = "a man with black curly hair, laughing happily"


def make(pipe, dim, parser=None, **config):
    backend = TokenFusionBackend(pipe, RandomProjectionIdentityEncoder(dim))
    fc = FreeCurePipeline(backend, parser or LayoutFaceParser(), FreeCureConfig(**config))
    fc.set_progress_bar_config(disable=True)
    return fc


def reference():
    from PIL import Image

    return Image.new("RGB", (32, 32), (90, 60, 40))


def z_T(pipe, height, width, seed=0):
    factor = pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, height // factor, width // factor)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


#: The module whose stage object calls each stage function.
STAGE_MODULES = {"same_pass": sampling_module, "rofa_pass": rofa_module, "expression_restore": expression_module}


class Recorder:
    """Wraps a stage function where its stage object calls it and records its arguments and result."""

    def __init__(self, monkeypatch, name):
        module = STAGE_MODULES[name]
        self.original = getattr(module, name)
        self.calls = []
        monkeypatch.setattr(module, name, self)

    def __call__(self, *args, **kwargs):
        result = self.original(*args, **kwargs)
        self.calls.append((args, kwargs, result))
        return result


def test_each_stage_receives_the_previous_stages_output(tiny_sd15, monkeypatch):
    same, rofa, expression = (Recorder(monkeypatch, name) for name in ("same_pass", "rofa_pass", "expression_restore"))
    fc = make(tiny_sd15, 32, gamma=0.4)
    out = fc(HAIR_AND_LAUGH, [reference()], class_word="man", num_inference_steps=5, latents=z_T(tiny_sd15, 64, 64))
    (same_args, _, same_result), = same.calls
    (rofa_args, _, rofa_result), = rofa.calls
    (expr_args, expr_kwargs, expr_result), = expression.calls
    backend, _, latents_in, conditions, *_ = same_args
    torch.testing.assert_close(latents_in, z_T(tiny_sd15, 64, 64))
    # ROFA restarts from the SAME pass's cache, with the mask the pipeline reports
    assert rofa_args[1] is same_result and rofa_args[2] is conditions
    assert torch.equal(rofa_args[3].cpu(), out.latent_mask)
    # the expression stage inverts ROFA's latent, template first, expression second
    assert torch.equal(expr_args[1], rofa_result)
    assert expr_args[2] is conditions.template and expr_args[3] is conditions.expression
    assert expr_args[4] is conditions.uncond
    assert expr_args[6] == 5 and expr_args[7] == 0.4
    # re-denoising guided at the run's scale, inversion unguided (the defaults)
    assert expr_args[8] == 7.5 and expr_kwargs["inversion_guidance_scale"] == 1.0
    assert torch.equal(out.latents["freecure"], expr_result)
    assert torch.equal(out.latents["blended"], rofa_result)
    assert torch.equal(out.latents["fd"], same_result.z0[FD_LANE : FD_LANE + 1])
    assert torch.equal(out.latents["pd"], same_result.z0[PD_LANE : PD_LANE + 1])
    # the prompts behind those conditionings
    assert out.parsed.template_prompt == "a man" and out.parsed.expression_prompt == "a man laughing happily"
    expected = backend.encode_text("a man laughing happily").prompt_embeds
    torch.testing.assert_close(conditions.expression.prompt_embeds, expected)
    torch.testing.assert_close(conditions.template.prompt_embeds, backend.encode_text("a man").prompt_embeds)


def test_without_a_mask_the_expression_stage_starts_from_pd(tiny_sd15, monkeypatch):
    same, expression = Recorder(monkeypatch, "same_pass"), Recorder(monkeypatch, "expression_restore")
    out = make(tiny_sd15, 32)("a man laughing", [reference()], class_word="man", num_inference_steps=4)
    (_, _, same_result), = same.calls
    (expr_args, _, _), = expression.calls
    assert torch.equal(expr_args[1], same_result.z0[PD_LANE : PD_LANE + 1])
    assert not out.stage("rofa").ran


class LeftHairParser:
    """Hair in the left third of the upper half, nothing else: a known, asymmetric region."""

    def parse_batch(self, images):
        results = []
        for image in images:
            labels = np.zeros((image.height, image.width), np.uint8)
            labels[: image.height // 2, : image.width // 3] = CLASS_TO_ID["hair"]
            results.append(ParseResult(labels, None, (0, 0, image.width, image.height), True, "left hair"))
        return results


def test_non_square_run_blends_exactly_where_the_mask_is(tiny_sd15, monkeypatch):
    """64 high × 96 wide; ROFA runs only the last step, so the blended latent may differ from PD's
    (replayed in the same batch) only where the latent mask is non-zero — any transposition or
    mis-resize shows. ("trailing" spacing makes the last step start at t = 249, where ε still moves the latent.)"""
    scheduler = DDIMScheduler.from_config(tiny_sd15.scheduler.config, timestep_spacing="trailing")
    monkeypatch.setattr(tiny_sd15, "scheduler", scheduler)
    steps, height, width = 4, 64, 96
    rofa = Recorder(monkeypatch, "rofa_pass")
    fc = make(tiny_sd15, 32, parser=LeftHairParser())
    out = fc(
        "a man with black curly hair", [reference()], class_word="man", num_inference_steps=steps,
        height=height, width=width, latents=z_T(tiny_sd15, height, width), inject_step=steps - 1,
    )
    assert all(image.size == (width, height) for image in out.images.values())
    assert out.attention_maps["black curly hair"].shape == (32, 48)
    assert out.mask.shape == (64, 96) and out.latent_mask.shape == (1, 1, 32, 48)
    torch.testing.assert_close(out.latent_mask, to_latent_resolution(out.mask, (32, 48)))
    support = out.latent_mask[0, 0] > 0
    assert support[:16, :16].any() and not support[:, 16:].any() and not support[16:].any()
    # PD replayed by the same ROFA pass with ℳ = 0: the same batch, so the same kernels; the
    # blend may differ from it only inside the mask, and there exactly 0 is not allowed
    (args, kwargs, _), = rofa.calls
    pd_replayed = rofa.original(args[0], args[1], args[2], torch.zeros_like(args[3]), *args[4:], **kwargs)
    change = (out.latents["blended"] - pd_replayed)[0].abs().amax(dim=0)
    assert change[~support].max() == 0
    assert change[support].max() > 1e-5  # ~3e-4: the tiny identity moves ε little
    # against the SAME pass's PD (another batch): equal to CPU kernels' batch variance
    torch.testing.assert_close(pd_replayed, out.latents["pd"], rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_fd_equals_diffusers_own_pipeline_non_square_with_guidance_rescale(family, tiny_sd15, tiny_sdxl):
    """FD is the base model without identity: the same latents as diffusers' pipeline on the
    foundation prompt, including SDXL's size conditioning and guidance rescale, at 64×96."""
    pipe, dim = (tiny_sd15, 32) if family == "sd15" else (tiny_sdxl, 64)
    height, width, steps = 64, 96, 3
    fc = make(pipe, dim)
    out = fc(
        "a man with black curly hair", [reference()], class_word="man", num_inference_steps=steps,
        guidance_scale=6.0, guidance_rescale=0.7, height=height, width=width, latents=z_T(pipe, height, width),
    )
    expected = pipe(
        out.parsed.foundation_prompt, num_inference_steps=steps, guidance_scale=6.0, guidance_rescale=0.7,
        height=height, width=width, latents=z_T(pipe, height, width), output_type="latent",
    ).images
    torch.testing.assert_close(out.latents["fd"], expected, rtol=1e-4, atol=1e-4)
    without_rescale = pipe(
        out.parsed.foundation_prompt, num_inference_steps=steps, guidance_scale=6.0,
        height=height, width=width, latents=z_T(pipe, height, width), output_type="latent",
    ).images
    assert (without_rescale - expected).abs().max() > 1e-3  # the rescale is not a no-op here


def test_sdxl_time_ids_match_diffusers_for_a_non_square_size(tiny_sdxl):
    backend = token_fusion_backend(tiny_sdxl, 64)
    row = backend.encode_text("a man")
    ids = backend.added_cond_kwargs([row, row], 64, 96)["time_ids"]
    expected = tiny_sdxl._get_add_time_ids(
        (64, 96), (0, 0), (64, 96), dtype=ids.dtype,
        text_encoder_projection_dim=tiny_sdxl.text_encoder_2.config.projection_dim,
    )
    assert torch.equal(ids, expected.repeat(2, 1))


@pytest.mark.parametrize("approximate", [False, True])
def test_capture_row_is_fds_conditional_row_at_every_step(tiny_sd15, approximate, grey_image):
    backend = token_fusion_backend(tiny_sd15)
    parsed = parse_prompt(HAIR_AND_LAUGH, "man", tokenizer=backend.tokenizer)
    conditions = backend.conditions(parsed, [grey_image], 6)
    for step in range(6):
        layout = same_layout(step, conditions, approximate)
        assert layout.rows[layout.capture_row] == (FD_LANE, FD)
        assert any(key == (PD if step >= conditions.inject_step else FD) for _, key in layout.rows)


@pytest.mark.parametrize(
    ("config", "inversion", "denoising"),
    [({}, 1.0, 4.0), ({"expression_guidance_scale": 1.0}, 1.0, 1.0), ({"inversion_guidance_scale": 2.0}, 2.0, 4.0)],
)
def test_expression_halves_get_their_own_guidance(tiny_sd15, monkeypatch, config, inversion, denoising):
    """Inversion: template prompt at the inversion scale (default 1); re-denoising: expression
    prompt at the expression scale (default the run's); {expression 1.0} is the former behaviour."""
    import freecure.stages.expression as inversion_module

    restore = Recorder(monkeypatch, "expression_restore")
    original, seen = inversion_module._run_steps, []

    def spy(backend, scheduler, z, steps, cond, uncond, guidance_scale, *rest):
        seen.append((type(scheduler).__name__, guidance_scale, cond))
        return original(backend, scheduler, z, steps, cond, uncond, guidance_scale, *rest)

    monkeypatch.setattr(inversion_module, "_run_steps", spy)
    out = make(tiny_sd15, 32, **config)(
        "a man laughing", [reference()], class_word="man", num_inference_steps=4, guidance_scale=4.0
    )
    (args, _, _), = restore.calls
    steps = [(name, scale) for name, scale, _ in seen]
    assert steps == [("DDIMInverseScheduler", inversion), ("DDIMScheduler", denoising)]
    assert seen[0][2] is args[2] and seen[1][2] is args[3]  # the template, then the expression
    rows = 2 * (1 if inversion == 1.0 else 2) + 2 * (1 if denoising == 1.0 else 2)
    assert out.stage("expression").batch_items == rows
    assert out.settings["expression_guidance_scale"] == denoising
    assert out.settings["inversion_guidance_scale"] == inversion


def test_a_half_precision_model_steps_fp32_lanes(tiny_sd15):
    """The UNet sees its own dtype; the lanes, ε after guidance and every stage's latents are fp32."""
    import copy

    pipe = copy.deepcopy(tiny_sd15).to(torch.bfloat16)
    fc = make(pipe, 32)
    seen = []
    predict = fc.backend.predict_noise

    def spy(latents, *args):
        eps = predict(latents, *args)
        seen.append((latents.dtype, eps.dtype))
        return eps

    fc.backend.predict_noise = spy
    generator = torch.Generator().manual_seed(0)
    out = fc(HAIR_AND_LAUGH, [reference()], class_word="man", num_inference_steps=3, generator=generator)
    assert all(stage.ran for stage in out.stages)
    assert set(seen) == {(torch.bfloat16, torch.bfloat16)}
    assert {latent.dtype for latent in out.latents.values()} == {torch.float32}


class KeySpyBackend:
    """Records the conditioning keys of every row; predicts zeros."""

    dtype = torch.float32

    def __init__(self):
        self.keys = []

    def predict_noise(self, latents, timestep, rows, row_keys, step_index, image_size):
        self.keys.append(tuple(row_keys))
        return torch.zeros_like(latents)


def test_plain_pass_guides_each_lane_with_its_own_negative_branch(tiny_sd15, grey_image):
    from dataclasses import replace

    from freecure.core.guidance import Guidance
    from freecure.stages.sampling import plain_pass

    backend = token_fusion_backend(tiny_sd15)
    parsed = parse_prompt("a man with black curly hair", "man", tokenizer=backend.tokenizer)
    conditions = replace(backend.conditions(parsed, [grey_image], 4), inject_step=2)
    conditions = replace(conditions, pd_uncond=backend.encode_text("blurry"))  # PD's own negative branch
    scheduler = DDIMScheduler.from_config(tiny_sd15.scheduler.config)
    # PD's lane uses PD's negative branch throughout (as the personalized method alone does)
    pd_rows = [("pd_uncond", "fd")] * 2 + [("pd_uncond", "pd")] * 2
    for lane, expected in ((PD, pd_rows), (FD, [("uncond", "fd")] * 4)):
        spy = KeySpyBackend()
        scheduler.set_timesteps(4)
        plain_pass(spy, scheduler, z_T(tiny_sd15, 64, 64), conditions, Guidance(), (64, 64), lane=lane)
        assert spy.keys == expected


# --- tiny start-up leaves nothing behind ---------------------------------------------------------
def _dead_pid() -> int:
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def test_tiny_start_up_removes_only_stale_tiny_folders(tmp_path, monkeypatch):
    """A SIGKILL (out of memory) during --tiny start-up leaves its freecure-tiny-PID-* folder; the
    next start removes those whose process is gone, and nothing else: not a live process's, not
    a link, a file or any other name."""
    import os
    import tempfile

    from freecure.families.tiny import tiny_sd15_pipeline

    scratch, outside = tmp_path / "tmp", tmp_path / "elsewhere"
    (outside / "keep").mkdir(parents=True)
    (outside / "keep" / "photo.png").write_bytes(b"user data")
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    dead = _dead_pid()
    stale = scratch / f"freecure-tiny-{dead}-ab_cd123"
    (stale / "unet").mkdir(parents=True)
    (stale / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 4096)
    live = scratch / f"freecure-tiny-{os.getpid()}-efgh5678"
    live.mkdir()
    kept = [live]
    for name in ("freecure-tiny-abcdefgh", f"freecure-tiny-clip-{dead}-abcd1234", f"freecure-tiny-{dead}-abcd123",
                 f"freecure-tiny-{dead}-abcd1234.old", f"my-freecure-tiny-{dead}-abcd1234", f"freecure-demo-{dead}"):
        (scratch / name).mkdir()
        kept.append(scratch / name)
    (scratch / f"freecure-tiny-{dead}-link1234").symlink_to(outside / "keep", target_is_directory=True)
    (scratch / f"freecure-tiny-{dead}-file1234").write_text("not a folder")
    kept += [scratch / f"freecure-tiny-{dead}-link1234", scratch / f"freecure-tiny-{dead}-file1234"]

    pipe = tiny_sd15_pipeline()

    assert not stale.exists()
    assert all(path.exists() or path.is_symlink() for path in kept)
    assert (outside / "keep" / "photo.png").read_bytes() == b"user data"
    assert sorted(scratch.iterdir()) == sorted(kept)  # and its own scratch folder is gone
    assert pipe.unet is not None


@pytest.mark.slow
def test_sigterm_during_tiny_start_up_removes_its_folder(tmp_path):
    """A SIGTERM (kill, timeout) while the tiny models are saved: the folder goes, and the process
    still ends by that signal."""
    import os
    import signal
    import subprocess
    import sys

    script = """
import os, signal, sys, tempfile
tempfile.tempdir = sys.argv[1]
from diffusers import StableDiffusionPipeline
from freecure.families.tiny import tiny_sd15_pipeline
save = StableDiffusionPipeline.save_pretrained
def save_then_terminate(self, directory, *args, **kwargs):
    save(self, directory, *args, **kwargs)
    assert os.listdir(directory)
    os.kill(os.getpid(), signal.SIGTERM)
StableDiffusionPipeline.save_pretrained = save_then_terminate
tiny_sd15_pipeline()
print("survived")
"""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script, str(scratch)], capture_output=True, text=True,
                          timeout=300, env=environment)
    assert done.returncode == -signal.SIGTERM, done.stderr[-2000:]
    assert "survived" not in done.stdout
    assert list(scratch.iterdir()) == []
