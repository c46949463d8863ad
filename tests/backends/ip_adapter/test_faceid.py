"""IP-Adapter-FaceID backend: released layouts (strict), diffusers' own loader, the per-row gate
against the adapter's scale 0 (bit for bit), PD against diffusers' pipeline with
``load_ip_adapter`` (the original method's loop), FD without the LoRA against the base model,
SAME's text-only attention with the adapter active, `generate`/`eval`/`cost` on tiny models."""

from __future__ import annotations

import functools
import json
from dataclasses import replace

import pytest
import torch

from freecure.attention.capture import AttentionStore, capture_cross_attention
from freecure.backends import BACKENDS, IPAdapterFaceIDBackend
from freecure.backends.common.face_embedding import FaceEmbedding, RandomFaceAnalyzer, save_face_embedding
from freecure.backends.ip_adapter.faceid import (
    TINY_CLIP_DIM,
    ReleasedFaceIDLayout,
    check_faceid_state_dict,
    faceid_state_dict,
    identity_rows,
    split_adapter_state,
)
from freecure.cli import main
from freecure.core.attributes import parse_prompt
from freecure.core.errors import InputError, WeightsNotFoundError
from freecure.core.guidance import FD_LANE, PD_LANE, Guidance
from freecure.stages.records import UNetCounter
from freecure.stages.rofa import rofa_pass
from freecure.stages.sampling import same_layout, same_pass
from tests.keylists import meta_state_dict, read_layout

PROMPT = "a man with black curly hair, laughing happily"
STEPS, SIZE = 4, (64, 64)


def latent(seed=0):
    return torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def sd15_backend():
    return IPAdapterFaceIDBackend.build_tiny("sd15", "plain")


@pytest.fixture(scope="module")
def faceid_file(tmp_path_factory, sd15_backend):
    """The tiny backend's FaceID file (same seed, released layout), saved as a local .bin."""
    path = tmp_path_factory.mktemp("faceid") / "ip-adapter-faceid_sd15.bin"
    torch.save(faceid_state_dict(sd15_backend.unet, "plain", seed=0), path)
    return path


@pytest.fixture(scope="module")
def reference_sd15(faceid_file):
    """The original method through diffusers alone: the tiny base pipeline and diffusers'
    ``load_ip_adapter`` reading the locally saved file."""
    from freecure.families.tiny import tiny_sd15_pipeline

    pipe = tiny_sd15_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(faceid_file.parent), subfolder="", weight_name=faceid_file.name, image_encoder_folder=None)
    return pipe


def conditions_for(backend, image, steps=STEPS, **changes):
    parsed = parse_prompt(PROMPT, "man", tokenizer=backend.tokenizer)
    conditions = backend.conditions(parsed, [image], steps)
    return replace(conditions, **changes) if changes else conditions


def scheduler_for(pipe, steps=STEPS):
    scheduler = pipe.scheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    return scheduler


# --- released layouts, strict loading ------------------------------------------------------------
@functools.cache
def full_unet(family):
    from diffusers import UNet2DConditionModel

    from freecure.core.configs import SD15_UNET, SDXL_UNET

    with torch.device("meta"):
        return UNet2DConditionModel(**(SDXL_UNET if family == "sdxl" else SD15_UNET))


@pytest.mark.parametrize(
    "family, variant, keys",
    [
        ("sd15", "plain", "ip_adapter_faceid_sd15_keys.txt"),
        ("sd15", "plus", "ip_adapter_faceid_plus_sd15_keys.txt"),
        ("sdxl", "plain", "ip_adapter_faceid_sdxl_keys.txt"),
        ("sdxl", "plusv2", "ip_adapter_faceid_plusv2_sdxl_keys.txt"),
    ],
)
def test_released_layouts_are_checked_strictly(family, variant, keys):
    unet = full_unet(family)
    layout = read_layout(keys)
    with torch.device("meta"):
        model = ReleasedFaceIDLayout(unet.config, list(unet.attn_processors), variant)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == layout
    flat = meta_state_dict(layout)
    state = split_adapter_state(flat)
    check_faceid_state_dict(unet, state, variant)  # passes
    wrong = dict(state["ip_adapter"])
    wrong["1.to_k_ip.weight_renamed"] = wrong.pop("1.to_k_ip.weight")
    with pytest.raises(WeightsNotFoundError, match=r"ip_adapter\.1\.to_k_ip\.weight"):
        check_faceid_state_dict(unet, {"image_proj": state["image_proj"], "ip_adapter": wrong}, variant)
    other = "plain" if variant != "plain" else "plus"
    with pytest.raises(WeightsNotFoundError, match="--faceid-variant"):
        check_faceid_state_dict(unet, state, other)


def test_sd15_file_on_sdxl_is_refused_with_a_named_key():
    state = meta_state_dict(read_layout("ip_adapter_faceid_sd15_keys.txt"))
    parts = split_adapter_state(state)
    with pytest.raises(WeightsNotFoundError, match="missing keys|shape mismatches"):
        check_faceid_state_dict(full_unet("sdxl"), parts, "plain")


def test_diffusers_loader_puts_every_released_tensor_in_place(sd15_backend):
    state = faceid_state_dict(sd15_backend.unet, "plain", seed=0)
    unet = sd15_backend.unet
    names = list(unet.attn_processors)
    cross = next(i for i, n in enumerate(names) if n.endswith("attn2.processor"))
    processor = unet.attn_processors[names[cross]]
    assert type(processor).__name__ == "IPAdapterAttnProcessor2_0"
    assert torch.equal(processor.to_k_ip[0].weight, state["ip_adapter"][f"{cross}.to_k_ip.weight"])
    proj = sd15_backend.projection
    assert torch.equal(proj.ff.net[0].proj.weight, state["image_proj"]["proj.0.weight"])
    assert torch.equal(proj.norm.bias, state["image_proj"]["norm.bias"])
    assert "faceid_0" in unet.peft_config  # the LoRA inside the file, as a peft adapter
    layer = unet.get_submodule(names[0].removesuffix(".processor")).to_q
    assert torch.equal(layer.lora_A["faceid_0"].weight, state["ip_adapter"]["0.to_q_lora.down.weight"])


# --- the per-row gate ------------------------------------------------------------------------------
def test_identity_rows():
    assert identity_rows(("uncond", "fd", "pd_uncond", "pd")) == [False, False, True, True]
    assert identity_rows(("uncond", "fd", "pd_uncond", "fd")) == [False] * 4  # PD before injection
    assert identity_rows(("uncond", "cond")) == [False, False]  # expression stage


def test_gate_reproduces_scale_zero_for_fd_and_scale_one_for_pd_bit_for_bit(sd15_backend, grey_image):
    backend, unet = sd15_backend, sd15_backend.unet
    conditions = conditions_for(backend, grey_image)
    layout = same_layout(0, conditions)
    assert layout.keys == ("uncond", "fd", "pd_uncond", "pd")
    z = torch.cat([latent(1), latent(2)])
    x, t = layout.gather(z), torch.tensor(700)
    rows = [conditions.get(k) for k in layout.keys]
    with torch.no_grad():
        eps = backend.predict_noise(x, t, rows, layout.keys, 0, SIZE)
        text = torch.cat([r.prompt_embeds for r in rows])
        face = conditions.pd.face_embeds
        ids = torch.cat([face, face, torch.zeros_like(face), face])[:, None]
        backend.pipeline.set_ip_adapter_scale(0.0)
        off = unet(x, t, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": [ids]}).sample
        backend.pipeline.set_ip_adapter_scale(1.0)
        on = unet(x, t, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": [ids]}).sample
    assert torch.equal(eps[:2], off[:2])  # FD rows: the adapter's scale 0, LoRA kept
    assert torch.equal(eps[2:], on[2:])  # PD rows: the released model, zero identity on the negative row
    assert not torch.allclose(eps[1], on[1])  # the gate did something


# --- PD and FD against diffusers' own pipeline ------------------------------------------------------
def diffusers_run(pipe, conditions, face, z_T, guidance=7.5, sdxl=False, clip=None):
    ids = torch.cat([torch.zeros_like(face), face])[:, None]
    kwargs = dict(
        prompt_embeds=conditions.fd.prompt_embeds,
        negative_prompt_embeds=conditions.uncond.prompt_embeds,
        ip_adapter_image_embeds=[ids],
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        latents=z_T,
        output_type="latent",
        height=SIZE[0],
        width=SIZE[1],
    )
    if sdxl:
        kwargs.update(
            pooled_prompt_embeds=conditions.fd.pooled_prompt_embeds,
            negative_pooled_prompt_embeds=conditions.uncond.pooled_prompt_embeds,
        )
    if clip is not None:
        pipe.unet.encoder_hid_proj.image_projection_layers[0].clip_embeds = clip
    return pipe(**kwargs).images


def test_pd_is_diffusers_load_ip_adapter_pipeline_and_fd_its_scale_zero(sd15_backend, reference_sd15, astronaut):
    backend = sd15_backend
    conditions = conditions_for(backend, astronaut)
    z_T = latent(3)
    same = same_pass(backend, scheduler_for(backend.pipeline), z_T, conditions, Guidance(7.5), SIZE)
    face = conditions.pd.face_embeds
    reference_sd15.set_ip_adapter_scale(1.0)
    pd = diffusers_run(reference_sd15, conditions, face, z_T)
    torch.testing.assert_close(same.z0[PD_LANE : PD_LANE + 1], pd, rtol=1e-4, atol=1e-4)
    reference_sd15.set_ip_adapter_scale(0.0)
    fd = diffusers_run(reference_sd15, conditions, face, z_T)
    reference_sd15.set_ip_adapter_scale(1.0)
    torch.testing.assert_close(same.z0[FD_LANE : FD_LANE + 1], fd, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(pd, fd, atol=1e-3)


@pytest.fixture(scope="module")
def plusv2_backend():
    return IPAdapterFaceIDBackend.build_tiny("sdxl", "plusv2")


def test_sdxl_plusv2_pd_is_diffusers_pipeline(plusv2_backend, astronaut):
    backend = plusv2_backend
    reference = backend.pipeline  # driven by diffusers' own __call__ (the backend's gate is not installed)
    assert reference.unet.encoder_hid_proj.image_projection_layers[0].shortcut  # PlusV2
    conditions = conditions_for(backend, astronaut)
    assert conditions.pd.clip_embeds.shape == (1, 5, TINY_CLIP_DIM)
    z_T = latent(4)
    same = same_pass(backend, scheduler_for(backend.pipeline), z_T, conditions, Guidance(5.0), SIZE)
    clip = torch.cat([conditions.pd_uncond.clip_embeds, conditions.pd.clip_embeds])[:, None]
    pd = diffusers_run(reference, conditions, conditions.pd.face_embeds, z_T, 5.0, sdxl=True, clip=clip)
    torch.testing.assert_close(same.z0[PD_LANE : PD_LANE + 1], pd, rtol=1e-4, atol=1e-4)


def test_plus_clip_states_are_the_encoders_penultimate_layer_of_face_and_zero_image(plusv2_backend, astronaut):
    from transformers import CLIPVisionModelWithProjection

    from freecure.backends.common.face_embedding import ClipFaceEncoder
    from freecure.backends.photomaker.id_encoder import tiny_vision_config

    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(tiny_vision_config(TINY_CLIP_DIM)).eval()
    face = astronaut.crop((150, 50, 330, 230)).resize((224, 224))
    analyzer = lambda image: FaceEmbedding(torch.ones(512), aligned_face=face)  # noqa: E731 (insightface stand-in)
    backend = IPAdapterFaceIDBackend(
        plusv2_backend.pipeline, "plusv2", analyzer=analyzer, clip_encoder=ClipFaceEncoder(encoder)
    )
    conditions = conditions_for(backend, astronaut)
    pixels = ClipFaceEncoder(encoder).processor(images=face, return_tensors="pt").pixel_values
    with torch.no_grad():
        clip = encoder(pixels, output_hidden_states=True).hidden_states[-2]
        negative = encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
    assert torch.equal(conditions.pd.clip_embeds, clip) and torch.equal(conditions.pd_uncond.clip_embeds, negative)
    assert conditions.pd.clip_embeds.shape == (1, 50, TINY_CLIP_DIM)


def test_fd_without_lora_is_the_base_model_at_one_extra_call_per_step(sd15_backend, tiny_sd15, astronaut):
    backend = sd15_backend
    conditions = conditions_for(backend, astronaut)
    z_T = latent(5)
    counter = UNetCounter()
    backend.fd_lora = False
    try:
        with counter.attached(backend.unets()):
            same = same_pass(backend, scheduler_for(backend.pipeline), z_T, conditions, Guidance(7.5), SIZE)
    finally:
        backend.fd_lora = True
    assert counter.calls == 2 * STEPS and counter.items == 4 * STEPS
    base = tiny_sd15(  # the plain base model (same seed as the tiny FaceID pipeline's base)
        prompt_embeds=conditions.fd.prompt_embeds,
        negative_prompt_embeds=conditions.uncond.prompt_embeds,
        num_inference_steps=STEPS,
        latents=z_T,
        output_type="latent",
        height=SIZE[0],
        width=SIZE[1],
    ).images
    torch.testing.assert_close(same.z0[FD_LANE : FD_LANE + 1], base, rtol=1e-4, atol=1e-4)


def test_rofa_masks_zero_and_one_give_pd_and_fd(sd15_backend, astronaut):
    backend = sd15_backend
    conditions = conditions_for(backend, astronaut, inject_step=1)
    same = same_pass(backend, scheduler_for(backend.pipeline), latent(8), conditions, Guidance(7.5), SIZE)
    pd = rofa_pass(backend, same, conditions, torch.zeros(1, 1, 32, 32), Guidance(7.5), SIZE)
    torch.testing.assert_close(pd, same.z0[PD_LANE : PD_LANE + 1], rtol=1e-4, atol=1e-4)
    fd = rofa_pass(backend, same, conditions, torch.ones(1, 1, 32, 32), Guidance(7.5), SIZE)
    assert torch.equal(fd, same.z0[FD_LANE : FD_LANE + 1])


@pytest.mark.slow
def test_from_pretrained_reads_local_base_model_file_and_embedding(tmp_path, faceid_file, astronaut):
    from freecure.families.tiny import tiny_sd15_pipeline

    tiny_sd15_pipeline(tmp_path / "base", seed=0)
    save_face_embedding(tmp_path / "face.safetensors", FaceEmbedding(torch.ones(512)))
    backend = IPAdapterFaceIDBackend.from_pretrained(
        "sd15", "plain", base_model=str(tmp_path / "base"), weights=faceid_file, device="cpu",
        dtype=torch.float32, face_embedding=tmp_path / "face.safetensors",
    )
    state = torch.load(faceid_file, weights_only=True)
    assert torch.equal(backend.projection.norm.weight, state["image_proj"]["norm.weight"])
    assert backend.analyzer is None  # no insightface needed with an embedding file
    conditions = conditions_for(backend, astronaut)
    assert torch.equal(conditions.pd.face_embeds, torch.ones(1, 512))
    with pytest.raises(WeightsNotFoundError, match="--faceid-variant"):
        IPAdapterFaceIDBackend.from_pretrained(
            "sd15", "plus", base_model=str(tmp_path / "base"), weights=faceid_file, device="cpu",
            dtype=torch.float32, face_embedding=tmp_path / "face.safetensors",
        )


# --- SAME's attention with the adapter active --------------------------------------------------------
def test_captured_attention_is_the_text_softmax_whatever_the_identity(sd15_backend, astronaut, grey_image):
    backend = sd15_backend
    captured = []
    for image in (astronaut, grey_image):  # two identities
        conditions = conditions_for(backend, image, steps=3)
        store = AttentionStore((2, 3), (32, 32))
        with capture_cross_attention(backend.unet, store):
            processors = list(backend.unet.attn_processors.values())
            assert any(type(p.inner).__name__ == "IPAdapterAttnProcessor2_0" for p in processors if hasattr(p, "inner"))
            scheduler = scheduler_for(backend.pipeline, 3)
            same = same_pass(backend, scheduler, latent(6), conditions, Guidance(7.5), SIZE, store)
        captured.append((store.aggregate(), same.z0))
    # FD's maps and lane do not depend on the identity; PD's lane does
    assert torch.equal(captured[0][0], captured[1][0])
    assert torch.equal(captured[0][1][FD_LANE], captured[1][1][FD_LANE])
    assert not torch.allclose(captured[0][1][PD_LANE], captured[1][1][PD_LANE])
    # rows of the captured map are text-attention probabilities: over all 77 tokens they sum to 1
    store = AttentionStore(tuple(range(77)), (32, 32))
    conditions = conditions_for(backend, astronaut, steps=2)
    with capture_cross_attention(backend.unet, store):
        same_pass(backend, scheduler_for(backend.pipeline, 2), latent(7), conditions, Guidance(7.5), SIZE, store)
    for layer in store.sums:
        mean = store.sums[layer] / store.counts[layer]
        torch.testing.assert_close(mean.sum(-1), torch.ones(mean.shape[0]), rtol=1e-5, atol=1e-5)


# --- face embeddings ------------------------------------------------------------------------------
def test_without_insightface_or_file_the_message_says_what_to_do(sd15_backend, astronaut):
    backend = IPAdapterFaceIDBackend(sd15_backend.pipeline, "plain", analyzer=None)
    parsed = parse_prompt(PROMPT, "man", tokenizer=backend.tokenizer)
    with pytest.raises(InputError) as error:
        backend.conditions(parsed, [astronaut], STEPS)
    message = str(error.value)
    assert "freecure[insightface]" in message and "--face-embedding" in message and "NON-COMMERCIAL" in message


def test_embedding_file_is_used_and_plus_needs_its_clip_states(sd15_backend, tmp_path, astronaut):
    face = FaceEmbedding(torch.randn(512, generator=torch.Generator().manual_seed(9)))
    save_face_embedding(tmp_path / "face.safetensors", face)
    backend = IPAdapterFaceIDBackend(sd15_backend.pipeline, "plain", face_embedding=tmp_path / "face.safetensors")
    conditions = conditions_for(backend, astronaut)
    assert torch.equal(conditions.pd.face_embeds[0], face.id_embedding)
    assert torch.equal(conditions.pd_uncond.face_embeds, torch.zeros(1, 512))
    plus = IPAdapterFaceIDBackend(sd15_backend.pipeline, "plus", face_embedding=tmp_path / "face.safetensors")
    with pytest.raises(InputError, match="clip_embedding"):
        conditions_for(plus, astronaut)
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    bad = IPAdapterFaceIDBackend(sd15_backend.pipeline, "plain", face_embedding=tmp_path / "bad.safetensors")
    with pytest.raises(InputError, match="safetensors"):
        conditions_for(bad, astronaut)


def test_random_analyzer_is_deterministic(astronaut, grey_image):
    analyzer = RandomFaceAnalyzer()
    assert torch.equal(analyzer(astronaut).id_embedding, analyzer(astronaut).id_embedding)
    assert not torch.equal(analyzer(astronaut).id_embedding, analyzer(grey_image).id_embedding)


# --- command line ---------------------------------------------------------------------------------
def test_registered_with_its_licence():
    assert BACKENDS["ip-adapter-faceid"] is IPAdapterFaceIDBackend
    assert "NON-COMMERCIAL" in IPAdapterFaceIDBackend.license


@pytest.mark.slow
@pytest.mark.parametrize(
    "family, extra", [("sd15", []), ("sdxl", ["--faceid-variant", "plusv2", "--faceid-fd-lora", "off"])]
)
def test_generate_tiny_runs_every_stage(tmp_path, astronaut, capsys, family, extra):
    astronaut.resize((64, 64)).save(tmp_path / "ref.png")
    out = tmp_path / "run"
    args = ["generate", "--tiny", "--tiny-family", family, "--backend", "ip-adapter-faceid", "--prompt", PROMPT]
    args += ["--ref", str(tmp_path / "ref.png"), "--steps", "3", "--out", str(out), "--no-progress", *extra]
    assert main(args) == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["license"] == IPAdapterFaceIDBackend.license
    assert manifest["settings"]["inject_step"] == 0
    stages = {s["name"]: s for s in manifest["stages"]}
    assert all(stage["ran"] for stage in stages.values()), stages
    calls_per_step = 2 if "off" in extra else 1  # FD without the LoRA: a separate call
    assert stages["same_pass"]["unet_calls"] == 3 * calls_per_step


@pytest.mark.slow
def test_cost_counts_the_separate_fd_call(capsys):
    results = []
    for option in ("keep", "off"):
        args = ["cost", "--backend", "ip-adapter-faceid", "--steps", "2", "--inject-step", "0", "--json"]
        assert main([*args, "--faceid-fd-lora", option]) == 0
        results.append(json.loads(capsys.readouterr().out))
    keep, off = results
    assert off["engine"]["stages"]["same_pass"]["unet_calls"] == 2 * keep["engine"]["stages"]["same_pass"]["unet_calls"]
    assert keep["engine"]["stages"]["same_pass"]["batch_items"] == off["engine"]["stages"]["same_pass"]["batch_items"]
    assert keep["settings"]["backend"] == "ip-adapter-faceid"


@pytest.mark.slow
def test_eval_tiny_scores_fd_pd_and_freecure(tmp_path, capsys):
    pytest.importorskip("dlib")
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt\na <S> with black curly hair, laughing happily\n")
    out = tmp_path / "eval"
    args = ["eval", "--tiny", "--backend", "ip-adapter-faceid", "--identities", "examples/identities"]
    args += ["--prompts", str(prompts), "--num-seeds", "1", "--steps", "2", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "ip-adapter-faceid (PD)" in printed and "ip-adapter-faceid + FreeCure" in printed
