"""PuLID SDXL v1.1 on the tiny SDXL pipeline: released layout, strict loading, the identity
attention against a replay of the original processor and sampling loop, per-row gating, ROFA
endpoints and the CLI end to end."""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from freecure.backends import BACKENDS
from freecure.backends.pulid.embedding import (
    BACKGROUND_LABELS,
    face_features_image,
    load_face_embedding,
    random_face_embedding,
    save_face_embedding,
)
from freecure.backends.pulid.idformer import IDFormer, IDFormerConfig, tiny_idformer_config
from freecure.backends.pulid.sdxl import (
    IdentitySettings,
    PuLIDAttnProcessor,
    PuLIDSDXLBackend,
    PuLIDSDXLModules,
    load_pulid_sdxl_weights,
    read_safetensors,
)
from freecure.cli import main
from freecure.core.attributes import parse_prompt
from freecure.core.conditioning import FD, PD, PD_UNCOND, UNCOND
from freecure.core.configs import SDXL_UNET
from freecure.core.errors import InputError, WeightsNotFoundError
from freecure.core.guidance import FD_LANE, PD_LANE, Guidance
from freecure.stages.rofa import rofa_pass
from freecure.stages.sampling import check_scheduler, plain_pass, same_pass
from tests.keylists import meta_state_dict, read_layout

PROMPT = "a man with black curly hair, laughing happily"
SIZE = (64, 64)
STEPS = 5


def karras_scheduler(pipe, steps=STEPS):
    scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, algorithm_type="dpmsolver++", use_karras_sigmas=True
    )
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.fixture(scope="module", params=["v2", "off"])
def backend(request, tiny_sdxl):
    settings = IdentitySettings(id_scale=0.8, num_zero=3, ortho=request.param)
    pulid = PuLIDSDXLBackend.build_tiny(settings=settings, pipeline=tiny_sdxl, seed=1)
    yield pulid
    pulid.restore_processors()


@pytest.fixture(scope="module")
def conditions(backend):
    parsed = parse_prompt(PROMPT, "man", tokenizer=backend.tokenizer)
    return backend.conditions(parsed, [], STEPS, negative_prompt="blurry")


def noise(seed=0):
    return torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed))


# --- the original, replayed from its description ---------------------------------------------
class OriginalIDAttnProcessor:
    """PuLID's IDAttnProcessor2_0 as the original describes it: text attention, plus (when
    ``id_embedding`` is given through cross_attention_kwargs) attention of the same queries to
    [id_to_k(id; NUM_ZERO zeros)], added with ``id_scale`` (ORTHO_v2: less the projection on
    the text output, weighted by 1 − the first five tokens' mean attention mass)."""

    def __init__(self, kv, num_zero, ortho):
        self.kv, self.num_zero, self.ortho = kv, num_zero, ortho

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 id_embedding=None, id_scale=1.0):
        b = hidden_states.shape[0]
        heads = attn.heads
        q = attn.to_q(hidden_states)
        k, v = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        d = k.shape[-1] // heads

        def split(x):
            return x.view(b, -1, heads, d).transpose(1, 2)

        q, k, v = split(q), split(k), split(v)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, heads * d)
        if id_embedding is not None:
            zeros = torch.zeros(b, self.num_zero, id_embedding.shape[-1])
            ik = split(self.kv.id_to_k(torch.cat([id_embedding, zeros], 1)))
            iv = split(self.kv.id_to_v(torch.cat([id_embedding, zeros], 1)))
            ih = F.scaled_dot_product_attention(q, ik, iv).transpose(1, 2).reshape(b, -1, heads * d)
            if self.ortho == "off":
                h = h + id_scale * ih
            else:
                mean = (q @ ik.transpose(-2, -1)).softmax(-1).mean(1)[:, :, :5].sum(-1, keepdim=True)
                proj = (h * ih).sum(-2, keepdim=True) / (h * h).sum(-2, keepdim=True) * h
                h = h + id_scale * (ih + (mean - 1) * proj)
        return attn.to_out[1](attn.to_out[0](h))


@contextlib.contextmanager
def processors(unet, replacement):
    """``replacement`` (a mapping or one processor) on ``unet`` for the block, then restored."""
    installed = dict(unet.attn_processors)
    unet.set_attn_processor(replacement)
    try:
        yield
    finally:
        unet.set_attn_processor(installed)


def replay_processors(backend):
    """The original's processors on every cross-attention layer, sharing our id_to_k/id_to_v."""
    return {
        name: OriginalIDAttnProcessor(proc.kv, proc.settings.num_zero, proc.settings.ortho)
        if isinstance(proc, PuLIDAttnProcessor)
        else proc
        for name, proc in backend.unet.attn_processors.items()
    }


def original_eps(backend, z, t, text, id_embedding, id_scale):
    """One branch as the original calls the UNet (its own call, identity via kwargs)."""
    return backend.unet(
        z,
        t,
        encoder_hidden_states=text.prompt_embeds,
        added_cond_kwargs=backend.added_cond_kwargs([text], *SIZE),
        cross_attention_kwargs={"id_embedding": id_embedding, "id_scale": id_scale},
        return_dict=False,
    )[0]


# --- released layout and loading -----------------------------------------------------------
def full_size_modules():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
        return PuLIDSDXLModules(unet.config, list(unet.attn_processors), IDFormerConfig())


def test_modules_have_the_released_sdxl_layout():
    released = read_layout("pulid_v1_1_keys.txt")
    assert len(released) == 312 and sum(math.prod(s) for s in released.values()) == 492_185_600
    ours = {k: tuple(v.shape) for k, v in full_size_modules().state_dict().items()}
    assert ours == released


def test_strict_loading_names_wrong_keys_and_shapes():
    state = meta_state_dict(read_layout("pulid_v1_1_keys.txt"))
    loaded = load_pulid_sdxl_weights(full_size_modules(), state)
    assert loaded.id_adapter.proj_out.shape == (1024, 2048)
    state["id_adapter_attn_layers.1.id_to_k.weights"] = state.pop("id_adapter_attn_layers.1.id_to_k.weight")
    with pytest.raises(WeightsNotFoundError, match=r"missing keys \(1\): id_adapter_attn_layers.1.id_to_k.weight"):
        load_pulid_sdxl_weights(full_size_modules(), state)
    flux = meta_state_dict(read_layout("pulid_flux_v0_9_1_keys.txt"))
    with pytest.raises(WeightsNotFoundError, match=r"unexpected keys \(312\): pulid_ca"):
        load_pulid_sdxl_weights(full_size_modules(), flux)


def test_tiny_checkpoint_round_trip_through_safetensors(tmp_path, tiny_sdxl):
    from safetensors.torch import save_file

    unet = tiny_sdxl.unet
    config = tiny_idformer_config(unet.config.cross_attention_dim)
    torch.manual_seed(3)
    saved = PuLIDSDXLModules(unet.config, list(unet.attn_processors), config)
    save_file(saved.state_dict(), str(tmp_path / "pulid.safetensors"))
    fresh = PuLIDSDXLModules(unet.config, list(unet.attn_processors), config)
    load_pulid_sdxl_weights(fresh, read_safetensors(tmp_path / "pulid.safetensors"))
    for key, value in saved.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    with pytest.raises(InputError, match="safetensors"):
        read_safetensors(tmp_path / "pulid.bin")


# --- IDFormer ----------------------------------------------------------------------------------
def test_idformer_equals_the_perceiver_loop_written_out():
    """32 queries + 5 id tokens attend to [id tokens; mapped ViT state i] in round i; the first
    num_queries latents are projected (the original's IDFormer.forward)."""
    torch.manual_seed(0)
    config = tiny_idformer_config(40)
    former = IDFormer(config).eval()
    face = random_face_embedding(config.id_dim, config.vit_dim, refs=2)
    id_cond, hidden = face.idformer_inputs()
    out = former(id_cond, hidden)
    assert out.shape == (1, config.num_queries, 40)

    def attend(layer, ctx, lat):  # softmax(q kᵀ/√d) v over [ctx; lat], heads split
        ctx, lat = layer.norm1(ctx), layer.norm2(lat)
        q = layer.to_q(lat)
        k, v = layer.to_kv(torch.cat([ctx, lat], 1)).chunk(2, -1)
        heads = config.heads
        q, k, v = (x.view(1, -1, heads, config.dim_head).transpose(1, 2) for x in (q, k, v))
        w = (q @ k.transpose(-2, -1) / math.sqrt(config.dim_head)).softmax(-1)
        return layer.to_out((w @ v).transpose(1, 2).reshape(1, -1, heads * config.dim_head))

    x = former.id_embedding_mapping(id_cond).reshape(1, 2 * config.num_id_token, config.dim)
    lat = torch.cat([former.latents, x], 1)
    for i in range(5):
        ctx = torch.cat([x, getattr(former, f"mapping_{i}")(hidden[i])], 1)
        attn, ff = former.layers[i]
        lat = attend(attn, ctx, lat) + lat
        lat = ff(lat) + lat
    torch.testing.assert_close(out, lat[:, : config.num_queries] @ former.proj_out, rtol=1e-5, atol=1e-5)


# --- identity attention, gated per row -----------------------------------------------------------
def test_pd_rows_equal_the_original_branches_and_fd_rows_the_base_model(backend, conditions):
    scheduler = karras_scheduler(backend.pipeline)
    t = scheduler.timesteps[1]
    z = torch.cat([noise(1), noise(1), noise(2), noise(2)])
    keys = (UNCOND, FD, PD_UNCOND, PD)
    rows = [conditions.get(key) for key in keys]
    scale = backend.settings.id_scale
    # the original: one call per branch, identity through cross_attention_kwargs
    with processors(backend.unet, replay_processors(backend)):
        expected_pd_u = original_eps(backend, z[2:3], t, conditions.uncond, conditions.pd_uncond.id_tokens[None], scale)
        expected_pd = original_eps(backend, z[3:], t, conditions.fd, conditions.pd.id_tokens[None], scale)
        expected_fd = original_eps(backend, z[1:2], t, conditions.fd, None, scale)
    with processors(backend.unet, AttnProcessor2_0()):  # the base model, SDPA everywhere
        base = backend.unet(
            z, t, encoder_hidden_states=torch.cat([r.prompt_embeds for r in rows]),
            added_cond_kwargs=backend.added_cond_kwargs(rows, *SIZE), return_dict=False,
        )[0]
    eps = backend.predict_noise(z, t, rows, keys, 1, SIZE)
    assert torch.equal(eps[:2], base[:2])  # FD's rows: the base model, bit for bit
    torch.testing.assert_close(eps[1:2], expected_fd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eps[2:3], expected_pd_u, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(eps[3:], expected_pd, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(eps[3:], base[3:], atol=1e-4)  # identity changes PD


def test_without_identity_rows_every_processor_is_diffusers_sdpa(backend, conditions):
    scheduler = karras_scheduler(backend.pipeline)
    t = scheduler.timesteps[0]
    z = torch.cat([noise(3), noise(3)])
    keys = (UNCOND, FD)
    rows = [conditions.get(key) for key in keys]
    gated = backend.predict_noise(z, t, rows, keys, 0, SIZE)
    with processors(backend.unet, AttnProcessor2_0()):
        base = backend.predict_noise(z, t, rows, keys, 0, SIZE)
    assert torch.equal(gated, base)


def test_pd_uncond_carries_the_zero_identity_only_when_pd_is_injected(backend, conditions):
    assert conditions.pd_uncond.id_tokens is not None and not conditions.shares_uncond
    zeros_tokens = backend.identity_tokens(backend.face.zeros())[0]
    torch.testing.assert_close(conditions.pd_uncond.id_tokens, zeros_tokens.float())
    scheduler = karras_scheduler(backend.pipeline)
    t = scheduler.timesteps[0]
    z = torch.cat([noise(4), noise(4)])
    before = backend.predict_noise(z, t, [conditions.pd_uncond, conditions.fd], (PD_UNCOND, FD), 0, SIZE)
    plain = backend.predict_noise(z, t, [conditions.uncond, conditions.fd], (UNCOND, FD), 0, SIZE)
    assert torch.equal(before, plain)
    # SDXL's zero negative embedding (no negative prompt): the text attention output is 0 there
    no_negative = backend.conditions(parse_prompt(PROMPT, "man", tokenizer=backend.tokenizer), [], STEPS)
    assert not no_negative.uncond.prompt_embeds.any()
    rows = [no_negative.pd_uncond, no_negative.pd]
    assert torch.isfinite(backend.predict_noise(z, t, rows, (PD_UNCOND, PD), 0, SIZE)).all()
    with pytest.raises(TypeError, match="PuLIDConditioning"):
        backend.predict_noise(z, t, [conditions.uncond, conditions.fd], (PD_UNCOND, PD), 0, SIZE)


# --- the sampling loop, FD/PD and ROFA endpoints ------------------------------------------------
@pytest.fixture(scope="module")
def same_run(backend, conditions):
    same = same_pass(backend, karras_scheduler(backend.pipeline), noise(), conditions, Guidance(7.0), SIZE)
    return same


def test_pd_lane_is_the_original_sampling_loop_replayed(backend, conditions, same_run):
    scheduler = karras_scheduler(backend.pipeline)
    z = noise().clone()
    scale = backend.settings.id_scale
    with processors(backend.unet, replay_processors(backend)):
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(z, t)
            neg = original_eps(backend, x, t, conditions.uncond, conditions.pd_uncond.id_tokens[None], scale)
            pos = original_eps(backend, x, t, conditions.fd, conditions.pd.id_tokens[None], scale)
            z = scheduler.step(neg + 7.0 * (pos - neg), t, z, return_dict=False)[0]
    torch.testing.assert_close(same_run.z0[PD_LANE : PD_LANE + 1], z, rtol=1e-4, atol=1e-4)


def test_fd_lane_is_the_base_model_and_rofa_endpoints(backend, conditions, same_run):
    with processors(backend.unet, AttnProcessor2_0()):
        z = noise().clone()
        scheduler = karras_scheduler(backend.pipeline)
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(torch.cat([z, z]), t)
            rows = [conditions.uncond, conditions.fd]
            eps = backend.unet(
                x, t, encoder_hidden_states=torch.cat([r.prompt_embeds for r in rows]),
                added_cond_kwargs=backend.added_cond_kwargs(rows, *SIZE), return_dict=False,
            )[0]
            z = scheduler.step(eps[:1] + 7.0 * (eps[1:] - eps[:1]), t, z, return_dict=False)[0]
    torch.testing.assert_close(same_run.z0[FD_LANE : FD_LANE + 1], z, rtol=1e-4, atol=1e-4)
    ones = rofa_pass(backend, same_run, conditions, torch.ones(1, 1, 8, 8), Guidance(7.0), SIZE)
    assert torch.equal(ones, same_run.z0[FD_LANE : FD_LANE + 1])
    # ℳ = 0: plain PuLID generation bit for bit (both run PD's 2 rows per call from the same state);
    # against the SAME pass's PD lane (4-row calls) it agrees to float rounding
    zeros = rofa_pass(backend, same_run, conditions, torch.zeros(1, 1, 8, 8), Guidance(7.0), SIZE)
    scheduler = karras_scheduler(backend.pipeline)
    plain_pd = plain_pass(backend, scheduler, noise(), conditions, Guidance(7.0), SIZE, lane=PD)
    assert torch.equal(zeros, plain_pd)
    torch.testing.assert_close(zeros, same_run.z0[PD_LANE : PD_LANE + 1], rtol=1e-4, atol=1e-4)


def test_inject_step_override_keeps_pd_equal_to_fd_before_it(backend, conditions):
    late = replace(conditions, inject_step=2)
    same = same_pass(backend, karras_scheduler(backend.pipeline, 4), noise(), late, Guidance(7.0), SIZE)
    assert torch.equal(same.injection_latents[FD_LANE], same.injection_latents[PD_LANE])
    assert not torch.allclose(same.z0[FD_LANE], same.z0[PD_LANE])


# --- presets, settings, embedding file ------------------------------------------------------------
def test_the_original_deterministic_preset_is_accepted(tiny_sdxl):
    """DPM++ 2M Karras (the v1.1 demo's non-Lightning sampler) passes FreeCure's scheduler check."""
    check_scheduler(karras_scheduler(tiny_sdxl))


@pytest.mark.parametrize(
    "kwargs, message",
    [({"id_scale": float("nan")}, "id scale"), ({"num_zero": -1}, "num_zero"), ({"ortho": "v3"}, "ortho")],
)
def test_bad_settings_are_input_errors(kwargs, message):
    with pytest.raises(InputError, match=message):
        IdentitySettings(**kwargs)


def test_settings_bounds_are_inclusive():
    # [0, 5] for the id scale, 0..256 zero tokens: the ends are allowed, one step past is not
    for scale in (0.0, 5.0):
        assert IdentitySettings(id_scale=scale).id_scale == scale
    for scale in (-0.01, 5.01):
        with pytest.raises(InputError, match="id scale"):
            IdentitySettings(id_scale=scale)
    for zeros in (0, 256):
        assert IdentitySettings(num_zero=zeros).num_zero == zeros
    with pytest.raises(InputError, match="num_zero"):
        IdentitySettings(num_zero=257)


def test_face_embedding_file_round_trip_and_errors(tmp_path):
    face = random_face_embedding(24, 16, refs=2)
    save_face_embedding(face, tmp_path / "face.safetensors")
    loaded = load_face_embedding(tmp_path / "face.safetensors")
    assert torch.equal(loaded.id_cond, face.id_cond) and len(loaded.vit_hidden) == 5
    id_cond, hidden = loaded.idformer_inputs()
    assert id_cond.shape == (1, 2, 24) and hidden[0].shape == (1, 18, 16)
    with pytest.raises(InputError, match="id_cond has shape"):
        loaded.check(1280, 1024, "face")
    from safetensors.torch import save_file

    save_file({"id_cond": face.id_cond}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(InputError, match="lacks vit_hidden.0"):
        load_face_embedding(tmp_path / "bad.safetensors")


def test_face_features_image_whitens_the_originals_background_labels():
    rgb = np.zeros((2, 3, 3))
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 1.0, 0.5, 0.0
    labels = np.array([[1, 0, 17], [16, 10, 14]])
    out = face_features_image(rgb, labels)
    grey = 0.299 + 0.5 * 0.587
    assert np.allclose(out[0, 0], grey) and np.allclose(out[0, 2], grey) and np.allclose(out[1, 1], grey)
    assert np.all(out[0, 1] == 1) and np.all(out[1, 0] == 1) and np.all(out[1, 2] == 1)
    assert set(BACKGROUND_LABELS) == {0, 7, 8, 9, 14, 15, 16, 18}


# --- CLI ----------------------------------------------------------------------------------------
def test_registered_with_the_non_commercial_licence():
    assert BACKENDS["pulid-sdxl"] is PuLIDSDXLBackend
    assert "non-commercial" in PuLIDSDXLBackend.license


@pytest.mark.slow
def test_generate_tiny_runs_every_stage(tmp_path, astronaut, capsys):
    astronaut.resize((64, 64)).save(tmp_path / "ref.png")
    face = random_face_embedding(24, 16, refs=1, seed=5)
    save_face_embedding(face, tmp_path / "face.safetensors")
    out = tmp_path / "run"
    args = ["generate", "--tiny", "--backend", "pulid-sdxl", "--prompt", PROMPT, "--ref", str(tmp_path / "ref.png"),
            "--steps", "4", "--scheduler", "dpmpp-2m-karras", "--face-embedding", str(tmp_path / "face.safetensors"),
            "--out", str(out), "--no-progress"]
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["stages"] if s["ran"]] == ["same_pass", "masks", "rofa", "expression"]
    assert "non-commercial" in manifest["license"]
    assert (out / "freecure.png").is_file()


def test_generate_without_tiny_needs_a_face_embedding(tmp_path, capsys):
    args = ["generate", "--backend", "pulid-sdxl", "--prompt", PROMPT, "--out", str(tmp_path / "x"), "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--face-embedding" in err and "non-commercial" in err and "Traceback" not in err


@pytest.mark.slow
def test_cost_counts_pulid(capsys):
    assert main(["cost", "--backend", "pulid-sdxl", "--steps", "4", "--inject-step", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["settings"]["backend"] == "pulid-sdxl"
    # PuLID's PD has its own unconditional row: the engine runs 4 rows per step from injection
    # (before injection too: PD's lane has its own negative row, without identity until injected)
    assert result["engine"]["stages"]["same_pass"]["batch_items"] == 4 * 4
    assert result["plain_pd"] == {"unet_calls": 4, "batch_items": 8}


@pytest.mark.slow
def test_eval_tiny_runs_pulid_sdxl(tmp_path, capsys):
    pytest.importorskip("dlib")
    pytest.importorskip("facenet_pytorch")
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt\na <S> with black curly hair, laughing\n")
    out = tmp_path / "eval"
    args = ["eval", "--tiny", "--backend", "pulid-sdxl", "--identities", "examples/identities", "--prompts",
            str(prompts), "--num-seeds", "1", "--steps", "3", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert "1 new, 0 already done" in capsys.readouterr().out
