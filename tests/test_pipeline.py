"""The FreeCure engine on tiny random pipelines: batching, SAME pass, ROFA, capture, stages."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler
from diffusers.models.attention_processor import AttnProcessor2_0

from freecure.attention.capture import AttentionStore, capture_cross_attention, up_block_cross_attention_layers
from freecure.backends import RandomProjectionIdentityEncoder, TokenFusionBackend
from freecure.core.attributes import parse_prompt
from freecure.core.conditioning import FD, PD
from freecure.core.errors import InputError
from freecure.core.guidance import FD_LANE, PD_LANE, Guidance, single_lane_layout
from freecure.families.tiny import LayoutFaceParser
from freecure.parsing import ParseResult
from freecure.pipeline import FreeCureConfig
from freecure.stages.rofa import rofa_blend, rofa_pass
from freecure.stages.sampling import plain_pass, predict_guided, same_layout, same_pass
from tests.factories import token_fusion_backend, token_fusion_freecure

PROMPT = "a man with black curly hair, laughing happily"
SIZE = (64, 64)


@pytest.fixture(scope="module")
def backend(tiny_sd15):
    return token_fusion_backend(tiny_sd15)


def make_conditions(backend, reference, steps=6, inject=2, prompt=PROMPT):
    parsed = parse_prompt(prompt, "man", tokenizer=backend.tokenizer)
    conditions = backend.conditions(parsed, [reference], steps)
    return parsed, replace(conditions, inject_step=inject)


def fresh_scheduler(pipe, steps):
    scheduler = pipe.scheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    return scheduler


def noise(seed=0):
    return torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(seed))


# --- ROFA blend (eq. 6) ------------------------------------------------------------------
def test_rofa_blend_endpoints_and_convexity():
    g = torch.Generator().manual_seed(0)
    eps_p, eps_f = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    assert torch.equal(rofa_blend(eps_p, eps_f, torch.zeros(1, 1, 8, 8)), eps_p)
    assert torch.equal(rofa_blend(eps_p, eps_f, torch.ones(1, 1, 8, 8)), eps_f)
    mask = torch.rand(1, 1, 8, 8, generator=g)
    blended = rofa_blend(eps_p, eps_f, mask)
    low, high = torch.minimum(eps_p, eps_f), torch.maximum(eps_p, eps_f)
    assert torch.all(blended >= low - 1e-6) and torch.all(blended <= high + 1e-6)


# --- batch layouts -------------------------------------------------------------------------
def test_three_row_batch_equals_two_separate_cfg_calls(backend, grey_image):
    _, conditions = make_conditions(backend, grey_image, inject=0)
    scheduler = fresh_scheduler(backend.pipeline, 6)
    t = scheduler.timesteps[2]
    z = noise().expand(2, -1, -1, -1)  # both lanes at the same latent
    guidance = Guidance(scale=7.5)
    layout = same_layout(2, conditions, approximate_shared_uncond=True)
    assert layout.keys == ("uncond", "fd", "pd")
    joint = predict_guided(backend, scheduler, layout, z, t, 2, conditions.get, guidance, SIZE)
    for lane, key in ((FD_LANE, FD), (PD_LANE, PD)):
        alone = predict_guided(
            backend, scheduler, single_lane_layout(key, True), z[:1], t, 2, conditions.get, guidance, SIZE
        )
        torch.testing.assert_close(joint[lane : lane + 1], alone, rtol=1e-4, atol=1e-5)


def test_exact_layout_guides_each_lane_on_its_own_latent(backend, grey_image):
    _, conditions = make_conditions(backend, grey_image, inject=0)
    scheduler = fresh_scheduler(backend.pipeline, 6)
    t = scheduler.timesteps[3]
    z = torch.cat([noise(1), noise(2)])  # different lanes
    guidance = Guidance(scale=5.0)
    layout = same_layout(3, conditions)
    assert layout.keys == ("uncond", "fd", "pd_uncond", "pd")
    joint = predict_guided(backend, scheduler, layout, z, t, 3, conditions.get, guidance, SIZE)
    for lane, key in ((FD_LANE, FD), (PD_LANE, PD)):
        alone = predict_guided(
            backend, scheduler, single_lane_layout(key, True), z[lane : lane + 1], t, 3, conditions.get, guidance, SIZE
        )
        torch.testing.assert_close(joint[lane : lane + 1], alone, rtol=1e-4, atol=1e-5)


def test_before_injection_the_batch_has_two_rows(backend, grey_image):
    _, conditions = make_conditions(backend, grey_image, inject=3)
    assert same_layout(2, conditions).keys == ("uncond", "fd")
    assert len(same_layout(3, conditions).rows) == 4


# --- SAME pass and ROFA ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def same_run(backend, astronaut):
    _, conditions = make_conditions(backend, astronaut)
    scheduler = fresh_scheduler(backend.pipeline, 6)
    same = same_pass(backend, scheduler, noise(), conditions, Guidance(), SIZE)
    return conditions, same


def test_joint_pass_equals_separate_fd_and_pd_generations(backend, same_run):
    conditions, same = same_run
    for lane, key in ((FD_LANE, FD), (PD_LANE, PD)):
        alone = plain_pass(
            backend, fresh_scheduler(backend.pipeline, 6), noise(), conditions, Guidance(), SIZE, lane=key
        )
        torch.testing.assert_close(same.z0[lane : lane + 1], alone, rtol=1e-4, atol=1e-4)
    # identity makes a difference after injection
    assert not torch.allclose(same.z0[FD_LANE], same.z0[PD_LANE])
    assert sorted(same.eps_f) == list(range(conditions.inject_step, 6))


def test_rofa_with_zero_mask_reproduces_pd(backend, same_run):
    conditions, same = same_run
    z = rofa_pass(backend, same, conditions, torch.zeros(1, 1, 32, 32), Guidance(), SIZE)
    torch.testing.assert_close(z, same.z0[PD_LANE : PD_LANE + 1], rtol=1e-4, atol=1e-4)


def test_rofa_with_unit_mask_follows_fd_lane_exactly(backend, same_run):
    conditions, same = same_run
    z = rofa_pass(backend, same, conditions, torch.ones(1, 1, 32, 32), Guidance(), SIZE)
    assert torch.equal(z, same.z0[FD_LANE : FD_LANE + 1])


def test_rofa_with_half_mask_is_local(backend, same_run):
    conditions, same = same_run
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :, :16] = 1.0  # left half follows FD
    z = rofa_pass(backend, same, conditions, mask, Guidance(), SIZE)
    fd, pd = same.z0[FD_LANE], same.z0[PD_LANE]
    left, right = (z[0] - fd)[..., :12].abs().mean(), (z[0] - pd)[..., 20:].abs().mean()
    assert left < (pd - fd)[..., :12].abs().mean()
    assert right < (pd - fd)[..., 20:].abs().mean()


# --- attention capture ----------------------------------------------------------------------
def test_capture_wraps_only_up_block_cross_attention_and_restores(tiny_sd15):
    unet = tiny_sd15.unet
    before = dict(unet.attn_processors)
    store = AttentionStore((1, 2), (32, 32))
    layers = up_block_cross_attention_layers(unet)
    assert layers and all(name.startswith("up_blocks.") and ".attn2." in name for name in layers)
    with pytest.raises(RuntimeError, match="boom"), capture_cross_attention(unet, store):
        during = unet.attn_processors
        for name, processor in during.items():
            if name in layers:
                assert type(processor).__name__ == "CrossAttentionCapture"
                assert isinstance(processor.inner, AttnProcessor2_0)
            else:
                assert processor is before[name]
        raise RuntimeError("boom")
    assert unet.attn_processors == before


def test_captured_maps_are_attention_rows_and_leave_output_unchanged(backend, grey_image):
    parsed, conditions = make_conditions(backend, grey_image)
    unet = backend.unet
    embeds = torch.cat([conditions.uncond.prompt_embeds, conditions.fd.prompt_embeds])
    z = noise().expand(2, -1, -1, -1)
    t = torch.tensor(500)
    reference = unet(z, t, encoder_hidden_states=embeds).sample
    store = AttentionStore(tuple(range(77)), (32, 32))
    with capture_cross_attention(unet, store):
        store.set_context(0, 1)
        captured = unet(z, t, encoder_hidden_states=embeds).sample
    torch.testing.assert_close(captured, reference)
    maps = store.aggregate()
    assert maps.shape == (77, 32, 32)
    # softmax rows over all 77 text tokens sum to one at every position
    torch.testing.assert_close(maps.sum(dim=0), torch.ones(32, 32), rtol=1e-4, atol=1e-4)
    # an attribute's map is the mean of its columns
    hair = next(a for a in parsed.attributes if a.category == "hair")
    expected = maps[list(hair.token_indices)].mean(dim=0)
    torch.testing.assert_close(store.token_map(hair.token_indices), expected)


def test_store_only_records_when_a_row_is_set(backend, grey_image):
    _, conditions = make_conditions(backend, grey_image)
    store = AttentionStore((1,), (32, 32))
    with capture_cross_attention(backend.unet, store):
        store.set_context(0, None)
        backend.unet(noise(), torch.tensor(10), encoder_hidden_states=conditions.fd.prompt_embeds)
    assert not store.sums
    with pytest.raises(RuntimeError, match="no cross-attention"):
        store.aggregate()


# --- the whole pipeline -------------------------------------------------------------------
freecure = token_fusion_freecure


def run(fc, prompt=PROMPT, seed=0, steps=5, reference=None):
    from PIL import Image

    reference = reference or Image.new("RGB", (32, 32), (90, 60, 40))
    return fc(
        prompt, [reference], class_word="man", num_inference_steps=steps, generator=torch.Generator().manual_seed(seed)
    )


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_end_to_end_runs_every_stage(family, tiny_sd15, tiny_sdxl):
    pipe, dim = (tiny_sd15, 32) if family == "sd15" else (tiny_sdxl, 64)
    out = run(freecure(pipe, dim))
    assert [s.name for s in out.stages] == ["same_pass", "masks", "rofa", "expression"]
    assert all(s.ran for s in out.stages)
    assert set(out.images) == {"fd", "pd", "blended", "freecure"}
    assert all(image.size == (64, 64) for image in out.images.values())
    assert set(out.attention_maps) == {"black curly hair", "laughing happily"}
    assert out.attention_maps["black curly hair"].shape == (32, 32)
    assert out.mask.shape == (64, 64) and out.latent_mask.shape == (1, 1, 32, 32)
    assert 0 < float(out.mask.max()) <= 1
    steps, inject = 5, out.settings["inject_step"]
    n = round(0.5 * steps)
    assert out.stage("same_pass").unet_calls == steps
    assert out.stage("same_pass").batch_items == 2 * inject + 4 * (steps - inject)
    assert out.stage("rofa").batch_items == 2 * (steps - inject)
    assert out.stage("expression").unet_calls == 2 * n


@pytest.mark.slow
def test_same_seed_same_images_other_seed_other_images(tiny_sd15):
    fc = freecure(tiny_sd15, 32)
    a, b, c = run(fc, seed=3), run(fc, seed=3), run(fc, seed=4)
    for name in a.images:
        assert np.array_equal(np.asarray(a.images[name]), np.asarray(b.images[name]))
    assert not np.array_equal(np.asarray(a.images["freecure"]), np.asarray(c.images["freecure"]))


@pytest.mark.slow
def test_stages_skip_when_nothing_to_do(tiny_sd15):
    fc = freecure(tiny_sd15, 32)
    localized_only = run(fc, prompt="a man with black curly hair")
    assert not localized_only.stage("expression").ran
    assert "no abstract attribute" in localized_only.stage("expression").reason
    expression_only = run(fc, prompt="a man laughing happily")
    assert not expression_only.stage("rofa").ran and not expression_only.stage("masks").ran
    assert expression_only.stage("expression").ran
    nothing = run(fc, prompt="a man")
    assert nothing.images["freecure"] is nothing.images["pd"]
    assert any("PD unchanged" in note for note in nothing.notes)
    assert nothing.unet_calls == 5


class EmptyParser:
    def __call__(self, image):
        width, height = image.size
        return ParseResult(np.zeros((height, width), np.uint8), None, (0, 0, width, height), False, "nothing")


def test_attribute_missing_from_the_images_is_skipped_and_said(tiny_sd15):
    out = run(freecure(tiny_sd15, 32, parser=EmptyParser()), prompt="a man with black curly hair")
    assert not out.stage("rofa").ran
    assert any("'black curly hair'" in note and "not blended" in note for note in out.notes)
    assert out.images["freecure"] is out.images["pd"]


class SunglassesOnFDParser:
    """The layout parse of both images, with sunglasses painted over FD's eyes only; it records
    the images it is given (FD first, PD second is the pipeline's contract)."""

    def __init__(self):
        self.layout = LayoutFaceParser()
        self.images = []

    def parse_batch(self, images):
        self.images.append(list(images))
        fd, pd = (self.layout(image) for image in images)
        eyes = fd.mask("eyes")
        fd.labels[eyes] = 6  # eye_g
        return [fd, pd]


@pytest.mark.parametrize("pd_region", ["placement", "literal"])
def test_an_accessory_pd_did_not_draw_is_restored_only_with_placement(tiny_sd15, pd_region):
    parser = SunglassesOnFDParser()
    out = run(freecure(tiny_sd15, 32, parser=parser, pd_region=pd_region), prompt="a man wearing sunglasses")
    assert parser.images[0][0] is out.images["fd"] and parser.images[0][1] is out.images["pd"]
    assert out.parse_fd.mask("eye_g").any() and not out.parse_pd.mask("eye_g").any()
    if pd_region == "literal":
        assert not out.stage("rofa").ran
        assert any("'sunglasses'" in note and "PD image" in note for note in out.notes)
    else:
        assert out.stage("rofa").ran
        mask = out.attribute_masks["sunglasses"]
        # FD's factor stays literal: the mask lives on FD's sunglasses only
        assert torch.all(mask[~torch.from_numpy(out.parse_fd.mask("eye_g"))] == 0) and mask.max() > 0
    assert out.settings["pd_region"] == pd_region
    with pytest.raises(InputError, match="pd_region"):
        FreeCureConfig(pd_region="everywhere")


@pytest.mark.parametrize("aggregation", ["per_resolution", "per_layer"])
def test_the_configured_aggregation_reaches_the_store(tiny_sd15, monkeypatch, aggregation):
    import freecure.stages.sampling as sampling_module

    stores = []

    class SpyStore(AttentionStore):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            stores.append(self)

    monkeypatch.setattr(sampling_module, "AttentionStore", SpyStore)
    out = run(freecure(tiny_sd15, 32, attention_aggregation=aggregation), prompt="a man with black curly hair", steps=2)
    assert [store.aggregation for store in stores] == [aggregation]
    assert out.settings["attention_aggregation"] == aggregation
    with pytest.raises(InputError, match="attention_aggregation"):
        FreeCureConfig(attention_aggregation="median")


@pytest.mark.slow
def test_approximate_shared_uncond_uses_three_rows_and_keeps_pd_exact(tiny_sd15):
    exact = run(freecure(tiny_sd15, 32), prompt="a man with black curly hair")
    approx = run(freecure(tiny_sd15, 32, approximate_shared_uncond=True), prompt="a man with black curly hair")
    inject = exact.settings["inject_step"]
    assert approx.stage("same_pass").batch_items == 2 * inject + 3 * (5 - inject)
    torch.testing.assert_close(approx.latents["pd"], exact.latents["pd"], rtol=1e-4, atol=1e-4)


def test_bad_inputs_get_clear_errors(tiny_sd15, tmp_path):
    fc = freecure(tiny_sd15, 32)
    with pytest.raises(InputError, match="at least 2"):
        run(fc, steps=1)
    with pytest.raises(InputError, match="gamma"):
        FreeCureConfig(gamma=0.0)
    with pytest.raises(InputError, match="gamma"):
        FreeCureConfig(gamma=1.5)
    not_an_image = tmp_path / "ref.png"
    not_an_image.write_text("hello")
    with pytest.raises(InputError, match="cannot read"):
        fc(PROMPT, [not_an_image], class_word="man", num_inference_steps=3)
    with pytest.raises(InputError, match="inject_step"):
        fc(PROMPT, [], class_word="man", num_inference_steps=3, inject_step=3)  # checked before encoding
    original = tiny_sd15.scheduler
    from diffusers import DPMSolverMultistepScheduler

    stochastic = (
        EulerAncestralDiscreteScheduler.from_config(original.config),
        # "sde-dpmsolver++" starts with "sde": a suffix test let it through
        DPMSolverMultistepScheduler.from_config(original.config, algorithm_type="sde-dpmsolver++"),
    )
    for scheduler in stochastic:
        tiny_sd15.scheduler = scheduler
        try:
            with pytest.raises(ValueError, match="fresh noise"):
                run(fc)
        finally:
            tiny_sd15.scheduler = original


def test_multistep_scheduler_keeps_rofa_exact(tiny_sd15):
    from diffusers import DPMSolverMultistepScheduler

    original = tiny_sd15.scheduler
    tiny_sd15.scheduler = DPMSolverMultistepScheduler.from_config(original.config)
    try:
        backend = token_fusion_backend(tiny_sd15)
        from PIL import Image

        _, conditions = make_conditions(backend, Image.new("RGB", (8, 8)), steps=6, inject=2)
        scheduler = fresh_scheduler(tiny_sd15, 6)
        same = same_pass(backend, scheduler, noise(), conditions, Guidance(), SIZE)
        z = rofa_pass(backend, same, conditions, torch.zeros(1, 1, 32, 32), Guidance(), SIZE)
        torch.testing.assert_close(z, same.z0[PD_LANE : PD_LANE + 1], rtol=1e-4, atol=1e-4)
        alone = plain_pass(backend, fresh_scheduler(tiny_sd15, 6), noise(), conditions, Guidance(), SIZE, lane=PD)
        torch.testing.assert_close(same.z0[PD_LANE : PD_LANE + 1], alone, rtol=1e-4, atol=1e-4)
    finally:
        tiny_sd15.scheduler = original


def test_captured_maps_equal_the_probabilities_the_layer_used(backend, grey_image):
    """Independent check: run every captured layer through diffusers' explicit-softmax
    processor, record the probabilities it computes on its own forward path, and compare."""
    from diffusers.models.attention_processor import AttnProcessor

    _, conditions = make_conditions(backend, grey_image)
    unet = backend.unet
    columns = (1, 4, 5)
    recorded: dict[str, torch.Tensor] = {}

    class Recording(AttnProcessor):
        def __init__(self, name):
            self.name = name

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
            scores = attn.get_attention_scores

            def spy(query, key, attention_mask=None):
                probs = scores(query, key, attention_mask)
                heads = attn.heads
                recorded[self.name] = probs.reshape(-1, heads, *probs.shape[1:])[1, :, :, list(columns)].mean(0)
                return probs

            attn.get_attention_scores = spy
            try:
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
            finally:
                del attn.get_attention_scores

    layers = up_block_cross_attention_layers(unet)
    original = dict(unet.attn_processors)
    unet.set_attn_processor({name: Recording(name) if name in layers else proc for name, proc in original.items()})
    store = AttentionStore(columns, (32, 32))
    try:
        with capture_cross_attention(unet, store):
            store.set_context(0, 1)
            embeds = torch.cat([conditions.uncond.prompt_embeds, conditions.fd.prompt_embeds])
            unet(noise().expand(2, -1, -1, -1), torch.tensor(300), encoder_hidden_states=embeds)
    finally:
        unet.set_attn_processor(original)
    assert set(store.sums) == set(recorded) == set(layers)
    for name in layers:
        torch.testing.assert_close(store.sums[name], recorded[name], rtol=1e-5, atol=1e-6)


def test_multi_evaluation_schedulers_are_refused_and_class_word_is_found(tiny_sd15):
    from diffusers import HeunDiscreteScheduler

    fc = freecure(tiny_sd15, 32)
    original = tiny_sd15.scheduler
    tiny_sd15.scheduler = HeunDiscreteScheduler.from_config(original.config)
    try:
        with pytest.raises(ValueError, match="several times per step"):
            run(fc)
    finally:
        tiny_sd15.scheduler = original
    from PIL import Image

    out = fc("a woman with blonde hair", [Image.new("RGB", (8, 8))], num_inference_steps=3)
    assert out.parsed.class_word == "woman"


def test_injection_step_bounds(tiny_sd15, grey_image):
    """Fraction 0 injects from the first step; a backend reporting step T (never injected) is refused."""
    parsed = parse_prompt(PROMPT, "man", tokenizer=tiny_sd15.tokenizer)
    at_start = TokenFusionBackend(tiny_sd15, RandomProjectionIdentityEncoder(32), inject_fraction=0.0)
    assert at_start.conditions(parsed, [grey_image], 6).inject_step == 0
    with pytest.raises(ValueError, match="inject_fraction"):
        TokenFusionBackend(tiny_sd15, RandomProjectionIdentityEncoder(32), inject_fraction=1.0)

    class NeverInjects(TokenFusionBackend):
        def identity_conditions(self, parsed, references, fd, num_inference_steps):
            pd, _ = super().identity_conditions(parsed, references, fd, num_inference_steps)
            return pd, num_inference_steps

    with pytest.raises(ValueError, match="outside 0..5"):
        NeverInjects(tiny_sd15, RandomProjectionIdentityEncoder(32)).conditions(parsed, [grey_image], 6)
