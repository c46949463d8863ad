"""InstantID backend: the released ip-adapter.bin layout (strict), PD against InstantID's loop
written from its description, FD = the zero identity through Resampler, UNet and IdentityNet
(or IdentityNet off), keypoints required, `generate`/`cost` on tiny models."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from freecure.backends import BACKENDS, InstantIDBackend
from freecure.backends.common.face_embedding import draw_keypoints
from freecure.backends.ip_adapter.faceid import split_adapter_state
from freecure.backends.ip_adapter.instantid import (
    ReleasedInstantIDLayout,
    check_instantid_state_dict,
    keypoint_tensor,
)
from freecure.cli import main
from freecure.core.attributes import parse_prompt
from freecure.core.errors import InputError, WeightsNotFoundError
from freecure.core.guidance import FD_LANE, PD_LANE, Guidance
from freecure.stages.records import UNetCounter
from freecure.stages.rofa import rofa_pass
from freecure.stages.sampling import same_pass
from tests.keylists import meta_state_dict, read_layout

PROMPT = "a man with black curly hair, laughing happily"
STEPS, SIZE, W = 3, (64, 64), 5.0


def latent(seed=0):
    return torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def backend():
    return InstantIDBackend.build_tiny()


def conditions_for(backend, image, steps=STEPS):
    parsed = parse_prompt(PROMPT, "man", tokenizer=backend.tokenizer)
    return backend.conditions(parsed, [image], steps)


def scheduler_for(pipe, steps=STEPS):
    scheduler = pipe.scheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    return scheduler


def instantid_loop(backend, conditions, z_T, positive_face, identitynet=True):
    """InstantID's sampling loop from its description: CFG batch [negative, positive]; identity
    tokens = Resampler([0, f]); IdentityNet(latents, text stream = identity tokens, keypoint image,
    scale 0.8); UNet(text, identity tokens via the IP processors, + IdentityNet residuals)."""
    pipe, unet, net = backend.pipeline, backend.unet, backend.controlnet
    scheduler = scheduler_for(pipe)
    faces = torch.cat([torch.zeros_like(positive_face), positive_face])[:, None, None]
    tokens = unet.encoder_hid_proj([faces])[0][:, 0]
    text = torch.cat([conditions.uncond.prompt_embeds, conditions.fd.prompt_embeds])
    pooled = torch.cat([conditions.uncond.pooled_prompt_embeds, conditions.fd.pooled_prompt_embeds])
    time_ids = torch.tensor([[64.0, 64.0, 0, 0, 64.0, 64.0]]).repeat(2, 1)
    added = {"text_embeds": pooled, "time_ids": time_ids}
    kps = keypoint_tensor(backend._face, SIZE, "cpu", torch.float32).expand(2, -1, -1, -1)
    z = z_T
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(torch.cat([z, z]), t)
            down = mid = None
            if identitynet:
                down, mid = net(x, t, encoder_hidden_states=tokens, controlnet_cond=kps, conditioning_scale=0.8,
                                added_cond_kwargs=added, return_dict=False)
            eps = unet(x, t, encoder_hidden_states=text, added_cond_kwargs={**added, "image_embeds": [faces]},
                       down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
            eps_u, eps_c = eps.chunk(2)
            z = scheduler.step(eps_u + W * (eps_c - eps_u), t, z).prev_sample
    return z


def test_released_layout_is_checked_strictly():
    from diffusers import UNet2DConditionModel

    from freecure.core.configs import SDXL_UNET

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
        model = ReleasedInstantIDLayout(unet.config, list(unet.attn_processors))
    layout = read_layout("instantid_ip_adapter_keys.txt")
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == layout
    assert layout["image_proj.latents"] == (1, 16, 1280) and layout["ip_adapter.1.to_k_ip.weight"] == (640, 2048)
    flat = meta_state_dict(layout)
    state = split_adapter_state(flat)
    check_instantid_state_dict(unet, state)
    del state["image_proj"]["norm_out.bias"]
    with pytest.raises(WeightsNotFoundError, match=r"image_proj\.norm_out\.bias"):
        check_instantid_state_dict(unet, state)


def test_pd_is_instantids_loop_and_fd_the_zero_identity(backend, astronaut):
    conditions = conditions_for(backend, astronaut)
    assert conditions.inject_step == 0 and conditions.shares_uncond
    z_T = latent(1)
    counter = UNetCounter()
    with counter.attached(backend.unets()):
        same = same_pass(backend, scheduler_for(backend.pipeline), z_T, conditions, Guidance(W), SIZE)
    assert counter.calls == 2 * STEPS  # IdentityNet + UNet, one each per step
    face = conditions.pd.face_embeds
    pd = instantid_loop(backend, conditions, z_T, face)
    torch.testing.assert_close(same.z0[PD_LANE : PD_LANE + 1], pd, rtol=1e-4, atol=1e-4)
    fd = instantid_loop(backend, conditions, z_T, torch.zeros_like(face))
    torch.testing.assert_close(same.z0[FD_LANE : FD_LANE + 1], fd, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(pd, fd, atol=1e-3)


def test_fd_without_identitynet(backend, astronaut):
    backend.fd_identitynet = False
    try:
        conditions = conditions_for(backend, astronaut)
        assert not conditions.shares_uncond  # PD's negative row keeps IdentityNet, FD's does not
        z_T = latent(2)
        same = same_pass(backend, scheduler_for(backend.pipeline), z_T, conditions, Guidance(W), SIZE)
    finally:
        backend.fd_identitynet = True
    face = conditions.pd.face_embeds
    fd = instantid_loop(backend, conditions, z_T, torch.zeros_like(face), identitynet=False)
    torch.testing.assert_close(same.z0[FD_LANE : FD_LANE + 1], fd, rtol=1e-4, atol=1e-4)
    pd = instantid_loop(backend, conditions, z_T, face)
    torch.testing.assert_close(same.z0[PD_LANE : PD_LANE + 1], pd, rtol=1e-4, atol=1e-4)


def test_rofa_masks_zero_and_one_give_pd_and_fd(backend, astronaut):
    conditions = replace(conditions_for(backend, astronaut), inject_step=1)
    same = same_pass(backend, scheduler_for(backend.pipeline), latent(3), conditions, Guidance(W), SIZE)
    pd = rofa_pass(backend, same, conditions, torch.zeros(1, 1, 32, 32), Guidance(W), SIZE)
    torch.testing.assert_close(pd, same.z0[PD_LANE : PD_LANE + 1], rtol=1e-4, atol=1e-4)
    fd = rofa_pass(backend, same, conditions, torch.ones(1, 1, 32, 32), Guidance(W), SIZE)
    assert torch.equal(fd, same.z0[FD_LANE : FD_LANE + 1])


def test_keypoint_image_colours_and_scaling():
    kps = torch.tensor([[20.0, 20.0], [44.0, 20.0], [32.0, 32.0], [24.0, 44.0], [40.0, 44.0]])
    image = draw_keypoints((64, 64), kps, radius=2)
    assert image.getpixel((20, 20)) == (255, 0, 0) and image.getpixel((32, 32)) == (0, 0, 255)
    assert image.getpixel((26, 26)) == (153, 0, 0)  # on the left eye's limb: 60 % of red
    assert image.getpixel((2, 60)) == (0, 0, 0)


def test_keypoints_are_required(backend, tmp_path, astronaut):
    from freecure.backends.common.face_embedding import FaceEmbedding, save_face_embedding

    save_face_embedding(tmp_path / "face.safetensors", FaceEmbedding(torch.ones(512)))
    no_kps = InstantIDBackend(backend.pipeline, backend.controlnet, face_embedding=tmp_path / "face.safetensors")
    with pytest.raises(InputError, match="--face-keypoints"):
        conditions_for(no_kps, astronaut)
    (tmp_path / "kps.json").write_text(json.dumps([[20, 20], [44, 20], [32, 32], [24, 44], [40, 44]]))
    with_kps = InstantIDBackend(
        backend.pipeline, backend.controlnet, face_embedding=tmp_path / "face.safetensors",
        face_keypoints=tmp_path / "kps.json",
    )
    conditions = conditions_for(with_kps, astronaut)
    assert torch.equal(conditions.pd.face_embeds, torch.ones(1, 512))
    nothing = InstantIDBackend(backend.pipeline, backend.controlnet)
    with pytest.raises(InputError, match=r"freecure\[insightface\].*--face-keypoints"):
        conditions_for(nothing, astronaut)


def test_registered_with_its_licence():
    assert BACKENDS["instantid"] is InstantIDBackend
    assert "NON-COMMERCIAL" in InstantIDBackend.license and "Apache-2.0" in InstantIDBackend.license


@pytest.mark.slow
def test_generate_tiny_runs_every_stage(tmp_path, astronaut, capsys):
    """With a precomputed embedding and keypoints, as a run without insightface would."""
    from freecure.backends.common.face_embedding import FaceEmbedding, save_face_embedding

    astronaut.resize((64, 64)).save(tmp_path / "ref.png")
    save_face_embedding(tmp_path / "face.safetensors", FaceEmbedding(torch.linspace(-1, 1, 512)))
    (tmp_path / "kps.json").write_text(json.dumps([[20, 24], [44, 24], [32, 34], [24, 46], [40, 46]]))
    out = tmp_path / "run"
    args = ["generate", "--tiny", "--backend", "instantid", "--prompt", PROMPT, "--ref", str(tmp_path / "ref.png")]
    args += ["--face-embedding", str(tmp_path / "face.safetensors"), "--face-keypoints", str(tmp_path / "kps.json")]
    assert main([*args, "--steps", "3", "--out", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["license"] == InstantIDBackend.license
    stages = {s["name"]: s for s in manifest["stages"]}
    assert all(stage["ran"] for stage in stages.values()), stages
    assert stages["same_pass"]["unet_calls"] == 2 * 3  # IdentityNet and UNet per step


@pytest.mark.slow
def test_cost_with_and_without_identitynet_for_fd(capsys):
    results = []
    for option in ("zero-identity", "no-identitynet"):
        args = ["cost", "--backend", "instantid", "--steps", "2", "--inject-step", "1", "--json"]
        assert main([*args, "--instantid-fd", option]) == 0
        results.append(json.loads(capsys.readouterr().out))
    zero, off = results
    assert zero["settings"]["backend"] == "instantid"
    same_zero, same_off = zero["engine"]["stages"]["same_pass"], off["engine"]["stages"]["same_pass"]
    # zero identity: step 0 [uncond, fd] through IdentityNet and UNet (2 + 2), step 1 four rows (4 + 4);
    # IdentityNet off for FD: PD's negative row is its own (4 UNet rows at both steps), IdentityNet
    # only on PD's two rows after injection
    assert (same_zero["unet_calls"], same_zero["batch_items"]) == (4, 12)
    assert (same_off["unet_calls"], same_off["batch_items"]) == (3, 10)


@pytest.mark.slow
def test_eval_tiny_scores_fd_pd_and_freecure(tmp_path, capsys):
    pytest.importorskip("dlib")
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt\na <S> with black curly hair, laughing happily\n")
    out = tmp_path / "eval"
    args = ["eval", "--tiny", "--backend", "instantid", "--identities", "examples/identities"]
    args += ["--prompts", str(prompts), "--num-seeds", "1", "--steps", "2", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "instantid (PD)" in printed and "instantid + FreeCure" in printed


@pytest.mark.parametrize("backend_name", ["instantid", "ip-adapter-faceid"])
def test_without_insightface_the_cli_says_what_to_install_or_pass(monkeypatch, tmp_path, capsys, backend_name):
    import sys

    monkeypatch.setitem(sys.modules, "insightface", None)  # as if not installed
    ref = _reference_file(tmp_path)
    args = ["generate", "--backend", backend_name, "--prompt", PROMPT, "--ref", ref, "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "freecure[insightface]" in error and "--face-embedding" in error and "Traceback" not in error


def test_captured_attention_is_text_only_with_identity_tokens_active(backend, astronaut):
    from freecure.attention.capture import AttentionStore, capture_cross_attention

    store = AttentionStore(tuple(range(77)), (32, 32))
    conditions = conditions_for(backend, astronaut, steps=2)
    with capture_cross_attention(backend.unet, store):
        same_pass(backend, scheduler_for(backend.pipeline, 2), latent(5), conditions, Guidance(W), SIZE, store)
    assert store.sums
    for layer in store.sums:  # text softmax rows: the 16 identity tokens are not among the columns
        mean = store.sums[layer] / store.counts[layer]
        torch.testing.assert_close(mean.sum(-1), torch.ones(mean.shape[0]), rtol=1e-5, atol=1e-5)


def _reference_file(folder) -> str:
    """A readable reference photo (references are checked before the face files)."""
    from PIL import Image

    path = folder / "ref.png"
    Image.new("RGB", (64, 64), (128, 128, 128)).save(path)
    return str(path)


def test_bad_face_files_fail_before_any_model_loads(tmp_path, capsys):
    (tmp_path / "kps.json").write_text("[[1, 2], [3, 4]]")
    (tmp_path / "face.safetensors").write_bytes(b"junk")
    ref = _reference_file(tmp_path)
    base = ["generate", "--backend", "instantid", "--prompt", PROMPT, "--ref", ref, "--device", "cpu"]
    assert main([*base, "--face-embedding", str(tmp_path / "face.safetensors"), "--out", str(tmp_path / "o")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main([*base, "--face-embedding", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    from freecure.backends.common.face_embedding import FaceEmbedding, save_face_embedding

    save_face_embedding(tmp_path / "ok.safetensors", FaceEmbedding(torch.ones(512)))
    args = [*base, "--face-embedding", str(tmp_path / "ok.safetensors"), "--face-keypoints", str(tmp_path / "kps.json")]
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    assert "keypoints has shape (2, 2); instantid expects (5, 2)" in capsys.readouterr().err


# --- IdentityNet is loaded strictly -----------------------------------------------------------------
def _drop(key):
    return lambda state: state.pop(key, None) is not None


def _add(key):
    return lambda state: state.setdefault(key, torch.zeros(2)) is not None


def _reshape(key):
    return lambda state: key in state and state.update({key: torch.zeros(3)}) is None


BROKEN_CHECKPOINTS = {  # edit → the message naming it
    "missing": (_drop("controlnet_mid_block.weight"), r"missing keys \(1\): controlnet_mid_block\.weight"),
    "unexpected": (_add("controlnet_mid_block.extra"), r"unexpected keys \(1\): controlnet_mid_block\.extra"),
    "reshaped": (
        _reshape("controlnet_mid_block.bias"),
        r"shape mismatches \(1\): controlnet_mid_block\.bias \(checkpoint \(3,\), model \(64,\)\)",
    ),
}


def test_identitynet_layout_of_the_released_config():
    """The key list derived from the released ControlNetModel/config.json is what the builder
    (the model its config.json makes, on the meta device) expects, and the check names a key."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from freecure.core.checkpoints import check_layout, meta_model
    from freecure.core.configs import SDXL_UNET
    from tests.keylists import read_config

    config = read_config("instantid_identitynet_config.json")
    layout = read_layout("instantid_identitynet_keys.txt")
    model = meta_model(ControlNetModel, config)
    assert {key: tuple(value.shape) for key, value in model.state_dict().items()} == layout
    assert len(layout) == 844 and sum(torch.Size(shape).numel() for shape in layout.values()) == 1_251_014_160
    with torch.device("meta"):  # IdentityNet is a ControlNet of SDXL's UNet
        from_unet = ControlNetModel.from_unet(UNet2DConditionModel(**SDXL_UNET))
    assert {key: tuple(value.shape) for key, value in from_unet.state_dict().items()} == layout
    check_layout(ControlNetModel, config, layout, "IdentityNet")
    del layout["controlnet_down_blocks.8.weight"]
    with pytest.raises(WeightsNotFoundError, match=r"missing keys \(1\): controlnet_down_blocks\.8\.weight"):
        check_layout(ControlNetModel, config, layout, "IdentityNet")


@pytest.mark.parametrize("case", sorted(BROKEN_CHECKPOINTS))
def test_identitynet_with_a_wrong_key_is_refused_naming_it(backend, tmp_path, case):
    """diffusers' from_pretrained only warned: a missing key stayed on the meta device (the later
    .to(device) failed with "Cannot copy out of meta tensor"), an extra one was dropped. The
    IdentityNet folder is refused, naming the key, before the base model is even looked for."""
    from tests.keylists import save_edited

    edit, message = BROKEN_CHECKPOINTS[case]
    folder = save_edited(backend.controlnet, tmp_path / "ControlNetModel", edit)
    # a readable ip-adapter.bin (it is read first, and checked against the base model only later)
    torch.save({"image_proj": {"latents": torch.zeros(1, 16, 8)}, "ip_adapter": {}}, tmp_path / "ip-adapter.bin")
    with pytest.raises(WeightsNotFoundError, match=message) as error:
        InstantIDBackend.from_pretrained(
            str(tmp_path / "no-base-model"), tmp_path / "ip-adapter.bin", folder, device="cpu",
            dtype=torch.float32, face_embedding=tmp_path / "face.safetensors",
        )
    assert "IdentityNet" in str(error.value) and "--instantid-controlnet" in str(error.value)


def test_identitynet_loads_strictly_from_one_file_or_shards(backend, tmp_path):
    from freecure.backends.ip_adapter.instantid import load_identitynet
    from tests.keylists import save_edited

    expected = backend.controlnet.state_dict()
    for folder in (
        save_edited(backend.controlnet, tmp_path / "single"),
        save_edited(backend.controlnet, tmp_path / "sharded", max_shard_size="300KB"),
    ):
        loaded = load_identitynet(folder, torch.float32)
        state = loaded.state_dict()
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
        assert not any(p.is_meta for p in loaded.parameters())
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    # a key missing from one shard, and a shard the index names but the folder lacks
    broken = save_edited(backend.controlnet, tmp_path / "broken", _drop("controlnet_mid_block.weight"),
                         max_shard_size="300KB")
    with pytest.raises(WeightsNotFoundError, match=r"missing keys \(1\): controlnet_mid_block\.weight"):
        load_identitynet(broken)
    next(iter(sorted((tmp_path / "sharded").glob("*-of-*.safetensors")))).unlink()
    with pytest.raises(WeightsNotFoundError, match=r"the shard '.*-00001-of-.*' that .*index\.json lists"):
        load_identitynet(tmp_path / "sharded")
    with pytest.raises(WeightsNotFoundError, match="IdentityNet folder not found"):
        load_identitynet(tmp_path / "nowhere")
