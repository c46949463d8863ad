"""`freecure analyze`: token alignment, per-token maps (Figure 3), eq. 3's interpolation
(Figures 4 and 10), labelled grids, and both commands end to end on tiny models."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from PIL import Image
from safetensors.torch import load_file

from freecure.analysis import (
    GridLayout,
    IdentityInterpolation,
    InterpolationState,
    align_tokens,
    attention_study,
    cross_attention_groups,
    interpolate_identity,
    interpolate_scores,
    labelled_grid,
    prepare,
)
from freecure.analysis.studies import _joint_run
from freecure.backends import BACKENDS, TokenFusionBackend
from freecure.cli import main
from freecure.core.attributes import parse_prompt
from freecure.core.guidance import FD_LANE, PD_LANE
from tests.factories import token_fusion_backend, token_fusion_freecure

PROMPT = "a man with black curly hair, laughing happily"


@pytest.fixture(scope="module")
def freecure(tiny_sd15):
    return token_fusion_freecure(tiny_sd15)


@pytest.fixture(scope="module")
def setup(freecure, astronaut):
    return prepare(freecure, PROMPT, [astronaut], class_word="man", num_inference_steps=3, seed=0, inject_step=1)


# --- tokens ----------------------------------------------------------------------------
def test_token_alignment_same_positions_shifted_positions_and_no_identity(tiny_sd15):
    backend = token_fusion_backend(tiny_sd15)
    parsed = parse_prompt(PROMPT, "man", tokenizer=backend.tokenizer)
    plain = align_tokens(backend, parsed)
    assert plain.labels[:3] == ("a", "man", "with") and plain.fd_columns[:3] == (1, 2, 3)
    assert plain.identity_fd == (2,) and plain.identity_pd == (2,) and plain.identity_pairs == ((2, 2),)
    assert plain.pd_columns == tuple((c,) for c in plain.fd_columns)
    # PhotoMaker: the class word's last token repeated once per ID embedding, later tokens shifted
    photomaker = SimpleNamespace(
        name="photomaker",
        prompt_identity="last",
        tokenizer=backend.tokenizer,
        id_encoder=SimpleNamespace(tokens_per_image=1),
    )
    stacked = align_tokens(photomaker, parsed, n_references=3)
    assert stacked.identity_pd == (2, 3, 4) and stacked.identity_pairs == ((2, 2), (3, 2), (4, 2))
    assert stacked.pd_columns[0] == (1,) and stacked.pd_columns[2] == (5,)  # "with" moved by 2
    adapter = SimpleNamespace(name="ip-adapter-faceid", tokenizer=backend.tokenizer)
    none = align_tokens(adapter, parsed)
    assert not none.identity_in_prompt and none.identity_pairs == () and none.labels == plain.labels


# --- Figure 3: per-token maps ------------------------------------------------------------
def test_maps_shapes_normalisation_and_summary(freecure, setup):
    study = attention_study(freecure, setup)
    groups = cross_attention_groups(freecure.pipeline.unet)
    assert list(groups) == ["down", "mid", "up"]
    n_tokens = len(setup.alignment.labels)
    for group in groups:
        for lane in ("fd", "pd"):
            full = study.full[lane, group]
            assert full.shape == (77, 32, 32)
            # every pixel's attention is a distribution over the keys
            torch.testing.assert_close(full.sum(dim=0), torch.ones(32, 32), rtol=0, atol=1e-5)
            assert study.maps[lane, group].shape == (n_tokens, 32, 32)
            assert torch.equal(study.maps[lane, group][1], full[2])  # "man" is column 2
    # identity injected from step 1: PD's identity column differs from FD's class word
    assert not torch.allclose(study.full["pd", "up"][2], study.full["fd", "up"][2])
    summary = study.summary["groups"]["up"]
    identity = summary["identity"]
    assert identity["fd"] == pytest.approx(float(study.full["fd", "up"][2].mean()))
    assert identity["gain"] == pytest.approx(identity["pd"] - identity["fd"])
    hair = summary["attributes"]["black curly hair"]
    assert hair["fd"] == pytest.approx(float(study.full["fd", "up"][[4, 5, 6]].sum(0).mean()), rel=1e-5)
    assert hair["change"] == pytest.approx(hair["pd"] - hair["fd"])


def test_steps_and_heads_selection_change_what_is_averaged(freecure, setup):
    first = attention_study(freecure, setup, steps=[0], heads=[0], groups=["up"])
    assert list(first.full) == [("fd", "up"), ("pd", "up")]
    # at step 0, before injection, PD's row is FD's row: identical maps
    assert torch.equal(first.full["fd", "up"], first.full["pd", "up"])
    later = attention_study(freecure, setup, steps=[2], heads=[0], groups=["up"])
    assert not torch.allclose(later.full["fd", "up"], later.full["pd", "up"])


# --- eq. 3 ---------------------------------------------------------------------------------
def test_interpolate_scores_reading_of_eq3():
    g = torch.Generator().manual_seed(0)
    s_p, s_f = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    assert torch.equal(interpolate_scores(s_p, s_f, [(3, 2)], 0.0), s_p)
    replaced = interpolate_scores(s_p, s_f, [(3, 2)], 1.0)
    assert torch.equal(replaced[..., 3], s_f[..., 2])
    others = [c for c in range(7) if c != 3]
    assert torch.equal(replaced[..., others], s_p[..., others])
    half = interpolate_scores(s_p, s_f, [(3, 2)], 0.5)
    torch.testing.assert_close(half[..., 3], 0.5 * (s_p[..., 3] + s_f[..., 2]))
    # after the attention's softmax, each row is still a distribution over the keys
    torch.testing.assert_close(half.softmax(-1).sum(-1), torch.ones(2, 5))


def _cross_case(alpha, pairs=((1, 2),)):
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8).eval()
    hidden, text = torch.randn(2, 9, 16), torch.randn(2, 4, 8)
    conditions = SimpleNamespace(inject_step=0)
    state = InterpolationState(conditions, alpha, pairs)
    state.rows = (1, 0)  # PD is row 1, FD row 0
    return attn, hidden, text, IdentityInterpolation(AttnProcessor2_0(), state, "t")


def test_processor_alpha0_is_exact_and_alpha1_uses_fds_column():
    attn, hidden, text, proc = _cross_case(0.0)
    with torch.no_grad():
        plain = AttnProcessor2_0()(attn, hidden, text)
        assert torch.equal(proc(attn, hidden, text), plain)
        attn, hidden, text, proc = _cross_case(1.0)
        out = proc(attn, hidden, text)

        def heads(x):
            return x.view(x.shape[0], -1, 2, 8).transpose(1, 2)[0]

        q, k_p, v_p = heads(attn.to_q(hidden[1:])), heads(attn.to_k(text[1:])), heads(attn.to_v(text[1:]))
        k_f = heads(attn.to_k(text[:1]))
        q_f = heads(attn.to_q(hidden[:1]))
        s_p = q @ k_p.transpose(-1, -2) / 8**0.5
        s_f = q_f @ k_f.transpose(-1, -2) / 8**0.5
        s_p[..., 1] = s_f[..., 2]  # α = 1: PD's identity column becomes FD's placeholder column
        expected = attn.to_out[0]((s_p.softmax(-1) @ v_p).transpose(0, 1).reshape(-1, 16))
    torch.testing.assert_close(out[1], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[0], plain[0])  # FD's row untouched


def test_alpha0_reproduces_pd_exactly_and_alpha1_on_every_block_changes_pd_only(freecure, setup):
    unet = freecure.pipeline.unet
    every = [n for names in cross_attention_groups(unet).values() for n in names]
    plain = _joint_run(freecure, setup, None, None)

    def run(alpha):
        state = InterpolationState(setup.conditions, alpha, setup.alignment.identity_pairs)
        with interpolate_identity(unet, state, every):
            return _joint_run(freecure, setup, state, None)

    zero, one = run(0.0), run(1.0)
    assert torch.equal(zero, plain)
    assert torch.equal(one[FD_LANE], plain[FD_LANE])
    assert (one[PD_LANE] - plain[PD_LANE]).abs().max() > 1e-5
    assert all(not isinstance(p, IdentityInterpolation) for p in unet.attn_processors.values())


# --- grids ------------------------------------------------------------------------------------
def test_grid_layout_puts_each_cell_in_its_row_and_column():
    colors = [[(40 * r, 60 * c, 200) for c in range(4)] for r in range(3)]
    cells = [[Image.new("RGB", (16, 16), color) for color in row] for row in colors]
    grid = labelled_grid(cells, ["down", "mid", "up"], ["a0", "a1", "a2", "a3"], ["title line"], cell=32)
    layout = GridLayout(3, 4, 32, 1, max(6 * 4 + 8, 40))
    assert grid.size == layout.size
    for r in range(3):
        for c in range(4):
            left, top, right, bottom = layout.cell_box(r, c)
            assert grid.getpixel(((left + right) // 2, (top + bottom) // 2)) == colors[r][c]
    with pytest.raises(ValueError):
        labelled_grid(cells, ["down"], ["a0"], [])


# --- the command line -------------------------------------------------------------------------
def _analyze(tmp_path, study, out, *extra):
    return main(
        [
            "analyze",
            study,
            "--tiny",
            "--prompt",
            PROMPT,
            "--ref",
            str(tmp_path / "ref.png"),
            "--steps",
            "3",
            "--out",
            str(out),
            "--no-progress",
            "--cell",
            "32",
            *extra,
        ]
    )


@pytest.mark.slow
def test_cli_attention_and_interpolate_tiny(tmp_path, astronaut, capsys):
    astronaut.resize((64, 64)).save(tmp_path / "ref.png")
    out = tmp_path / "attention"
    assert _analyze(tmp_path, "attention", out, "--analysis-steps", "1", "2") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["study"] == "attention" and manifest["analysis_steps"] == [1, 2]
    assert sorted(manifest["files"]) == sorted(p.name for p in out.iterdir())
    maps = load_file(str(out / "maps.safetensors"))
    summary = json.loads((out / "summary.json").read_text())
    n = len(summary["tokens"])
    assert maps["pd.up"].shape == (n, 32, 32) and maps["full.fd.mid"].shape == (77, 32, 32)
    assert set(summary["groups"]) == {"down", "mid", "up"}
    assert _analyze(tmp_path, "attention", out) == 2  # never overwrites silently
    assert "already exist" in capsys.readouterr().err

    out = tmp_path / "interpolate"
    assert _analyze(tmp_path, "interpolate", out, "--alpha", "0", "1", "--blocks", "mid", "up") == 0
    grid = Image.open(out / "interpolation_grid.png")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["alphas"] == [0.0, 1.0] and manifest["blocks"] == ["mid", "up"]
    assert grid.size == GridLayout(2, 2, 32, 3, 40).size  # 2 block groups down, 2 α across
    assert (out / "pd_up_a1.png").is_file() and (out / "pd_mid_a0.png").is_file()
    with pytest.raises(SystemExit) as refused:  # by --alpha's type, at parse time
        _analyze(tmp_path, "interpolate", tmp_path / "bad", "--alpha", "1.5")
    assert refused.value.code == 2 and "[0, 1]" in capsys.readouterr().err


def test_cli_interpolate_refuses_backends_without_an_identity_token(tmp_path, monkeypatch, capsys):
    class AdapterBackend(TokenFusionBackend):
        name = "adapter-demo"
        prompt_identity = None

    monkeypatch.setitem(BACKENDS, "token-fusion", AdapterBackend)
    Image.new("RGB", (64, 64)).save(tmp_path / "ref.png")
    assert _analyze(tmp_path, "interpolate", tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert "not a prompt token" in err and "analyze attention" in err and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_cli_unet_adapter_compares_text_maps_and_split_rows_are_refused(tmp_path, astronaut, capsys):
    astronaut.resize((64, 64)).save(tmp_path / "ref.png")
    out = tmp_path / "faceid"
    assert _analyze(tmp_path, "attention", out, "--backend", "ip-adapter-faceid") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["identity_in_prompt"] is False and set(summary["groups"]) == {"down", "mid", "up"}
    assert all(entry["identity"] is None for entry in summary["groups"].values())
    # without the LoRA on FD, FD's and PD's rows go through separate UNet calls: refused, not misread
    off = tmp_path / "off"
    assert _analyze(tmp_path, "attention", off, "--backend", "ip-adapter-faceid", "--faceid-fd-lora", "off") == 2
    assert "separate calls" in capsys.readouterr().err and not off.exists()


@pytest.mark.slow
def test_cli_interpolate_gives_distinct_alphas_distinct_files(tmp_path, astronaut):
    """`--alpha 0.1000001 0.1000002` wrote both cells to pd_up_a0.1.png (issue 20); ordinary α keep
    their short names (pd_up_a0.5.png, pd_up_a1.png)."""
    astronaut.resize((64, 64)).save(tmp_path / "ref.png")
    out = tmp_path / "close"
    alphas = ["0.1000001", "0.1000002", "0.5", "1"]
    assert _analyze(tmp_path, "interpolate", out, "--alpha", *alphas, "--blocks", "up", "--steps", "2") == 0
    cells = sorted(p.name for p in out.glob("pd_*.png"))
    assert cells == ["pd_up_a0.1000001.png", "pd_up_a0.1000002.png", "pd_up_a0.5.png", "pd_up_a1.png"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(p.name for p in out.iterdir())  # no name listed twice


def test_alpha_file_names_are_distinct_and_read_back():
    from freecure.cli.analyze import alpha_text

    assert [alpha_text(a) for a in (0.0, 0.25, 0.5, 1.0)] == ["0", "0.25", "0.5", "1"]
    close = [0.1000001, 0.1000002, 0.1, 0.1 + 1e-17, 1 / 3, 0.1 + 0.2, 5e-324, 1.0 - 2**-53]
    names = [alpha_text(a) for a in close]
    assert len(set(names)) == len(set(close)) and all(float(n) == a for n, a in zip(names, close))
