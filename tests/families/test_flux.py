"""The FreeCure engine on a tiny FLUX pipeline: packing, joint pass, ROFA, flow inversion,
joint-attention capture, and the whole pipeline with the token-fusion backend."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

from freecure.attention.capture import (
    AttentionStore,
    JointAttentionCapture,
    capture_joint_attention,
    double_stream_attention_layers,
)
from freecure.core.attributes import parse_prompt
from freecure.core.conditioning import FD, PD, TextConditioning
from freecure.core.configs import FLUX_SCHEDULER
from freecure.core.errors import InputError
from freecure.core.guidance import FD_LANE, PD_LANE, Guidance
from freecure.families.flux import FLUX, FlowEulerInverseScheduler, pack_latents, unpack_latents
from freecure.stages.expression import ddim_denoise_from, ddim_invert, expression_restore, reconstruction_error
from freecure.stages.rofa import rofa_pass
from freecure.stages.sampling import plain_pass, same_layout, same_pass
from tests.factories import token_fusion_backend, token_fusion_freecure

PROMPT = "a man with black curly hair, laughing happily"
SIZE = (64, 64)  # pixels → a 32×32 latent → 16×16 = 256 image tokens
LATENT = (32, 32)
STEPS = 6


@pytest.fixture(scope="module")
def backend(tiny_flux):
    backend = token_fusion_backend(tiny_flux)
    backend.guidance_scale = 3.5
    return backend


def make_conditions(backend, steps=STEPS, inject=2, prompt=PROMPT, negative_prompt=None):
    parsed = parse_prompt(prompt, "man", tokenizer=backend.tokenizer)
    reference = Image.new("RGB", (32, 32), (90, 60, 40))
    conditions = backend.conditions(parsed, [reference], steps, negative_prompt)
    return parsed, replace(conditions, inject_step=inject)


def fresh_scheduler(pipe, steps=STEPS):
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    FLUX.set_timesteps(scheduler, steps, "cpu", LATENT)
    return scheduler


def noise(pipe, seed=0):
    return FLUX.initial_latents(pipe, None, LATENT, torch.Generator().manual_seed(seed), "cpu", torch.float32)


# --- packing: the layout ℳ and the latents share -------------------------------------------------
def test_pack_matches_diffusers_and_round_trips(tiny_flux):
    z = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(z)
    assert torch.equal(packed, tiny_flux._pack_latents(z, 1, 4, 8, 12))
    assert torch.equal(unpack_latents(packed, (8, 12)), z)
    assert torch.equal(unpack_latents(packed, (8, 12)), tiny_flux._unpack_latents(packed, 16, 24, 2))


def test_mask_is_packed_exactly_as_the_latents():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 8, 8, generator=g)
    mask = torch.rand(1, 1, 8, 8, generator=g)
    packed_mask = FLUX.model_mask(mask, pack_latents(z))
    assert packed_mask.shape == (1, 16, 16)  # (h/2·w/2 tokens, 4 channels × 2×2)
    # masking then packing equals packing then masking, value for value
    assert torch.equal(pack_latents(mask * z), packed_mask * pack_latents(z))


def test_schedule_is_fluxs_with_dynamic_shifting(tiny_flux):
    scheduler = fresh_scheduler(tiny_flux, 28)
    reference = FlowMatchEulerDiscreteScheduler.from_config(tiny_flux.scheduler.config)
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(256, 256, 4096, 0.5, 1.15)
    reference.set_timesteps(sigmas=np.linspace(1.0, 1 / 28, 28), mu=mu)
    assert scheduler.config.use_dynamic_shifting
    assert torch.equal(scheduler.timesteps, reference.timesteps)
    assert torch.equal(scheduler.sigmas, reference.sigmas)


# --- rows and lanes ----------------------------------------------------------------------------
def test_guidance_distilled_lanes_take_one_row(backend):
    _, conditions = make_conditions(backend, inject=3)
    assert same_layout(2, conditions, guided=False).keys == ("fd",)
    assert same_layout(3, conditions, guided=False).keys == ("fd", "pd")
    assert FLUX.loop_guidance(3.5).cfg is False
    assert FLUX.loop_guidance(3.5, true_cfg_scale=4.0).cfg is True
    with pytest.raises(InputError, match="true_cfg_scale"):
        FLUX.loop_guidance(3.5, true_cfg_scale=0.5)


def test_fd_lane_equals_diffusers_flux_pipeline(backend, tiny_flux):
    """FD of the engine is plain FLUX: diffusers' own FluxPipeline loop with FD's embeddings."""
    _, conditions = make_conditions(backend)
    z_T = noise(tiny_flux)
    ours = plain_pass(backend, fresh_scheduler(tiny_flux), z_T, conditions, Guidance(scale=1.0), SIZE, lane=FD)
    theirs = tiny_flux(
        prompt_embeds=conditions.fd.prompt_embeds,
        pooled_prompt_embeds=conditions.fd.pooled_prompt_embeds,
        latents=z_T,
        num_inference_steps=STEPS,
        guidance_scale=3.5,
        height=SIZE[0],
        width=SIZE[1],
        output_type="latent",
    ).images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.fixture(scope="module")
def same_run(backend, tiny_flux):
    _, conditions = make_conditions(backend)
    same = same_pass(backend, fresh_scheduler(tiny_flux), noise(tiny_flux), conditions, Guidance(scale=1.0), SIZE)
    return conditions, same


def test_joint_pass_equals_separate_generations(backend, tiny_flux, same_run):
    conditions, same = same_run
    for lane, key in ((FD_LANE, FD), (PD_LANE, PD)):
        alone = plain_pass(
            backend, fresh_scheduler(tiny_flux), noise(tiny_flux), conditions, Guidance(scale=1.0), SIZE, lane=key
        )
        torch.testing.assert_close(same.z0[lane : lane + 1], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(same.z0[FD_LANE], same.z0[PD_LANE])


def test_true_cfg_takes_two_rows_per_lane_and_matches_separate_runs(backend, tiny_flux):
    _, conditions = make_conditions(backend, negative_prompt="blurry")
    guidance = FLUX.loop_guidance(3.5, true_cfg_scale=2.0)
    assert same_layout(STEPS - 1, conditions, guided=guidance.cfg).keys == ("uncond", "fd", "pd_uncond", "pd")
    same = same_pass(backend, fresh_scheduler(tiny_flux), noise(tiny_flux), conditions, guidance, SIZE)
    alone = plain_pass(backend, fresh_scheduler(tiny_flux), noise(tiny_flux), conditions, guidance, SIZE, lane=PD)
    torch.testing.assert_close(same.z0[PD_LANE : PD_LANE + 1], alone, rtol=1e-5, atol=1e-5)
    # diffusers' true CFG on FD's lane
    theirs = tiny_flux(
        prompt_embeds=conditions.fd.prompt_embeds,
        pooled_prompt_embeds=conditions.fd.pooled_prompt_embeds,
        negative_prompt_embeds=conditions.uncond.prompt_embeds,
        negative_pooled_prompt_embeds=conditions.uncond.pooled_prompt_embeds,
        true_cfg_scale=2.0,
        latents=noise(tiny_flux),
        num_inference_steps=STEPS,
        guidance_scale=3.5,
        height=SIZE[0],
        width=SIZE[1],
        output_type="latent",
    ).images
    torch.testing.assert_close(same.z0[FD_LANE : FD_LANE + 1], theirs, rtol=1e-5, atol=1e-5)


# --- ROFA on velocities -------------------------------------------------------------------------------
def test_rofa_unit_mask_reproduces_fd_bit_for_bit(backend, same_run):
    conditions, same = same_run
    mask = FLUX.model_mask(torch.ones(1, 1, *LATENT), same.z0)
    z = rofa_pass(backend, same, conditions, mask, Guidance(scale=1.0), SIZE)
    assert torch.equal(z, same.z0[FD_LANE : FD_LANE + 1])


def test_rofa_zero_mask_reproduces_pd_bit_for_bit(backend, tiny_flux, same_run):
    """ℳ = 0 gives plain PD generation exactly (both run PD's rows one per call from the same
    injection-step state); against the joint pass's PD lane, computed in a 2-row batch, it
    agrees to float rounding (CPU kernels are not batch-invariant: 1-row GEMV vs GEMM)."""
    conditions, same = same_run
    mask = FLUX.model_mask(torch.zeros(1, 1, *LATENT), same.z0)
    z = rofa_pass(backend, same, conditions, mask, Guidance(scale=1.0), SIZE)
    plain_pd = plain_pass(
        backend, fresh_scheduler(tiny_flux), noise(tiny_flux), conditions, Guidance(scale=1.0), SIZE, lane=PD
    )
    assert torch.equal(z, plain_pd)
    torch.testing.assert_close(z, same.z0[PD_LANE : PD_LANE + 1], rtol=1e-5, atol=1e-5)


def test_rofa_half_mask_is_local_on_the_latent_grid(backend, same_run):
    conditions, same = same_run
    mask = torch.zeros(1, 1, *LATENT)
    mask[..., :, :16] = 1.0  # left half follows FD
    z = rofa_pass(backend, same, conditions, FLUX.model_mask(mask, same.z0), Guidance(scale=1.0), SIZE)
    z, fd, pd = (unpack_latents(x, LATENT)[0] for x in (z, same.z0[:1], same.z0[1:]))
    assert (z - fd)[..., :12].abs().mean() < (pd - fd)[..., :12].abs().mean()
    assert (z - pd)[..., 20:].abs().mean() < (pd - fd)[..., 20:].abs().mean()


# --- flow inversion --------------------------------------------------------------------------------
class ConstantVelocityBackend:
    """v(z, σ, c) = a fixed field depending on the conditioning only: Euler integration of such
    a field is exact, so inversion then integration with one prompt must reconstruct z_0."""

    family = FLUX

    def __init__(self):
        self.calls = []

    def predict_noise(self, latents, timestep, rows, row_keys, step_index, image_size):
        self.calls.append((float(timestep), tuple(row_keys)))
        fields = []
        for row in rows:
            seed = int(row.prompt_embeds.sum().item() * 1000) % 10_000
            fields.append(torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(seed)))
        return torch.stack(fields).to(latents)


def conditioning(value: float) -> TextConditioning:
    return TextConditioning(torch.full((1, 4, 8), value), torch.zeros(1, 8))


@pytest.mark.parametrize("gamma", [0.25, 0.5, 1.0])
def test_flow_inversion_then_integration_is_exact_on_a_constant_field(gamma):
    config = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER).config
    backend = ConstantVelocityBackend()
    z0 = torch.randn(1, 64, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    error = reconstruction_error(backend, z0, conditioning(0.1), conditioning(0.0), config, 20, gamma, 1.0, SIZE)
    assert error < 1e-6
    assert len(backend.calls) == 2 * round(gamma * 20)


def test_flow_inversion_walks_the_same_sigmas_back():
    config = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER).config
    backend = ConstantVelocityBackend()
    z0 = torch.zeros(1, 64, 16)
    ddim_invert(backend, z0, conditioning(0.1), conditioning(0.0), config, 10, 0.5, 1.0, SIZE)
    up = [t for t, _ in backend.calls]
    backend.calls.clear()
    ddim_denoise_from(backend, z0, conditioning(0.1), conditioning(0.0), config, 10, 0.5, 1.0, SIZE)
    down = [t for t, _ in backend.calls]
    assert up == down[::-1] and len(up) == 5
    inverse, forward = FLUX.inversion_schedulers(config, 10, "cpu", z0)
    assert isinstance(inverse, FlowEulerInverseScheduler)
    assert torch.equal(inverse.sigmas, forward.sigmas.flip(0)) and float(inverse.sigmas[0]) == 0.0


def test_flow_inversion_with_another_prompt_does_not_reconstruct():
    config = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER).config
    z0 = torch.randn(1, 64, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = expression_restore(
        ConstantVelocityBackend(),
        z0,
        conditioning(0.1),
        conditioning(0.3),
        conditioning(0.0),
        config,
        20,
        0.5,
        1.0,
        SIZE,
    )
    assert (out - z0).norm() / z0.norm() > 1e-2


def test_flow_inversion_on_the_tiny_transformer_is_finite(backend, tiny_flux, same_run):
    """Reported, not asserted small: a random transformer is not a smooth velocity field."""
    conditions, same = same_run
    error = reconstruction_error(
        backend, same.z0[:1], conditions.template, conditions.uncond, tiny_flux.scheduler.config, STEPS, 0.5, 1.0, SIZE
    )
    assert 0.0 <= error < float("inf")


# --- joint attention capture --------------------------------------------------------------------------
class ExplicitJointAttention:
    """An independent FLUX attention processor with an explicit softmax: it computes the layer's
    output from the probabilities it records (no SDPA), for the one row being checked."""

    def __init__(self, name, recorded, columns, row):
        self.name, self.recorded, self.columns, self.row = name, recorded, columns, row

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        def heads(x):
            return x.unflatten(-1, (attn.heads, -1))

        query, key, value = (heads(project(hidden_states)) for project in (attn.to_q, attn.to_k, attn.to_v))
        query, key = attn.norm_q(query), attn.norm_k(key)
        text_tokens = 0
        if encoder_hidden_states is not None:
            text_tokens = encoder_hidden_states.shape[1]
            eq = attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states)))
            ek = attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states)))
            ev = heads(attn.add_v_proj(encoder_hidden_states))
            query, key, value = torch.cat([eq, query], 1), torch.cat([ek, key], 1), torch.cat([ev, value], 1)
        else:
            text_tokens = self.text_tokens
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1).transpose(1, 2)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1).transpose(1, 2)
        probs = torch.softmax(query @ key.transpose(-1, -2) / attn.head_dim**0.5, dim=-1)  # (B, H, Q, K)
        out = (probs @ value.transpose(1, 2)).transpose(1, 2).flatten(2)
        self.recorded[self.name] = probs[self.row, :, text_tokens:, self.columns].mean(0)
        if encoder_hidden_states is not None:
            context, out = out[:, :text_tokens], out[:, text_tokens:]
            return attn.to_out[1](attn.to_out[0](out)), attn.to_add_out(context)
        return out


def call_transformer(backend, conditions, z):
    rows = [conditions.uncond, conditions.fd]
    inputs = FLUX.model_inputs(backend, z.expand(2, -1, -1), torch.tensor(700.0), rows, SIZE)
    return backend.denoiser(**inputs)[0]


@pytest.mark.parametrize("which", ["double", "single"])
def test_captured_joint_maps_equal_explicit_probabilities(backend, tiny_flux, which):
    _, conditions = make_conditions(backend)
    transformer = tiny_flux.transformer
    prefix = "transformer_blocks." if which == "double" else "single_transformer_blocks."
    names = [n for n in transformer.attn_processors if n.startswith(prefix)]
    columns = [3, 4, 5]
    recorded: dict[str, torch.Tensor] = {}
    original = dict(transformer.attn_processors)
    text_tokens = conditions.fd.prompt_embeds.shape[1]
    explicit = {}
    for name in names:
        explicit[name] = ExplicitJointAttention(name, recorded, columns, row=1)
        explicit[name].text_tokens = text_tokens
    z = noise(tiny_flux)
    reference = call_transformer(backend, conditions, z)
    transformer.set_attn_processor({**original, **explicit})
    try:
        with_explicit = call_transformer(backend, conditions, z)
    finally:
        transformer.set_attn_processor(original)
    torch.testing.assert_close(with_explicit, reference, rtol=1e-4, atol=1e-5)  # the explicit layer is the layer
    store = AttentionStore(tuple(columns), LATENT)
    with capture_joint_attention(transformer, store, names, chunk_size=100):  # chunks not dividing 256
        store.set_context(0, 1)
        captured = call_transformer(backend, conditions, z)
    assert torch.equal(captured, reference)  # capture leaves the output untouched
    assert set(store.sums) == set(names)
    for name in names:
        assert store.sums[name].shape == (256, 3)
        torch.testing.assert_close(store.sums[name], recorded[name], rtol=1e-5, atol=1e-6)
    assert store.aggregate().shape == (3, *LATENT)


def test_capture_installs_only_on_chosen_blocks_and_restores(tiny_flux):
    transformer = tiny_flux.transformer
    before = dict(transformer.attn_processors)
    layers = double_stream_attention_layers(transformer)
    assert layers == ["transformer_blocks.0.attn.processor", "transformer_blocks.1.attn.processor"]
    store = AttentionStore((1,), LATENT)
    with pytest.raises(RuntimeError, match="boom"), capture_joint_attention(transformer, store):
        for name, processor in transformer.attn_processors.items():
            if name in layers:
                assert isinstance(processor, JointAttentionCapture) and processor.inner is before[name]
            else:
                assert processor is before[name]
        raise RuntimeError("boom")
    assert transformer.attn_processors == before
    with pytest.raises(ValueError, match="no such FLUX attention"):
        with capture_joint_attention(transformer, store, ["up_blocks.0.attn2.processor"]):
            pass


# --- the whole pipeline -------------------------------------------------------------------------------
def freecure(pipe, **config):
    return token_fusion_freecure(pipe, 32, **config)


def test_flux_end_to_end_runs_every_stage(tiny_flux):
    out = freecure(tiny_flux)(
        PROMPT,
        [Image.new("RGB", (32, 32), (90, 60, 40))],
        class_word="man",
        num_inference_steps=5,
        guidance_scale=3.5,
        generator=torch.Generator().manual_seed(0),
    )
    assert [s.name for s in out.stages] == ["same_pass", "masks", "rofa", "expression"]
    assert all(s.ran for s in out.stages)
    assert all(image.size == SIZE for image in out.images.values())
    assert out.latent_mask.shape == (1, 1, *LATENT) and out.attention_maps["black curly hair"].shape == LATENT
    inject = out.settings["inject_step"]
    assert out.settings["family"] == "flux"
    # guidance-distilled: one row per lane, 1 row before injection (shared lane), 2 after
    assert out.stage("same_pass").unet_calls == 5
    assert out.stage("same_pass").batch_items == inject + 2 * (5 - inject)
    assert out.stage("rofa").batch_items == 5 - inject
    assert out.stage("expression").batch_items == 2 * round(0.5 * 5)
    with pytest.raises(InputError, match="multiples of 4"):
        freecure(tiny_flux)(PROMPT, [], class_word="man", num_inference_steps=3, height=62)


def test_freecure_runs_unchanged_under_offload_hooks(tiny_flux):
    """Sequential offload (weights on the meta device, loaded per submodule call by accelerate
    hooks) of the transformer and the VAE: same latents and attention maps as without hooks."""
    import copy

    from accelerate import cpu_offload

    pipe = copy.deepcopy(tiny_flux)  # hooks stay on the copy

    def run():
        reference = Image.new("RGB", (32, 32))
        generator = torch.Generator().manual_seed(0)
        return freecure(pipe)(PROMPT, [reference], class_word="man", num_inference_steps=3, generator=generator)

    plain = run()
    cpu_offload(pipe.transformer, execution_device=torch.device("cpu"))
    cpu_offload(pipe.vae, execution_device=torch.device("cpu"))
    assert pipe.transformer.x_embedder.weight.device.type == "meta"
    hooked = run()
    assert all(torch.equal(plain.latents[k], hooked.latents[k]) for k in plain.latents)
    assert all(torch.equal(v, hooked.attention_maps[k]) for k, v in plain.attention_maps.items())
    assert hooked.stage("same_pass").unet_calls == 3


def test_identity_embedding_file_for_token_fusion(tmp_path):
    from safetensors.torch import save_file

    from freecure.backends.token_fusion.backend import load_identity_embedding

    save_file({"identity": torch.ones(2, 32)}, str(tmp_path / "id.safetensors"))
    assert load_identity_embedding(tmp_path / "id.safetensors").shape == (2, 32)
    (tmp_path / "bad.safetensors").write_text("not safetensors")
    from freecure.core.errors import FreeCureError

    with pytest.raises(FreeCureError, match="cannot read"):
        load_identity_embedding(tmp_path / "bad.safetensors")
