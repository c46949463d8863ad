"""`freecure analyze` on Face-diffuser, whose PD runs in calls of its own models: the engine's
FD and PD rows mapped onto those calls (PD's maps from the SDM's s(c̃) row, FD's from FD's
call; eq. 3 in the SDM's call with FD's scores handed over from FD's call of the step)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from freecure.analysis import (
    IdentityInterpolation,
    InterpolationState,
    attention_study,
    cross_attention_groups,
    prepare,
)
from freecure.analysis.interpolate import HandedIdentityInterpolation, interpolate_across_calls
from freecure.analysis.maps import TokenMapStore, record_token_maps
from freecure.analysis.studies import _joint_run, check_rows_in_one_call
from freecure.backends.face_diffuser.backend import FaceDiffuserBackend
from freecure.backends.fastcomposer.backend import TINY_VISION_CONFIG, PostfuseModule, clip_vision_model
from freecure.cli import main
from freecure.core.conditioning import FD, PD
from freecure.core.errors import InputError
from freecure.core.guidance import FD_LANE, PD_LANE
from freecure.families.tiny import LayoutFaceParser, build_tiny_sd15_components
from freecure.pipeline import FreeCurePipeline
from freecure.stages.sampling import same_layout

PROMPT = "a man with black curly hair, laughing happily"


@pytest.fixture(scope="module")
def freecure(tiny_sd15):
    """Tiny Face-diffuser, 4 steps: TDM step 0, SNF step 1 (injection), SDM steps 2-3."""
    torch.manual_seed(0)
    backend = FaceDiffuserBackend(
        tiny_sd15,
        build_tiny_sd15_components(seed=1)["unet"].eval(),
        clip_vision_model(TINY_VISION_CONFIG),
        PostfuseModule(32),
        start_merge_step=0,
        final_step=1,
    )
    fc = FreeCurePipeline(backend, LayoutFaceParser())
    fc.set_progress_bar_config(disable=True)
    return fc


@pytest.fixture(scope="module")
def setup(freecure, astronaut):
    return prepare(freecure, PROMPT, [astronaut], class_word="man", num_inference_steps=4, seed=0)


def _calls(model, calls):
    def hook(module, args, kwargs):
        calls.append((args[0].clone(), args[1], kwargs["encoder_hidden_states"].clone()))

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def test_refusal_kept_for_backends_that_split_rows_without_mapping_them():
    with pytest.raises(InputError, match="separate calls"):
        check_rows_in_one_call(SimpleNamespace(name="split", rows_in_one_call=False))
    check_rows_in_one_call(SimpleNamespace(name="mapped", rows_in_one_call=False, analysis_across_calls=True))


@pytest.mark.parametrize("step", [1, 2])  # SNF (FD's rows in one call with the TDM's), SDM alone
def test_maps_are_fd_calls_fd_row_and_sdm_calls_identity_row(freecure, setup, step):
    backend = freecure.backend
    assert setup.conditions.inject_step == 1 and setup.alignment.identity_pairs == ((2, 2),)
    fd_calls, sdm_calls = [], []
    handles = [_calls(backend.pipeline.unet, fd_calls), _calls(backend.sdm_unet, sdm_calls)]
    try:
        study = attention_study(freecure, setup, steps=[step], groups=["up"])
    finally:
        for handle in handles:
            handle.remove()
    n_tokens = len(setup.alignment.labels)
    for lane in ("fd", "pd"):
        full = study.full[lane, "up"]
        assert full.shape == (77, 32, 32)
        torch.testing.assert_close(full.sum(dim=0), torch.ones(32, 32), rtol=0, atol=1e-5)
        assert study.maps[lane, "up"].shape == (n_tokens, 32, 32)
    assert study.summary["groups"]["up"]["identity"]["pd_columns"] == [2]
    # calls of the models: FD's model at steps 0, 1 (with the TDM's rows), 2, 3; the SDM at steps 1, 2, 3
    assert len(fd_calls) == 4 and len(sdm_calls) == 3
    layers = cross_attention_groups(backend.pipeline.unet)["up"]

    def replay(model, call, row, lane):
        store = TokenMapStore(setup.conditions, setup.latent_size)
        store.rows = {lane: row}
        with torch.no_grad(), record_token_maps(model, store, layers):
            model(call[0], call[1], encoder_hidden_states=call[2])
        return store.group_map(lane, layers)

    # PD: the SDM's call of the step is [s(c), s(c̃)]; its maps are row 1's, the identity prompt's
    # (at the SNF step not averaged with the TDM's e(c) row, which has no identity token)
    latents, _, embeds = sdm_calls[step - 1]
    assert torch.equal(embeds[1], setup.conditions.pd.prompt_embeds[0].to(embeds))
    assert not torch.equal(embeds[0], embeds[1])
    torch.testing.assert_close(study.full["pd", "up"], replay(backend.sdm_unet, sdm_calls[step - 1], 1, "pd"))
    # FD: FD's model's call holds the step's non-PD rows first (then, at SNF, the TDM's e(∅), e(c))
    rows = same_layout(step, setup.conditions, False).rows
    others = [k for k, (_, key) in enumerate(rows) if key not in (PD, "pd_uncond")]
    fd_row = others.index(rows.index((FD_LANE, FD)))
    assert torch.equal(fd_calls[step][2][fd_row], setup.conditions.fd.prompt_embeds[0].to(embeds))
    torch.testing.assert_close(study.full["fd", "up"], replay(backend.pipeline.unet, fd_calls[step], fd_row, "fd"))
    assert not torch.allclose(study.full["fd", "up"], study.full["pd", "up"])
    assert backend.analysis_state is None  # handed back after the run


def test_handed_interpolation_across_calls_equals_eq3_in_one_call():
    """FD's call records S^f; the identity call's PD row gets exactly the one-call processor's result."""
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8).eval()
    hidden, text = torch.randn(3, 9, 16), torch.randn(3, 4, 8)  # engine rows: FD 0, other 1, PD 2
    for alpha in (0.0, 1.0, 0.4):
        one_state = InterpolationState(SimpleNamespace(inject_step=0), alpha, ((1, 2),))
        one_state.rows = (1, 0)
        with torch.no_grad():
            plain = AttnProcessor2_0()(attn, hidden[[0, 2]], text[[0, 2]])
            one_call = IdentityInterpolation(AttnProcessor2_0(), one_state, "t")(attn, hidden[[0, 2]], text[[0, 2]])
        state = InterpolationState(SimpleNamespace(inject_step=0), alpha, ((1, 2),))
        state.rows = (2, 0)  # engine rows (PD, FD)
        proc = HandedIdentityInterpolation(AttnProcessor2_0(), state, "t")
        with torch.no_grad():
            with state.in_call([0], identity=False):  # FD's model: FD's row only
                fd_out = proc(attn, hidden[:1], text[:1])
            with state.in_call([1, 2], identity=False):  # a model without the identity token: untouched
                assert torch.equal(proc(attn, hidden[1:], text[1:]), AttnProcessor2_0()(attn, hidden[1:], text[1:]))
            with state.in_call([1, 2], identity=True):  # the identity model: PD's row is call row 1
                pd_out = proc(attn, hidden[1:], text[1:])
        assert state.rows == (2, 0) and state.call is None
        assert torch.equal(fd_out[0], plain[0])
        torch.testing.assert_close(pd_out[1], one_call[1], rtol=1e-6, atol=1e-6)
        if alpha == 0.0:
            assert torch.equal(pd_out[1], plain[1])
        else:
            assert (pd_out[1] - plain[1]).abs().max() > 1e-4
    fresh = InterpolationState(SimpleNamespace(inject_step=0), 1.0, ((1, 2),), rows=(2, 0))
    with pytest.raises(RuntimeError, match="before FD's call"), fresh.in_call([1, 2], identity=True):
        HandedIdentityInterpolation(AttnProcessor2_0(), fresh, "t")(attn, hidden[1:], text[1:])


def test_alpha0_reproduces_face_diffusers_pd_exactly_and_alpha1_changes_pd_only(freecure, setup):
    backend = freecure.backend
    every = [n for names in cross_attention_groups(backend.pipeline.unet).values() for n in names]
    plain = _joint_run(freecure, setup, None, None)

    def run(alpha):
        state = InterpolationState(setup.conditions, alpha, setup.alignment.identity_pairs)
        with interpolate_across_calls(backend.unets(), state, every):
            return _joint_run(freecure, setup, state, None)

    zero, one = run(0.0), run(1.0)
    assert torch.equal(zero, plain)
    assert torch.equal(one[FD_LANE], plain[FD_LANE])
    assert (one[PD_LANE] - plain[PD_LANE]).abs().max() > 1e-5
    for unet in backend.unets():
        assert all(not isinstance(p, IdentityInterpolation) for p in unet.attn_processors.values())


@pytest.mark.slow
def test_cli_attention_and_interpolate_tiny_face_diffuser(tmp_path, astronaut):
    astronaut.resize((64, 64)).save(tmp_path / "ref.png")
    common = ["--tiny", "--backend", "face-diffuser", "--prompt", PROMPT, "--ref", str(tmp_path / "ref.png")]
    common += ["--steps", "4", "--no-progress", "--cell", "32"]
    out = tmp_path / "attention"
    assert main(["analyze", "attention", *common, "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["study"] == "attention" and manifest["settings"]["backend"] == "face-diffuser"
    assert sorted(manifest["files"]) == sorted(p.name for p in out.iterdir())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["identity_in_prompt"] is True and summary["groups"]["up"]["identity"]["pd_columns"] == [2]
    out = tmp_path / "interpolate"
    assert main(["analyze", "interpolate", *common, "--out", str(out), "--alpha", "0", "1", "--blocks", "up"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["study"] == "interpolate" and manifest["alphas"] == [0.0, 1.0]
    assert (out / "pd_up_a1.png").is_file() and (out / "fd.png").is_file()
