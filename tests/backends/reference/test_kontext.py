"""FLUX.1 Kontext on tiny FLUX components: PD is FluxKontextPipeline's own call with the
reference, FD the same pipeline without it, ℳ = 0/1 give PD/FD, FASA across FD's and PD's
calls, the reference checks, and the CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

from freecure.attention.fasa import FasaState
from freecure.backends.reference import FluxKontextBackend
from freecure.cli import main
from freecure.core.attributes import parse_prompt
from freecure.core.conditioning import FD, PD, ReferenceConditioning
from freecure.core.errors import InputError
from freecure.core.guidance import FD_LANE, PD_LANE, Guidance
from freecure.families.flux import FLUX
from freecure.stages.fasa import fasa_pass
from freecure.stages.rofa import rofa_pass
from freecure.stages.sampling import plain_pass, same_pass

PROMPT = "a woman with black curly hair, laughing happily"
SIZE, LATENT, STEPS = (64, 64), (32, 32), 4


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    backend = FluxKontextBackend.build_tiny(directory=tmp_path_factory.mktemp("kontext"))
    backend.pipeline.set_progress_bar_config(disable=True)
    backend.guidance_scale = 2.5
    return backend


@pytest.fixture(scope="module")
def reference(backend, astronaut):
    """The photo as the tiny backend hands it to the VAE: scaled down to 64² px (MTCNN checks the
    photo before, at its own size: a 64 px face is too small for it)."""
    return backend.prepared_references([astronaut])[0]


@pytest.fixture(scope="module")
def conditions(backend, astronaut):
    parsed = parse_prompt(PROMPT, "woman", tokenizer=backend.tokenizer)
    return backend.conditions(parsed, [astronaut], STEPS)


def scheduler(backend):
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(backend.pipeline.scheduler.config)
    FLUX.set_timesteps(scheduler, STEPS, "cpu", LATENT)
    return scheduler


def z_T(seed=0, backend=None):
    generator = torch.Generator().manual_seed(seed)
    return FLUX.initial_latents(backend.pipeline, None, LATENT, generator, "cpu", torch.float32)


def pipeline_call(backend, conditions, z, image=None):
    return backend.pipeline(
        image=image,
        prompt_embeds=conditions.fd.prompt_embeds,
        pooled_prompt_embeds=conditions.fd.pooled_prompt_embeds,
        latents=z,
        num_inference_steps=STEPS,
        guidance_scale=2.5,
        height=SIZE[0],
        width=SIZE[1],
        output_type="latent",
        max_area=SIZE[0] * SIZE[1],  # the pipeline rescales the output to this area (default 1024²)
        _auto_resize=False,
    ).images


def test_pd_rows_carry_the_reference_and_fd_rows_do_not(conditions):
    assert isinstance(conditions.pd, ReferenceConditioning) and isinstance(conditions.pd_uncond, ReferenceConditioning)
    assert not isinstance(conditions.fd, ReferenceConditioning)
    assert not isinstance(conditions.uncond, ReferenceConditioning)
    assert conditions.inject_step == 0 and torch.equal(conditions.pd.prompt_embeds, conditions.fd.prompt_embeds)
    references = conditions.pd.references
    assert references.blocks == (256,) and references.latents.shape == (1, 256, 16)  # 64² px → 16×16 tokens
    assert torch.equal(references.ids[:, 0], torch.ones(256))  # Kontext's reference index 1


def test_pd_equals_flux_kontext_pipeline_with_the_reference(backend, conditions, reference):
    ours = plain_pass(backend, scheduler(backend), z_T(0, backend), conditions, Guidance(scale=1.0), SIZE, lane=PD)
    theirs = pipeline_call(backend, conditions, z_T(0, backend), image=reference)
    assert torch.equal(ours, theirs)


def test_fd_equals_the_same_pipeline_without_the_reference(backend, conditions):
    ours = plain_pass(backend, scheduler(backend), z_T(0, backend), conditions, Guidance(scale=1.0), SIZE, lane=FD)
    theirs = pipeline_call(backend, conditions, z_T(0, backend))
    assert torch.equal(ours, theirs)


def test_same_pass_and_rofa_masks_reproduce_pd_and_fd(backend, conditions):
    guidance = Guidance(scale=1.0)
    same = same_pass(backend, scheduler(backend), z_T(0, backend), conditions, guidance, SIZE)
    pd = plain_pass(backend, scheduler(backend), z_T(0, backend), conditions, guidance, SIZE, lane=PD)
    fd = plain_pass(backend, scheduler(backend), z_T(0, backend), conditions, guidance, SIZE, lane=FD)
    # the SAME pass runs FD's and PD's rows in two calls of one row each, as the plain passes do
    assert torch.equal(same.z0[PD_LANE : PD_LANE + 1], pd) and torch.equal(same.z0[FD_LANE : FD_LANE + 1], fd)
    ones = FLUX.model_mask(torch.ones(1, 1, *LATENT), same.z0)
    assert torch.equal(rofa_pass(backend, same, conditions, ones, guidance, SIZE), fd)
    zeros = FLUX.model_mask(torch.zeros(1, 1, *LATENT), same.z0)
    assert torch.equal(rofa_pass(backend, same, conditions, zeros, guidance, SIZE), pd)


def test_predict_noise_makes_one_call_per_row_kind_fd_first(backend, conditions):
    lengths = []
    handle = backend.denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(tuple(kwargs["hidden_states"].shape[:2])), with_kwargs=True
    )
    try:
        z = torch.cat([z_T(1, backend), z_T(2, backend), z_T(3, backend)])
        rows = [conditions.pd, conditions.fd, conditions.pd_uncond]
        out = backend.predict_noise(z, torch.tensor(700.0), rows, ("pd", "fd", "pd_uncond"), 1, SIZE)
    finally:
        handle.remove()
    assert lengths == [(1, 256), (2, 512)]  # FD's row alone, then PD's two rows with 256 reference tokens
    alone = backend.predict_noise(z[1:2], torch.tensor(700.0), rows[1:2], ("fd",), 1, SIZE)
    assert out.shape == z.shape and torch.equal(out[1:2], alone)


def fasa_state(mask_value: float, weight: float = 1.5):
    return FasaState(torch.full((1, 16, 16), mask_value), weight, (16, 16))


def test_fasa_across_the_two_calls(backend, conditions):
    guidance = Guidance(scale=1.0)
    same = same_pass(backend, scheduler(backend), z_T(0, backend), conditions, guidance, SIZE)
    layers = FLUX.fasa_layers(backend.denoiser, "up")

    def run(state):
        backend.fasa_state = state
        try:
            with FLUX.foundation_aware_attention(backend.denoiser, state, layers):
                return fasa_pass(backend, scheduler(backend), same, conditions, state, guidance, SIZE)
        finally:
            backend.fasa_state = None

    blocked = run(fasa_state(0.0))  # every FD key blocked: plain PD, bit for bit
    assert torch.equal(blocked, same.pd)
    state = fasa_state(1.0)
    opened = run(state)
    assert not torch.allclose(opened, same.pd, atol=1e-4)  # PD's queries now see FD's keys
    # FD's image keys were recorded in FD's call (256 target tokens, none of the references)
    recorded = [kv[0] for by_row in state.cache.values() for kv in by_row.values()]
    assert recorded and all(k.shape[1] == 256 for k in recorded)


def test_two_references_give_two_blocks_with_their_own_index(backend, reference):
    other = reference.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((32, 64))
    tokens = backend.family.encode_references(backend.pipeline, [reference, other], None, auto_resize=False)
    assert tokens.blocks == (256, 128)
    assert torch.equal(tokens.ids[:256, 0], torch.full((256,), 1.0))
    assert torch.equal(tokens.ids[256:, 0], torch.full((128,), 2.0))
    assert tokens.ids[256:, 1].max() == 15 and tokens.ids[256:, 2].max() == 7  # its own 16×8 grid


def test_a_reference_without_a_face_is_refused(backend):
    parsed = parse_prompt(PROMPT, "woman", tokenizer=backend.tokenizer)
    blank = Image.new("RGB", (64, 64), (120, 120, 120))
    with pytest.raises(InputError, match="reference photo 1 of 1 shows no face"):
        backend.conditions(parsed, [blank], STEPS)
    with pytest.raises(InputError, match="give --ref PHOTO"):
        backend.conditions(parsed, [], STEPS)


# --- CLI ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method", ["rofa", "fasa"])
def test_generate_tiny_flux_kontext(tmp_path, astronaut, method):
    astronaut.save(tmp_path / "ref.png")
    out = tmp_path / "run"
    code = main(
        ["generate", "--tiny", "--backend", "flux-kontext", "--prompt", PROMPT, "--ref", str(tmp_path / "ref.png")]
        + ["--steps", "4", "--method", method, "--out", str(out), "--no-progress"]
    )
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["stages"] if s["ran"]][:3] == ["same_pass", "masks", method]
    assert "Non-Commercial" in manifest["license"]
    fd, pd = (np.asarray(Image.open(out / f"{name}.png")) for name in ("fd", "pd"))
    assert not np.array_equal(fd, pd)  # the reference tokens change PD
