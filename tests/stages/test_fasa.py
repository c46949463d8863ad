"""FASA (foundation-aware self-attention, the authors' released correction) on small cases
and tiny pipelines: the joint softmax, its end points, layer choice by name, the pass, the CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from freecure.attention.fasa import (
    FasaState,
    FoundationAwareSelfAttention,
    fasa_layers,
    foundation_aware_self_attention,
    key_bias,
)
from freecure.backends import RandomProjectionIdentityEncoder, TokenFusionBackend
from freecure.cli import main
from freecure.core.attributes import parse_prompt
from freecure.core.errors import InputError
from freecure.core.guidance import FD_LANE, PD_LANE, Guidance
from freecure.families.tiny import LayoutFaceParser
from freecure.pipeline import FreeCureConfig, FreeCurePipeline
from freecure.stages.fasa import FasaConfig, fasa_layout, fasa_mask, fasa_pass, fresh_scheduler
from freecure.stages.sampling import same_pass
from tests.factories import token_fusion_backend

PROMPT = "a man with black curly hair, laughing happily"
FASA = FreeCureConfig(method="fasa")


# --- the processor on a small case ---------------------------------------------------------
def small_case(seed=0):
    torch.manual_seed(seed)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    hidden = torch.randn(3, 16, 16)  # 3 rows, a 4×4 grid of tokens
    return attn, hidden


def explicit_joint(attn, hidden, q_row, k_row, mask, weight, attn_fd=None, hidden_fd=None):
    """softmax([Q K_ownᵀ/√d, Q K_fdᵀ/√d + w·M (−∞ outside M)])·[V_own; V_fd], written out
    (FD's keys and values by ``attn_fd`` from ``hidden_fd`` when given: another model's)."""
    heads, d = attn.heads, 8
    attn_fd = attn if attn_fd is None else attn_fd
    hidden_fd = hidden if hidden_fd is None else hidden_fd
    q = attn.to_q(hidden[q_row]).view(-1, heads, d).transpose(0, 1)
    k_own, v_own = (f(hidden[q_row]).view(-1, heads, d).transpose(0, 1) for f in (attn.to_k, attn.to_v))
    k_fd, v_fd = (f(hidden_fd[k_row]).view(-1, heads, d).transpose(0, 1) for f in (attn_fd.to_k, attn_fd.to_v))
    m = mask.flatten()
    bias = torch.where(m > 0, weight * m, torch.tensor(float("-inf")))
    logits = torch.cat([q @ k_own.transpose(-1, -2) / d**0.5, q @ k_fd.transpose(-1, -2) / d**0.5 + bias], dim=-1)
    out = torch.softmax(logits, dim=-1) @ torch.cat([v_own, v_fd], dim=1)
    return attn.to_out[0](out.transpose(0, 1).reshape(-1, heads * d))


def run_processor(attn, hidden, mask, weight=1.5, pairs=((0, 2),)):
    state = FasaState(mask, weight, (4, 4))
    state.set_pairs(pairs)
    return FoundationAwareSelfAttention(state, "test")(attn, hidden)


def test_processor_equals_the_explicit_masked_joint_softmax():
    attn, hidden = small_case()
    mask = torch.zeros(4, 4)
    mask[1:3, 1:4] = 1.0
    mask[0, 0] = 0.5  # a soft value raises its key by w·0.5
    with torch.no_grad():
        out = run_processor(attn, hidden, mask, weight=1.5)
        expected = explicit_joint(attn, hidden, 0, 2, mask, 1.5)
        plain = AttnProcessor2_0()(attn, hidden)
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[0], plain[0], atol=1e-4)  # FD's keys changed PD's row
    assert torch.equal(out[1:], plain[1:])  # the other rows keep plain self-attention


def test_processor_pairs_each_image_with_its_own_fd_row_and_mask():
    torch.manual_seed(3)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    hidden = torch.randn(4, 16, 16)  # rows [PD_0, PD_1, FD_0, FD_1], as fasa_layout(images=2) lays them out
    masks = torch.zeros(2, 4, 4)
    masks[0, :2] = 1.0
    masks[1, 2:, 1:3] = 1.0
    state = FasaState(masks, 1.5, (4, 4))
    state.set_pairs(((0, 2, 0), (1, 3, 1)))
    with torch.no_grad():
        out = FoundationAwareSelfAttention(state, "test")(attn, hidden)
        for row in (0, 1):
            expected = explicit_joint(attn, hidden, row, 2 + row, masks[row], 1.5)
            torch.testing.assert_close(out[row], expected, rtol=1e-5, atol=1e-6)
        plain = AttnProcessor2_0()(attn, hidden)
    assert torch.equal(out[2:], plain[2:])


def test_blocked_fd_keys_reproduce_plain_self_attention_bit_for_bit():
    attn, hidden = small_case(1)
    with torch.no_grad():
        out = run_processor(attn, hidden, torch.zeros(4, 4), weight=1.5, pairs=((0, 2), (1, 2)))
        plain = AttnProcessor2_0()(attn, hidden)
    assert torch.equal(out, plain)


def test_full_mask_with_zero_weight_is_the_plain_joint_softmax_over_both_key_sets():
    attn, hidden = small_case(2)
    with torch.no_grad():
        out = run_processor(attn, hidden, torch.ones(4, 4), weight=0.0)
        # identical rows: softmax over duplicated keys is the same distribution → same output
        same_rows = run_processor(attn, hidden[[0, 1, 0]], torch.ones(4, 4), weight=0.0)
        plain = AttnProcessor2_0()(attn, hidden)
    torch.testing.assert_close(out[0], explicit_joint(attn, hidden, 0, 2, torch.ones(4, 4), 0.0))
    torch.testing.assert_close(same_rows[0], plain[0], rtol=1e-5, atol=1e-6)


def test_key_bias_raises_inside_and_blocks_outside():
    mask = torch.tensor([0.0, 1.0, 0.5])
    bias = key_bias(mask, 1.5)
    assert bias[0] == float("-inf") and bias[1] == 1.5 and bias[2] == 0.75


def test_config_and_layer_choice_by_name(tiny_sd15, tiny_sdxl):
    with pytest.raises(InputError, match="mask source"):
        FasaConfig(mask_source="both")
    with pytest.raises(InputError, match="mask weight"):
        FasaConfig(mask_weight=float("nan"))
    with pytest.raises(InputError, match="preset"):
        FasaConfig(layers="down")
    with pytest.raises(InputError, match="method"):
        FreeCureConfig(method="blend")
    for pipe in (tiny_sd15, tiny_sdxl):
        names = fasa_layers(pipe.unet, "up")
        assert names and all(n.startswith("up_blocks.") and ".attn1." in n for n in names)
        every_up_self = [n for n in pipe.unet.attn_processors if n.startswith("up_blocks.") and ".attn1." in n]
        assert names == every_up_self
    with pytest.raises(InputError, match="no self-attention layer"):
        fasa_layers(tiny_sd15.unet, ("mid_block.*.attn2.processor",))


class _NamedUNet:
    """Only the processor names of real SDXL, in execution order (down, mid, up)."""

    def __init__(self):
        names = []
        for stage, attentions, depth in (("down_blocks.1", 2, 2), ("down_blocks.2", 2, 10)):
            for a in range(attentions):
                for b in range(depth):
                    names += [f"{stage}.attentions.{a}.transformer_blocks.{b}.attn{i}.processor" for i in (1, 2)]
        names += [f"mid_block.attentions.0.transformer_blocks.{b}.attn{i}.processor" for b in range(10) for i in (1, 2)]
        for stage, depth in (("up_blocks.0", 10), ("up_blocks.1", 2)):
            for a in range(3):
                for b in range(depth):
                    names += [f"{stage}.attentions.{a}.transformer_blocks.{b}.attn{i}.processor" for i in (1, 2)]
        self.attn_processors = dict.fromkeys(names)


def test_authors_sdxl_preset_is_their_last_twenty_transformer_blocks():
    unet = _NamedUNet()
    self_attention = [n for n in unet.attn_processors if ".attn1." in n]
    assert len(self_attention) == 70  # SDXL's transformer blocks
    assert fasa_layers(unet, "authors-sdxl") == self_attention[50:70]  # their layer_idx 50..69


def test_processors_are_restored_even_when_the_block_raises(tiny_sd15):
    unet = tiny_sd15.unet
    before = dict(unet.attn_processors)
    layers = fasa_layers(unet, "up")
    state = FasaState(torch.ones(32, 32), 1.5, (32, 32))
    with pytest.raises(ZeroDivisionError):
        with foundation_aware_self_attention(unet, state, layers):
            assert all(isinstance(unet.attn_processors[n], FoundationAwareSelfAttention) for n in layers)
            assert not any(
                isinstance(p, FoundationAwareSelfAttention) for n, p in unet.attn_processors.items() if n not in layers
            )
            raise ZeroDivisionError
    assert all(type(unet.attn_processors[n]) is type(p) for n, p in before.items())


def test_layout_rows_and_pairs(tiny_sd15, grey_image):
    backend = token_fusion_backend(tiny_sd15)
    parsed = parse_prompt(PROMPT, "man", tokenizer=backend.tokenizer)
    conditions = replace(backend.conditions(parsed, [grey_image], 6), inject_step=2)
    before, after = fasa_layout(1, conditions, True), fasa_layout(2, conditions, True)
    assert before.layout.rows == ((PD_LANE, "pd_uncond"), (PD_LANE, "fd"), (FD_LANE, "fd"))
    assert after.layout.rows[1] == (PD_LANE, "pd") and after.pairs == ((1, 2),)
    both = fasa_layout(3, conditions, True, uncond=True)
    assert both.layout.rows[3] == (FD_LANE, "uncond") and both.pairs == ((1, 2), (0, 3))
    unguided = fasa_layout(3, conditions, False)
    assert unguided.layout.rows == ((PD_LANE, "pd"), (FD_LANE, "fd")) and unguided.pairs == ((0, 1),)
    two = fasa_layout(3, conditions, True, images=2)  # rows [pd_uncond×2, pd×2, fd×2], lanes FD_0, FD_1, PD_0, PD_1
    assert two.layout.rows == after.layout.for_images(2).rows
    assert [two.layout.rows[q][0] for q, _, _ in two.pairs] == [2, 3]  # PD_k queries …
    assert [two.layout.rows[k][0] for _, k, _ in two.pairs] == [0, 1]  # … FD_k's keys, with mask k
    assert two.pairs == ((2, 4, 0), (3, 5, 1))


def test_fd_parse_mask_keeps_cells_wholly_inside_and_same_mask_stays_soft():
    region = torch.zeros(64, 64, dtype=torch.bool)
    region[8:40, 16:48] = True
    region[0, 0] = True  # a stray pixel covers no latent cell wholly
    mask = fasa_mask("fd-parse", [region], None, (32, 32))
    assert mask.shape == (32, 32) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask[0, 0] == 0 and mask[4:20, 8:24].all() and mask.sum() == 16 * 16
    soft = torch.zeros(64, 64)
    soft[:, :32] = 0.5
    assert torch.allclose(fasa_mask("same", [], soft, (32, 32))[:, :16], torch.full((32, 16), 0.5))
    assert fasa_mask("fd-parse", [torch.zeros(64, 64, dtype=torch.bool)], None, (32, 32)) is None
    assert fasa_mask("same", [region], None, (32, 32)) is None


# --- the pass on a tiny pipeline ------------------------------------------------------------
@pytest.fixture(scope="module")
def fasa_run(tiny_sd15, astronaut):
    backend = token_fusion_backend(tiny_sd15)
    parsed = parse_prompt(PROMPT, "man", tokenizer=backend.tokenizer)
    conditions = replace(backend.conditions(parsed, [astronaut], 5), inject_step=2)
    scheduler = tiny_sd15.scheduler.from_config(tiny_sd15.scheduler.config)
    scheduler.set_timesteps(5)
    z_T = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(0))
    same = same_pass(backend, scheduler, z_T, conditions, Guidance(), (64, 64))

    def run(mask, weight=1.5):
        state = FasaState(mask, weight, (32, 32))
        with foundation_aware_self_attention(backend.unet, state, fasa_layers(backend.unet, "up")):
            return fasa_pass(backend, fresh_scheduler(scheduler), same, conditions, state, Guidance(), (64, 64))

    return same, run


def test_all_zero_mask_reproduces_pd_and_a_mask_changes_it(fasa_run):
    same, run = fasa_run
    assert len(same.fd_latents) == 5
    pd = same.z0[PD_LANE : PD_LANE + 1]
    zero = (run(torch.zeros(32, 32)) - pd).abs().max()
    print("zero-mask deviation", float(zero))
    assert zero <= 1e-5
    # a random tiny UNet's attention moves little, but far more than the zero mask's rounding
    full = (run(torch.ones(32, 32), weight=3.0) - pd).abs().max()
    assert full > 20 * max(float(zero), 1e-6)


# --- the pipeline and the command line -----------------------------------------------------
@pytest.mark.parametrize("mask_source", ["fd-parse", "same"])
def test_pipeline_method_fasa_stages_and_work(tiny_sd15, mask_source):
    backend = token_fusion_backend(tiny_sd15)
    fc = FreeCurePipeline(
        backend, LayoutFaceParser(), FreeCureConfig(method="fasa", fasa=FasaConfig(mask_source=mask_source))
    )
    fc.set_progress_bar_config(disable=True)
    from PIL import Image

    out = fc(
        PROMPT,
        [Image.new("RGB", (32, 32))],
        class_word="man",
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
    )
    assert [(s.name, s.ran) for s in out.stages] == [
        ("same_pass", True),
        ("masks", True),
        ("fasa", True),
        ("expression", False),
    ]
    # FD replayed: PD's two rows plus FD's conditional row at every step
    assert out.stage("fasa").unet_calls == 4 and out.stage("fasa").batch_items == 3 * 4
    assert out.settings["method"] == "fasa" and out.settings["fasa"]["mask_source"] == mask_source
    assert out.fasa_mask is not None and out.fasa_mask.shape == (32, 32)
    if mask_source == "fd-parse":
        assert set(out.fasa_mask.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_generate_tiny_method_fasa(tmp_path, astronaut, family):
    astronaut.resize((64, 64)).save(tmp_path / "ref.png")
    out = tmp_path / "run"
    code = main(
        [
            "generate",
            "--tiny",
            "--tiny-family",
            family,
            "--method",
            "fasa",
            "--prompt",
            PROMPT,
            "--ref",
            str(tmp_path / "ref.png"),
            "--steps",
            "3",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["method"] == "fasa"
    assert [s["name"] for s in manifest["stages"] if s["ran"]] == ["same_pass", "masks", "fasa"]
    assert (out / "freecure.png").is_file() and (out / "fasa_mask_overlay.png").is_file()


def test_generate_rejects_bad_fasa_options(tmp_path, capsys, grey_image):
    grey_image.save(tmp_path / "ref.png")
    base = ["generate", "--tiny", "--method", "fasa", "--prompt", PROMPT, "--ref", str(tmp_path / "ref.png")]
    with pytest.raises(SystemExit) as refused:  # refused at parse time, one line
        main([*base, "--fasa-mask-weight", "inf", "--out", str(tmp_path / "x")])
    assert refused.value.code == 2 and "--fasa-mask-weight" in capsys.readouterr().err
    code = main([*base, "--fasa-layers", "nothing.*", "--out", str(tmp_path / "y")])
    assert code == 2 and "no self-attention layer" in capsys.readouterr().err


@pytest.mark.slow
def test_cost_counts_the_authors_schedule_and_the_engines_reuse(tiny_sd15):
    from freecure.cost import count_fasa_costs

    backend = token_fusion_backend(tiny_sd15)
    fc = FreeCurePipeline(backend, LayoutFaceParser(), FreeCureConfig())
    steps, inject = 4, 1
    result = count_fasa_costs(fc, num_inference_steps=steps, inject_step=inject)
    # theirs: two whole generations of a 4-row batch
    assert result["literal_fasa"] == {"unet_calls": 2 * steps, "batch_items": 8 * steps}
    # ours: the SAME pass (2 rows before injection, 4 after), then 3 rows per step (FD replayed)
    engine = result["engine_fasa"]
    assert engine["stages"]["same_pass"]["batch_items"] == 2 * inject + 4 * (steps - inject)
    assert engine["stages"]["fasa"] == {"ran": True, "unet_calls": steps, "batch_items": 3 * steps}
    assert engine["batch_items"] < result["literal_fasa"]["batch_items"]


def test_tables_label_runs_by_correction_method():
    from freecure.evaluation.tables import table1

    def row(digest, method=None):
        metrics = {m: {"pc": 20.0, "if": None, "face_found": False} for m in ("fd", "pd", "freecure")}
        extra = {} if method is None else {"method": method}
        return {"backend": "token-fusion", "settings_hash": digest, "metrics": metrics, "n_attributes": 1, **extra}

    both = table1([row("aaa"), row("bbb", "fasa")])  # an old row without "method" is ROFA
    labels = [e["label"] for e in both]
    assert "token-fusion [ROFA] + FreeCure" in labels and "token-fusion [FASA] + FreeCure" in labels
    assert {e["correction"] for e in both} == {"rofa", "fasa"}
    alone = table1([row("bbb", "fasa")])
    assert [e["label"] for e in alone][-1] == "token-fusion + FreeCure (FASA)"


@pytest.mark.slow
def test_eval_both_methods_in_one_report(tmp_path):
    pytest.importorskip("dlib")
    pytest.importorskip("facenet_pytorch")
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt\na <S> with black curly hair\n")
    out = tmp_path / "eval"
    base = [
        "eval",
        "--tiny",
        "--identities",
        "examples/identities",
        "--prompts",
        str(prompts),
        "--steps",
        "3",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main([*base, "--num-seeds", "1"]) == 0
    assert main([*base, "--num-seeds", "2", "--method", "fasa", "--batch-size", "2"]) == 0  # both seeds in one call
    from freecure.evaluation.store import read_jsonl, shard_paths

    rows = [row for path in shard_paths(out) for row in read_jsonl(path)]
    assert sorted(row["method"] for row in rows) == ["fasa", "fasa", "rofa"]
    assert sorted(len(row.get("batch_keys", [])) for row in rows) == [0, 2, 2]
    table = json.loads((out / "report" / "table1.json").read_text())
    labels = {e["label"] for e in table}
    assert {"token-fusion [ROFA] + FreeCure", "token-fusion [FASA] + FreeCure", "token-fusion [FASA] (PD)"} <= labels


def test_backends_that_run_pd_in_separate_calls_are_refused(tiny_sd15):
    class SeparateCalls(TokenFusionBackend):
        name = "separate-calls"
        rows_in_one_call = False  # PD by its own model calls, as Face-diffuser does

    class OneCall(TokenFusionBackend):
        name = "one-call"
        rows_in_one_call = True  # an override that keeps one call (InstantID, PuLID, …) is fine, once said

        def predict_noise(self, *args):
            return super().predict_noise(*args)

    class Unsaid(OneCall):
        name = "unsaid"
        rows_in_one_call = None  # not said: an override is taken to split the rows

    backend = SeparateCalls(tiny_sd15, RandomProjectionIdentityEncoder(32))
    with pytest.raises(InputError, match="one denoiser call"):
        FreeCurePipeline(backend, LayoutFaceParser(), FreeCureConfig(method="fasa"))
    FreeCurePipeline(backend, LayoutFaceParser(), FreeCureConfig())  # ROFA does not care
    one_call = OneCall(tiny_sd15, RandomProjectionIdentityEncoder(32))
    FreeCurePipeline(one_call, LayoutFaceParser(), FreeCureConfig(method="fasa"))
    with pytest.raises(InputError, match="one denoiser call"):
        FreeCurePipeline(Unsaid(tiny_sd15, RandomProjectionIdentityEncoder(32)), LayoutFaceParser(), FASA)


def test_face_diffuser_and_faceid_without_fd_lora_declare_separate_calls():
    from freecure.backends.face_diffuser.backend import FaceDiffuserBackend
    from freecure.backends.ip_adapter.faceid import IPAdapterFaceIDBackend

    assert FaceDiffuserBackend.rows_in_one_call is False and FaceDiffuserBackend.fasa_across_calls is True
    faceid = IPAdapterFaceIDBackend.__new__(IPAdapterFaceIDBackend)
    faceid.fd_lora = False
    assert faceid.rows_in_one_call is False
    faceid.fd_lora = True
    assert faceid.rows_in_one_call is True


def test_a_layer_call_with_another_batch_than_declared_is_refused():
    attn, hidden = small_case()
    state = FasaState(torch.ones(4, 4), 1.5, (4, 4))
    state.set_pairs(((0, 2),), batch=4)  # the engine built 4 rows, the layer sees 3: a split batch
    with pytest.raises(RuntimeError, match="split"):
        FoundationAwareSelfAttention(state, "test")(attn, hidden)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["instantid", "ip-adapter-faceid"])
def test_unet_backends_that_override_predict_noise_but_keep_one_call_run_fasa(tmp_path, astronaut, backend):
    """Before rows_in_one_call, any predict_noise override was refused; these keep one UNet call
    (IdentityNet / per-row gates) and run FASA, the batch checked at every layer."""
    astronaut.resize((64, 64)).save(tmp_path / "ref.png")
    out = tmp_path / "run"
    args = ["generate", "--tiny", "--backend", backend, "--method", "fasa", "--prompt", PROMPT]
    assert main([*args, "--ref", str(tmp_path / "ref.png"), "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["stages"] if s["ran"]] == ["same_pass", "masks", "fasa"]


# --- across calls: Face-diffuser (FD's keys recorded in one model's call, handed to another's) ----
def test_keys_handed_across_calls_equal_the_explicit_joint_softmax_with_another_models_keys():
    attn_fd, hidden_fd = small_case(4)  # FD's model and rows
    attn_pd, hidden_pd = small_case(5)  # PD's model (other weights) and rows, a call of its own
    mask = torch.zeros(4, 4)
    mask[:, 1:3] = 1.0
    state = FasaState(mask, 1.5, (4, 4))
    with torch.no_grad():
        state.set_call(record={2: 7}, attend={})  # row 2 of FD's call comes from the engine's FD row 7
        recorded = FoundationAwareSelfAttention(state, "layer")(attn_fd, hidden_fd)
        state.set_call(record={}, attend={0: (7, 0)})  # row 0 of PD's call attends to FD row 7's keys
        out = FoundationAwareSelfAttention(state, "layer")(attn_pd, hidden_pd)
        state.set_call({}, {})
        expected = explicit_joint(attn_pd, hidden_pd, 0, 2, mask, 1.5, attn_fd=attn_fd, hidden_fd=hidden_fd)
        assert torch.equal(recorded, AttnProcessor2_0()(attn_fd, hidden_fd))  # recording changes nothing
        plain = AttnProcessor2_0()(attn_pd, hidden_pd)
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[1:], plain[1:]) and not torch.allclose(out[0], plain[0], atol=1e-4)
    assert state.cached_bytes() == 2 * 2 * 16 * 8 * 4  # K and V: 2 heads × 16 tokens × 8, fp32


@pytest.fixture(scope="module")
def face_diffuser_run(tiny_sd15, astronaut):
    from freecure.backends.face_diffuser.backend import FaceDiffuserBackend
    from freecure.backends.fastcomposer.backend import TINY_VISION_CONFIG, PostfuseModule, clip_vision_model
    from freecure.families.tiny import build_tiny_sd15_components
    from freecure.stages.fasa import _handed_to

    torch.manual_seed(0)
    sdm = build_tiny_sd15_components(seed=1)["unet"].eval()
    backend = FaceDiffuserBackend(
        tiny_sd15, sdm, clip_vision_model(TINY_VISION_CONFIG), PostfuseModule(32), start_merge_step=1, final_step=3
    )
    backend.guidance_scale = 5.0
    parsed = parse_prompt(PROMPT, "man", tokenizer=backend.tokenizer)
    conditions = backend.conditions(parsed, [astronaut], 6)  # TDM steps 0–1, SNF 2–3, SDM 4–5
    scheduler = tiny_sd15.scheduler.from_config(tiny_sd15.scheduler.config)
    scheduler.set_timesteps(6)
    z_T = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(0))
    guidance = Guidance(scale=5.0)
    same = same_pass(backend, scheduler, z_T, conditions, guidance, (64, 64))

    def run(mask, weight=1.5, install=True):
        import contextlib

        state = FasaState(mask, weight, (32, 32))
        with contextlib.ExitStack() as stack:
            if install:
                for unet in backend.fasa_denoisers():
                    stack.enter_context(foundation_aware_self_attention(unet, state, fasa_layers(unet, "up")))
            stack.enter_context(_handed_to(backend, state))
            z = fasa_pass(backend, fresh_scheduler(scheduler), same, conditions, state, guidance, (64, 64))
        return z, state

    return same, run


@pytest.mark.slow
def test_face_diffuser_all_zero_mask_reproduces_its_pd_and_a_mask_changes_it(face_diffuser_run):
    same, run = face_diffuser_run
    pd = same.z0[PD_LANE : PD_LANE + 1]
    zero_mask, state = run(torch.zeros(32, 32))
    assert torch.equal(zero_mask, run(None, install=False)[0])  # bit for bit: the processors change nothing
    zero = (zero_mask - pd).abs().max()
    print("Face-diffuser zero-mask deviation from the SAME pass's PD", float(zero))
    assert zero <= 1e-5
    assert state.cached_bytes() > 0  # FD's keys were recorded and handed over
    full = (run(torch.ones(32, 32), weight=3.0)[0] - pd).abs().max()
    assert full > 20 * max(float(zero), 1e-6)


@pytest.mark.slow
def test_generate_tiny_face_diffuser_method_fasa(tmp_path, astronaut):
    astronaut.resize((64, 64)).save(tmp_path / "ref.png")
    out = tmp_path / "run"
    args = ["generate", "--tiny", "--backend", "face-diffuser", "--method", "fasa", "--prompt", PROMPT]
    assert main([*args, "--ref", str(tmp_path / "ref.png"), "--steps", "6", "--out", str(out), "--no-progress"]) == 0
    stages = {s["name"]: s for s in json.loads((out / "manifest.json").read_text())["stages"]}
    assert stages["fasa"]["ran"] and stages["fasa"]["freecure_bytes"] > 0  # FD's keys handed to PD's calls

