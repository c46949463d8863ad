"""FastComposer backend: released checkpoint layout, post-fuse maths, <|image|> tokens,
delayed subject conditioning against the original loop, `--tiny` end to end."""

from __future__ import annotations

import argparse
import copy
import json
import math

import pytest
import torch
from PIL import Image

from freecure.backends import BACKENDS, FastComposerBackend
from freecure.backends.fastcomposer.backend import (
    IMAGE_TOKEN,
    LEGACY_BUFFERS,
    TINY_VISION_CONFIG,
    FastComposerModel,
    PostfuseModule,
    clip_vision_model,
    read_checkpoint,
    reference_pixels,
    resolve_checkpoint,
    subject_caption,
    tokenize_with_image_tokens,
)
from freecure.cli import main
from freecure.core.attributes import parse_prompt
from freecure.core.errors import InputError, WeightsNotFoundError
from freecure.core.guidance import FD_LANE, PD_LANE, Guidance
from freecure.stages.sampling import same_pass
from tests.keylists import meta_state_dict, read_layout

PROMPT = "a man with black curly hair, laughing happily"


def random_state_dict(layout: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with a released layout (CLIP's legacy position ids as 0, 1, 2, …)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in layout.items():
        if key.endswith("position_ids"):
            state[key] = torch.arange(shape[-1]).expand(shape).clone()
        else:
            state[key] = torch.randn(shape, generator=g)
    return state


def tiny_backend(pipe, seed=0, **kwargs):
    torch.manual_seed(seed)
    image_encoder = clip_vision_model(TINY_VISION_CONFIG)
    postfuse = PostfuseModule(32)
    return FastComposerBackend(pipe, image_encoder, postfuse, **kwargs)


@pytest.fixture(scope="module")
def backend(tiny_sd15):
    return tiny_backend(tiny_sd15)


# --- released checkpoint layout -----------------------------------------------------------
def test_full_size_model_has_the_released_key_layout():
    """Our SD1.5 + ViT-L/14 modules, named back, are exactly the original FastComposerModel."""
    released = read_layout("fastcomposer_keys.txt")
    assert len(released) == 1538
    model = FastComposerModel.sd15("meta")
    assert set(LEGACY_BUFFERS) <= set(released)
    assert model.released_layout() == {k: v for k, v in released.items() if k not in LEGACY_BUFFERS}
    # and the full-size layout loads strictly (on the meta device: nothing materialised)
    model.load_released(meta_state_dict(released))
    assert model.unet.conv_in.weight.shape == (320, 4, 3, 3)
    assert model.text_encoder.get_input_embeddings().weight.shape == (49408, 768)


def test_tiny_checkpoint_loads_strictly_with_the_legacy_names_mapped(tmp_path):
    released = read_layout("fastcomposer_tiny_keys.txt")
    state = random_state_dict(released, seed=1)
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    model = FastComposerModel.tiny(seed=3)
    model.load_released(read_checkpoint(path))
    loaded = model.state_dict()
    for key, value in loaded.items():
        torch.testing.assert_close(value, state[model.released_name(key)], rtol=0, atol=0)
    # the two legacy renames really happened
    attention = "vae.decoder.mid_block.attentions.0."
    assert torch.equal(loaded[attention + "to_q.weight"], state[attention + "query.weight"])
    assert torch.equal(loaded[attention + "to_out.0.bias"], state[attention + "proj_attn.bias"])
    text = model.text_encoder.get_input_embeddings().weight
    assert torch.equal(text, state["text_encoder.embeddings.token_embedding.weight"])


@pytest.mark.parametrize("change", ["rename", "reshape", "drop"])
def test_mismatched_checkpoint_fails_with_a_clear_message(change):
    state = meta_state_dict(read_layout("fastcomposer_tiny_keys.txt"))
    key = "postfuse_module.mlp1.fc1.weight"
    if change == "rename":
        state["postfuse_module.mlp1.fc_1.weight"] = state.pop(key)
        expected = ["missing keys (1): " + key, "unexpected keys (1): postfuse_module.mlp1.fc_1.weight"]
    elif change == "reshape":
        state[key] = torch.empty(33, 64, device="meta")
        expected = [f"shape mismatches (1): {key} (checkpoint (33, 64), model (32, 64))"]
    else:
        del state["vae.encoder.mid_block.attentions.0.query.weight"]
        expected = ["missing keys (1): vae.encoder.mid_block.attentions.0.query.weight"]
    with pytest.raises(WeightsNotFoundError) as error:
        FastComposerModel.tiny().load_released(state, source="ckpt.bin")
    for text in expected:
        assert text in str(error.value)


# --- post-fuse MLP ---------------------------------------------------------------------------
def _layer_norm(x, weight, bias, eps=1e-5):
    mean = sum(x) / len(x)
    var = sum((v - mean) ** 2 for v in x) / len(x)
    return [(v - mean) / math.sqrt(var + eps) * w + b for v, w, b in zip(x, weight, bias)]


def _linear(x, weight, bias):
    return [sum(w * v for w, v in zip(row, x)) + b for row, b in zip(weight, bias)]


def _gelu(x):
    return [0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x]


def _mlp(x, mlp, residual):
    p = {name: value.tolist() for name, value in mlp.state_dict().items()}
    y = _layer_norm(x, p["layernorm.weight"], p["layernorm.bias"])
    y = _linear(_gelu(_linear(y, p["fc1.weight"], p["fc1.bias"])), p["fc2.weight"], p["fc2.bias"])
    return [a + b for a, b in zip(y, x)] if residual else y


def test_postfuse_matches_a_hand_computation():
    torch.manual_seed(0)
    module = PostfuseModule(4)
    with torch.no_grad():
        for parameter in module.parameters():  # LayerNorm affine weights too
            parameter.copy_(torch.randn_like(parameter))
    e, o = torch.randn(4), torch.randn(4)
    # e' = LN(MLP2(MLP1([e; o]) + e)), MLP1 without residual, MLP2 with residual
    h = [a + b for a, b in zip(_mlp(e.tolist() + o.tolist(), module.mlp1, residual=False), e.tolist())]
    h = _mlp(h, module.mlp2, residual=True)
    p = module.layer_norm.state_dict()
    expected = torch.tensor(_layer_norm(h, p["weight"].tolist(), p["bias"].tolist()))
    torch.testing.assert_close(module(e[None], o[None])[0], expected, rtol=1e-5, atol=1e-5)


def test_fuse_replaces_only_the_flagged_tokens():
    torch.manual_seed(0)
    module = PostfuseModule(8)
    embeds, objects = torch.randn(1, 77, 8), torch.randn(2, 8)
    mask = torch.zeros(1, 77, dtype=torch.bool)
    mask[0, [2, 6]] = True
    fused = module.fuse(embeds, mask, objects)
    keep = ~mask[0]
    assert torch.equal(fused[0, keep], embeds[0, keep])
    torch.testing.assert_close(fused[0, 2], module(embeds[0, 2:3], objects[0:1])[0])
    torch.testing.assert_close(fused[0, 6], module(embeds[0, 6:7], objects[1:2])[0])
    with pytest.raises(InputError, match="2 subject"):
        module.fuse(embeds, mask, objects[:1])


# --- <|image|> tokens --------------------------------------------------------------------------
def original_tokenization(tokenizer, caption):
    """FastComposer's `_tokenize_and_mask_noun_phrases_ends`, with <|image|> an added token."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    ids = tokenizer.encode(caption)
    mask = [False] * len(ids)
    clean = []
    for token in ids:
        if token == image_token_id:
            mask[len(clean) - 1] = True
        else:
            clean.append(token)
    length = tokenizer.model_max_length
    clean = (clean + [tokenizer.pad_token_id] * length)[:length]
    mask = (mask + [False] * length)[:length]
    return clean, mask


@pytest.mark.parametrize(
    "caption, nouns",
    [
        ("a man <|image|> and a woman <|image|> are reading a book together", ["man", "woman"]),
        ("a photo of a man<|image|> with black curly hair, laughing", ["man"]),
        ("A close-up of a WOMAN <|image|>", ["woman"]),
    ],
)
def test_image_tokens_are_removed_and_the_noun_before_them_flagged(tiny_sd15, caption, nouns):
    tokenizer = tiny_sd15.tokenizer
    ids, mask = tokenize_with_image_tokens(tokenizer, caption)
    clean, expected_mask = original_tokenization(tokenizer, caption)
    assert ids[0].tolist() == clean
    assert mask[0].tolist() == expected_mask
    # the clean ids are the text-only prompt's ids, so FD and PD encode the same tokens
    text_only = tokenizer(caption.replace(IMAGE_TOKEN, ""), padding="max_length", max_length=77)["input_ids"]
    assert ids[0].tolist() == text_only
    assert [tokenizer.decode([ids[0, i]]).strip() for i in mask[0].nonzero().flatten()] == nouns


def test_image_token_must_follow_a_word(tiny_sd15):
    with pytest.raises(InputError, match="must follow"):
        tokenize_with_image_tokens(tiny_sd15.tokenizer, "<|image|> a man")
    with pytest.raises(InputError, match="must follow"):
        tokenize_with_image_tokens(tiny_sd15.tokenizer, "a man <|image|> <|image|>")


@pytest.mark.parametrize(
    "prompt, trigger, caption",
    [
        ("a woman and a man with black curly hair", None, "a woman and a man <|image|> with black curly hair"),
        ("a man img with black hair, smiling", "img", "a man <|image|> with black hair, smiling"),
    ],
)
def test_the_image_token_goes_after_the_subjects_class_word(tiny_sd15, prompt, trigger, caption):
    tokenizer = tiny_sd15.tokenizer
    parsed = parse_prompt(prompt, "man", trigger=trigger, tokenizer=tokenizer)
    assert subject_caption(parsed, tokenizer) == caption
    _, mask = tokenize_with_image_tokens(tokenizer, caption)
    assert mask[0].nonzero().flatten().tolist() == [parsed.class_token_indices[-1]]


# --- reference image ---------------------------------------------------------------------------
@pytest.mark.parametrize("object_resolution", [224, 512])
def test_reference_pixels_follow_the_original_transforms(object_resolution):
    T = pytest.importorskip("torchvision.transforms")
    import numpy as np

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (90, 50, 3), dtype=np.uint8))
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    pad = (90 - 50) // 2  # the original PadToSquare: (h - w) // 2 each side
    x = torch.nn.functional.pad(x, (pad, pad, 0, 0))
    x = T.Resize((object_resolution, object_resolution), interpolation=T.InterpolationMode.BILINEAR, antialias=True)(x)
    x = T.ConvertImageDtype(torch.float32)(x)[None]
    if object_resolution != 224:  # the encoder's own resize
        x = torch.nn.functional.interpolate(x, (224, 224), mode="bilinear", antialias=True)
    x = T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))(x)[0]
    ours = reference_pixels(image, object_resolution, 224)
    assert ours.shape == (3, 224, 224)
    # torchvision resizes uint8 natively; ours rounds a float resize: at most one grey level apart
    assert (ours - x).abs().max() <= 1.01 / 255 / 0.2613


def test_wide_references_pad_top_and_bottom():
    # PadToSquare pads the short side whichever it is: a wide photo is the tall one transposed
    import numpy as np

    tall = np.random.default_rng(1).integers(0, 256, (90, 50, 3), dtype=np.uint8)
    ours_tall = reference_pixels(Image.fromarray(tall), 224, 224)
    ours_wide = reference_pixels(Image.fromarray(tall.transpose(1, 0, 2).copy()), 224, 224)
    torch.testing.assert_close(ours_wide, ours_tall.transpose(1, 2), rtol=0, atol=1.01 / 255 / 0.2613)


# --- conditioning and delayed subject conditioning ----------------------------------------------
def test_pd_differs_from_fd_only_at_the_subject_token(backend, astronaut):
    parsed = parse_prompt(PROMPT, "man", tokenizer=backend.tokenizer)
    conditions = backend.conditions(parsed, [astronaut], 50)
    assert conditions.inject_step == 11  # the original's start_merge_step = 10 of 50
    fd, pd = conditions.fd.prompt_embeds[0], conditions.pd.prompt_embeds[0]
    column = parsed.class_token_indices[-1]
    others = [i for i in range(77) if i != column]
    torch.testing.assert_close(pd[others], fd[others], rtol=0, atol=1e-6)
    assert not torch.allclose(pd[column], fd[column])
    # the fused token is the post-fuse MLP of the text token and the image embedding
    objects = backend.object_embeddings([astronaut])
    torch.testing.assert_close(pd[column], backend.postfuse(fd[column : column + 1], objects)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="exactly one reference"):
        backend.conditions(parsed, [astronaut, astronaut], 50)


def test_injection_step_scales_with_the_step_count(tiny_sd15):
    assert tiny_backend(tiny_sd15).injection_step(50) == 11
    assert tiny_backend(tiny_sd15).injection_step(4) == 2
    assert tiny_backend(tiny_sd15, start_merge_step=0).injection_step(4) == 1
    with pytest.raises(InputError, match="start_merge_step"):
        tiny_backend(tiny_sd15, start_merge_step=3).injection_step(4)


@torch.no_grad()
def original_delayed_conditioning(unet, scheduler, z, null, text, augmented, start_merge_step, w):
    """The original `stable_diffusion_call_with_references_delayed_conditioning` loop."""
    for i, t in enumerate(scheduler.timesteps):
        embeds = torch.cat([null, text if i <= start_merge_step else augmented])
        model_input = scheduler.scale_model_input(torch.cat([z] * 2), t)
        noise_uncond, noise_text = unet(model_input, t, encoder_hidden_states=embeds).sample.chunk(2)
        z = scheduler.step(noise_uncond + w * (noise_text - noise_uncond), t, z).prev_sample
    return z


def test_fd_and_pd_agree_before_injection_and_pd_is_the_original_delayed_conditioning(backend, astronaut):
    steps, w = 6, 5.0
    backend = FastComposerBackend(backend.pipeline, backend.image_encoder, backend.postfuse, start_merge_step=2)
    parsed = parse_prompt(PROMPT, "man", tokenizer=backend.tokenizer)
    conditions = backend.conditions(parsed, [astronaut], steps)
    assert conditions.inject_step == 3
    pipe = backend.pipeline
    z_T = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(0))

    def scheduler():
        s = pipe.scheduler.from_config(pipe.scheduler.config)
        s.set_timesteps(steps)
        return s

    same = same_pass(backend, scheduler(), z_T, conditions, Guidance(scale=w), (64, 64))
    lanes = same.injection_latents
    assert torch.equal(lanes[FD_LANE], lanes[PD_LANE])  # identical up to the injection step
    null, text, augmented = (c.prompt_embeds for c in (conditions.uncond, conditions.fd, conditions.pd))
    pd = original_delayed_conditioning(pipe.unet, scheduler(), z_T, null, text, augmented, 2, w)
    fd = original_delayed_conditioning(pipe.unet, scheduler(), z_T, null, text, text, 2, w)
    torch.testing.assert_close(same.z0[PD_LANE : PD_LANE + 1], pd, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(same.z0[FD_LANE : FD_LANE + 1], fd, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(pd, fd)


# --- command line ------------------------------------------------------------------------------
def cli_args(**overrides) -> argparse.Namespace:
    values = dict(
        tiny=True,
        device=torch.device("cpu"),
        dtype=torch.float32,
        base_model=None,
        fastcomposer_checkpoint=None,
        fastcomposer_start_merge_step=None,
        fastcomposer_object_resolution=224,
    )
    values.update(overrides)
    return argparse.Namespace(**values)


def test_registered_with_its_licence():
    assert BACKENDS["fastcomposer"] is FastComposerBackend
    assert "MIT" in FastComposerBackend.license


def test_tiny_from_cli_loads_a_given_checkpoint(tmp_path):
    state = random_state_dict(read_layout("fastcomposer_tiny_keys.txt"), seed=2)
    torch.save(state, tmp_path / "pytorch_model.bin")
    backend = FastComposerBackend.from_options(cli_args(fastcomposer_checkpoint=str(tmp_path)))  # a folder works
    assert torch.equal(backend.unet.conv_in.weight, state["unet.conv_in.weight"])
    assert torch.equal(backend.postfuse.mlp2.fc1.bias, state["postfuse_module.mlp2.fc1.bias"])
    assert torch.equal(
        backend.pipeline.text_encoder.get_input_embeddings().weight,
        state["text_encoder.embeddings.token_embedding.weight"],
    )
    assert torch.equal(backend.image_encoder.visual_projection.weight, state["image_encoder.visual_projection.weight"])


def test_missing_weights_offline_point_at_tiny_and_local_paths(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsNotFoundError) as error:
        resolve_checkpoint(
            None, "mit-han-lab/fastcomposer", "pytorch_model.bin", "FastComposer", "--fastcomposer-checkpoint"
        )
    message = str(error.value)
    assert "HF_HUB_OFFLINE" in message and "--tiny" in message and "--fastcomposer-checkpoint PATH" in message
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope.bin", "r/r", "f.bin", "FastComposer", "--fastcomposer-checkpoint")


def test_generate_tiny_end_to_end(tmp_path, astronaut, capsys):
    astronaut.resize((64, 64)).save(tmp_path / "ref.png")
    out = tmp_path / "run"
    code = main(
        [
            "generate",
            "--tiny",
            "--backend",
            "fastcomposer",
            "--prompt",
            PROMPT,
            "--ref",
            str(tmp_path / "ref.png"),
            "--steps",
            "4",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["license"] == FastComposerBackend.license
    assert manifest["settings"]["backend"] == "fastcomposer"
    assert manifest["settings"]["inject_step"] == 2
    assert [s["name"] for s in manifest["stages"]] == ["same_pass", "masks", "rofa", "expression"]
    for name in ("fd", "pd", "blended", "freecure"):
        assert (out / f"{name}.png").is_file()
