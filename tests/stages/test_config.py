"""The paper's FASA form, FASA followed by the expression stage (the NeurIPS paper's asymmetric
prompt guidance, APG) and the three documented presets."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from PIL import Image

from freecure.attention.fasa import FasaState, FoundationAwareSelfAttention, joint_attention, key_factor
from freecure.core.errors import InputError
from freecure.families.tiny import LayoutFaceParser
from freecure.pipeline import PRESETS, FreeCureConfig, FreeCurePipeline
from freecure.stages.fasa import FasaConfig
from tests.factories import token_fusion_backend

PROMPT = "a man with black curly hair, laughing happily"


def paper_softmax(attn, hidden, q_row, k_row, mask, weight):
    """Softmax(([1, ωℳ] ⊙ Q_p K̂ᵀ)/√d)·V̂ with K̂ = [K_p; K_f], V̂ = [V_p; V_f], written out as the
    paper prints it (the factor applied to the raw logits, then the division by √d)."""
    heads, d = attn.heads, hidden.shape[-1] // attn.heads
    q = attn.to_q(hidden[q_row]).view(-1, heads, d).transpose(0, 1)
    k_own, v_own = (f(hidden[q_row]).view(-1, heads, d).transpose(0, 1) for f in (attn.to_k, attn.to_v))
    k_fd, v_fd = (f(hidden[k_row]).view(-1, heads, d).transpose(0, 1) for f in (attn.to_k, attn.to_v))
    factor = torch.cat([torch.ones(k_own.shape[1]), weight * mask.flatten()])
    logits = torch.cat([q @ k_own.transpose(-1, -2), q @ k_fd.transpose(-1, -2)], dim=-1)
    out = torch.softmax(factor * logits / d**0.5, dim=-1) @ torch.cat([v_own, v_fd], dim=1)
    return attn.to_out[0](out.transpose(0, 1).reshape(-1, heads * d))


def small_case(seed=0):
    torch.manual_seed(seed)
    return Attention(query_dim=16, heads=2, dim_head=8).eval(), torch.randn(3, 16, 16)


def run_paper_form(attn, hidden, mask, weight):
    state = FasaState(mask, weight, (4, 4), form="paper")
    state.set_pairs(((0, 2),))
    return FoundationAwareSelfAttention(state, "test")(attn, hidden)


def test_paper_form_equals_the_explicit_softmax_of_the_paper():
    attn, hidden = small_case()
    mask = torch.zeros(4, 4)
    mask[1:3, 1:4] = 1.0
    mask[0, 0] = 0.5
    with torch.no_grad():
        out = run_paper_form(attn, hidden, mask, 2.0)
        expected = paper_softmax(attn, hidden, 0, 2, mask, 2.0)
        plain = AttnProcessor2_0()(attn, hidden)
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[1:], plain[1:])  # FD's rows and the unpaired row stay plain


def test_paper_form_differs_from_the_released_code_form():
    """Outside ℳ the paper's factor gives FD's keys logit 0 (they still attend); the code blocks them."""
    attn, hidden = small_case(1)
    mask = torch.zeros(4, 4)
    mask[:2] = 1.0
    with torch.no_grad():
        paper = run_paper_form(attn, hidden, mask, 2.0)
        code_state = FasaState(mask, 2.0, (4, 4), form="code")
        code_state.set_pairs(((0, 2),))
        code = FoundationAwareSelfAttention(code_state, "test")(attn, hidden)
        empty = run_paper_form(attn, hidden, torch.zeros(4, 4), 2.0)
        plain = AttnProcessor2_0()(attn, hidden)
    assert not torch.allclose(paper[0], code[0], atol=1e-4)
    assert not torch.allclose(empty[0], plain[0], atol=1e-4)  # an empty ℳ still mixes FD's values in


def test_joint_attention_factor_of_one_is_the_unscaled_joint_softmax():
    torch.manual_seed(2)
    q, k_own, v_own, k_ref, v_ref = (torch.randn(2, 6, 4) for _ in range(5))
    out_own = torch.softmax(q @ k_own.transpose(-1, -2) * 0.5, dim=-1) @ v_own
    zeros = torch.zeros(6)
    with_factor = joint_attention(q, out_own, k_own, k_ref, v_ref, zeros, 0.5, factor=torch.ones(6))
    without = joint_attention(q, out_own, k_own, k_ref, v_ref, zeros, 0.5)
    assert torch.equal(with_factor, without)
    assert torch.equal(key_factor(torch.tensor([0.0, 0.5, 1.0]), 2.0), torch.tensor([0.0, 1.0, 2.0]))


def test_fasa_form_is_checked():
    with pytest.raises(InputError, match="FASA form must be one of code, paper"):
        FasaConfig(form="multiplicative")


# --- presets ---------------------------------------------------------------------------------
def test_presets_set_what_their_sources_say():
    arxiv, neurips, code = (FreeCureConfig.from_preset(name) for name in ("arxiv-v1", "neurips", "official-code"))
    assert (arxiv.method, arxiv.runs_expression) == ("rofa", True)
    assert (neurips.method, neurips.runs_expression) == ("fasa", True)
    assert (neurips.fasa.form, neurips.fasa.mask_weight, neurips.fasa.mask_source) == ("paper", 2.0, "same")
    assert (code.method, code.runs_expression) == ("fasa", False)
    assert (code.fasa.form, code.fasa.mask_weight, code.fasa.mask_source) == ("code", 1.5, "fd-parse")
    assert code == FreeCureConfig(method="fasa", expression=False)  # the released code is the FASA default
    assert all(PRESETS[name].source for name in PRESETS)


def test_preset_overrides_win():
    config = FreeCureConfig.from_preset("neurips", gamma=0.3, fasa={"mask_weight": 1.0})
    assert config.gamma == 0.3 and config.fasa.mask_weight == 1.0 and config.fasa.form == "paper"
    with pytest.raises(InputError, match="unknown preset 'iclr': use one of arxiv-v1, neurips, official-code"):
        FreeCureConfig.from_preset("iclr")


def test_expression_default_follows_the_correction():
    assert FreeCureConfig().runs_expression and not FreeCureConfig(method="fasa").runs_expression
    assert FreeCureConfig(method="fasa", expression=True).runs_expression
    assert not FreeCureConfig(expression=False).runs_expression


# --- FASA then the expression stage on a tiny pipeline ----------------------------------------
def run(tiny_sd15, config):
    freecure = FreeCurePipeline(token_fusion_backend(tiny_sd15), LayoutFaceParser(), config)
    freecure.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return freecure(PROMPT, [Image.new("RGB", (32, 32))], class_word="man", num_inference_steps=4, generator=generator)


@pytest.mark.slow
def test_fasa_followed_by_the_expression_stage(tiny_sd15, monkeypatch):
    import freecure.stages.expression as expression_module

    received = []
    original = expression_module.expression_restore

    def spy(backend, z0, *args, **kwargs):
        received.append(z0.clone())
        return original(backend, z0, *args, **kwargs)

    monkeypatch.setattr(expression_module, "expression_restore", spy)
    out = run(tiny_sd15, FreeCureConfig.from_preset("neurips"))
    assert [(s.name, s.ran) for s in out.stages] == [
        ("same_pass", True),
        ("masks", True),
        ("fasa", True),
        ("expression", True),
    ]
    assert torch.equal(received[0], out.latents["blended"])  # APG starts from FASA's result
    assert not torch.equal(out.latents["freecure"], out.latents["blended"])
    assert out.settings["expression"] is True and out.settings["fasa"]["form"] == "paper"
    # the same run without the expression stage ends at FASA's result, which APG started from
    alone = run(tiny_sd15, FreeCureConfig.from_preset("neurips", expression=False))
    assert torch.equal(alone.latents["freecure"], received[0])
    assert "expression=False" in alone.stage("expression").reason


def test_rofa_without_the_expression_stage_ends_at_the_blend(tiny_sd15):
    out = run(tiny_sd15, FreeCureConfig(expression=False))
    assert not out.stage("expression").ran and torch.equal(out.latents["freecure"], out.latents["blended"])


# --- every backend and family: FASA then APG, through the command line ------------------------
def _backend_families():
    from freecure.backends import BACKENDS

    return [(name, family) for name, backend in sorted(BACKENDS.items()) for family in backend.families]


@pytest.mark.slow
@pytest.mark.parametrize("backend, family", _backend_families(), ids="-".join)
def test_the_neurips_preset_runs_fasa_then_apg_on_every_backend_and_family(backend, family, tmp_path):
    import json
    from pathlib import Path

    from freecure.cli import main

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "run"
    args = [
        "generate",
        "--tiny",
        "--backend",
        backend,
        "--tiny-family",
        family,
        "--preset",
        "neurips",
        "--steps",
        "3",
        "--prompt",
        "a man img with black curly hair, laughing",
        "--ref",
        str(root / "examples" / "astronaut.png"),
        "--no-progress",
        "--out",
        str(out),
    ]
    if backend == "ip-adapter-faceid":
        args += ["--faceid-family", family]
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    settings = manifest["settings"]
    assert settings["method"] == "fasa" and settings["expression"] is True
    assert (settings["fasa"]["form"], settings["fasa"]["mask_weight"]) == ("paper", 2.0)
    stages = {stage["name"]: stage for stage in manifest["stages"]}
    assert list(stages) == ["same_pass", "masks", "fasa", "expression"]
    assert stages["fasa"]["ran"] and stages["expression"]["ran"] and stages["expression"]["unet_calls"] > 0
