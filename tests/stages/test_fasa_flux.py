"""FASA on FLUX's joint attention: the processor against a written-out masked joint softmax with
rotary embeddings (double- and single-stream blocks), its end points, layer presets by name,
the pass, the pipeline, batched seeds, the cost count and the command line on FLUX backends."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from PIL import Image

from freecure.attention.capture import JointContext
from freecure.attention.fasa import (
    FasaState,
    FoundationAwareJointAttention,
    foundation_aware_joint_attention,
    joint_fasa_layers,
)
from freecure.cli import main
from freecure.core.attributes import parse_prompt
from freecure.core.errors import InputError
from freecure.core.guidance import PD_LANE, Guidance
from freecure.families.flux import FLUX, image_ids
from freecure.families.tiny import LayoutFaceParser
from freecure.pipeline import FreeCureConfig, FreeCurePipeline
from freecure.stages.fasa import fasa_pass, fresh_scheduler
from freecure.stages.sampling import same_pass
from tests.factories import token_fusion_backend

PROMPT = "a man with black curly hair, laughing happily"
TEXT, GRID = 5, (4, 4)  # 5 text tokens, a 4×4 grid of image tokens (an 8×8 latent)


# --- the processor on a small case, with FLUX's own attention modules ---------------------------
def block_attention(tiny_flux, kind: str):
    transformer = tiny_flux.transformer
    blocks = transformer.transformer_blocks if kind == "double" else transformer.single_transformer_blocks
    return blocks[0].attn


def small_case(tiny_flux, rows=3, seed=0):
    torch.manual_seed(seed)
    dim = tiny_flux.transformer.inner_dim
    image = torch.randn(rows, GRID[0] * GRID[1], dim)
    text = torch.randn(rows, TEXT, dim)
    ids = torch.cat([torch.zeros(TEXT, 3), image_ids((2 * GRID[0], 2 * GRID[1]), "cpu", torch.float32)])
    rotary = tiny_flux.transformer.pos_embed(ids)
    return image, text, rotary


def call(processor, attn, kind, image, text, rotary):
    """The layer's output for the image tokens (and text's), as the blocks call it."""
    if kind == "double":
        image_out, text_out = processor(attn, image, text, None, rotary)
        return image_out, text_out
    out = processor(attn, torch.cat([text, image], dim=1), None, None, rotary)
    return out[:, TEXT:], out[:, :TEXT]


def fasa_processor(state):
    return FoundationAwareJointAttention(FluxAttnProcessor(), state, "test", JointContext(TEXT), chunk_size=5)


def rope(x, cos, sin):
    """FLUX's rotary embedding written out: consecutive pairs (x₁, x₂) rotate to
    (x₁cos − x₂sin, x₂cos + x₁sin)."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos + rotated * sin


def explicit_joint(attn, kind, image, text, rotary, q_row, k_row, mask, weight):
    """softmax([Q K_ownᵀ/√d, Q K_fdᵀ/√d + w·M (−∞ outside M)])·[V_own; V_fd] for the image
    queries of ``q_row``, K_own = [text; image] keys of ``q_row``, K_fd = image keys of ``k_row``;
    then the block's output projection (double-stream) or none (single-stream)."""
    d = attn.head_dim
    cos, sin = (r.float() for r in rotary)

    def heads(x):
        return x.unflatten(-1, (-1, d)).transpose(0, 1)  # (heads, tokens, d)

    def keys_values(row):
        if kind == "double":
            k_text = attn.norm_added_k(heads(attn.add_k_proj(text[row])))
            k = torch.cat([k_text, attn.norm_k(heads(attn.to_k(image[row])))], 1)
            v = torch.cat([heads(attn.add_v_proj(text[row])), heads(attn.to_v(image[row]))], 1)
        else:
            joint = torch.cat([text[row], image[row]])
            k, v = attn.norm_k(heads(attn.to_k(joint))), heads(attn.to_v(joint))
        return rope(k, cos, sin), v

    q = rope(attn.norm_q(heads(attn.to_q(image[q_row]))), cos[TEXT:], sin[TEXT:])
    k_own, v_own = keys_values(q_row)
    k_fd, v_fd = keys_values(k_row)
    k_fd, v_fd = k_fd[:, TEXT:], v_fd[:, TEXT:]
    m = mask.flatten()
    bias = torch.where(m > 0, weight * m, torch.tensor(float("-inf")))
    logits = torch.cat([q @ k_own.transpose(-1, -2) / d**0.5, q @ k_fd.transpose(-1, -2) / d**0.5 + bias], dim=-1)
    out = (torch.softmax(logits, dim=-1) @ torch.cat([v_own, v_fd], dim=1)).transpose(0, 1).flatten(1)
    return attn.to_out[0](out) if kind == "double" else out


@pytest.mark.parametrize("kind", ["double", "single"])
def test_processor_equals_the_explicit_masked_joint_softmax_with_rotary(tiny_flux, kind):
    attn = block_attention(tiny_flux, kind)
    image, text, rotary = small_case(tiny_flux)
    mask = torch.zeros(GRID)
    mask[1:3, 1:4] = 1.0
    mask[0, 0] = 0.5  # a soft value raises its key by w·0.5
    state = FasaState(mask, 1.5, GRID)
    state.set_pairs(((0, 2),), batch=3)
    with torch.no_grad():
        out_image, out_text = call(fasa_processor(state), attn, kind, image, text, rotary)
        plain_image, plain_text = call(FluxAttnProcessor(), attn, kind, image, text, rotary)
        expected = explicit_joint(attn, kind, image, text, rotary, 0, 2, mask, 1.5)
        blocked = explicit_joint(attn, kind, image, text, rotary, 0, 2, torch.zeros(GRID), 1.5)
    torch.testing.assert_close(blocked, plain_image[0], rtol=1e-5, atol=1e-5)  # the explicit layer is the layer
    torch.testing.assert_close(out_image[0], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out_image[0], plain_image[0], atol=1e-3)  # FD's keys changed PD's image tokens
    assert torch.equal(out_image[1:], plain_image[1:])  # FD's and the other rows: untouched
    assert torch.equal(out_text, plain_text)  # text queries: untouched


@pytest.mark.parametrize("kind", ["double", "single"])
def test_blocked_fd_keys_reproduce_plain_joint_attention_bit_for_bit(tiny_flux, kind):
    attn = block_attention(tiny_flux, kind)
    image, text, rotary = small_case(tiny_flux, rows=4, seed=1)
    masks = torch.zeros(2, *GRID)
    masks[0, :2] = 1.0  # image 0 attends to FD's keys; image 1's are all blocked
    state = FasaState(masks, 1.5, GRID)
    state.set_pairs(((0, 2, 0), (1, 3, 1)), batch=4)
    with torch.no_grad():
        out_image, out_text = call(fasa_processor(state), attn, kind, image, text, rotary)
        plain_image, plain_text = call(FluxAttnProcessor(), attn, kind, image, text, rotary)
        expected = explicit_joint(attn, kind, image, text, rotary, 0, 2, masks[0], 1.5)
    torch.testing.assert_close(out_image[0], expected, rtol=1e-5, atol=1e-5)  # each image its own mask
    assert torch.equal(out_image[1:], plain_image[1:]) and torch.equal(out_text, plain_text)
    state.set_pairs(((0, 2, 1), (1, 3, 1)), batch=4)  # every FD key blocked
    with torch.no_grad():
        out_image, out_text = call(fasa_processor(state), attn, kind, image, text, rotary)
    assert torch.equal(out_image, plain_image) and torch.equal(out_text, plain_text)


def test_whole_transformer_keeps_fd_rows_and_a_zero_mask_keeps_everything(tiny_flux):
    transformer = tiny_flux.transformer
    backend = token_fusion_backend(tiny_flux)
    backend.guidance_scale = 3.5
    parsed = parse_prompt(PROMPT, "man", tokenizer=backend.tokenizer)
    conditions = backend.conditions(parsed, [Image.new("RGB", (32, 32))], 4)
    z = torch.randn(2, 256, 16, generator=torch.Generator().manual_seed(0))
    inputs = FLUX.model_inputs(backend, z, torch.tensor(700.0), [conditions.pd, conditions.fd], (64, 64))
    layers = joint_fasa_layers(transformer, ("transformer_blocks.*", "single_transformer_blocks.*"))
    before = dict(transformer.attn_processors)

    def run(mask):
        state = FasaState(mask, 1.5, (16, 16))
        with foundation_aware_joint_attention(transformer, state, layers):
            state.set_pairs(((0, 1),), batch=2)
            return transformer(**inputs)[0]

    with torch.no_grad():
        plain = transformer(**inputs)[0]
        zero, full = run(torch.zeros(16, 16)), run(torch.ones(16, 16))
    assert torch.equal(zero, plain)
    assert torch.equal(full[1], plain[1])  # FD's row: plain FLUX
    assert not torch.allclose(full[0], plain[0], atol=1e-4)
    assert transformer.attn_processors == before  # restored


class _NamedFlux:
    """Only the processor names of FLUX.1-dev: 19 double-stream, 38 single-stream blocks."""

    def __init__(self):
        names = [f"single_transformer_blocks.{i}.attn.processor" for i in range(38)]  # order does not matter
        names += [f"transformer_blocks.{i}.attn.processor" for i in range(19)]
        self.attn_processors = dict.fromkeys(names)


def test_flux_presets_choose_late_blocks_by_position_and_patterns_by_name(tiny_flux):
    flux = _NamedFlux()
    single = [f"single_transformer_blocks.{i}.attn.processor" for i in range(38)]
    assert joint_fasa_layers(flux, "up") == single[10:]  # the later half: 28 of 57 blocks
    assert joint_fasa_layers(flux, "late") == single[22:]  # the authors' share, 20/70 → 16 of 57
    assert len(joint_fasa_layers(flux, "double")) == 19 and joint_fasa_layers(flux, "single") == single
    assert joint_fasa_layers(flux, ("transformer_blocks.1[5-8].*",)) == [
        f"transformer_blocks.{i}.attn.processor" for i in range(15, 19)
    ]
    tiny = tiny_flux.transformer
    assert joint_fasa_layers(tiny, "up") == [f"single_transformer_blocks.{i}.attn.processor" for i in (0, 1)]
    assert joint_fasa_layers(tiny, "late") == ["single_transformer_blocks.1.attn.processor"]
    with pytest.raises(InputError, match="not defined for flux"):
        joint_fasa_layers(tiny, "authors-sdxl")
    with pytest.raises(InputError, match="no joint-attention block"):
        joint_fasa_layers(tiny, ("up_blocks.*",))


# --- the pass and the pipeline on the tiny FLUX ------------------------------------------------------
@pytest.fixture(scope="module")
def flux_run(tiny_flux):
    backend = token_fusion_backend(tiny_flux)
    backend.guidance_scale = 3.5
    parsed = parse_prompt(PROMPT, "man", tokenizer=backend.tokenizer)
    conditions = replace(backend.conditions(parsed, [Image.new("RGB", (32, 32))], 5), inject_step=2)
    scheduler = tiny_flux.scheduler.from_config(tiny_flux.scheduler.config)
    FLUX.set_timesteps(scheduler, 5, "cpu", (32, 32))
    z_T = FLUX.initial_latents(tiny_flux, scheduler, (32, 32), torch.Generator().manual_seed(0), "cpu", torch.float32)
    same = same_pass(backend, scheduler, z_T, conditions, Guidance(scale=1.0), (64, 64))
    layers = joint_fasa_layers(backend.denoiser, "up")

    def run(mask, weight=1.5, install=True):
        state = FasaState(mask, weight, (16, 16))
        fresh = fresh_scheduler(scheduler, "cpu", FLUX, (32, 32))
        if not install:  # the same rows and steps, FLUX's own processors
            return fasa_pass(backend, fresh, same, conditions, state, Guidance(scale=1.0), (64, 64))
        with foundation_aware_joint_attention(backend.denoiser, state, layers):
            return fasa_pass(backend, fresh, same, conditions, state, Guidance(scale=1.0), (64, 64))

    return same, run


def test_all_zero_mask_reproduces_flux_pd_and_a_mask_changes_it(flux_run):
    same, run = flux_run
    pd = same.z0[PD_LANE : PD_LANE + 1]
    zero_mask = run(torch.zeros(16, 16))
    assert torch.equal(zero_mask, run(None, install=False))  # bit for bit: the processors change nothing
    # against the SAME pass's PD: the same maths on other batches ([FD] then [FD, PD] there,
    # [PD, FD] here), which CPU matrix kernels may round differently
    zero = (zero_mask - pd).abs().max()
    print("FLUX zero-mask deviation from the SAME pass's PD", float(zero))
    assert zero <= 1e-5
    full = (run(torch.ones(16, 16), weight=3.0) - pd).abs().max()
    assert full > 20 * max(float(zero), 1e-6)


def flux_freecure(tiny_flux, **fasa):
    from freecure.stages.fasa import FasaConfig

    backend = token_fusion_backend(tiny_flux)
    fc = FreeCurePipeline(backend, LayoutFaceParser(), FreeCureConfig(method="fasa", fasa=FasaConfig(**fasa)))
    fc.set_progress_bar_config(disable=True)
    return fc


def test_pipeline_method_fasa_on_flux_stages_work_and_mask_on_the_token_grid(tiny_flux):
    out = flux_freecure(tiny_flux)(
        PROMPT, [Image.new("RGB", (32, 32))], class_word="man", num_inference_steps=4, guidance_scale=3.5,
        generator=torch.Generator().manual_seed(0),
    )
    ran = [(s.name, s.ran) for s in out.stages]
    assert ran == [("same_pass", True), ("masks", True), ("fasa", True), ("expression", False)]
    # guidance-distilled: PD's row and FD's (replayed lane, keys lent) per step
    assert out.stage("fasa").unet_calls == 4 and out.stage("fasa").batch_items == 2 * 4
    assert out.fasa_mask.shape == (16, 16) and set(out.fasa_mask.unique().tolist()) <= {0.0, 1.0}
    assert out.settings["family"] == "flux" and out.settings["fasa"]["layers"] == "up"
    assert not torch.equal(out.latents["freecure"], out.latents["pd"])


def test_flux_batched_seeds_equal_their_single_seed_runs(tiny_flux):
    fc = flux_freecure(tiny_flux, mask_source="same")

    def run(seeds):
        out = fc(
            PROMPT, [Image.new("RGB", (32, 32))], class_word="man", num_inference_steps=3, guidance_scale=3.5,
            num_images_per_prompt=len(seeds), generator=[torch.Generator().manual_seed(s) for s in seeds],
        )
        return out if isinstance(out, list) else [out]

    batch = run((0, 1))
    for seed, batched in zip((0, 1), batch):
        alone = run((seed,))[0]
        assert alone.stage("fasa").ran and batched.fasa_mask is not None
        torch.testing.assert_close(batched.fasa_mask, alone.fasa_mask)
        torch.testing.assert_close(batched.latents["freecure"], alone.latents["freecure"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batch[0].latents["freecure"], batch[1].latents["freecure"])


def test_cost_counts_flux_fasa(tiny_flux):
    from freecure.cost import count_fasa_costs

    backend = token_fusion_backend(tiny_flux)
    fc = FreeCurePipeline(backend, LayoutFaceParser(), FreeCureConfig())
    steps, inject = 4, 1
    result = count_fasa_costs(fc, num_inference_steps=steps, inject_step=inject)
    # theirs on FLUX's rows: two whole generations of [PD, FD]
    assert result["literal_fasa"] == {"unet_calls": 2 * steps, "batch_items": 4 * steps}
    engine = result["engine_fasa"]["stages"]
    assert engine["same_pass"]["batch_items"] == inject + 2 * (steps - inject)
    assert engine["fasa"] == {"ran": True, "unet_calls": steps, "batch_items": 2 * steps}


# --- the command line on FLUX backends ---------------------------------------------------------------
@pytest.mark.parametrize(
    "backend", [["--tiny-family", "flux"], ["--backend", "infiniteyou"], ["--backend", "pulid-flux"]]
)
def test_generate_tiny_flux_backends_method_fasa(tmp_path, astronaut, backend):
    astronaut.resize((64, 64)).save(tmp_path / "ref.png")
    out = tmp_path / "run"
    args = ["generate", "--tiny", *backend, "--method", "fasa", "--fasa-layers", "late", "--prompt", PROMPT]
    code = main([*args, "--ref", str(tmp_path / "ref.png"), "--steps", "2", "--out", str(out), "--no-progress"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["family"] == "flux" and manifest["settings"]["fasa"]["layers"] == "late"
    assert [s["name"] for s in manifest["stages"] if s["ran"]] == ["same_pass", "masks", "fasa"]
    assert (out / "freecure.png").is_file() and (out / "fasa_mask_overlay.png").is_file()


def test_generate_refuses_a_unet_preset_on_flux(tmp_path, capsys, grey_image):
    grey_image.save(tmp_path / "ref.png")
    args = ["generate", "--tiny", "--tiny-family", "flux", "--method", "fasa", "--fasa-layers", "authors-sdxl"]
    code = main([*args, "--prompt", PROMPT, "--ref", str(tmp_path / "ref.png"), "--out", str(tmp_path / "x")])
    assert code == 2 and "not defined for flux" in capsys.readouterr().err


def test_cost_command_flux_fasa(capsys):
    assert main(["cost", "--family", "flux", "--method", "fasa", "--steps", "3", "--inject-step", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["literal_fasa"]["batch_items"] == 4 * 3 and result["engine_fasa"]["stages"]["fasa"]["ran"]


@pytest.mark.slow
def test_eval_tiny_method_fasa_on_a_flux_backend(tmp_path):
    pytest.importorskip("dlib")
    pytest.importorskip("facenet_pytorch")
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt\na <S> with black curly hair\n")
    out = tmp_path / "eval"
    args = ["eval", "--tiny", "--backend", "pulid-flux", "--method", "fasa", "--identities", "examples/identities"]
    assert main([*args, "--prompts", str(prompts), "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    from freecure.evaluation.store import read_jsonl, shard_paths

    rows = [row for path in shard_paths(out) for row in read_jsonl(path)]
    assert rows and {(row["backend"], row["method"]) for row in rows} == {("pulid-flux", "fasa")}
    labels = {e["label"] for e in json.loads((out / "report" / "table1.json").read_text())}
    assert "pulid-flux + FreeCure (FASA)" in labels



def test_fasa_uncond_without_an_unconditional_row_is_refused(tiny_flux):
    fc = flux_freecure(tiny_flux, uncond=True)
    with pytest.raises(InputError, match="has none"):
        fc(PROMPT, [Image.new("RGB", (32, 32))], class_word="man", num_inference_steps=2)


def test_true_cfg_rows_and_fasa_uncond_on_flux(tiny_flux):
    """Under true CFG a lane is [negative, cond]; --fasa-uncond adds FD's negative row, whose
    keys PD's negative row attends to."""
    out = flux_freecure(tiny_flux, uncond=True)(
        PROMPT, [Image.new("RGB", (32, 32))], class_word="man", num_inference_steps=3, true_cfg_scale=2.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.stage("fasa").ran and out.stage("fasa").batch_items == 4 * 3
    assert out.settings["fasa"]["uncond"] is True
