"""`freecure analyze` on FLUX: T5 token alignment, joint-attention token maps by block group
(double, single), eq. 3 on the joint softmax, grids, and both commands end to end on the tiny
FLUX pipeline (token fusion, whose identity is a T5 token, and the InfiniteYou adapter)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from freecure.analysis import (
    GridLayout,
    InterpolationState,
    JointIdentityInterpolation,
    align_tokens,
    attention_study,
    cross_attention_groups,
    interpolate_identity,
    joint_projection,
    joint_text_maps,
    prepare,
)
from freecure.analysis.studies import _joint_run
from freecure.attention.capture import JointContext
from freecure.backends import RandomProjectionIdentityEncoder, TokenFusionBackend
from freecure.cli import main
from freecure.core.attributes import parse_prompt
from freecure.core.errors import InputError
from freecure.core.guidance import FD_LANE, PD_LANE
from freecure.families.flux import image_ids
from freecure.families.tiny import LayoutFaceParser
from freecure.pipeline import FreeCurePipeline
from tests.factories import token_fusion_freecure

PROMPT = "a man with black curly hair, laughing happily"
LATENT = (32, 32)  # 64 px → 16×16 = 256 image tokens, maps on the 32×32 latent grid


@pytest.fixture(scope="module")
def freecure(tiny_flux):
    return token_fusion_freecure(tiny_flux)


@pytest.fixture(scope="module")
def setup(freecure, astronaut):
    return prepare(freecure, PROMPT, [astronaut], class_word="man", num_inference_steps=3, seed=0, inject_step=1)


def test_t5_alignment_has_no_bos_and_the_identity_is_a_t5_token(freecure):
    backend = freecure.backend
    parsed = parse_prompt(PROMPT, "man", tokenizer=backend.tokenizer)
    alignment = align_tokens(backend, parsed)
    assert alignment.labels[:3] == ("a", "man", "with") and alignment.fd_columns[:3] == (0, 1, 2)
    assert "</s>" not in alignment.labels and len(alignment.labels) == 9
    assert alignment.identity_pairs == ((1, 1),)  # token fusion writes the identity into "man"'s T5 column


# --- Figure 3 on FLUX ----------------------------------------------------------------------------
def test_flux_maps_by_double_and_single_blocks_shapes_and_normalisation(freecure, setup):
    study = attention_study(freecure, setup)
    transformer = freecure.backend.denoiser
    groups = cross_attention_groups(transformer)
    assert list(groups) == ["double", "single"]
    assert groups["double"] == [n for n in transformer.attn_processors if n.startswith("transformer_blocks.")]
    text = setup.conditions.fd.prompt_embeds.shape[1]
    n_tokens = len(setup.alignment.labels)
    for group in groups:
        for lane in ("fd", "pd"):
            full = study.full[lane, group]
            assert full.shape == (text + 1, *LATENT)  # every T5 key, then the image keys' mass
            # the joint softmax: text keys plus the image keys' mass make 1 at every pixel
            torch.testing.assert_close(full.sum(dim=0), torch.ones(LATENT), rtol=0, atol=1e-5)
            assert study.maps[lane, group].shape == (n_tokens, *LATENT)
            assert torch.equal(study.maps[lane, group][1], full[1])  # "man" is T5 column 1
    assert not torch.allclose(study.full["pd", "double"][1], study.full["fd", "double"][1])
    entry = study.summary["groups"]["single"]
    assert entry["image_keys"]["pd"] == pytest.approx(float(study.full["pd", "single"][-1].mean()))
    assert entry["identity"]["fd"] == pytest.approx(float(study.full["fd", "single"][1].mean()))
    hair = entry["attributes"]["black curly hair"]
    assert hair["fd"] == pytest.approx(float(study.full["fd", "single"][[3, 4, 5]].sum(0).mean()), rel=1e-5)


def test_flux_steps_heads_and_groups_selection(freecure, setup):
    first = attention_study(freecure, setup, steps=[0], heads=[1], groups=["single"])
    assert list(first.full) == [("fd", "single"), ("pd", "single")]
    assert torch.equal(first.full["fd", "single"], first.full["pd", "single"])  # PD is FD before injection
    later = attention_study(freecure, setup, steps=[2], heads=[1], groups=["single"])
    assert not torch.allclose(later.full["fd", "single"], later.full["pd", "single"])
    every = attention_study(freecure, setup, steps=[2], heads=[0, 1], groups=["single"])
    assert not torch.allclose(every.full["fd", "single"], later.full["fd", "single"])
    pooled = attention_study(freecure, setup, steps=[2], groups=["all"])  # both groups' layers pooled
    assert list(pooled.full) == [("fd", "all"), ("pd", "all")]
    image_keys = pooled.summary["groups"]["all"]["image_keys"]
    assert image_keys["fd"] == pytest.approx(float(pooled.full["fd", "all"][-1].mean()))


# --- the processors against an explicit joint softmax ---------------------------------------------
def _rope(x, cos, sin):
    """Rotary embedding of (tokens, heads, d), pairs (x0, x1) rotated, written out."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos[:, None] + rotated * sin[:, None]


def _explicit(attn, states, text, cos, sin):
    """Scores (heads, T+N, T+N) and values (heads, T+N, d) of one row of FLUX's joint attention."""

    def heads(x):
        return x.unflatten(-1, (attn.heads, -1))

    if text is not None:
        q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(text))), attn.norm_q(heads(attn.to_q(states)))])
        k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(text))), attn.norm_k(heads(attn.to_k(states)))])
        v = torch.cat([heads(attn.add_v_proj(text)), heads(attn.to_v(states))])
    else:
        q, k, v = attn.norm_q(heads(attn.to_q(states))), attn.norm_k(heads(attn.to_k(states))), heads(attn.to_v(states))
    q, k = _rope(q, cos, sin).transpose(0, 1), _rope(k, cos, sin).transpose(0, 1)
    return q @ k.transpose(1, 2) / attn.head_dim**0.5, v.transpose(0, 1)


@pytest.mark.parametrize("kind", ["double", "single"])
def test_joint_processor_equals_an_explicit_joint_softmax(tiny_flux, kind):
    transformer = tiny_flux.transformer
    block = transformer.transformer_blocks[0] if kind == "double" else transformer.single_transformer_blocks[0]
    attn = block.attn
    T, latent = 5, (8, 8)  # 5 text tokens, 4×4 = 16 image tokens
    ids = torch.cat([torch.zeros(T, 3), image_ids(latent, "cpu", torch.float32)])
    cos, sin = transformer.pos_embed(ids)
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(2, 16, 32, generator=g), torch.randn(2, T, 32, generator=g)
    states, encoder = (image, text) if kind == "double" else (torch.cat([text, image], dim=1), None)
    inner = attn.processor
    context = JointContext(T)
    m, n = 1, 3
    with torch.no_grad():
        plain = inner(attn, states, encoder, None, (cos, sin))
        # the joint map of row 0: image queries' softmax on each text key, then the image keys' mass
        scores, values = _explicit(attn, states[0], None if encoder is None else encoder[0], cos, sin)
        probs = scores.softmax(-1)[:, T:].mean(0)
        expected_map = torch.cat([probs[:, :T], probs[:, T:].sum(-1, keepdim=True)], dim=-1)
        rows = [encoder[0:1] if encoder is not None else None]
        joint = joint_projection(attn, states[0:1], rows[0], (cos, sin), T)
        torch.testing.assert_close(joint_text_maps(joint, chunk_size=7), expected_map, rtol=1e-5, atol=1e-6)

        def run(alpha):
            state = InterpolationState(SimpleNamespace(inject_step=0), alpha, ((m, n),))
            state.rows = (1, 0)  # PD is row 1, FD row 0
            return JointIdentityInterpolation(inner, state, "t", context, chunk_size=7)(
                attn, states, encoder, None, (cos, sin)
            )

        zero, one = run(0.0), run(1.0)
        s_p, v_p = _explicit(attn, states[1], None if encoder is None else encoder[1], cos, sin)
        s_f, _ = _explicit(attn, states[0], None if encoder is None else encoder[0], cos, sin)
        s_p[:, T:, m] = s_f[:, T:, n]  # α = 1: PD's image queries get FD's scores on key n in column m
        out = (s_p.softmax(-1) @ v_p).transpose(0, 1).flatten(1)  # (T+N, heads·d)
    if kind == "double":
        assert all(torch.equal(a, b) for a, b in zip(zero, plain))  # α = 0: the layer's output, bit for bit
        torch.testing.assert_close(one[0][1], attn.to_out[0](out[T:]), rtol=1e-5, atol=1e-5)
        assert torch.equal(one[0][0], plain[0][0]) and torch.equal(one[1], plain[1])  # FD and text untouched
    else:
        assert torch.equal(zero, plain)
        torch.testing.assert_close(one[1], out, rtol=1e-5, atol=1e-5)  # text queries' rows unchanged too
        assert torch.equal(one[0], plain[0])


def test_flux_alpha0_reproduces_pd_exactly_and_alpha1_on_every_group_changes_pd_only(freecure, setup):
    transformer = freecure.backend.denoiser
    every = [n for names in cross_attention_groups(transformer).values() for n in names]
    plain = _joint_run(freecure, setup, None, None)

    def run(alpha):
        state = InterpolationState(setup.conditions, alpha, setup.alignment.identity_pairs, guided=False)
        with interpolate_identity(transformer, state, every):
            return _joint_run(freecure, setup, state, None)

    zero, one = run(0.0), run(1.0)
    assert torch.equal(zero, plain)
    assert torch.equal(one[FD_LANE], plain[FD_LANE])
    assert (one[PD_LANE] - plain[PD_LANE]).abs().max() > 1e-5
    assert all(not isinstance(p, JointIdentityInterpolation) for p in transformer.attn_processors.values())
    assert not transformer._forward_pre_hooks  # the text-length hook is gone too


# --- the command line on FLUX -------------------------------------------------------------------------
def _analyze(tmp_path, study, out, *extra):
    args = ["analyze", study, "--tiny", "--tiny-family", "flux", "--prompt", PROMPT]
    args += ["--ref", str(tmp_path / "ref.png"), "--steps", "3", "--out", str(out), "--cell", "32", *extra]
    return main(args)


@pytest.mark.slow
def test_cli_flux_attention_and_interpolate_tiny(tmp_path, astronaut, capsys):
    astronaut.resize((64, 64)).save(tmp_path / "ref.png")
    out = tmp_path / "attention"
    assert _analyze(tmp_path, "attention", out, "--analysis-steps", "1", "2") == 0
    err = capsys.readouterr().err
    assert "analyze attention: FD+PD" in err and "3/3" in err  # progress shown
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["groups"] == ["double", "single"] and manifest["settings"]["family"] == "flux"
    assert sorted(manifest["files"]) == sorted(p.name for p in out.iterdir())
    summary = json.loads((out / "summary.json").read_text())
    n = len(summary["tokens"])
    maps = load_file(str(out / "maps.safetensors"))
    assert maps["pd.double"].shape == (n, *LATENT) and maps["full.fd.single"].shape == (32 + 1, *LATENT)
    assert summary["groups"]["double"]["identity"]["pd_columns"] == [1]
    labels = ["image", *[t["label"] for t in summary["tokens"]]]
    labels[2] += " / S*"
    width = max([6 * len(label) + 8 for label in labels] + [40])
    layout = GridLayout(1 + n, 4, 32, 3, width)  # images, then a row per token; FD/PD × double/single
    assert Image.open(out / "attention_grid.png").size == layout.size
    assert _analyze(tmp_path, "attention", out) == 2  # never overwrites silently
    assert "already exist" in capsys.readouterr().err

    out = tmp_path / "interpolate"
    assert _analyze(tmp_path, "interpolate", out, "--alpha", "0", "0.5", "1", "--no-progress") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["blocks"] == ["double", "single"] and manifest["alphas"] == [0.0, 0.5, 1.0]
    assert sorted(manifest["files"]) == sorted(p.name for p in out.iterdir())
    grid = Image.open(out / "interpolation_grid.png")
    assert grid.size == GridLayout(2, 3, 32, 3, 6 * len("single") + 8).size  # groups down, α across
    layout = GridLayout(2, 3, 32, 3, 6 * len("single") + 8)
    # α = 0 is PD for every group: the same image in both rows
    assert grid.crop(layout.cell_box(0, 0)).tobytes() == grid.crop(layout.cell_box(1, 0)).tobytes()
    assert _analyze(tmp_path, "interpolate", out, "--alpha", "1") == 2  # earlier cells are not replaced
    assert "already exist" in capsys.readouterr().err


def test_cli_flux_adapter_compares_text_maps_and_refuses_eq3(tmp_path, capsys):
    Image.new("RGB", (64, 64), (120, 90, 60)).save(tmp_path / "ref.png")
    out = tmp_path / "iy"
    args = ["--backend", "infiniteyou", "--no-progress"]
    assert _analyze(tmp_path, "attention", out, *args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["identity_in_prompt"] is False and summary["groups"]["single"]["identity"] is None
    assert summary["tokens"][1]["label"] == "man"
    assert _analyze(tmp_path, "interpolate", tmp_path / "x", *args) == 2
    err = capsys.readouterr().err
    assert "InfuseNet" in err and "not a prompt token" in err and not (tmp_path / "x").exists()


def test_backends_that_split_fd_and_pd_into_separate_calls_are_refused(freecure, tiny_flux, astronaut):
    class Split(TokenFusionBackend):
        name = "split-demo"

        def predict_noise(self, latents, timestep, rows, row_keys, step_index, image_size):
            halves = [
                super(Split, self).predict_noise(latents[[i]], timestep, [rows[i]], [key], step_index, image_size)
                for i, key in enumerate(row_keys)
            ]
            return torch.cat(halves)

    split = FreeCurePipeline(Split(tiny_flux, RandomProjectionIdentityEncoder(32)), LayoutFaceParser())
    with pytest.raises(InputError, match="separate calls"):  # not declared: refused before any run
        prepare(split, PROMPT, [astronaut], class_word="man", num_inference_steps=3)
    Split.rows_in_one_call = True  # declared, wrongly: the run-time guard catches the first split call
    setup = prepare(split, PROMPT, [astronaut], class_word="man", num_inference_steps=3, inject_step=1)
    with pytest.raises(InputError, match="1 of the step's 2 rows"):
        attention_study(split, setup, groups=["double"])
    assert not split.backend.denoiser._forward_pre_hooks
