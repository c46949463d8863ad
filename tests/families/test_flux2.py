"""The FLUX.2 family on tiny FLUX.2 [klein] and [dev] pipelines: the family's own loop (noise,
schedule, rows, predictions, references, decoding) against diffusers' ``Flux2KleinPipeline`` and
``Flux2Pipeline``, the chat-template token columns, and ℳ's packed layout."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline
from PIL import Image

from freecure.core.attributes import token_indices_for_spans
from freecure.core.errors import InputError
from freecure.families import FLUX, FLUX2, Flux2Family, family_of
from freecure.families.flux import pack_latents
from freecure.families.flux2 import ChatTemplateTokenizer, patchify_pack

torch.set_num_threads(1)

PROMPT = "a man with black curly hair"
SIZE = (64, 64)  # pixels → a 32×32 latent → a 16×16 grid of 256 tokens
LATENT = (32, 32)
STEPS = 2


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    from freecure.families.tiny_flux2 import tiny_flux2_klein_pipeline

    pipe = tiny_flux2_klein_pipeline(tmp_path_factory.mktemp("tiny-flux2-klein"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    from freecure.families.tiny_flux2 import tiny_flux2_pipeline

    pipe = tiny_flux2_pipeline(tmp_path_factory.mktemp("tiny-flux2-dev"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def references():
    """Two different photos of at least 64 px a side (the pipelines' minimum), of two sizes."""
    from skimage import data

    astronaut = Image.fromarray(data.astronaut()).resize((96, 64))
    coffee = Image.fromarray(data.coffee()).resize((64, 80))
    return [astronaut, coffee]


def backend_of(pipe, guidance_scale=None):
    """What the family reads from a backend."""
    return SimpleNamespace(pipeline=pipe, device=torch.device("cpu"), guidance_scale=guidance_scale)


def pipeline_call(pipe, generator_seed=0, **kwargs):
    return pipe(
        prompt=PROMPT,
        height=SIZE[0],
        width=SIZE[1],
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(generator_seed),
        text_encoder_out_layers=pipe.text_encoder_out_layers,
        max_sequence_length=128,  # the tiny tokenizers' limit, which the family follows
        **kwargs,
    ).images


def family_loop(pipe, guidance_scale=4.0, images=None, seed=0):
    """The sampling loop driven through the family only: what the FreeCure stages do per lane."""
    family = family_of(pipe)
    backend = backend_of(pipe, guidance_scale)
    guidance = family.loop_guidance(guidance_scale)
    cond = family.encode_text(backend, PROMPT)
    rows = [family.negative_conditioning(backend, None), cond] if guidance.cfg else [cond]
    refs = None if images is None else family.encode_references(pipe, images, SIZE)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    family.set_timesteps(scheduler, STEPS, "cpu", LATENT)
    z = family.initial_latents(
        pipe, scheduler, LATENT, torch.Generator().manual_seed(seed), "cpu", cond.prompt_embeds.dtype
    )
    with torch.no_grad():
        for t in scheduler.timesteps:
            v = family.predict(backend, z.expand(len(rows), -1, -1), t, rows, SIZE, references=refs)
            if guidance.cfg:
                v = v[0:1] + guidance.scale * (v[1:2] - v[0:1])
            z = scheduler.step(v, t, z, return_dict=False)[0]
    return family, z, refs


def unpatchified(pipe, z):
    """Packed tokens → what Flux2KleinPipeline returns for output_type="latent"."""
    ids = pipe._prepare_latent_ids(torch.empty(1, 0, LATENT[0] // 2, LATENT[1] // 2))
    grid = pipe._unpack_latents_with_ids(z, ids)
    mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    return pipe._unpatchify_latents(grid * std + mean)


def assert_decoded_equal(family, pipe, z, theirs_np):
    """The family's PIL decode against the pipeline's float output: PIL rounds to 1/255."""
    ours = np.asarray(family.decode(pipe, z, SIZE)[0], dtype=np.float32) / 255
    assert ours.shape == theirs_np[0].shape
    np.testing.assert_allclose(ours, theirs_np[0], atol=0.5 / 255 + 1e-5, rtol=0)


# --- (a) z_T -------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["klein", "dev"])
def test_initial_noise_is_the_pipelines_draw(which, request):
    pipe = request.getfixturevalue(which)
    z = FLUX2.initial_latents(pipe, None, LATENT, torch.Generator().manual_seed(3), "cpu", torch.float32)
    theirs, ids = pipe.prepare_latents(1, 4, *SIZE, torch.float32, "cpu", torch.Generator().manual_seed(3))
    assert z.shape == (1, 16 * 16, 16) and z.dtype == torch.float32
    assert torch.equal(z, theirs)
    assert ids.shape == (1, 256, 4)
    # a z_T given in the pipeline's own (B, 4C, h/2, w/2) shape is packed the same way
    drawn = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(FLUX2.initial_latents(pipe, None, LATENT, None, "cpu", torch.float32, drawn), theirs)


def test_schedule_is_the_pipelines_with_empirical_mu(klein):
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(klein.scheduler.config)
    FLUX2.set_timesteps(scheduler, 28, "cpu", LATENT)
    reference = FlowMatchEulerDiscreteScheduler.from_config(klein.scheduler.config)
    reference.set_timesteps(sigmas=np.linspace(1.0, 1 / 28, 28), mu=compute_empirical_mu(256, 28))
    assert torch.equal(scheduler.timesteps, reference.timesteps)
    assert torch.equal(scheduler.sigmas, reference.sigmas)
    inverse, forward = FLUX2.inversion_schedulers(klein.scheduler.config, 28, "cpu", torch.zeros(1, 256, 16))
    assert torch.equal(forward.sigmas, reference.sigmas)
    assert torch.equal(inverse.sigmas, reference.sigmas.flip(0))


# --- (b) the loop against the pipelines -----------------------------------------------------------
def test_klein_cfg_loop_equals_flux2_klein_pipeline(klein):
    """Real CFG, two rows (empty prompt, prompt) per call. The pipeline calls the transformer once
    per branch, the family once on both rows: CPU kernels of batch 1 and 2 round differently, so
    the latents agree to float rounding, not bit for bit."""
    family, z, _ = family_loop(klein, guidance_scale=4.0)
    assert family.cfg and family.loop_guidance(4.0).cfg
    theirs = pipeline_call(klein, guidance_scale=4.0, output_type="latent")
    torch.testing.assert_close(unpatchified(klein, z), theirs, rtol=1e-5, atol=1e-5)
    assert_decoded_equal(family, klein, z, pipeline_call(klein, guidance_scale=4.0, output_type="np"))


def test_dev_embedded_guidance_loop_equals_flux2_pipeline(dev):
    """One row per lane, the guidance scale embedded; one transformer call each side: equal."""
    family, z, _ = family_loop(dev, guidance_scale=3.0)
    assert not family.cfg and not family.loop_guidance(3.0).cfg
    theirs = pipeline_call(dev, guidance_scale=3.0, output_type="latent")  # dev returns packed tokens
    torch.testing.assert_close(z, theirs, rtol=1e-5, atol=1e-5)
    assert_decoded_equal(family, dev, z, pipeline_call(dev, guidance_scale=3.0, output_type="np"))
    # the scale reaches the transformer: another one gives another result
    _, other, _ = family_loop(dev, guidance_scale=6.0)
    assert not torch.allclose(z, other)


def test_guidance_rows_and_defaults(klein, dev):
    klein_family, dev_family = family_of(klein), family_of(dev)
    assert klein_family.default_guidance_scale(klein) == 4.0 == dev_family.default_guidance_scale(dev)
    assert klein_family.loop_guidance(1.0).cfg is False  # the pipeline guides only above 1
    assert dev_family.loop_guidance(3.5, true_cfg_scale=2.0).scale == 2.0
    with pytest.raises(InputError, match="true_cfg_scale"):
        klein_family.loop_guidance(4.0, true_cfg_scale=2.0)
    with pytest.raises(InputError, match="guidance_rescale"):
        dev_family.loop_guidance(4.0, rescale=0.7)
    # a step-distilled klein: one row, the scale ignored (Flux2KleinPipeline's is_distilled)
    klein.register_to_config(is_distilled=True)
    try:
        distilled = family_of(klein)
        assert not distilled.cfg and not distilled.loop_guidance(4.0).cfg
        assert distilled.default_guidance_scale(klein) == 1.0
    finally:
        klein.register_to_config(is_distilled=False)


# --- (c) reference images --------------------------------------------------------------------------
@pytest.mark.parametrize("count", [1, 2])
def test_references_loop_equals_pipeline_with_images(klein, references, count):
    images = references[:count]
    family, z, refs = family_loop(klein, guidance_scale=4.0, images=images)
    theirs = pipeline_call(klein, guidance_scale=4.0, image=images, output_type="latent")
    torch.testing.assert_close(unpatchified(klein, z), theirs, rtol=1e-5, atol=1e-5)
    # blocks: 96×64 px → 48×32 latent → 24×16 tokens; 64×80 → 32×40 → 16×20
    assert refs.blocks == ((24 * 16,), (24 * 16, 16 * 20))[count - 1]
    assert refs.latents.shape == (1, sum(refs.blocks), 16) and refs.ids.shape == (sum(refs.blocks), 4)
    starts = np.cumsum((0, *refs.blocks))
    for k in range(count):
        block = refs.ids[starts[k] : starts[k + 1]]
        assert set(block[:, 0].tolist()) == {10 * (k + 1)}  # _prepare_image_ids: t = 10, 20, …
        assert set(block[:, 3].tolist()) == {0}
    # the tokens and ids are the pipeline's own prepare_image_latents
    pixels = [
        klein.image_processor.preprocess(im, height=im.height // 4 * 4, width=im.width // 4 * 4, resize_mode="crop")
        for im in images
    ]
    tokens, ids = klein.prepare_image_latents(pixels, 1, None, "cpu", klein.vae.dtype)
    assert torch.equal(refs.latents, tokens) and torch.equal(refs.ids, ids[0])


def test_dev_reads_references_like_klein(dev, references):
    _, z, refs = family_loop(dev, guidance_scale=4.0, images=references)
    theirs = pipeline_call(dev, guidance_scale=4.0, image=references, output_type="latent")
    torch.testing.assert_close(z, theirs, rtol=1e-5, atol=1e-5)
    assert len(refs.blocks) == 2


def test_a_reference_too_small_is_an_input_error(klein):
    with pytest.raises(InputError, match="reference image 1"):
        FLUX2.encode_references(klein, [Image.new("RGB", (32, 96))], SIZE)


# --- (d) token columns behind the chat template -----------------------------------------------------
def encoder_ids(pipe):
    """The ids the pipeline feeds its text encoder for PROMPT, padding dropped."""
    seen = {}
    encoder = pipe.text_encoder
    forward = encoder.forward

    def spy(input_ids=None, attention_mask=None, **kwargs):
        seen["ids"] = input_ids[0][attention_mask[0].bool()].tolist()
        return forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    encoder.forward = spy
    try:
        pipe.encode_prompt(PROMPT, text_encoder_out_layers=pipe.text_encoder_out_layers, max_sequence_length=128)
    finally:
        del encoder.forward
    return seen["ids"]


@pytest.mark.parametrize("which", ["klein", "dev"])
def test_attribute_columns_are_the_encoders_token_positions(which, request):
    pipe = request.getfixturevalue(which)
    tokenizer = family_of(pipe).tokenizer(pipe)
    assert isinstance(tokenizer, ChatTemplateTokenizer) and tokenizer.model_max_length == 128
    ids = encoder_ids(pipe)
    assert tokenizer(PROMPT)["input_ids"] == ids
    start = PROMPT.index("curly")
    (columns,) = token_indices_for_spans(tokenizer, PROMPT, [(start, start + len("curly"))])
    assert columns and min(columns) > 2  # after the template's leading tokens
    assert "".join(tokenizer.decode([ids[c]]) for c in columns).strip() == "curly"
    # template tokens carry no text; the prompt's tokens cover it in order
    offsets = tokenizer(PROMPT, return_offsets_mapping=True)["offset_mapping"]
    covered = "".join(PROMPT[a:b] for a, b in offsets)
    assert covered == PROMPT


def test_dev_columns_follow_the_prompt_that_format_input_cleans(dev):
    tokenizer = family_of(dev).tokenizer(dev)
    prompt = "a man[IMG] with curly hair"
    offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    assert "".join(prompt[a:b] for a, b in offsets) == prompt.replace("[IMG]", "")
    start = prompt.index("curly")
    (columns,) = token_indices_for_spans(tokenizer, prompt, [(start, start + 5)])
    ids = tokenizer(prompt)["input_ids"]
    assert "".join(tokenizer.decode([ids[c]]) for c in columns).strip() == "curly"


# --- (e) ℳ's packed layout ------------------------------------------------------------------------------
def test_mask_lands_on_the_packed_entries_of_its_pixel():
    """FLUX.2 patchifies channel-major then flattens: token (i, j) holds channel c of pixel
    (2i + dy, 2j + dx) at c·4 + 2·dy + dx. That is FLUX.1's packed order too (its
    ``_pack_latents`` permutes to (c, dy, dx) as well), so ℳ packs alike in both families; what
    differs is the noise (drawn in the patchified shape) and the batch-norm scaling."""
    channels, h, w = 4, 8, 12
    for y, x in ((0, 0), (5, 2), (7, 11)):
        mask = torch.zeros(1, 1, h, w)
        mask[0, 0, y, x] = 1
        packed = FLUX2.model_mask(mask, torch.zeros(1, (h // 2) * (w // 2), 4 * channels))
        assert packed.shape == (1, 24, 16)
        token = (y // 2) * (w // 2) + x // 2
        expected = torch.zeros_like(packed)
        expected[0, token, [c * 4 + 2 * (y % 2) + (x % 2) for c in range(channels)]] = 1
        assert torch.equal(packed, expected)
        assert torch.equal(packed, FLUX.model_mask(mask, packed))  # the same order as FLUX.1's
    # and value for value: masking then packing equals packing then masking
    g = torch.Generator().manual_seed(1)
    z, mask = torch.randn(1, channels, h, w, generator=g), torch.rand(1, 1, h, w, generator=g)
    assert torch.equal(patchify_pack(mask * z), FLUX2.model_mask(mask, patchify_pack(z)) * patchify_pack(z))
    assert torch.equal(patchify_pack(z), pack_latents(z))


# --- (f) family_of ------------------------------------------------------------------------------------------
def test_family_of_the_tiny_pipelines(klein, dev):
    assert isinstance(klein, Flux2KleinPipeline) and isinstance(dev, Flux2Pipeline)
    for pipe, cfg in ((klein, True), (dev, False)):
        family = family_of(pipe)
        assert isinstance(family, Flux2Family) and family.name == "flux2"
        assert family.cfg is cfg
        assert family.out_layers(pipe) == (1, 2, 3)
        assert family_of(pipe) is family  # one shared object per configuration
        assert family.denoiser(pipe) is pipe.transformer
        assert family.default_size(pipe) == (64, 64) and family.size_multiple(pipe) == 4
        assert family.attention_grid(LATENT) == (16, 16)
    # without the tiny attribute, the pipelines' own defaults
    assert FLUX2.out_layers(object.__new__(Flux2KleinPipeline)) == (9, 18, 27)
    assert FLUX2.out_layers(object.__new__(Flux2Pipeline)) == (10, 20, 30)


def test_tiny_pipeline_builds_flux2(tmp_path):
    from freecure.families.tiny import tiny_pipeline

    assert isinstance(tiny_pipeline("flux2-klein", tmp_path / "k"), Flux2KleinPipeline)
    assert isinstance(tiny_pipeline("flux2", tmp_path / "d"), Flux2Pipeline)
