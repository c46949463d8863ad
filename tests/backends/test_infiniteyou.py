"""InfiniteYou on tiny FLUX: released Resampler layout, PD against the original loop, FD
against plain FLUX, per-row InfuseNet gating, and the CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

from freecure.backends.infiniteyou.backend import (
    RESAMPLER,
    TINY_RESAMPLER,
    IdentityResampler,
    InfiniteYouBackend,
    injection_step,
    load_face_embedding,
    load_resampler,
)
from freecure.cli import main
from freecure.core.attributes import parse_prompt
from freecure.core.checkpoints import check_state_dict
from freecure.core.conditioning import FD, PD
from freecure.core.errors import InputError, WeightsNotFoundError
from freecure.core.guidance import FD_LANE, PD_LANE, Guidance
from freecure.families.flux import FLUX
from freecure.stages.rofa import rofa_pass
from freecure.stages.sampling import plain_pass, same_pass
from tests.keylists import meta_state_dict, read_layout

PROMPT = "a man with black curly hair, laughing happily"
SIZE, LATENT, STEPS = (64, 64), (32, 32), 5


@pytest.fixture(scope="module")
def backend(tiny_flux):
    backend = InfiniteYouBackend.build_tiny(pipeline=tiny_flux, guidance_start=0.3)
    backend.pipeline.set_progress_bar_config(disable=True)
    backend.guidance_scale = 3.5
    return backend


@pytest.fixture(scope="module")
def conditions(backend):
    parsed = parse_prompt(PROMPT, "man", tokenizer=backend.tokenizer)
    return backend.conditions(parsed, [Image.new("RGB", (32, 32), (90, 60, 40))], STEPS)


def scheduler(backend):
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(backend.pipeline.scheduler.config)
    FLUX.set_timesteps(scheduler, STEPS, "cpu", LATENT)
    return scheduler


def z_T(backend, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return FLUX.initial_latents(backend.pipeline, None, LATENT, generator, "cpu", torch.float32)


# --- checkpoints --------------------------------------------------------------------------------
def test_released_resampler_layout_matches_the_original():
    layout = read_layout("infiniteyou_image_proj_keys.txt")
    with torch.device("meta"):
        resampler = IdentityResampler(**RESAMPLER)
    check_state_dict(resampler, meta_state_dict(layout), "layout")
    assert layout["latents"] == (1, 8, 1280) and layout["proj_out.weight"] == (4096, 1280)
    del layout["layers.3.1.3.weight"]
    with pytest.raises(WeightsNotFoundError, match="layers.3.1.3.weight"):
        check_state_dict(resampler, meta_state_dict(layout), "layout")


def test_resampler_file_loads_strictly(tmp_path):
    torch.manual_seed(0)
    resampler = IdentityResampler(**TINY_RESAMPLER)
    torch.save({"image_proj": resampler.state_dict()}, tmp_path / "image_proj_model.bin")
    loaded = load_resampler(tmp_path / "image_proj_model.bin", TINY_RESAMPLER)
    x = torch.randn(1, 1, 512)
    assert torch.equal(loaded(x), resampler(x)) and loaded(x).shape == (1, 8, 32)
    torch.save({"image_proj": {"latents": torch.zeros(1)}}, tmp_path / "bad.bin")
    with pytest.raises(WeightsNotFoundError, match="missing keys"):
        load_resampler(tmp_path / "bad.bin", TINY_RESAMPLER)
    torch.save({"other": {}}, tmp_path / "other.bin")
    with pytest.raises(WeightsNotFoundError, match="image_proj"):
        load_resampler(tmp_path / "other.bin", TINY_RESAMPLER)


def test_infusenet_layout_is_the_released_one():
    """The key list derived from InfuseNet's configuration is the builder's (the model its
    config.json makes, on the meta device), and it is the released file's: DiffSynth-Studio
    records the hash of infu_flux_v1.0/aes_stage2/InfuseNetModel's keys and shapes."""
    from diffusers import FluxControlNetModel

    from freecure.core.checkpoints import check_layout, meta_model
    from tests.keylists import key_hash, read_config

    config = read_config("infiniteyou_infusenet_config.json")
    layout = read_layout("infiniteyou_infusenet_keys.txt")
    model = meta_model(FluxControlNetModel, config)
    assert {key: tuple(value.shape) for key, value in model.state_dict().items()} == layout
    assert key_hash(layout) == "7f9583eb8ba86642abb9a21a4b2c9e16"
    assert len(layout) == 314 and layout["controlnet_single_blocks.9.weight"] == (3072, 3072)
    assert "controlnet_blocks.4.weight" not in layout and "time_text_embed.guidance_embedder.linear_1.weight" in layout
    check_layout(FluxControlNetModel, config, layout, "InfuseNet")
    layout["input_hint_block.0.weight"] = (16, 3, 3, 3)
    with pytest.raises(WeightsNotFoundError, match=r"unexpected keys \(1\): input_hint_block\.0\.weight"):
        check_layout(FluxControlNetModel, config, layout, "InfuseNet")


def _drop(key):
    return lambda state: state.pop(key, None) is not None


def _add(key, value, replace=False):
    """Put ``value`` under ``key`` in the first shard that holds it (``replace``) or in the first one."""

    def edit(state):
        if replace and key not in state:
            return False
        state[key] = value
        return True

    return edit


BROKEN_INFUSENETS = {  # edit → the message naming it
    "missing": (_drop("controlnet_single_blocks.0.weight"), r"missing keys \(1\): controlnet_single_blocks\.0\.weight"),
    "unexpected": (
        _add("controlnet_blocks.2.weight", torch.zeros(32, 32)),
        r"unexpected keys \(1\): controlnet_blocks\.2\.weight",
    ),
    "reshaped": (
        _add("controlnet_x_embedder.bias", torch.zeros(3), replace=True),
        r"shape mismatches \(1\): controlnet_x_embedder\.bias \(checkpoint \(3,\), model \(32,\)\)",
    ),
}


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
@pytest.mark.parametrize("case", sorted(BROKEN_INFUSENETS))
def test_infusenet_with_a_wrong_key_is_refused_naming_it(backend, tmp_path, case, sharded):
    """diffusers' from_pretrained only warned: a missing key stayed on the meta device (the later
    .to(device) failed with "Cannot copy out of meta tensor"), an extra one was dropped. The
    InfuseNet folder (one file or shards with their index) is refused, naming the key, before
    image_proj_model.bin or the base model are looked for."""
    from tests.keylists import save_edited

    edit, message = BROKEN_INFUSENETS[case]
    shards = {"max_shard_size": "200KB"} if sharded else {}
    save_edited(backend.infusenet, tmp_path / "aes_stage2" / "InfuseNetModel", edit, **shards)
    index = tmp_path / "aes_stage2" / "InfuseNetModel" / "diffusion_pytorch_model.safetensors.index.json"
    assert index.is_file() == sharded
    with pytest.raises(WeightsNotFoundError, match=message) as error:
        InfiniteYouBackend.from_pretrained(
            str(tmp_path / "no-base-model"), tmp_path / "aes_stage2", "aes_stage2", device="cpu",
            dtype=torch.float32, face_embedding=torch.ones(512),
        )
    assert "InfuseNet" in str(error.value) and "--infiniteyou-weights" in str(error.value)


def test_infusenet_loads_strictly_from_one_file_or_shards(backend, tmp_path):
    from freecure.backends.infiniteyou.backend import load_infusenet
    from tests.keylists import save_edited

    expected = backend.infusenet.state_dict()
    for folder, shards in ((tmp_path / "single", {}), (tmp_path / "sharded", {"max_shard_size": "200KB"})):
        loaded = load_infusenet(save_edited(backend.infusenet, folder, **shards), torch.float32)
        state = loaded.state_dict()
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
        assert not any(p.is_meta for p in [*loaded.parameters(), *loaded.buffers()])
    first = sorted((tmp_path / "sharded").glob("*-00001-of-*.safetensors"))[0]
    first.write_bytes(first.read_bytes()[:100])  # a truncated download
    with pytest.raises(WeightsNotFoundError, match=f"cannot read .*{first.name} as a safetensors file for InfuseNet"):
        load_infusenet(tmp_path / "sharded")
    index = tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(index.read_text().replace("-00001-of-", "-00001-of-../../"))  # a shard outside the folder
    with pytest.raises(WeightsNotFoundError, match="is not a file in"):
        load_infusenet(tmp_path / "sharded")
    index.write_text("{not json")
    with pytest.raises(WeightsNotFoundError, match="cannot read .*index.json, the shard index of InfuseNet"):
        load_infusenet(tmp_path / "sharded")
    (tmp_path / "single" / "config.json").write_text('{"_class_name": "ControlNetModel"}')
    with pytest.raises(WeightsNotFoundError, match="describes a ControlNetModel, not a FluxControlNetModel"):
        load_infusenet(tmp_path / "single")


def test_resampler_computes_the_original_perceiver():
    """The original Resampler's forward written out: learned queries, ``depth`` × (perceiver
    attention over [features; latents] with the √√d split scale + FFN, both residual), then
    proj_out and norm_out."""
    torch.manual_seed(0)
    resampler = IdentityResampler(**TINY_RESAMPLER).eval()
    x = torch.randn(2, 1, 512)
    heads = TINY_RESAMPLER["heads"]
    latents = resampler.latents.repeat(2, 1, 1)
    features = resampler.proj_in(x)
    for attention, ff in resampler.layers:
        f, q_in = attention.norm1(features), attention.norm2(latents)
        q = attention.to_q(q_in)
        k, v = attention.to_kv(torch.cat([f, q_in], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.view(2, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        scale = 1 / (TINY_RESAMPLER["dim_head"] ** 0.25)
        weight = torch.softmax(((q * scale) @ (k * scale).transpose(-2, -1)).float(), dim=-1)
        out = (weight @ v).permute(0, 2, 1, 3).reshape(2, latents.shape[1], -1)
        latents = attention.to_out(out) + latents
        latents = ff(latents) + latents
    expected = resampler.norm_out(resampler.proj_out(latents))
    with torch.no_grad():
        torch.testing.assert_close(resampler(x), expected, rtol=1e-5, atol=1e-6)


def test_face_embedding_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"embedding": torch.ones(1, 512)}, str(tmp_path / "face.safetensors"))
    assert load_face_embedding(tmp_path / "face.safetensors").shape == (512,)
    save_file({"embedding": torch.ones(3)}, str(tmp_path / "short.safetensors"))
    with pytest.raises(InputError, match="512"):
        load_face_embedding(tmp_path / "short.safetensors")
    with pytest.raises(InputError, match="not found"):
        load_face_embedding(tmp_path / "missing.safetensors")


def test_injection_step_follows_the_original_controlnet_keep():
    # the original's keep_i = 1 − [i/T < start]: InfuseNet is on from the first i with i/T ≥ start
    for start, steps in ((0.0, 28), (0.1, 28), (0.3, 5), (0.5, 30)):
        keep = [1.0 - float(i / steps < start) for i in range(steps)]
        assert injection_step(start, steps) == keep.index(1.0)
    with pytest.raises(InputError, match="guidance_start"):
        injection_step(1.0, 28)


# --- PD and FD exactness -------------------------------------------------------------------------
def original_loop(backend, conditions, latents):
    """InfiniteYou's ``FluxInfuseNetPipeline.__call__`` denoising loop (no true CFG), replayed
    step by step on the tiny models: InfuseNet on the identity tokens, then FLUX with its residuals."""
    pipe, infusenet = backend.pipeline, backend.infusenet
    sched = scheduler(backend)
    embeds, pooled = conditions.fd.prompt_embeds, conditions.fd.pooled_prompt_embeds
    text_ids = torch.zeros(embeds.shape[1], 3)
    image_ids = pipe._prepare_latent_image_ids(1, LATENT[0] // 2, LATENT[1] // 2, "cpu", torch.float32)
    control = backend.control_latents(SIZE)
    timesteps = sched.timesteps
    keep = [1.0 - float(i / len(timesteps) < backend.guidance_start) for i in range(len(timesteps))]
    for i, t in enumerate(timesteps):
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        blocks, singles = infusenet(
            hidden_states=latents,
            controlnet_cond=control,
            conditioning_scale=backend.conditioning_scale * keep[i],
            timestep=timestep / 1000,
            guidance=torch.tensor([1.0]).expand(1),
            pooled_projections=pooled,
            encoder_hidden_states=backend.identity_tokens,
            txt_ids=torch.zeros(8, 3),
            img_ids=image_ids,
            return_dict=False,
        )
        velocity = pipe.transformer(
            hidden_states=latents,
            timestep=timestep / 1000,
            guidance=torch.tensor([3.5]).expand(1),
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            controlnet_block_samples=blocks,
            controlnet_single_block_samples=singles,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        latents = sched.step(velocity, t, latents, return_dict=False)[0]
    return latents


def test_control_latent_is_encoded_in_the_vae_dtype(backend):
    # a half-precision VAE gets its control pixels in its own dtype (fp32 pixels would not run)
    import copy

    vae, cached = backend.pipeline.vae, dict(backend._control)
    backend.pipeline.vae = copy.deepcopy(vae).to(torch.bfloat16)
    backend._control.clear()
    try:
        half = backend.control_latents(SIZE)
    finally:
        backend.pipeline.vae = vae
        backend._control.clear()
        backend._control.update(cached)
    full = backend.control_latents(SIZE)
    assert half.shape == full.shape and half.dtype == full.dtype and torch.isfinite(half).all()


def test_pd_equals_the_original_sampling_loop(backend, conditions):
    assert conditions.inject_step == 2  # i/T ≥ 0.3 first at i = 2 of 5
    ours = plain_pass(backend, scheduler(backend), z_T(backend), conditions, Guidance(scale=1.0), SIZE, lane=PD)
    theirs = original_loop(backend, conditions, z_T(backend))
    assert torch.equal(ours, theirs)


def test_fd_equals_plain_flux(backend, conditions):
    ours = plain_pass(backend, scheduler(backend), z_T(backend), conditions, Guidance(scale=1.0), SIZE, lane=FD)
    theirs = backend.pipeline(
        prompt_embeds=conditions.fd.prompt_embeds,
        pooled_prompt_embeds=conditions.fd.pooled_prompt_embeds,
        latents=z_T(backend),
        num_inference_steps=STEPS,
        guidance_scale=3.5,
        height=SIZE[0],
        width=SIZE[1],
        output_type="latent",
    ).images
    assert torch.equal(ours, theirs)


def test_infusenet_residuals_are_gated_per_row(backend, conditions):
    z = torch.cat([z_T(backend, 1), z_T(backend, 2)])
    t = torch.tensor(700.0)
    rows = [conditions.fd, conditions.pd]
    joint = backend.predict_noise(z, t, rows, ("fd", "pd"), 3, SIZE)
    inputs = FLUX.model_inputs(backend, z, t, rows, SIZE)
    without = backend.denoiser(**inputs)[0]
    assert torch.equal(joint[0], without[0])  # FD's row: h + 0 = h, bit for bit
    assert not torch.allclose(joint[1], without[1])  # PD's row carries the identity
    alone = backend.predict_noise(z[1:], t, rows[1:], ("pd",), 3, SIZE)
    torch.testing.assert_close(joint[1:], alone, rtol=1e-5, atol=1e-5)


def test_joint_pass_and_rofa_on_infiniteyou(backend, conditions):
    guidance = Guidance(scale=1.0)
    same = same_pass(backend, scheduler(backend), z_T(backend), conditions, guidance, SIZE)
    pd = plain_pass(backend, scheduler(backend), z_T(backend), conditions, guidance, SIZE, lane=PD)
    torch.testing.assert_close(same.z0[PD_LANE : PD_LANE + 1], pd, rtol=1e-5, atol=1e-5)
    ones = FLUX.model_mask(torch.ones(1, 1, *LATENT), same.z0)
    assert torch.equal(rofa_pass(backend, same, conditions, ones, guidance, SIZE), same.z0[FD_LANE : FD_LANE + 1])
    zeros = FLUX.model_mask(torch.zeros(1, 1, *LATENT), same.z0)
    assert torch.equal(rofa_pass(backend, same, conditions, zeros, guidance, SIZE), pd)


# --- CLI ----------------------------------------------------------------------------------------------
def test_generate_tiny_infiniteyou_runs_every_stage(tmp_path, astronaut):
    astronaut.resize((64, 64)).save(tmp_path / "ref.png")
    out = tmp_path / "run"
    code = main(
        ["generate", "--tiny", "--backend", "infiniteyou", "--prompt", PROMPT, "--ref", str(tmp_path / "ref.png")]
        + ["--steps", "4", "--out", str(out), "--no-progress"]
    )
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["stages"] if s["ran"]] == ["same_pass", "masks", "rofa", "expression"]
    assert "CC BY-NC 4.0" in manifest["license"]
    assert manifest["settings"]["family"] == "flux" and manifest["settings"]["inject_step"] == 0
    fd, pd = (np.asarray(Image.open(out / f"{name}.png")) for name in ("fd", "pd"))
    assert not np.array_equal(fd, pd)  # identity injected from step 0


def test_generate_refuses_bad_infusenet_options_before_loading(tmp_path, capsys):
    args = ["generate", "--tiny", "--backend", "infiniteyou", "--prompt", PROMPT, "--out", str(tmp_path / "x")]
    assert main([*args, "--infusenet-guidance-start", "1.5"]) == 2
    assert "--infusenet-guidance-start must lie in [0, 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:  # by the option's checked type, at parse time
        main([*args, "--infusenet-conditioning-scale", "nan"])
    assert refused.value.code == 2 and "finite" in capsys.readouterr().err
    assert main([*args, "--face-embedding", str(tmp_path / "missing.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err


def test_generate_names_the_missing_infusenet_key_in_one_line(backend, tmp_path, astronaut, capsys):
    """Before, the run went on with a parameter left on the meta device and ended in torch's
    "Cannot copy out of meta tensor" traceback; now: exit 2, one line, the key named."""
    from tests.keylists import save_edited

    save_edited(backend.infusenet, tmp_path / "aes_stage2" / "InfuseNetModel", _drop("controlnet_blocks.1.bias"))
    astronaut.resize((64, 64)).save(tmp_path / "ref.png")
    args = ["generate", "--backend", "infiniteyou", "--infiniteyou-weights", str(tmp_path / "aes_stage2")]
    args += ["--prompt", PROMPT, "--ref", str(tmp_path / "ref.png"), "--device", "cpu", "--out", str(tmp_path / "x")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "missing keys (1): controlnet_blocks.1.bias" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()
