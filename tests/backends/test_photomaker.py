"""The PhotoMaker backend: released checkpoint layout, ID-encoder maths, prompt handling,
LoRA loading and the FreeCure engine on tiny random components (offline, CPU)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from freecure.backends import BACKENDS
from freecure.backends.common.layers import FuseModule, PerceiverAttention
from freecure.backends.photomaker.backend import (
    PhotoMakerBackend,
    build_id_encoder,
    check_state_dict,
    expand_class_token,
    load_checkpoint,
    load_id_encoder_weights,
    load_lora,
    photomaker_lora_state_dict,
    resolve_checkpoint,
    start_merge_step,
)
from freecure.backends.photomaker.id_encoder import (
    CLIP_MEAN,
    CLIP_STD,
    clip_image_processor,
    fuse_class_tokens,
    tiny_vision_config,
)
from freecure.cli import main
from freecure.core.attributes import parse_prompt
from freecure.core.errors import InputError, WeightsNotFoundError
from freecure.core.guidance import FD_LANE, PD_LANE, Guidance
from freecure.families.tiny import LayoutFaceParser, tiny_sdxl_pipeline
from freecure.pipeline import FreeCurePipeline
from freecure.stages.sampling import same_pass
from tests.keylists import meta_state_dict

DATA = Path(__file__).parents[1] / "data"
PROMPT = "a man img with black curly hair, laughing happily"


def released_keys(version: str) -> dict[str, tuple[int, ...]]:
    """The key list kept next to the tests (derived from the original model definition)."""
    rows = (
        line.rstrip("\n").split("\t")
        for line in (DATA / f"photomaker_{version}_id_encoder_keys.txt").open()
        if not line.startswith("#")
    )
    return {key: tuple(int(n) for n in shape.split(",")) for key, shape in rows}


@pytest.fixture(scope="module")
def backend():
    pm = PhotoMakerBackend.build_tiny("v1")
    pm.pipeline.set_progress_bar_config(disable=True)
    return pm


@pytest.fixture(scope="module")
def backend_v2():
    return PhotoMakerBackend.build_tiny("v2")


@pytest.fixture(scope="module")
def refs(astronaut):
    return [astronaut, astronaut.rotate(15).crop((40, 0, 512, 400))]


def parsed_prompt(pm, prompt=PROMPT, class_word="man", trigger="img"):
    return parse_prompt(prompt, class_word, trigger=trigger, tokenizer=pm.tokenizer)


# --- released checkpoint layout --------------------------------------------------------
@pytest.mark.parametrize("version, count", [("v1", 407), ("v2", 463)])
def test_encoder_keys_and_shapes_are_the_released_ones(version, count):
    keys = released_keys(version)
    assert len(keys) == count
    encoder = build_id_encoder(version, meta=True)
    assert {k: tuple(v.shape) for k, v in encoder.state_dict().items()} == keys


def test_full_size_random_v1_checkpoint_loads_strictly():
    """Every released key at its full shape, random fp16 values. The tensors are views into one
    random pool at different offsets (values differ per key) so that the 326 M-parameter
    state dict costs 34 MB instead of 650 MB."""
    keys = released_keys("v1")
    assert sum(math.prod(shape) for shape in keys.values()) == 326_273_024
    largest = max(math.prod(shape) for shape in keys.values())
    pool = torch.randn(2 * largest, generator=torch.Generator().manual_seed(0), dtype=torch.float16)
    state = {k: pool[i : i + math.prod(shape)].view(shape) for i, (k, shape) in enumerate(keys.items())}
    encoder = load_id_encoder_weights(build_id_encoder("v1", meta=True), state)
    for key in ("fuse_module.mlp1.fc1.weight", "vision_model.encoder.layers.23.mlp.fc2.weight"):
        assert torch.equal(encoder.get_parameter(key), state[key])
    assert not torch.equal(encoder.fuse_module.mlp1.fc1.bias, encoder.fuse_module.mlp2.fc1.bias)
    assert torch.equal(encoder.vision_model.embeddings.position_ids, torch.arange(257)[None])
    assert not any(t.is_meta for t in [*encoder.parameters(), *encoder.buffers()])


def test_renamed_key_fails_with_its_name():
    state = meta_state_dict(released_keys("v1"))
    state["fuse_module.mlp2.fc1.weights"] = state.pop("fuse_module.mlp2.fc1.weight")
    with pytest.raises(WeightsNotFoundError) as error:
        load_id_encoder_weights(build_id_encoder("v1", meta=True), state)
    message = str(error.value)
    assert "missing keys (1): fuse_module.mlp2.fc1.weight" in message
    assert "unexpected keys (1): fuse_module.mlp2.fc1.weights" in message


def test_changed_shape_fails_with_both_shapes():
    state = meta_state_dict(released_keys("v1"))
    state["visual_projection_2.weight"] = torch.empty(1024, 1024, device="meta")
    with pytest.raises(
        WeightsNotFoundError, match=r"visual_projection_2.weight \(checkpoint \(1024, 1024\), model \(1280, 1024\)\)"
    ):
        check_state_dict(build_id_encoder("v1", meta=True), state, "the encoder")


def test_v2_checkpoint_into_v1_encoder_names_the_version_option():
    with pytest.raises(WeightsNotFoundError, match=r"unexpected keys \(56\): qformer_perceiver.*--photomaker-version"):
        check_state_dict(build_id_encoder("v1", meta=True), meta_state_dict(released_keys("v2")), "the encoder")


def test_legacy_position_ids_buffer_is_tolerated():
    state = meta_state_dict(released_keys("v1"))
    state["vision_model.embeddings.position_ids"] = torch.arange(257)[None]
    check_state_dict(build_id_encoder("v1", meta=True), state, "the encoder")


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_checkpoint_file_round_trip(tmp_path, suffix):
    encoder = build_id_encoder("v1", text_dims=(32, 32), tiny=True)
    lora = {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight": torch.randn(4, 64)
    }
    path = tmp_path / f"photomaker{suffix}"
    if suffix == ".bin":
        torch.save({"id_encoder": encoder.state_dict(), "lora_weights": lora}, path)
    else:
        from safetensors.torch import save_file

        flat = {f"id_encoder.{k}": v.contiguous() for k, v in encoder.state_dict().items()}
        save_file({**flat, **{f"lora_weights.{k}": v for k, v in lora.items()}}, str(path))
    state = load_checkpoint(path)
    fresh = load_id_encoder_weights(build_id_encoder("v1", text_dims=(32, 32), tiny=True), state["id_encoder"])
    assert torch.equal(fresh.fuse_module.layer_norm.bias, encoder.fuse_module.layer_norm.bias)
    assert list(state["lora_weights"]) == list(lora)
    assert resolve_checkpoint(tmp_path / f"photomaker{suffix}") == path


@pytest.mark.slow
def test_from_pretrained_loads_a_local_base_model_and_checkpoint(tmp_path, monkeypatch, refs):
    """The whole loading path (checkpoint file, strict encoder load, base model, LoRA) with a
    tiny-config encoder standing in for ViT-L/14 and a tiny SDXL folder for the base model."""
    import freecure.backends.photomaker.backend as pm

    base = tiny_sdxl_pipeline(tmp_path / "base")
    torch.manual_seed(1)
    encoder = build_id_encoder("v1", text_dims=(32, 32), tiny=True)
    lora = photomaker_lora_state_dict(base.unet, seed=3)
    torch.save({"id_encoder": encoder.state_dict(), "lora_weights": lora}, tmp_path / "photomaker-v1.bin")
    real = pm.build_id_encoder
    monkeypatch.setattr(pm, "build_id_encoder", lambda version, meta: real(version, (32, 32), tiny=True, meta=meta))
    loaded = PhotoMakerBackend.from_pretrained(str(tmp_path / "base"), weights=tmp_path, device="cpu")
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    assert torch.equal(loaded.id_encoder.fuse_module.mlp2.fc2.weight, encoder.fuse_module.mlp2.fc2.weight)
    assert not torch.equal(
        loaded.unet.up_blocks[0].attentions[0].transformer_blocks[0].attn2.to_q.weight,
        base.unet.up_blocks[0].attentions[0].transformer_blocks[0].attn2.to_q.weight,
    )
    conditions = loaded.conditions(parsed_prompt(loaded), refs, 10)
    assert conditions.pd.prompt_embeds.shape == conditions.fd.prompt_embeds.shape == (1, 77, 64)


def test_checkpoint_without_the_two_parts_is_refused(tmp_path):
    torch.save({"id_encoder": {}}, tmp_path / "x.bin")
    with pytest.raises(WeightsNotFoundError, match="exactly 'id_encoder' and 'lora_weights'"):
        load_checkpoint(tmp_path / "x.bin")
    with pytest.raises(WeightsNotFoundError, match="--photomaker-weights"):
        resolve_checkpoint(tmp_path / "missing.bin")


def test_offline_without_weights_fails_fast_pointing_at_tiny(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as error:
        PhotoMakerBackend.from_pretrained(base_model=str(tmp_path / "never-loaded"))
    assert time.perf_counter() - start < 10
    message = str(error.value)
    assert "TencentARC/PhotoMaker" in message and "HF_HUB_OFFLINE" in message
    assert "--tiny" in message and "--photomaker-weights" in message


def test_cli_without_tiny_offline_exits_with_the_message(tmp_path, monkeypatch, capsys, astronaut):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    astronaut.resize((64, 64)).save(tmp_path / "ref.png")
    code = main(
        [
            "generate",
            "--backend",
            "photomaker",
            "--prompt",
            PROMPT,
            "--ref",
            str(tmp_path / "ref.png"),
            "--out",
            str(tmp_path / "out"),
            "--device",
            "cpu",
        ]
    )
    assert code == 2
    assert "--tiny" in capsys.readouterr().err


# --- ID encoder maths ----------------------------------------------------------------------
def test_fuse_module_is_the_papers_mlp_stack():
    torch.manual_seed(0)
    fuse = FuseModule(4)
    for parameter in fuse.parameters():
        torch.nn.init.normal_(parameter)
    c, e = torch.randn(3, 4), torch.randn(3, 4)

    def mlp(x, m, residual):
        y = F.linear(
            F.gelu(
                F.linear(F.layer_norm(x, x.shape[-1:], m.layernorm.weight, m.layernorm.bias), m.fc1.weight, m.fc1.bias)
            ),
            m.fc2.weight,
            m.fc2.bias,
        )
        return x + y if residual else y

    h = mlp(torch.cat([c, e], dim=-1), fuse.mlp1, False) + c
    expected = F.layer_norm(mlp(h, fuse.mlp2, True), (4,), fuse.layer_norm.weight, fuse.layer_norm.bias)
    torch.testing.assert_close(fuse(c, e), expected)


def test_fuse_class_tokens_writes_only_the_masked_rows_in_order():
    torch.manual_seed(0)
    fuse = FuseModule(4)
    prompt = torch.randn(1, 6, 4)
    mask = torch.tensor([[False, False, True, True, False, False]])
    ids = torch.randn(2, 4)
    out = fuse_class_tokens(fuse, prompt, ids, mask)
    assert torch.equal(out[0, [0, 1, 4, 5]], prompt[0, [0, 1, 4, 5]])
    torch.testing.assert_close(out[0, 2:4], fuse(prompt[0, 2:4], ids))
    with pytest.raises(ValueError, match="2 class-token positions but 3"):
        fuse_class_tokens(fuse, prompt, torch.randn(3, 4), mask)


def test_id_embedding_is_clips_image_embedding_and_the_second_projection():
    from transformers import CLIPVisionModelWithProjection

    torch.manual_seed(0)
    encoder = build_id_encoder("v1", text_dims=(32, 48), tiny=True)
    clip = CLIPVisionModelWithProjection(tiny_vision_config(32))
    clip.vision_model.load_state_dict(encoder.vision_model.state_dict())
    clip.visual_projection.load_state_dict(encoder.visual_projection.state_dict())
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ids = encoder.id_embeddings(pixels)
        out = clip(pixel_values=pixels)
    assert ids.shape == (2, 80)
    torch.testing.assert_close(ids[:, :32], out.image_embeds)
    pooled = clip.vision_model(pixel_values=pixels).pooler_output
    torch.testing.assert_close(ids[:, 32:], pooled @ encoder.visual_projection_2.weight.T)


def test_perceiver_attention_is_softmax_attention_over_features_and_latents():
    torch.manual_seed(0)
    attention = PerceiverAttention(dim=8, dim_head=4, heads=2)
    for parameter in attention.parameters():
        torch.nn.init.normal_(parameter)
    features, latents = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    x, lat = attention.norm1(features), attention.norm2(latents)
    q = attention.to_q(lat)
    k, v = attention.to_kv(torch.cat([x, lat], dim=1)).chunk(2, dim=-1)
    heads = [
        F.softmax(q[..., h * 4 : (h + 1) * 4] @ k[..., h * 4 : (h + 1) * 4].transpose(1, 2) / 2.0, dim=-1)
        @ v[..., h * 4 : (h + 1) * 4]
        for h in range(2)
    ]
    expected = attention.to_out(torch.cat(heads, dim=-1))
    torch.testing.assert_close(attention(features, latents), expected)


def test_clip_preprocessing_is_pil_resize_crop_normalise(astronaut):
    image = astronaut.crop((0, 0, 512, 380))
    pixels = clip_image_processor()([image], return_tensors="pt").pixel_values
    resized = image.resize((int(224 * 512 / 380), 224), Image.BICUBIC)  # short side to 224
    left = (resized.width - 224) // 2
    crop = np.asarray(resized.crop((left, 0, left + 224, 224)), np.float32) / 255
    expected = torch.from_numpy((crop - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)).permute(2, 0, 1)
    torch.testing.assert_close(pixels[0], expected)


# --- prompt handling -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "strength, steps, merge",
    [(20, 50, 10), (20, 4, 0), (20, 30, 6), (100, 50, 30), (80, 100, 30), (0, 50, 0), (15, 10, 1)],
)
def test_start_merge_step(strength, steps, merge):
    assert start_merge_step(strength, steps) == merge


def test_injection_step_is_the_step_after_the_merge_step(backend):
    assert backend.injection_step(50) == 11  # text-only while i <= 10, fused from 11 on
    with pytest.raises(InputError, match="never"):
        PhotoMakerBackend(backend.pipeline, backend.id_encoder, style_strength=100).injection_step(20)
    with pytest.raises(InputError, match="percentage"):
        PhotoMakerBackend(backend.pipeline, backend.id_encoder, style_strength=120)


def test_expand_class_token():
    ids, mask = expand_class_token([49406, 320, 786, 593, 49407], 2, 3, 8, 0)
    assert ids == [49406, 320, 786, 786, 786, 593, 49407, 0]
    assert mask == [False, False, True, True, True, False, False, False]
    ids, mask = expand_class_token([1, 2, 3, 4, 5, 6], 1, 3, 6, 0)  # cut at the context length
    assert ids == [1, 2, 2, 2, 3, 4] and mask == [False, True, True, True, False, False]
    with pytest.raises(InputError, match="do not fit"):
        expand_class_token([1, 2, 3], 2, 3, 4, 0)


def test_pd_prompt_is_the_prompt_with_the_class_token_repeated(backend):
    parsed = parsed_prompt(backend)
    assert parsed.foundation_prompt == "a man with black curly hair, laughing happily"
    expanded, mask = backend.encode_expanded_prompt(parsed.foundation_prompt, parsed.class_token_indices[-1], 3)
    reference = backend.encode_text("a man man man with black curly hair, laughing happily")
    assert torch.equal(expanded.prompt_embeds, reference.prompt_embeds)
    assert torch.equal(expanded.pooled_prompt_embeds, reference.pooled_prompt_embeds)
    assert mask[0].nonzero().flatten().tolist() == [2, 3, 4]


def test_conditions_fd_pd_and_one_class_copy_per_reference(backend, refs):
    parsed = parsed_prompt(backend)
    conditions = backend.conditions(parsed, refs, num_inference_steps=10)
    assert conditions.inject_step == 3 and conditions.shares_uncond
    fd = backend.encode_text("a man with black curly hair, laughing happily")  # trigger gone, no copies
    assert torch.equal(conditions.fd.prompt_embeds, fd.prompt_embeds)
    repeated = backend.encode_text("a man man with black curly hair, laughing happily")
    pd = conditions.pd.prompt_embeds
    assert torch.equal(conditions.pd.pooled_prompt_embeds, repeated.pooled_prompt_embeds)
    outside = [i for i in range(pd.shape[1]) if i not in (2, 3)]
    assert torch.equal(pd[0, outside], repeated.prompt_embeds[0, outside])
    with torch.no_grad():
        ids = backend.id_encoder.id_embeddings(backend.pixel_values(refs))
        expected = backend.id_encoder.fuse_module(repeated.prompt_embeds[0, 2:4], ids)
    torch.testing.assert_close(pd[0, 2:4], expected)  # copy k carries reference k
    assert not torch.allclose(pd[0, 2], pd[0, 3])


def test_several_class_words_expand_the_one_before_the_trigger(backend, refs):
    parsed = parsed_prompt(backend, "a man and a man img with black hair")
    assert parsed.foundation_prompt == "a man and a man with black hair"
    assert parsed.class_token_indices == (5,)
    pd = backend.conditions(parsed, refs[:1], 10).pd.prompt_embeds
    repeated = backend.encode_text("a man and a man with black hair")  # one reference: one copy
    assert torch.equal(pd[0, :5], repeated.prompt_embeds[0, :5])
    assert not torch.allclose(pd[0, 5], repeated.prompt_embeds[0, 5])
    assert torch.equal(pd[0, 6:], repeated.prompt_embeds[0, 6:])


def test_multi_word_class_repeats_its_last_token_as_the_original(backend, refs):
    parsed = parsed_prompt(backend, "an old man img with glasses", class_word="old man")
    _, mask = backend.encode_expanded_prompt(parsed.foundation_prompt, parsed.class_token_indices[-1], 2)
    assert parsed.class_token_indices == (2, 3)
    assert mask[0].nonzero().flatten().tolist() == [3, 4]


@pytest.mark.parametrize(
    "prompt, trigger, message",
    [
        ("a man with black curly hair", "img", "does not occur"),
        ("a img man with black curly hair", "img", "right after the class word"),
        ("a man with img black curly hair", "img", "right after the class word"),
        ("a man img with black hair and img", "img", "2 times"),
        ("a man with black curly hair", None, "trigger word right after the class word"),
    ],
)
def test_trigger_word_errors(backend, refs, prompt, trigger, message):
    freecure = FreeCurePipeline(backend, LayoutFaceParser())
    with pytest.raises(InputError, match=message):
        freecure(prompt, refs, class_word="man", trigger_word=trigger, num_inference_steps=4)


def test_no_reference_is_an_error(backend):
    with pytest.raises(InputError, match="at least one reference"):
        backend.conditions(parsed_prompt(backend), [], 10)


def test_v2_two_class_copies_per_reference(backend_v2, refs):
    parsed = parsed_prompt(backend_v2)
    conditions = backend_v2.conditions(parsed, refs, 10)
    repeated = backend_v2.encode_text("a man man man man with black curly hair, laughing happily")
    pd = conditions.pd.prompt_embeds
    assert torch.equal(pd[0, 6:], repeated.prompt_embeds[0, 6:])
    assert not torch.allclose(pd[0, 2:6], repeated.prompt_embeds[0, 2:6])
    assert torch.equal(conditions.pd.pooled_prompt_embeds, repeated.pooled_prompt_embeds)


# --- LoRA ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_released_format_lora_fuses_into_the_unet():
    pipe = tiny_sdxl_pipeline()
    lora = photomaker_lora_state_dict(pipe.unet)
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.up.weight" in lora
    before = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.weight.detach().clone()
    assert load_lora(pipe, lora, fuse=True) == len(lora) // 2
    layer = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k
    prefix = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora"
    delta = lora[f"{prefix}.up.weight"] @ lora[f"{prefix}.down.weight"]
    torch.testing.assert_close(layer.base_layer.weight.detach() - before, delta)


@pytest.mark.slow
def test_lora_kept_as_a_switchable_adapter_and_a_wrong_lora_refused():
    pipe = tiny_sdxl_pipeline()
    load_lora(pipe, photomaker_lora_state_dict(pipe.unet), fuse=False)
    assert pipe.get_active_adapters() == ["photomaker"]
    wrong = {
        "unet.mid_block.nothing.attn1.processor.to_q_lora.down.weight": torch.randn(4, 64),
        "unet.mid_block.nothing.attn1.processor.to_q_lora.up.weight": torch.randn(64, 4),
    }
    with pytest.raises(WeightsNotFoundError, match="SDXL UNet"):
        load_lora(tiny_sdxl_pipeline(), wrong)


# --- the engine and the CLI --------------------------------------------------------------
def test_fd_and_pd_lanes_identical_until_the_injection_step(backend, refs):
    conditions = backend.conditions(parsed_prompt(backend), refs, num_inference_steps=5)
    assert conditions.inject_step == 2
    scheduler = backend.pipeline.scheduler.from_config(backend.pipeline.scheduler.config)
    scheduler.set_timesteps(5)
    z_T = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(0))
    same = same_pass(backend, scheduler, z_T, conditions, Guidance(scale=5.0), (64, 64))
    assert torch.equal(same.injection_latents[FD_LANE], same.injection_latents[PD_LANE])
    assert not torch.allclose(same.z0[FD_LANE], same.z0[PD_LANE])


@pytest.mark.slow
def test_cli_tiny_runs_photomaker_end_to_end(tmp_path, astronaut):
    astronaut.resize((64, 64)).save(tmp_path / "a.png")
    astronaut.rotate(20).resize((64, 64)).save(tmp_path / "b.png")
    out = tmp_path / "run"
    code = main(
        [
            "generate",
            "--backend",
            "photomaker",
            "--tiny",
            "--prompt",
            PROMPT,
            "--ref",
            str(tmp_path / "a.png"),
            "--ref",
            str(tmp_path / "b.png"),
            "--steps",
            "4",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    for name in ("fd", "pd", "blended", "freecure", "mask"):
        assert (out / f"{name}.png").is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["backend"] == "photomaker"
    assert manifest["settings"]["trigger_word"] == "img"  # the default trigger
    assert manifest["settings"]["inject_step"] == 1  # int(0.2 × 4) + 1
    assert "Apache-2.0" in manifest["license"]
    assert [s["name"] for s in manifest["stages"] if s["ran"]] == ["same_pass", "masks", "rofa", "expression"]


def test_backend_is_registered_with_prefixed_options():
    import argparse

    assert BACKENDS["photomaker"] is PhotoMakerBackend
    parser = argparse.ArgumentParser()
    PhotoMakerBackend.add_cli_arguments(parser)
    options = [a for action in parser._actions for a in action.option_strings if a not in ("-h", "--help")]
    assert options and all(option.startswith("--photomaker-") for option in options)
    version = next(a for a in parser._actions if "--photomaker-version" in a.option_strings)
    assert "NON-COMMERCIAL" in version.help


# --- PhotoMaker v2's face embeddings -------------------------------------------------------
def test_v2_without_insightface_says_how_to_install(monkeypatch):
    import sys

    from freecure.backends.photomaker.v2 import ArcFaceEmbedder

    monkeypatch.setitem(sys.modules, "insightface", None)
    monkeypatch.setitem(sys.modules, "insightface.app", None)
    with pytest.raises(InputError, match="pip install insightface.*non-commercial"):
        ArcFaceEmbedder()


def test_arcface_embedder_keeps_photos_with_a_face_and_retries_smaller_sizes():
    from freecure.backends.photomaker.v2 import ArcFaceEmbedder

    class FakeAnalysis:  # insightface's FaceAnalysis: finds a face in red images at size ≤ 512 only
        def __init__(self):
            self.det_model = type("Det", (), {"input_size": (640, 640)})()
            self.seen = []

        def get(self, bgr):
            self.seen.append((self.det_model.input_size[0], tuple(bgr[0, 0])))
            if bgr[0, 0, 2] == 255 and self.det_model.input_size[0] <= 512:  # BGR: red is channel 2
                return [{"embedding": np.full(512, 3.0, np.float32)}, {"embedding": np.zeros(512, np.float32)}]
            return []

    embedder = object.__new__(ArcFaceEmbedder)
    embedder.app = FakeAnalysis()
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    kept, embeddings = embedder.embed([blue, red])
    assert kept == [red] and embeddings.shape == (1, 512) and torch.all(embeddings == 3.0)
    assert [size for size, _ in embedder.app.seen] == [640, 576, 512, 448, 384, 320, 256, 640, 576, 512]
    with pytest.raises(InputError, match="no face detected"):
        embedder.embed([blue])


def test_v2_backend_reports_the_non_commercial_licence(backend_v2):
    assert "NON-COMMERCIAL" in backend_v2.license and backend_v2.id_encoder.tokens_per_image == 2


# --- real weights (need the Hub; the second also a GPU) ------------------------------------
def _needs_hub():
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        pytest.skip("needs the Hugging Face Hub (HF_HUB_OFFLINE is set)")


@pytest.mark.hub
@pytest.mark.slow
def test_released_v1_checkpoint_has_the_listed_keys_and_loads_strictly():
    """Downloads photomaker-v1.bin (≈0.93 GB) once into the Hugging Face cache."""
    _needs_hub()
    state = load_checkpoint(resolve_checkpoint(None, "v1"))
    given = {k: tuple(v.shape) for k, v in state["id_encoder"].items() if k != "vision_model.embeddings.position_ids"}
    assert given == released_keys("v1")
    load_id_encoder_weights(build_id_encoder("v1", meta=True), state["id_encoder"])
    assert any(key.endswith("down.weight") for key in state["lora_weights"])


@pytest.mark.hub
@pytest.mark.gpu
@pytest.mark.slow
def test_real_photomaker_runs_freecure_on_a_gpu(astronaut):
    """Downloads SDXL base 1.0 (fp16, ≈6.9 GB) and photomaker-v1.bin; 10 steps at 1024²."""
    _needs_hub()
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pm = PhotoMakerBackend.from_pretrained(device="cuda")
    freecure = FreeCurePipeline(pm, LayoutFaceParser())
    out = freecure(
        "a woman img with black curly hair, laughing happily",
        [astronaut],
        class_word="woman",
        trigger_word="img",
        num_inference_steps=10,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.settings["inject_step"] == 3
    fd, pd = (np.asarray(out.images[name], np.float32) for name in ("fd", "pd"))
    assert np.isfinite(pd).all() and np.abs(fd - pd).mean() > 1.0  # identity changed the image
