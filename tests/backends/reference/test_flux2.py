"""FLUX.2 [klein] and [dev] on tiny components: PD is the pipeline's own call with the
references, FD the same pipeline without them, ℳ = 0/1 give PD/FD, FASA across FD's and PD's
calls on FLUX.2's fused single-stream blocks, several references, and the CLI end to end."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from freecure.attention.fasa import FasaState
from freecure.backends.reference import Flux2Backend, Flux2KleinBackend
from freecure.cli import main
from freecure.core.attributes import parse_prompt
from freecure.core.conditioning import FD, PD
from freecure.core.errors import InputError
from freecure.core.guidance import FD_LANE, PD_LANE
from freecure.stages.fasa import fasa_pass
from freecure.stages.rofa import rofa_pass
from freecure.stages.sampling import plain_pass, same_pass
from tests.families.test_flux2 import unpatchified

PROMPT = "a woman with black curly hair, laughing happily"
SIZE, LATENT, STEPS, SCALE = (64, 64), (32, 32), 3, 4.0


@pytest.fixture(scope="module", params=["klein-base", "klein-distilled", "dev"])
def backend(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "dev":
        backend = Flux2Backend.build_tiny(directory=folder)
    else:
        backend = Flux2KleinBackend.build_tiny(directory=folder, distilled=request.param == "klein-distilled")
    backend.pipeline.set_progress_bar_config(disable=True)
    backend.guidance_scale = SCALE
    return backend


@pytest.fixture(scope="module")
def conditions(backend, astronaut):
    parsed = parse_prompt(PROMPT, "woman", tokenizer=backend.tokenizer)
    return backend.conditions(parsed, [astronaut], STEPS)


def scheduler(backend):
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(backend.pipeline.scheduler.config)
    backend.family.set_timesteps(scheduler, STEPS, "cpu", LATENT)
    return scheduler


def z_T(backend, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return backend.family.initial_latents(backend.pipeline, None, LATENT, generator, "cpu", torch.float32)


def lane(backend, conditions, key):
    guidance = backend.family.loop_guidance(SCALE)
    return plain_pass(backend, scheduler(backend), z_T(backend), conditions, guidance, SIZE, lane=key)


def pipeline_call(backend, images=None):
    pipe = backend.pipeline
    return pipe(
        prompt=PROMPT,
        image=images,
        height=SIZE[0],
        width=SIZE[1],
        num_inference_steps=STEPS,
        guidance_scale=SCALE,
        generator=torch.Generator().manual_seed(0),
        text_encoder_out_layers=pipe.text_encoder_out_layers,
        max_sequence_length=128,  # the tiny tokenizers' limit, which the family follows
        output_type="latent",
    ).images


def as_pipeline_output(backend, z):
    """Packed tokens in the layout the pipeline returns for output_type="latent" ([dev]: packed)."""
    return z if isinstance(backend, Flux2Backend) else unpatchified(backend.pipeline, z)


def test_pd_equals_the_pipeline_with_the_references(backend, conditions, astronaut):
    ours = as_pipeline_output(backend, lane(backend, conditions, PD))
    theirs = pipeline_call(backend, backend.prepared_references([astronaut]))
    # [klein] base runs real CFG: our PD lane is one call of 2 rows where the pipeline makes two
    # calls of 1, and CPU kernels do not round those alike (≤ 1e-5); one row per lane is exact
    if backend.family.loop_guidance(SCALE).cfg:
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(ours, theirs)


def test_fd_equals_the_same_pipeline_without_references(backend, conditions):
    ours = as_pipeline_output(backend, lane(backend, conditions, FD))
    theirs = pipeline_call(backend)
    if backend.family.loop_guidance(SCALE).cfg:
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(ours, theirs)


def test_same_pass_and_rofa_masks_reproduce_pd_and_fd(backend, conditions):
    guidance = backend.family.loop_guidance(SCALE)
    same = same_pass(backend, scheduler(backend), z_T(backend), conditions, guidance, SIZE)
    pd, fd = lane(backend, conditions, PD), lane(backend, conditions, FD)
    torch.testing.assert_close(same.z0[PD_LANE : PD_LANE + 1], pd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(same.z0[FD_LANE : FD_LANE + 1], fd, rtol=1e-5, atol=1e-5)
    family = backend.family
    ones = family.model_mask(torch.ones(1, 1, *LATENT), same.z0)
    assert torch.equal(rofa_pass(backend, same, conditions, ones, guidance, SIZE), same.fd)
    zeros = family.model_mask(torch.zeros(1, 1, *LATENT), same.z0)
    assert torch.equal(rofa_pass(backend, same, conditions, zeros, guidance, SIZE), same.pd)


def test_fasa_across_the_two_calls_on_fused_single_blocks(backend, conditions):
    guidance = backend.family.loop_guidance(SCALE)
    same = same_pass(backend, scheduler(backend), z_T(backend), conditions, guidance, SIZE)
    layers = backend.family.fasa_layers(backend.denoiser, "up")
    assert layers == ["single_transformer_blocks.0.attn.processor", "single_transformer_blocks.1.attn.processor"]

    def run(value):
        state = FasaState(torch.full((1, 16, 16), value), 1.5, (16, 16))
        backend.fasa_state = state
        try:
            with backend.family.foundation_aware_attention(backend.denoiser, state, layers):
                return fasa_pass(backend, scheduler(backend), same, conditions, state, guidance, SIZE), state
        finally:
            backend.fasa_state = None

    blocked, _ = run(0.0)  # every FD key blocked: PD exactly
    assert torch.equal(blocked, same.pd)
    opened, state = run(1.0)
    assert not torch.allclose(opened, same.pd, atol=1e-4)
    recorded = [kv[0] for by_row in state.cache.values() for kv in by_row.values()]
    assert recorded and all(k.shape[1] == 256 for k in recorded)  # FD's 16×16 target keys only


def test_two_references_give_two_blocks_with_their_own_time_offset(backend, astronaut):
    parsed = parse_prompt(PROMPT, "woman", tokenizer=backend.tokenizer)
    mirrored = astronaut.transpose(0)
    conditions = backend.conditions(parsed, [astronaut, mirrored], STEPS)
    references = conditions.pd.references
    assert references.blocks == (256, 256)
    assert set(references.ids[:256, 0].tolist()) == {10} and set(references.ids[256:, 0].tolist()) == {20}
    assert conditions.pd_uncond.references is references


def test_a_reference_without_a_face_is_refused(backend):
    from PIL import Image

    parsed = parse_prompt(PROMPT, "woman", tokenizer=backend.tokenizer)
    with pytest.raises(InputError, match="shows no face"):
        backend.conditions(parsed, [Image.new("RGB", (128, 128), (30, 90, 30))], STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flux2-klein", "flux2"])
def test_generate_tiny_fasa_then_apg(tmp_path, name):
    out = tmp_path / "run"
    code = main(
        ["generate", "--tiny", "--backend", name, "--prompt", PROMPT, "--ref", "examples/astronaut.png"]
        + ["--steps", "3", "--preset", "neurips", "--out", str(out), "--no-progress"]
    )
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["stages"] if s["ran"]] == ["same_pass", "masks", "fasa", "expression"]
    assert manifest["settings"]["family"] == "flux2"
