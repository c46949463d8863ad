"""Face-diffuser backend: released checkpoint layouts, saliency-adaptive noise fusion against
the original's operations, the noise-prediction hook against direct UNet calls, the original
sampling loop, FD/PD agreement before injection, `--tiny` end to end."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from freecure.backends import BACKENDS, FaceDiffuserBackend
from freecure.backends.face_diffuser.backend import (
    SNF,
    SUBJECT,
    TEXT,
    FaceDiffuserConditioning,
    TextDrivenModel,
    saliency_map,
    snf_mask,
    snf_rows,
    snf_stage,
)
from freecure.backends.fastcomposer.backend import (
    LEGACY_BUFFERS,
    TINY_VISION_CONFIG,
    FastComposerModel,
    PostfuseModule,
    clip_vision_model,
    read_checkpoint,
)
from freecure.cli import main
from freecure.core.attributes import parse_prompt
from freecure.core.errors import InputError, WeightsNotFoundError
from freecure.core.guidance import FD_LANE, PD_LANE, Guidance
from freecure.families.tiny import build_tiny_sd15_components
from freecure.stages.sampling import same_layout, same_pass
from tests.keylists import meta_state_dict, read_layout

PROMPT = "a man with black curly hair, laughing happily"


def random_state_dict(layout, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in layout.items():
        if key.endswith("position_ids"):  # CLIP's legacy buffers: 0, 1, 2, …
            state[key] = torch.arange(shape[-1]).expand(shape).clone()
        else:
            state[key] = torch.randn(shape, generator=g)
    return state


@pytest.fixture(scope="module")
def sdm_unet():
    return build_tiny_sd15_components(seed=1)["unet"].eval()


@pytest.fixture(scope="module")
def backend(tiny_sd15, sdm_unet):
    """Tiny Face-diffuser: TDM = the tiny pipeline's UNet (also FD), SDM = another tiny UNet."""
    torch.manual_seed(0)
    backend = FaceDiffuserBackend(
        tiny_sd15,
        sdm_unet,
        clip_vision_model(TINY_VISION_CONFIG),
        PostfuseModule(32),
        start_merge_step=1,
        final_step=3,
    )
    backend.guidance_scale = 5.0
    return backend


def conditions_for(backend, reference, steps=6):
    parsed = parse_prompt(PROMPT, "man", tokenizer=backend.tokenizer)
    return backend.conditions(parsed, [reference], steps)


@pytest.fixture(scope="module")
def conditions(backend, astronaut):
    """Conditions of a 6-step run: TDM steps 0-1, SNF steps 2-3, SDM steps 4-5."""
    return conditions_for(backend, astronaut)


def latent(seed):
    return torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(seed))


# --- released checkpoint layouts ------------------------------------------------------------
@pytest.mark.parametrize(
    "build, keys, count",
    [
        (FastComposerModel.sd15, "face_diffuser_sdm_keys.txt", 1538),
        (TextDrivenModel.sd15, "face_diffuser_tdm_keys.txt", 1131),
    ],
)
def test_full_size_models_have_the_released_key_layouts(build, keys, count):
    released = read_layout(keys)
    assert len(released) == count
    model = build("meta")
    assert model.released_layout() == {k: v for k, v in released.items() if k not in LEGACY_BUFFERS}
    model.load_released(meta_state_dict(released))  # strict, nothing materialised


@pytest.mark.parametrize(
    "build, keys",
    [
        (FastComposerModel.tiny, "face_diffuser_sdm_tiny_keys.txt"),
        (TextDrivenModel.tiny, "face_diffuser_tdm_tiny_keys.txt"),
    ],
)
def test_tiny_checkpoints_load_strictly(tmp_path, build, keys):
    state = random_state_dict(read_layout(keys), seed=4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    model = build(seed=5)
    model.load_released(read_checkpoint(tmp_path / "pytorch_model.bin"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[model.released_name(key)]), key
    bad = dict(state)
    bad["unet.conv_out.weight"] = torch.zeros(5, 32, 3, 3)
    with pytest.raises(WeightsNotFoundError, match=r"shape mismatches \(1\): unet.conv_out.weight"):
        build(seed=5).load_released(bad)


def test_the_sdm_checkpoint_is_not_a_tdm_checkpoint():
    with pytest.raises(WeightsNotFoundError, match=r"unexpected keys \(\d+\): image_encoder"):
        TextDrivenModel.tiny().load_released(meta_state_dict(read_layout("face_diffuser_sdm_tiny_keys.txt")))


# --- saliency-adaptive noise fusion ---------------------------------------------------------
@torch.no_grad()
def reference_snf(e_null, e_text, s_text, s_aug, w):
    """SNF written out from its description, independently of the backend's code: each model's
    guidance term w·(ε_c − ε_u) is smoothed (4×4 box filter, stride 1, zero padding 1, then
    bilinearly resized back to the latent size), averaged over channels and turned into a
    spatial softmax; each pixel takes the guided prediction of the more salient model, the
    TDM on ties. Returns the fused prediction and the SDM-choice mask."""

    def saliency(term):
        smooth = F.avg_pool2d(term.abs(), kernel_size=4, stride=1, padding=1)
        smooth = F.interpolate(smooth, size=term.shape[-2:], mode="bilinear", align_corners=False)
        mean = smooth.mean(dim=1, keepdim=True)
        return mean.flatten(1).softmax(dim=1).view_as(mean)

    guided_tdm = e_null + w * (e_text - e_null)
    guided_sdm = s_text + w * (s_aug - s_text)
    take_sdm = saliency(w * (s_aug - s_text)) > saliency(w * (e_text - e_null))
    return torch.where(take_sdm, guided_sdm, guided_tdm), take_sdm.expand_as(guided_sdm)


def test_snf_equals_a_reference_written_from_the_description():
    g = torch.Generator().manual_seed(0)
    e_null, e_text, s_text, s_aug = (torch.randn(1, 4, 64, 64, generator=g) for _ in range(4))
    s_aug[..., 10:30, 20:40] += 2.0  # the subject region: the SDM's response is strong there
    w = 5.0
    expected, argeps = reference_snf(e_null, e_text, s_text, s_aug, w)
    eps_u, eps_c, mask = snf_rows(e_null, e_text, s_text, s_aug, w)
    assert mask.shape == (1, 1, 64, 64)
    assert torch.equal(mask.expand(1, 4, 64, 64), argeps.float())
    assert 0.05 < mask.mean() < 0.95
    assert mask[..., 15:25, 25:35].all()  # the SDM wins inside the subject region
    # the engine's guidance on the returned rows gives the original fused prediction
    torch.testing.assert_close(eps_u + w * (eps_c - eps_u), expected, rtol=1e-5, atol=1e-5)


def test_saliency_map_by_hand():
    response = torch.zeros(1, 2, 4, 4)
    response[0, 0, 0, 0] = -8.0  # |S| = 8 at the top-left corner of channel 0
    # Box filter 4×4, stride 1, zero padding 1 (zeros counted): output (i, j) of the 3×3 map
    # covers inputs i-1..i+2, so outputs with i, j ∈ {0, 1} see the corner: 8 / 16 = 0.5, and
    # the map is 0.5·a_i·a_j with a = (1, 1, 0). Bilinear 3 → 4 (align_corners=False) samples
    # x = (k + 0.5)·3/4 − 0.5 = −0.125 (clamped to 0), 0.625, 1.375, 2.125 (clamped to 2):
    # a' = (1, 1, 1 − 0.375, 0). The channel mean halves it: 0.25·a'_i·a'_j.
    a = torch.tensor([1.0, 1.0, 0.625, 0.0])
    expected = 0.25 * a[:, None] * a[None, :]
    probabilities = expected.flatten().exp() / expected.flatten().exp().sum()  # softmax over positions
    torch.testing.assert_close(saliency_map(response), probabilities.view(1, 1, 4, 4))


def test_snf_mask_picks_the_more_salient_model_and_ties_go_to_the_tdm():
    flat = torch.ones(1, 4, 8, 8)
    peaked = torch.ones(1, 4, 8, 8)
    peaked[..., 2:4, 2:4] = 10.0
    mask = snf_mask(flat, peaked)
    assert mask[0, 0, 2:4, 2:4].all() and not mask[0, 0, 6:, 6:].any()
    assert not snf_mask(flat, flat).any()  # equal saliency: the TDM (argmax's first index)


def test_snf_stages_follow_the_original_step_boundaries():
    assert [snf_stage(i, 15, 30) for i in (0, 15, 16, 30, 31, 49)] == [TEXT, TEXT, SNF, SNF, SUBJECT, SUBJECT]


# --- the noise-prediction hook ---------------------------------------------------------------
def unet(model, z, t, *embeds):
    return model(z.expand(len(embeds), -1, -1, -1), t, encoder_hidden_states=torch.cat(embeds)).sample


@pytest.mark.parametrize("step", [1, 2, 4])  # TEXT, SNF and SUBJECT stages (start 1, final 3)
@torch.no_grad()
def test_hook_matches_the_original_step_computed_by_hand(backend, sdm_unet, conditions, step):
    conditions = replace(conditions, inject_step=0)  # PD rows at every step
    layout = same_layout(step, conditions)
    assert layout.keys == ("uncond", "fd", "pd_uncond", "pd")
    z = torch.cat([latent(1), latent(2)])
    t = torch.tensor(500)
    rows = [conditions.get(key) for key in layout.keys]
    eps = backend.predict_noise(layout.gather(z), t, rows, layout.keys, step, (64, 64))
    w = backend.guidance_scale
    guided = layout.guide(eps, w)
    tdm = backend.pipeline.unet
    null, text, aug = (c.prompt_embeds for c in (conditions.uncond, conditions.fd, conditions.pd))
    # FD: the TDM on the text-only prompt
    e = unet(tdm, z[:1], t, null, text)
    torch.testing.assert_close(guided[FD_LANE], (e[0] + w * (e[1] - e[0])), rtol=1e-4, atol=1e-4)
    # PD, by hand from the four predictions of the original loop
    e_null, e_text = unet(tdm, z[1:], t, null, text)
    s_text, s_aug = unet(sdm_unet, z[1:], t, text, aug)
    eps_g = e_null + w * (e_text - e_null)
    eps_e = s_text + w * (s_aug - s_text)
    if step <= 1:
        expected = eps_g
    elif step > 3:
        expected = eps_e
    else:
        mask = snf_mask(w * (e_text - e_null)[None], w * (s_aug - s_text)[None])[0]
        assert 0 < mask.mean() < 1
        expected = torch.where(mask.bool(), eps_e, eps_g)
    torch.testing.assert_close(guided[PD_LANE], expected, rtol=1e-4, atol=1e-4)


def test_fd_and_expression_rows_use_only_the_fd_model(backend, sdm_unet, conditions):
    calls = []
    handle = sdm_unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        for keys in (("uncond", "fd"), ("cond",), ("uncond", "cond")):
            rows = [conditions.fd] * len(keys)
            backend.predict_noise(latent(0).expand(len(keys), -1, -1, -1), torch.tensor(10), rows, keys, 4, (64, 64))
    finally:
        handle.remove()
    assert calls == []
    assert backend.unets() == [backend.pipeline.unet, sdm_unet]


@pytest.mark.parametrize("step", [1, 2, 4])  # TEXT, SNF and SUBJECT stages
@torch.no_grad()
def test_three_pd_pairs_together_equal_each_pair_alone(backend, conditions, step):
    # a batch of seeds puts several (pd_uncond, pd) pairs after each other (three: a pair's
    # slice must be right beyond the first two, where a wrong stride still lands in range)
    rows = [conditions.uncond, conditions.pd]
    keys = ("pd_uncond", "pd")
    t = torch.tensor(500)
    seeds = (1, 2, 3)
    alone = [backend.predict_noise(latent(s).expand(2, -1, -1, -1), t, rows, keys, step, (64, 64)) for s in seeds]
    batch = torch.cat([latent(s).expand(2, -1, -1, -1) for s in seeds])
    together = backend.predict_noise(batch, t, rows * 3, keys * 3, step, (64, 64))
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(alone[0], alone[1])


def test_hook_refuses_layouts_it_cannot_fuse_exactly(backend, conditions):
    z = latent(0).expand(3, -1, -1, -1)
    rows = [conditions.uncond, conditions.fd, conditions.pd]
    with pytest.raises(InputError, match="approximate_shared_uncond"):
        backend.predict_noise(z, torch.tensor(10), rows, ("uncond", "fd", "pd"), 2, (64, 64))
    with pytest.raises(InputError, match="guidance"):
        backend.predict_noise(z[:1], torch.tensor(10), rows[2:], ("pd",), 2, (64, 64))
    pair = torch.cat([latent(0), latent(1)])
    with pytest.raises(ValueError, match="different latents"):
        rows = [conditions.uncond, conditions.pd]
        backend.predict_noise(pair, torch.tensor(10), rows, ("pd_uncond", "pd"), 2, (64, 64))


def test_conditioning_moves_its_text_only_branch(conditions):
    pd = conditions.pd
    assert isinstance(pd, FaceDiffuserConditioning) and (pd.start_merge_step, pd.final_step) == (1, 3)
    half = pd.to(dtype=torch.float16)
    assert isinstance(half, FaceDiffuserConditioning)
    assert half.prompt_embeds.dtype == half.text_only.prompt_embeds.dtype == torch.float16
    assert half.final_step == 3


# --- the whole sampling loop --------------------------------------------------------------------
@torch.no_grad()
def original_face_diffuser(tdm, sdm, scheduler, z, null, text, augmented, start_merge_step, final_step, w):
    """Face-diffuser's delayed-conditioning sampling loop, written out: TDM alone up to the start
    step, SNF of TDM and SDM up to the final step, SDM alone after it."""
    for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(torch.cat([z] * 2), t)
        if i <= start_merge_step:
            e_null, e_text = tdm(model_input, t, encoder_hidden_states=torch.cat([null, text])).sample.chunk(2)
            eps = e_null + w * (e_text - e_null)
        elif i <= final_step:
            s_text, s_aug = sdm(model_input, t, encoder_hidden_states=torch.cat([text, augmented])).sample.chunk(2)
            e_null, e_text = tdm(model_input, t, encoder_hidden_states=torch.cat([null, text])).sample.chunk(2)
            mask = snf_mask(w * (e_text - e_null), w * (s_aug - s_text)).bool()
            eps = torch.where(mask, s_text + w * (s_aug - s_text), e_null + w * (e_text - e_null))
        else:
            s_text, s_aug = sdm(model_input, t, encoder_hidden_states=torch.cat([text, augmented])).sample.chunk(2)
            eps = s_text + w * (s_aug - s_text)
        z = scheduler.step(eps, t, z).prev_sample
    return z


def test_fd_and_pd_agree_before_injection_and_pd_is_the_original_loop(backend, sdm_unet, conditions):
    steps, w = 6, backend.guidance_scale
    assert conditions.inject_step == 2  # start_merge_step + 1
    pipe = backend.pipeline

    def scheduler():
        s = pipe.scheduler.from_config(pipe.scheduler.config)
        s.set_timesteps(steps)
        return s

    z_T = latent(3)
    same = same_pass(backend, scheduler(), z_T, conditions, Guidance(scale=w), (64, 64))
    assert torch.equal(same.injection_latents[FD_LANE], same.injection_latents[PD_LANE])
    null, text, aug = (c.prompt_embeds for c in (conditions.uncond, conditions.fd, conditions.pd))
    pd = original_face_diffuser(pipe.unet, sdm_unet, scheduler(), z_T, null, text, aug, 1, 3, w)
    torch.testing.assert_close(same.z0[PD_LANE : PD_LANE + 1], pd, rtol=1e-4, atol=1e-4)
    fd = original_face_diffuser(pipe.unet, sdm_unet, scheduler(), z_T, null, text, aug, steps, steps, w)  # TDM only
    torch.testing.assert_close(same.z0[FD_LANE : FD_LANE + 1], fd, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(pd, fd)


def test_same_captures_fds_attention_through_the_hook(backend, conditions):
    """The TDM call that carries PD's rows keeps FD's conditional row at the capture row: the
    maps SAME records equal those of a backend whose PD never touches the FD UNet's batch."""
    from freecure.attention.capture import AttentionStore, capture_cross_attention
    from freecure.backends import TokenFusionBackend

    plain = TokenFusionBackend(backend.pipeline, torch.zeros(32))
    plain_conditions = replace(conditions, pd=conditions.fd)  # FD's lane is all that is compared
    maps = []
    for runner, c in ((backend, conditions), (plain, plain_conditions)):
        scheduler = backend.pipeline.scheduler.from_config(backend.pipeline.scheduler.config)
        scheduler.set_timesteps(4)
        store = AttentionStore((1, 2, 3), (32, 32))
        with capture_cross_attention(backend.pipeline.unet, store):
            same = same_pass(runner, scheduler, latent(4), replace(c, inject_step=1), Guidance(5.0), (64, 64), store)
        maps.append((store.aggregate(), same.z0[FD_LANE]))
    torch.testing.assert_close(maps[0][1], maps[1][1], rtol=0, atol=0)
    torch.testing.assert_close(maps[0][0], maps[1][0], rtol=0, atol=0)


def test_sd15_fd_model_injects_from_the_first_step(tiny_sd15, sdm_unet, astronaut):
    tdm_unet = build_tiny_sd15_components(seed=2)["unet"].eval()
    torch.manual_seed(0)
    backend = FaceDiffuserBackend(
        tiny_sd15,
        sdm_unet,
        clip_vision_model(TINY_VISION_CONFIG),
        PostfuseModule(32),
        tdm_unet=tdm_unet,
        start_merge_step=1,
        final_step=3,
    )
    conditions = conditions_for(backend, astronaut)
    assert conditions.inject_step == 0
    assert backend.unets() == [tiny_sd15.unet, sdm_unet, tdm_unet]
    layout = same_layout(0, conditions)
    z = torch.cat([latent(1), latent(2)])
    t = torch.tensor(900)
    eps = backend.predict_noise(layout.gather(z), t, [conditions.get(k) for k in layout.keys], layout.keys, 0, (64, 64))
    null, text = conditions.uncond.prompt_embeds, conditions.fd.prompt_embeds
    torch.testing.assert_close(eps[:2], unet(tiny_sd15.unet, z[:1], t, null, text), rtol=1e-4, atol=1e-4)  # FD: SD1.5
    torch.testing.assert_close(eps[2:], unet(tdm_unet, z[1:], t, null, text), rtol=1e-4, atol=1e-4)  # PD: TDM


# --- command line ------------------------------------------------------------------------------
def test_registered_with_its_non_commercial_licence():
    assert BACKENDS["face-diffuser"] is FaceDiffuserBackend
    assert "non-commercial" in FaceDiffuserBackend.license


def test_from_cli_loads_given_checkpoints(tmp_path, caplog):
    sdm = random_state_dict(read_layout("face_diffuser_sdm_tiny_keys.txt"), seed=6)
    tdm = random_state_dict(read_layout("face_diffuser_tdm_tiny_keys.txt"), seed=7)
    (tmp_path / "SDM").mkdir()
    (tmp_path / "TDM").mkdir()
    torch.save(sdm, tmp_path / "SDM" / "pytorch_model.bin")
    torch.save(tdm, tmp_path / "TDM" / "pytorch_model.bin")
    args = argparse.Namespace(
        tiny=True,
        device=torch.device("cpu"),
        dtype=torch.float32,
        base_model=None,
        face_diffuser_sdm=str(tmp_path),
        face_diffuser_tdm=str(tmp_path / "TDM" / "pytorch_model.bin"),
        face_diffuser_start_merge_step=None,
        face_diffuser_final_step=None,
        face_diffuser_fd_model="tdm",
        face_diffuser_object_resolution=512,
    )
    with caplog.at_level("WARNING", logger="freecure"):
        backend = FaceDiffuserBackend.from_options(args)
    assert not any("non-commercial" in r.getMessage() for r in caplog.records)  # tiny: no licence notice
    assert torch.equal(backend.sdm_unet.conv_in.weight, sdm["unet.conv_in.weight"])
    assert torch.equal(backend.pipeline.unet.conv_in.weight, tdm["unet.conv_in.weight"])  # FD = TDM
    assert backend.tdm_unet is backend.pipeline.unet
    # every text embedding comes from the SDM's text encoder, as in the original
    assert torch.equal(
        backend.pipeline.text_encoder.get_input_embeddings().weight,
        sdm["text_encoder.embeddings.token_embedding.weight"],
    )
    assert torch.equal(backend.postfuse.layer_norm.weight, sdm["postfuse_module.layer_norm.weight"])
    assert backend.schedule(50) == (15, 30) and backend.schedule(4) == (1, 2)


def test_missing_weights_offline_point_at_tiny_and_local_paths(tmp_path, monkeypatch, capsys, caplog):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    code = main(
        [
            "generate",
            "--backend",
            "face-diffuser",
            "--prompt",
            PROMPT,
            "--ref",
            str(Path(__file__).resolve().parents[2] / "examples" / "astronaut.png"),  # refs are read first
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2
    error = capsys.readouterr().err
    assert "CodeGoat24/Face-diffuser/SDM/pytorch_model.bin" in error
    assert "--tiny" in error and "--face-diffuser-sdm PATH" in error
    # the released weights' licence is shown before they are looked for
    assert any("non-commercial" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_generate_tiny_end_to_end(tmp_path, astronaut, capsys):
    astronaut.resize((64, 64)).save(tmp_path / "ref.png")
    out = tmp_path / "run"
    code = main(
        [
            "generate",
            "--tiny",
            "--backend",
            "face-diffuser",
            "--prompt",
            PROMPT,
            "--ref",
            str(tmp_path / "ref.png"),
            "--steps",
            "4",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["license"] == FaceDiffuserBackend.license
    assert manifest["settings"]["inject_step"] == 2
    stages = {s["name"]: s for s in manifest["stages"]}
    assert all(stage["ran"] for stage in stages.values())
    # SAME: 2 steps TDM only (1 call), step 2 SNF (TDM + SDM), step 3 SDM for PD + TDM for FD
    assert stages["same_pass"]["unet_calls"] == 1 + 1 + 2 + 2
    assert stages["rofa"]["unet_calls"] == 2 + 1  # SNF: TDM + SDM; then SDM only
