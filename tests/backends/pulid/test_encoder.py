"""PuLID's face encoder (photo → id_cond and EVA-CLIP hidden states) on tiny random towers.

What is checked against what: the timm EVA tower's hidden states against the inputs of its
blocks 4, 8, 12, 16, 20 captured by hooks, its embedding against LayerNorm → class token →
head written out; the released layout (key list derived from the original code, under
tests/data/) loads strictly into the real-size tower built on the meta device, and wrong files
are refused; preprocessing (alignment, grey and white from the parser's labels, bicubic resize,
CLIP mean/std) and ``id_cond``'s order against explicit computations. insightface is not
installed here: its place is taken by a fake with ``FaceAnalysis``'s output fields.

(The tower was also compared once with the original ``eva_clip.EVAVisionTransformer`` run from
a temporary copy of ToTheBeginning/PuLID @ 1aa2fc7 on a tiny random config: embedding and
all five hidden states agreed to 2e-5; that script is not part of the repository.)
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from freecure.backends.common.face_embedding import FaceEmbedding
from freecure.backends.pulid.embedding import FaceSource, PuLIDFaceEmbedding, load_face_embedding
from freecure.backends.pulid.encoder import (
    FACE_TEMPLATE_512,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ROPE_BUFFERS,
    TINY_EVA,
    EvaCLIPVision,
    EvaVisionConfig,
    PuLIDFaceEncoder,
    eva_pixels,
    identity_condition,
    load_eva_clip_vision,
    original_key,
    similarity_transform,
    timm_key,
    warp_face,
)
from freecure.cli import main
from freecure.core.errors import InputError, WeightsNotFoundError
from freecure.parsing import ParseResult
from tests.keylists import meta_state_dict, read_layout

pytest.importorskip("timm")

LAYOUT = "eva02_clip_l_336_visual_keys.txt"


@pytest.fixture(scope="module")
def tower() -> EvaCLIPVision:
    torch.manual_seed(0)
    vision = EvaCLIPVision(TINY_EVA).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a skipped one shows
        for p in vision.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
    return vision


# --- the EVA-CLIP vision tower ---------------------------------------------------------------------


def test_taps_are_the_inputs_of_blocks_4_to_20_as_the_original_rule():
    assert EvaVisionConfig().taps == (4, 8, 12, 16, 20)
    assert EvaVisionConfig(depth=10).taps == (4, 8)
    assert TINY_EVA.taps == (4, 8, 12, 16, 20) and TINY_EVA.tokens == 5


def test_tower_returns_block_inputs_and_the_head_of_the_normed_class_token(tower):
    seen = {}
    trunk = tower.trunk
    hooks = [blk.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].clone()))
             for i, blk in enumerate(trunk.blocks)]
    hooks.append(trunk.blocks[-1].register_forward_hook(lambda m, a, out: seen.__setitem__("last", out.clone())))
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        embedding, hidden = tower(x)
    for hook in hooks:
        hook.remove()
    assert len(hidden) == 5
    for h, tap in zip(hidden, (4, 8, 12, 16, 20)):
        assert h.shape == (2, 5, 16)
        torch.testing.assert_close(h, seen[tap], rtol=0, atol=0)
    assert not torch.equal(hidden[0], seen[3]) and not torch.equal(hidden[0], seen[5])
    ln = trunk.norm
    normed = torch.nn.functional.layer_norm(seen["last"], (16,), ln.weight, ln.bias, eps=1e-6)
    expected = normed[:, 0] @ trunk.head.weight.T + trunk.head.bias  # class token, no mean pooling
    torch.testing.assert_close(embedding, expected, rtol=1e-5, atol=1e-5)


def original_checkpoint(vision: EvaCLIPVision) -> dict[str, torch.Tensor]:
    """The tower's weights as the original's checkpoint names them, with the text tower and
    the rope buffers the original deletes before loading."""
    state = {original_key(k): v.clone() for k, v in vision.trunk.state_dict().items()}
    state["visual.rope.freqs_cos"] = torch.zeros(4, 8)
    state["visual.blocks.0.attn.rope.freqs_sin"] = torch.zeros(4, 8)
    state["text.token_embedding.weight"] = torch.zeros(3, 2)
    state["logit_scale"] = torch.zeros(())
    return state


def test_original_names_round_trip_and_load_strictly(tower, tmp_path):
    state = original_checkpoint(tower)
    assert "visual.blocks.0.mlp.w3.weight" in state and "visual.blocks.0.attn.q_bias" in state
    assert all(timm_key(original_key(k)[len("visual."):]) == k for k in tower.trunk.state_dict())
    path = tmp_path / "eva.pt"
    torch.save({"module": state}, path)  # read with weights_only=True, wrapper removed
    from freecure.core.checkpoints import read_tensors

    loaded = load_eva_clip_vision(EvaCLIPVision(TINY_EVA), read_tensors(path, nested=True), "eva.pt").eval()
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        a, b = tower(x), loaded(x)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)


def test_released_layout_loads_into_the_real_size_tower_on_meta():
    layout = read_layout(LAYOUT)
    assert len(layout) == 512 and not any(k.endswith(ROPE_BUFFERS) for k in layout)
    with torch.device("meta"):
        vision = EvaCLIPVision(EvaVisionConfig())
    load_eva_clip_vision(vision, meta_state_dict(layout), "layout")
    assert sum(p.numel() for p in vision.parameters()) == sum(int(np.prod(s)) for s in layout.values())
    embedding, hidden = vision(torch.empty(1, 3, 336, 336, device="meta"))
    assert embedding.shape == (1, 768)
    assert [tuple(h.shape) for h in hidden] == [(1, 577, 1024)] * 5


def test_timm_checkpoint_filter_renames_the_released_layout_as_ours():
    from timm.models.eva import checkpoint_filter_fn

    layout = read_layout(LAYOUT)
    with torch.device("meta"):
        vision = EvaCLIPVision(EvaVisionConfig())
    filtered = checkpoint_filter_fn(meta_state_dict(layout), vision.trunk)
    assert set(filtered) == {timm_key(k[len("visual."):]) for k in layout}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.pop("visual.blocks.3.mlp.w3.weight"), "missing keys (1): visual.blocks.3.mlp.w3.weight"),
        (lambda s: s.__setitem__("visual.blocks.0.attn.gamma", torch.zeros(16)), "unexpected keys (1)"),
        (lambda s: s.__setitem__("visual.pos_embed", torch.zeros(1, 17, 16)), "shape mismatches (1): visual.pos_embed"),
    ],
)
def test_wrong_checkpoints_are_refused_naming_the_original_key(tower, change, message):
    state = original_checkpoint(tower)
    change(state)
    with pytest.raises(WeightsNotFoundError, match="does not match EVA02-CLIP-L-14-336") as error:
        load_eva_clip_vision(EvaCLIPVision(TINY_EVA), state, "eva.pt")
    assert message in str(error.value)


def test_eva_clip_weights_missing_file_or_offline_hub_say_what_to_pass(tmp_path, monkeypatch):
    from freecure.backends.pulid.encoder import eva_clip_weights

    with pytest.raises(WeightsNotFoundError, match="is not a file.*--eva-clip-weights"):
        eva_clip_weights(tmp_path / "none.pt")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WeightsNotFoundError, match="could not download QuanSun/EVA-CLIP.*--face-embedding"):
        eva_clip_weights(None)


def test_a_checkpoint_without_the_vision_tower_is_refused(tower):
    with pytest.raises(WeightsNotFoundError, match="no 'visual"):
        load_eva_clip_vision(EvaCLIPVision(TINY_EVA), {"text.token_embedding.weight": torch.zeros(3, 2)}, "text.pt")


# --- alignment and pixels --------------------------------------------------------------------------


def test_similarity_transform_recovers_a_known_similarity():
    angle, scale, shift = 0.3, 0.7, np.array([40.0, -25.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = (FACE_TEMPLATE_512 - shift) @ np.linalg.inv(scale * rotation).T  # template = sR·p + t
    matrix = similarity_transform(points)
    np.testing.assert_allclose(matrix[:, :2], scale * rotation, atol=1e-9)
    np.testing.assert_allclose(points @ matrix[:, :2].T + matrix[:, 2], FACE_TEMPLATE_512, atol=1e-9)


def test_warp_face_is_bilinear_sampling_with_the_grey_border():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    matrix = np.array([[2.0, 0.0, 3.0], [0.0, 2.0, 1.0]])  # aligned = 2·photo + (3, 1)
    out = warp_face(image, matrix, size=64)
    # aligned pixel (x, y) = (10, 7) samples the photo at (3.5, 3): halfway between columns 3 and 4
    expected = (image[3, 3].astype(float) + image[3, 4]) / 2
    np.testing.assert_allclose(out[7, 10], np.round(expected), atol=1)
    np.testing.assert_array_equal(out[1, 3], image[0, 0])  # (3, 1) is the photo's first pixel
    np.testing.assert_array_equal(out[63, 0], (132, 133, 135))  # outside: facexlib's grey (RGB)


def test_eva_pixels_are_bicubic_without_antialias_and_clip_normalised():
    tf = pytest.importorskip("torchvision.transforms.functional")
    from torchvision.transforms import InterpolationMode

    features = np.random.default_rng(1).random((64, 64, 3)).astype(np.float32)
    t = torch.from_numpy(features).permute(2, 0, 1)[None]
    def torchvision_pixels(antialias: bool) -> torch.Tensor:
        resized = tf.resize(t, 42, InterpolationMode.BICUBIC, antialias=antialias)
        return tf.normalize(resized, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    torch.testing.assert_close(eva_pixels(features, 42), torchvision_pixels(antialias=False))
    assert not torch.allclose(eva_pixels(features, 42), torchvision_pixels(antialias=True))


def test_id_cond_is_arcface_then_the_normalised_eva_embedding():
    arcface, eva = torch.randn(2, 8), torch.randn(2, 16) * 5
    out = identity_condition(arcface, eva)
    assert torch.equal(out[:, :8], arcface)
    torch.testing.assert_close(out[:, 8:].norm(dim=1), torch.ones(2))
    torch.testing.assert_close(out[:, 8:] * eva.norm(dim=1, keepdim=True), eva)


# --- the encoder --------------------------------------------------------------------------------


class FakeAnalyzer:
    """insightface's role: a fixed raw embedding and 5 keypoints (``FaceAnalysis.get`` fields
    of the largest face, as :class:`InsightFaceAnalyzer` returns them)."""

    def __init__(self, keypoints):
        self.keypoints = torch.tensor(keypoints, dtype=torch.float32)
        self.embedding = torch.linspace(-3, 3, 8)

    def __call__(self, image):
        return FaceEmbedding(self.embedding, self.keypoints, image.size)


class HalfBackgroundParser:
    """BiSeNet's role: left half background (0), right half skin (1), top-right rows neck (14)."""

    def __call__(self, image):
        w, h = image.size
        labels = np.ones((h, w), np.uint8)
        labels[:, : w // 2] = 0
        labels[:10, w // 2 :] = 14
        return ParseResult(labels, None, (0, 0, w, h), False, "fake")


def test_encoder_matches_the_original_steps_written_out(tower, astronaut):
    kps = [[200.0, 250.0], [300.0, 248.0], [252.0, 310.0], [210.0, 360.0], [295.0, 362.0]]
    encoder = PuLIDFaceEncoder(FakeAnalyzer(kps), HalfBackgroundParser(), tower)
    face = encoder([astronaut])
    # the steps, written out
    photo = np.asarray(astronaut.convert("RGB"))
    aligned = warp_face(photo, similarity_transform(np.array(kps))).astype(np.float32) / 255
    grey = aligned @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    white = np.zeros((512, 512), bool)
    white[:, :256] = True
    white[:10, 256:] = True
    features = np.repeat(np.where(white, 1.0, grey)[..., None], 3, -1)
    with torch.no_grad():
        eva, hidden = tower(eva_pixels(features, 28))
    expected = torch.cat([torch.linspace(-3, 3, 8)[None], eva / eva.norm(dim=1, keepdim=True)], 1)
    torch.testing.assert_close(face.id_cond, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(face.vit_hidden, hidden):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert face.id_cond.shape == (1, 24) and len(face.vit_hidden) == 5


def test_encoder_stacks_one_row_per_photo_and_flux_reads_the_first(tower, astronaut):
    calls = []
    encoder = PuLIDFaceEncoder.tiny()

    def counting(images):
        calls.append(len(images))
        return encoder(images)

    flipped = astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    both = encoder([astronaut, flipped])
    assert both.id_cond.shape == (2, 24) and all(h.shape == (2, 5, 16) for h in both.vit_hidden)
    flux = FaceSource(encoder=counting, max_refs=1)
    first = flux([astronaut, flipped])
    assert torch.equal(first.id_cond, both.id_cond[:1]) and calls == [1]
    flux([astronaut, flipped])
    assert calls == [1]  # same photos: computed once
    flux([flipped])
    assert calls == [1, 1]


def test_tiny_backends_compute_the_identity_from_the_reference(tiny_flux, astronaut):
    from freecure.backends import PuLIDFluxBackend
    from freecure.core.conditioning import TextConditioning

    encoder = PuLIDFaceEncoder.tiny()
    backend = PuLIDFluxBackend.build_tiny(pipeline=tiny_flux, encoder=encoder)
    assert backend.face is None
    fd = TextConditioning(torch.zeros(1, 4, 32), torch.zeros(1, 32))
    pd, _ = backend.identity_conditions(None, [astronaut], fd, 4)
    tokens, uncond = backend.identity_tokens(encoder([astronaut]))
    torch.testing.assert_close(pd.id_tokens, tokens)
    torch.testing.assert_close(pd.uncond_id_tokens, uncond)


def test_sdxl_backend_reads_every_reference_one_row_each(tiny_sdxl, astronaut):
    from freecure.backends import PuLIDSDXLBackend
    from freecure.core.conditioning import TextConditioning

    encoder = PuLIDFaceEncoder.tiny()
    backend = PuLIDSDXLBackend.build_tiny(pipeline=tiny_sdxl, encoder=encoder)
    try:
        refs = [astronaut, astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
        dim = tiny_sdxl.unet.config.cross_attention_dim
        fd = TextConditioning(torch.zeros(1, 4, dim), torch.zeros(1, 8))
        pd, _ = backend.identity_conditions(None, refs, fd, 4)
        tokens, _ = backend.identity_tokens(encoder(refs))
        torch.testing.assert_close(pd.id_tokens, tokens)
        one, _ = backend.identity_tokens(encoder(refs[:1]))
        assert not torch.allclose(pd.id_tokens, one)
    finally:
        backend.restore_processors()


def test_from_pretrained_uses_antelopev2_raw_embeddings_and_parses_the_whole_aligned_face(monkeypatch):
    import importlib.util

    from freecure.backends.common import face_embedding
    from freecure.backends.pulid import encoder as pulid_encoder

    made = {}

    class Recorder:
        def __init__(self, name, normed, device=None, root=None, aligned_size=None):
            made.update(name=name, normed=normed)

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name in (
        "insightface", "onnxruntime") else find_spec(name, *a))
    monkeypatch.setattr(face_embedding, "InsightFaceAnalyzer", Recorder)
    monkeypatch.setattr(pulid_encoder, "pretrained_eva_clip_vision", lambda path: EvaCLIPVision(TINY_EVA))
    from freecure.parsing import BiSeNet, weights

    monkeypatch.setattr(weights, "resolve_bisenet_weights", lambda given: argparse.Namespace(path="bisenet.pth"))
    monkeypatch.setattr(weights, "load_bisenet", lambda path, device: BiSeNet(width=8))
    encoder = PuLIDFaceEncoder.from_pretrained(device="cpu")
    assert made == {"name": "antelopev2", "normed": False}
    assert encoder.parser.detector is None and encoder.parser.hair_crop_scale is None


# --- command line ------------------------------------------------------------------------------


def test_embed_tiny_writes_a_file_the_tiny_backends_read(tmp_path, capsys):
    from freecure.backends.pulid.idformer import tiny_idformer_config

    out = tmp_path / "face.safetensors"
    args = ["embed", "--tiny", "--backend", "pulid-sdxl", "--ref", "examples/astronaut.png", "--out", str(out)]
    assert main(args) == 0
    assert "id_cond (1, 24)" in capsys.readouterr().out
    face = load_face_embedding(out)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert "non-commercial" in f.metadata()["licence"]
    config = tiny_idformer_config(24)
    face.check(config.id_dim, config.vit_dim, "tiny")
    expected = PuLIDFaceEncoder.tiny()([Image.open("examples/astronaut.png")])
    torch.testing.assert_close(face.id_cond, expected.id_cond)
    assert main(args) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err


def test_embed_flux_takes_one_photo(tmp_path, capsys):
    args = ["embed", "--tiny", "--backend", "pulid-flux", "--ref", "examples/astronaut.png", "--ref",
            "examples/astronaut.png", "--out", str(tmp_path / "f.safetensors")]
    assert main(args) == 2
    assert "give one --ref" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [
        ["embed", "--backend", "pulid-flux", "--ref", "examples/astronaut.png", "--out", "OUT/f.safetensors"],
        ["generate", "--backend", "pulid-sdxl", "--ref", "examples/astronaut.png", "--prompt", "a man", "--out", "OUT"],
        ["generate", "--backend", "pulid-flux", "--ref", "examples/astronaut.png", "--prompt", "a man", "--out", "OUT"],
    ],
)
def test_without_insightface_one_line_says_what_to_install(args, tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    def without_insightface(name, *rest):
        return None if name == "insightface" else find_spec(name, *rest)

    monkeypatch.setattr(importlib.util, "find_spec", without_insightface)
    assert main([a.replace("OUT", str(tmp_path / "out")) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "insightface is not installed" in err and "freecure[pulid]" in err and "non-commercial" in err
    assert not any(tmp_path.iterdir())


def test_without_ref_or_embedding_the_backend_says_what_to_pass():
    from freecure.backends.pulid.sdxl import face_from_cli

    with pytest.raises(InputError, match="needs --ref PHOTO .* or --face-embedding"):
        face_from_cli(argparse.Namespace(face_embedding=None, ref=[], device="cpu"), "pulid-flux")


def test_face_source_needs_something():
    with pytest.raises(ValueError):
        FaceSource()
    fixed = PuLIDFaceEmbedding(torch.zeros(1, 24), tuple(torch.zeros(1, 5, 16) for _ in range(5)))
    assert FaceSource(fixed)([]) is fixed
