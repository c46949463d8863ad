"""PuLID-FLUX's modules on a tiny diffusers FluxTransformer2DModel: released layout, strict
loading, insertion points, and the hooked transformer against a replay of the original's
block loop, gated per batch row."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FluxTransformer2DModel

from freecure.backends.pulid.flux import (
    DOUBLE,
    SINGLE,
    PuLIDFluxModules,
    ca_insertion_points,
    install_flux_identity,
    load_pulid_flux_weights,
)
from freecure.backends.pulid.idformer import tiny_idformer_config
from freecure.backends.pulid.sdxl import IdentityRows
from freecure.core.errors import WeightsNotFoundError
from tests.keylists import meta_state_dict, read_layout

ID_WEIGHT = 0.7


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=3,
        num_single_layers=5,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    ).eval()


@pytest.fixture(scope="module")
def modules(transformer):
    torch.manual_seed(1)
    pulid = PuLIDFluxModules.for_transformer(transformer, tiny_idformer_config(24), dim_head=8, heads=2).eval()
    for ca in pulid.pulid_ca:  # the released norms are not identity maps: make them differ
        torch.nn.init.normal_(ca.norm1.weight, 1.0, 0.2)
        torch.nn.init.normal_(ca.norm2.bias, 0.0, 0.2)
    return pulid


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(2)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    return dict(
        hidden_states=torch.randn(2, 16, 4, generator=g),
        encoder_hidden_states=torch.randn(2, 6, 32, generator=g),
        pooled_projections=torch.randn(2, 32, generator=g),
        timestep=torch.tensor([0.6, 0.6]),
        guidance=torch.tensor([3.5, 3.5]),
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=torch.zeros(6, 3),
    )


def original_forward(tr, ca, id_tokens, id_weight, x):
    """The original's FLUX forward (flux/model.py) on diffusers' blocks: after double block i
    with i % 2 == 0 and single block j with j % 4 == 0, img += id_weight · CA_k(id, img),
    k counting up; text tokens untouched; nothing when id is None."""
    h = tr.x_embedder(x["hidden_states"])
    temb = tr.time_text_embed(x["timestep"] * 1000, x["guidance"] * 1000, x["pooled_projections"])
    e = tr.context_embedder(x["encoder_hidden_states"])
    rope = tr.pos_embed(torch.cat([x["txt_ids"], x["img_ids"]]))
    k = 0
    for i, block in enumerate(tr.transformer_blocks):
        e, h = block(hidden_states=h, encoder_hidden_states=e, temb=temb, image_rotary_emb=rope)
        if i % 2 == 0 and id_tokens is not None:
            h = h + id_weight * ca[k](id_tokens, h)
            k += 1
    for j, block in enumerate(tr.single_transformer_blocks):
        e, h = block(hidden_states=h, encoder_hidden_states=e, temb=temb, image_rotary_emb=rope)
        if j % 4 == 0 and id_tokens is not None:
            h = h + id_weight * ca[k](id_tokens, h)
            k += 1
    assert id_tokens is None or k == len(ca)
    return tr.proj_out(tr.norm_out(h, temb))


def test_insertion_points_are_the_originals_and_scale_with_block_counts():
    full = ca_insertion_points(19, 38)
    assert len(full) == 20
    assert full[:10] == [(DOUBLE, i) for i in range(0, 19, 2)]
    assert full[10:] == [(SINGLE, j) for j in range(0, 37, 4)]
    assert ca_insertion_points(3, 5) == [(DOUBLE, 0), (DOUBLE, 2), (SINGLE, 0), (SINGLE, 4)]


def test_modules_have_the_released_flux_layout_and_load_strictly():
    released = read_layout("pulid_flux_v0_9_1_keys.txt")
    assert len(released) == 312 and sum(math.prod(s) for s in released.values()) == 571_033_600
    with torch.device("meta"):
        modules = PuLIDFluxModules()
    assert {k: tuple(v.shape) for k, v in modules.state_dict().items()} == released
    load_pulid_flux_weights(modules, meta_state_dict(released))
    state = meta_state_dict(released)
    state["pulid_ca.19.to_out.weight"] = torch.empty(3072, 1024, device="meta")
    with torch.device("meta"):
        fresh = PuLIDFluxModules()
    with pytest.raises(WeightsNotFoundError, match=r"pulid_ca.19.to_out.weight \(checkpoint \(3072, 1024\)"):
        load_pulid_flux_weights(fresh, state)
    with pytest.raises(WeightsNotFoundError, match=r"missing keys \(312\).*unexpected keys \(312\): id_adapter"):
        load_pulid_flux_weights(fresh, meta_state_dict(read_layout("pulid_v1_1_keys.txt")))


def test_weights_load_into_modules_built_on_meta(transformer, modules):
    # the real modules are built on meta; loading must put the checkpoint's tensors in place
    with torch.device("meta"):
        empty = PuLIDFluxModules.for_transformer(transformer, tiny_idformer_config(24), dim_head=8, heads=2)
    loaded = load_pulid_flux_weights(empty, modules.state_dict())
    for (name, ours), theirs in zip(loaded.state_dict().items(), modules.state_dict().values()):
        assert ours.device.type == "cpu" and torch.equal(ours, theirs), name


def test_ca_module_is_per_head_attention_written_out(modules):
    # the original's CA: LN on both inputs, q from the image tokens, k|v from the identity
    # tokens, head h on features h·d…(h+1)·d, softmax(q·kᵀ/√d)·v, heads concatenated, to_out
    ca = modules.pulid_ca[0]
    g = torch.Generator().manual_seed(3)
    id_tokens, image_tokens = torch.randn(2, 5, 24, generator=g), torch.randn(2, 7, ca.to_q.in_features, generator=g)
    q = ca.to_q(ca.norm2(image_tokens))
    k, v = ca.to_kv(ca.norm1(id_tokens)).chunk(2, dim=-1)
    d = ca.dim_head
    heads = []
    for h in range(ca.heads):
        part = slice(h * d, (h + 1) * d)
        heads.append(torch.softmax(q[..., part] @ k[..., part].transpose(-2, -1) / math.sqrt(d), dim=-1) @ v[..., part])
    with torch.no_grad():
        torch.testing.assert_close(ca(id_tokens, image_tokens), ca.to_out(torch.cat(heads, dim=-1)))


def test_injection_step_is_the_start_step_clamped_to_the_last_step(flux_backend, flux_conditions):
    start = flux_backend.start_step
    flux_backend.start_step = 10
    try:
        assert flux_backend.identity_conditions(None, [], flux_conditions.fd, 4)[1] == 3
        assert flux_backend.identity_conditions(None, [], flux_conditions.fd, 20)[1] == 10
    finally:
        flux_backend.start_step = start


def test_hooked_transformer_equals_the_original_loop_per_row(transformer, modules, inputs):
    g = torch.Generator().manual_seed(3)
    id_tokens = torch.randn(1, 4, 24, generator=g)
    rows = IdentityRows()
    with torch.no_grad():
        plain = transformer(**inputs, return_dict=False)[0]
        with install_flux_identity(transformer, modules, rows, id_weight=ID_WEIGHT):
            closed = transformer(**inputs, return_dict=False)[0]
            with rows.use({1: id_tokens[0]}):
                gated = transformer(**inputs, return_dict=False)[0]
        after = transformer(**inputs, return_dict=False)[0]
        row1 = {k: (v[1:] if k not in ("img_ids", "txt_ids") else v) for k, v in inputs.items()}
        expected = original_forward(transformer, modules.pulid_ca, id_tokens, ID_WEIGHT, row1)
        expected_plain = original_forward(transformer, modules.pulid_ca, None, ID_WEIGHT, row1)
    assert torch.equal(closed, plain) and torch.equal(after, plain)  # no rows named / hooks removed
    assert torch.equal(gated[0], plain[0])  # FD row: the base transformer, bit for bit
    torch.testing.assert_close(gated[1:], expected, rtol=1e-5, atol=1e-5)  # PD row: the original
    torch.testing.assert_close(plain[1:], expected_plain, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(gated[1:], plain[1:], atol=1e-4)


def test_hooks_refuse_modules_built_for_other_block_counts(transformer):
    with torch.device("meta"):
        full = PuLIDFluxModules()
    with pytest.raises(ValueError, match="20 insertion points, the transformer has 4"):
        with install_flux_identity(transformer, full, IdentityRows()):
            pass
    assert not any(block._forward_hooks for block in transformer.transformer_blocks)


# --- the pulid-flux backend on the FLUX engine ---------------------------------------------------
FLUX_SIZE, FLUX_LATENT, FLUX_STEPS = (64, 64), (32, 32), 4


@pytest.fixture(scope="module")
def flux_backend(tiny_flux):
    from freecure.backends.pulid.flux import PuLIDFluxBackend

    backend = PuLIDFluxBackend.build_tiny(id_weight=ID_WEIGHT, pipeline=tiny_flux, seed=4, start_step=1)
    backend.guidance_scale = 3.5
    return backend


@pytest.fixture(scope="module")
def flux_conditions(flux_backend):
    from freecure.core.attributes import parse_prompt

    parsed = parse_prompt("a man with black curly hair, laughing happily", "man", tokenizer=flux_backend.tokenizer)
    return flux_backend.conditions(parsed, [], FLUX_STEPS)


def flux_scheduler(pipe):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from freecure.families.flux import FLUX

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    FLUX.set_timesteps(scheduler, FLUX_STEPS, "cpu", FLUX_LATENT)
    return scheduler


def flux_noise(pipe, seed=0):
    from freecure.families.flux import FLUX

    return FLUX.initial_latents(pipe, None, FLUX_LATENT, torch.Generator().manual_seed(seed), "cpu", torch.float32)


def test_backend_pd_row_is_the_original_forward_and_fd_row_plain_flux(flux_backend, flux_conditions):
    from freecure.core.conditioning import FD, PD

    backend, c = flux_backend, flux_conditions
    assert c.inject_step == 1 and c.pd.id_tokens.shape == (4, 24)
    t = flux_scheduler(backend.pipeline).timesteps[1]
    z = torch.cat([flux_noise(backend.pipeline, 1), flux_noise(backend.pipeline, 2)])
    rows, keys = [c.fd, c.pd], (FD, PD)
    with torch.no_grad():
        eps = backend.predict_noise(z, t, rows, keys, 1, FLUX_SIZE)
        plain = backend.family.predict(backend, z, t, rows, FLUX_SIZE)
        inputs = backend.family.model_inputs(backend, z, t, rows, FLUX_SIZE)
        row1 = {k: (v[1:] if k not in ("img_ids", "txt_ids") else v) for k, v in inputs.items() if k != "return_dict"}
        expected = original_forward(
            backend.denoiser, backend.modules.pulid_ca, c.pd.id_tokens[None], ID_WEIGHT, row1
        )
    assert torch.equal(eps[0], plain[0])  # FD: plain FLUX, bit for bit
    torch.testing.assert_close(eps[1:], expected, rtol=1e-5, atol=1e-5)  # PD: the original's forward
    assert not torch.allclose(eps[1], plain[1], atol=1e-4)
    assert not any(b._forward_hooks for b in backend.denoiser.transformer_blocks)  # hooks removed


def test_flux_rofa_endpoints_and_start_step(flux_backend, flux_conditions):
    from freecure.core.conditioning import PD
    from freecure.core.guidance import FD_LANE, PD_LANE, Guidance
    from freecure.families.flux import FLUX
    from freecure.stages.rofa import rofa_pass
    from freecure.stages.sampling import plain_pass, same_pass

    backend, c = flux_backend, flux_conditions
    guidance = Guidance(scale=1.0)
    same = same_pass(backend, flux_scheduler(backend.pipeline), flux_noise(backend.pipeline), c, guidance, FLUX_SIZE)
    # before start_step PD has no identity: both lanes identical at the injection step
    assert torch.equal(same.injection_latents[FD_LANE], same.injection_latents[PD_LANE])
    ones = rofa_pass(backend, same, c, FLUX.model_mask(torch.ones(1, 1, *FLUX_LATENT), same.z0), guidance, FLUX_SIZE)
    assert torch.equal(ones, same.z0[FD_LANE : FD_LANE + 1])
    zeros = rofa_pass(backend, same, c, FLUX.model_mask(torch.zeros(1, 1, *FLUX_LATENT), same.z0), guidance, FLUX_SIZE)
    plain_pd = plain_pass(
        backend, flux_scheduler(backend.pipeline), flux_noise(backend.pipeline), c, guidance, FLUX_SIZE, lane=PD
    )
    assert torch.equal(zeros, plain_pd)  # ℳ = 0: plain PuLID-FLUX generation, bit for bit
    torch.testing.assert_close(zeros, same.z0[PD_LANE : PD_LANE + 1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(same.z0[FD_LANE], same.z0[PD_LANE])


@pytest.mark.slow
def test_generate_tiny_pulid_flux_runs_every_stage(tmp_path):
    import json

    from freecure.backends import BACKENDS, PuLIDFluxBackend
    from freecure.cli import main

    assert BACKENDS["pulid-flux"] is PuLIDFluxBackend and "non-commercial" in PuLIDFluxBackend.license
    out = tmp_path / "run"
    prompt = "a man with black curly hair, laughing happily"
    args = ["generate", "--tiny", "--backend", "pulid-flux", "--prompt", prompt, "--steps", "3",
            "--inject-step", "1", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["stages"] if s["ran"]] == ["same_pass", "masks", "rofa", "expression"]
    assert "non-commercial" in manifest["license"]


def test_tiny_from_cli_uses_a_given_face_embedding(tmp_path):
    import argparse

    from freecure.backends import PuLIDFluxBackend
    from freecure.backends.pulid.embedding import random_face_embedding, save_face_embedding

    config = tiny_idformer_config(24)
    face = random_face_embedding(config.id_dim, config.vit_dim, seed=5)
    save_face_embedding(face, tmp_path / "face.safetensors")
    args = argparse.Namespace(tiny=True, pulid_id_scale=None, face_embedding=str(tmp_path / "face.safetensors"),
                              device=torch.device("cpu"))
    backend = PuLIDFluxBackend.from_options(args)
    assert torch.equal(backend.face.id_cond, face.id_cond)
    assert all(torch.equal(a, b) for a, b in zip(backend.face.vit_hidden, face.vit_hidden))


def test_cost_counts_pulid_flux(capsys):
    import json

    from freecure.cli import main

    assert main(["cost", "--backend", "pulid-flux", "--steps", "4", "--inject-step", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["settings"]["backend"] == "pulid-flux" and result["settings"]["family"] == "flux"
    # guidance-distilled: one row per lane; before start_step PD equals FD (1 row), then 2
    assert result["engine"]["stages"]["same_pass"] == {"ran": True, "unet_calls": 4, "batch_items": 1 + 3 * 2}
    assert result["plain_pd"] == {"unet_calls": 4, "batch_items": 4}


def test_pulid_flux_without_tiny_needs_a_face_embedding_and_weights(tmp_path, capsys):
    from freecure.backends.pulid.embedding import random_face_embedding, save_face_embedding
    from freecure.cli import main

    base = ["generate", "--backend", "pulid-flux", "--prompt", "a man", "--out", str(tmp_path / "x"), "--device", "cpu"]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "--face-embedding" in err and "non-commercial" in err and "Traceback" not in err
    save_face_embedding(random_face_embedding(1280, 1024, patches=577), tmp_path / "face.safetensors")
    face, weights = str(tmp_path / "face.safetensors"), str(tmp_path / "no.safetensors")
    missing = ["--face-embedding", face, "--pulid-weights", weights]
    assert main(base + missing) == 2
    assert "PuLID weights not found" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_tiny_runs_pulid_flux(tmp_path, capsys):
    pytest.importorskip("dlib")
    pytest.importorskip("facenet_pytorch")
    from freecure.cli import main

    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt\na <S> with black curly hair, laughing\n")
    out = tmp_path / "eval"
    args = ["eval", "--tiny", "--backend", "pulid-flux", "--identities", "examples/identities", "--prompts",
            str(prompts), "--num-seeds", "1", "--steps", "3", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert "1 new, 0 already done" in capsys.readouterr().out
    assert "pulid-flux + FreeCure" in (out / "report" / "index.html").read_text()
