"""The evaluation metrics: PC on a tiny random CLIP, IF with real dlib / FaceNet loading, LPIPS with
the real offline AlexNet weights, and face diversity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from freecure.core.errors import InputError, WeightsNotFoundError
from freecure.evaluation.metrics import (
    LPIPS,
    DlibEmbedder,
    FaceNetEmbedder,
    IdentityFidelity,
    PromptConsistency,
    build_tiny_clip,
    choose_results,
    clip_preprocess,
    face_crop,
    face_diversity,
    load_facenet,
    resolve_facenet_weights,
)
from freecure.evaluation.metrics.identity import FACENET_FILE


def noise_images(count: int, size=(64, 48)) -> list[Image.Image]:
    return [
        Image.fromarray(np.random.RandomState(i).randint(0, 256, (size[1], size[0], 3), np.uint8)) for i in range(count)
    ]


# --------------------------------------------------------------------------- PC (CLIP-T)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> PromptConsistency:
    directory = build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))
    return PromptConsistency.from_pretrained(str(directory), batch_size=2)


def test_clip_preprocess_is_openai_resize_crop_normalise():
    image = Image.new("RGB", (96, 48), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 12, 48))  # a black band on the left that the centre crop removes
    pixels = clip_preprocess(image, 32)
    assert pixels.shape == (3, 32, 32)
    white = (1.0 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711]
    )
    assert torch.allclose(pixels.mean(dim=(1, 2)), white, atol=1e-4)


def test_pc_shapes_and_range(tiny_clip):
    scores = tiny_clip(noise_images(5), "a woman with black curly hair")
    assert scores.shape == (5,)
    assert torch.all(scores.abs() <= 100.0)
    assert tiny_clip.image_embeddings(noise_images(3)).shape == (3, 16)
    embeddings = tiny_clip.text_embeddings(["a woman", "a man laughing"])
    assert embeddings.shape == (2, 16)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_pc_batching_equals_one_by_one(tiny_clip):
    images = noise_images(5)
    texts = ["a woman", "a woman with blue eyes", "a man laughing", "a woman", "a boy wearing sunglasses"]
    batched = tiny_clip(images, texts)  # batch_size 2: three forward passes
    single = torch.cat([tiny_clip([image], [text]) for image, text in zip(images, texts)])
    assert torch.allclose(batched, single, atol=1e-4)
    # one text for every image is the same as repeating it
    assert torch.allclose(tiny_clip(images, "a woman"), tiny_clip(images, ["a woman"] * 5), atol=1e-5)


def test_pc_is_100_times_the_embedding_cosine(tiny_clip):
    images = noise_images(2)
    expected = 100 * (tiny_clip.image_embeddings(images) @ tiny_clip.text_embeddings(["a man"]).T).squeeze(1)
    assert torch.allclose(tiny_clip(images, "a man"), expected, atol=1e-5)
    assert not torch.allclose(tiny_clip(images, "a man"), tiny_clip(images, "a woman with red hair"))


def test_pc_rejects_mismatched_texts(tiny_clip):
    with pytest.raises(ValueError, match="one text or one per image"):
        tiny_clip(noise_images(3), ["a", "b"])


def test_pc_unknown_model_says_what_to_do():
    with pytest.raises(InputError, match="could not load the CLIP model"):
        PromptConsistency.from_pretrained("/nonexistent/clip-folder")


def test_pc_open_clip_backend(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    import json

    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / "freecure-test-tiny.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path)
    scorer = PromptConsistency.from_pretrained("open_clip:freecure-test-tiny")
    scores = scorer(noise_images(3), "a woman")
    assert scores.shape == (3,) and torch.all(scores.abs() <= 100)
    assert scorer.name == "open_clip:freecure-test-tiny"


# --------------------------------------------------------------------------- IF (real dlib)


@pytest.fixture(scope="module")
def dlib_fidelity() -> IdentityFidelity:
    pytest.importorskip("dlib")
    pytest.importorskip("facenet_pytorch")
    return IdentityFidelity(DlibEmbedder.from_pretrained())


@pytest.fixture(scope="module")
def reference(dlib_fidelity, astronaut):
    return dlib_fidelity.reference([astronaut])


@pytest.fixture(scope="module")
def mirrored_score(dlib_fidelity, astronaut, reference):
    return dlib_fidelity.score(ImageOps.mirror(astronaut), reference)


def test_if_same_photo_is_100(dlib_fidelity, astronaut, reference):
    assert dlib_fidelity.score(astronaut, reference) == pytest.approx(100.0, abs=1e-3)


def test_if_mirrored_and_rescaled_photo_is_close(dlib_fidelity, astronaut, reference, mirrored_score):
    assert mirrored_score > 97
    assert dlib_fidelity.score(astronaut.resize((256, 256)), reference) > 97


def test_if_different_face_scores_lower(dlib_fidelity, reference, mirrored_score):
    from skimage import data

    cameraman = Image.fromarray(data.camera()).convert("RGB")
    face = dlib_fidelity.face(cameraman)
    assert face is not None
    assert IdentityFidelity.similarity(face.embedding, reference) < mirrored_score - 10
    # dlib's own same-person rule is Euclidean distance < 0.6
    assert (face.embedding - reference[0]).norm() > 0.6


def test_if_no_face_is_a_failure_not_a_number(dlib_fidelity, reference, grey_image):
    assert dlib_fidelity.face(grey_image) is None
    assert dlib_fidelity.score(grey_image, reference) is None
    with pytest.raises(InputError, match="no face found in reference photo 1"):
        dlib_fidelity.reference([grey_image])


def test_if_face_crop_is_the_box_at_160(dlib_fidelity, astronaut):
    small = astronaut.resize((256, 256))
    face = dlib_fidelity.face(small)
    left, top, right, bottom = face.box
    assert 0 <= left < right <= 256 and 0 <= top < bottom <= 256
    assert face.crop.size == (160, 160)
    expected = small.crop(face.box).resize((160, 160), Image.BILINEAR)
    assert np.array_equal(np.asarray(face.crop), np.asarray(expected))


def test_if_several_references_average():
    torch.manual_seed(0)
    embedding, first, second = torch.randn(3, 128)
    expected = (IdentityFidelity.similarity(embedding, [first]) + IdentityFidelity.similarity(embedding, [second])) / 2
    assert IdentityFidelity.similarity(embedding, [first, second]) == pytest.approx(expected, abs=1e-4)
    cosine = torch.nn.functional.cosine_similarity(embedding, first, dim=0)
    assert IdentityFidelity.similarity(embedding, [first]) == pytest.approx(100 * cosine.item(), abs=1e-4)


def test_dlib_files_named_by_environment_must_exist(monkeypatch, tmp_path):
    pytest.importorskip("dlib")
    monkeypatch.setenv("FREECURE_DLIB_RECOGNITION", str(tmp_path / "missing.dat"))
    with pytest.raises(WeightsNotFoundError, match="missing.dat"):
        DlibEmbedder.from_pretrained()


# --------------------------------------------------------------------------- FaceNet loading path


@pytest.fixture(scope="module")
def facenet_file(tmp_path_factory):
    """A FaceNet checkpoint shaped like the release (random weights + the 8631-class logits head)."""
    facenet_pytorch = pytest.importorskip("facenet_pytorch")
    torch.manual_seed(0)
    model = facenet_pytorch.InceptionResnetV1(pretrained=None).eval()
    state = model.state_dict()
    state["logits.weight"] = torch.randn(8631, 512)
    state["logits.bias"] = torch.randn(8631)
    path = tmp_path_factory.mktemp("facenet") / FACENET_FILE
    torch.save(state, path)
    return path, model.state_dict()


def _no_download(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    import facenet_pytorch.models.inception_resnet_v1 as irv1

    monkeypatch.setattr(irv1, "download_url_to_file", refuse)


def test_facenet_loads_a_local_file_without_download(monkeypatch, facenet_file, astronaut):
    _no_download(monkeypatch)
    path, expected = facenet_file
    embedder = FaceNetEmbedder.from_pretrained(path)
    loaded = embedder.model.state_dict()
    assert set(loaded) == set(expected)  # the logits head is dropped
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)
    assert not embedder.model.training
    embedding = embedder(astronaut, (181, 62, 268, 173))
    assert embedding.shape == (512,)
    assert embedding.norm().item() == pytest.approx(1.0, abs=1e-4)


def test_facenet_uses_weights_only_loading(tmp_path, monkeypatch):
    _no_download(monkeypatch)
    path = tmp_path / "pickled.pt"
    torch.save({"conv2d_1a.conv.weight": torch.zeros(1), "extra": np.float64(1.0).__class__}, path)
    with pytest.raises(WeightsNotFoundError, match="tensor-only"):
        load_facenet(path)
    wrong = tmp_path / "wrong.pt"
    torch.save({"some.weight": torch.zeros(3)}, wrong)
    with pytest.raises(WeightsNotFoundError, match="does not match InceptionResnetV1"):
        load_facenet(wrong)


def test_facenet_weight_lookup_order(tmp_path, monkeypatch, facenet_file):
    _no_download(monkeypatch)
    path, _ = facenet_file
    cache = tmp_path / "torch-home"
    env = {"TORCH_HOME": str(cache)}
    with pytest.raises(WeightsNotFoundError, match="downloads are off"):
        resolve_facenet_weights(download=False, environ=env)
    (cache / "checkpoints").mkdir(parents=True)
    cached = cache / "checkpoints" / FACENET_FILE
    cached.write_bytes(path.read_bytes())
    assert resolve_facenet_weights(download=False, environ=env) == cached
    assert resolve_facenet_weights(path, environ=env) == path
    assert resolve_facenet_weights(environ={**env, "FREECURE_FACENET_WEIGHTS": str(path)}) == path
    with pytest.raises(WeightsNotFoundError, match="do not exist"):
        resolve_facenet_weights(tmp_path / "nope.pt", environ=env)


# --------------------------------------------------------------------------- LPIPS and face diversity


@pytest.fixture(scope="module")
def lpips() -> LPIPS:
    return LPIPS.from_pretrained()


def test_lpips_grows_with_distortion_and_separates_images(lpips, astronaut):
    # Real weights, real photo: more noise is perceptually farther, and another picture is
    # farther still than mild noise.
    crop = np.asarray(astronaut.crop((150, 40, 300, 190)), dtype=np.float32)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(crop.shape).astype(np.float32)
    noisy = [Image.fromarray(np.clip(crop + sigma * noise, 0, 255).astype(np.uint8)) for sigma in (4, 16, 48)]
    original = Image.fromarray(crop.astype(np.uint8))
    distances = lpips.distance([original] * 3, noisy, size=160).tolist()
    assert 0 < distances[0] < distances[1] < distances[2]
    from skimage import data

    other = Image.fromarray(data.camera()).convert("RGB").resize(original.size)
    assert lpips.distance([original], [other], size=160).item() > distances[0]


def test_lpips_of_identical_crops_is_zero(lpips, astronaut):
    crop = astronaut.crop((181, 62, 268, 173))
    assert lpips.distance([crop, crop], [crop, crop], size=160).tolist() == [0.0, 0.0]


def test_lpips_batching_and_symmetry(lpips, astronaut):
    a = [astronaut.crop((x, 60, x + 100, 160)) for x in (100, 150, 200)]
    b = [ImageOps.mirror(image) for image in a]
    batched = lpips.distance(a, b, size=64)
    single = torch.cat([lpips.distance([x], [y], size=64) for x, y in zip(a, b)])
    assert torch.allclose(batched, single, atol=1e-5)
    assert torch.allclose(lpips.distance(b, a, size=64), batched, atol=1e-5)
    assert torch.all(batched > 0)


def test_lpips_refuses_foreign_pickles(tmp_path):
    import collections
    import pickle

    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"AlexNet_0": collections.OrderedDict}))  # a class reference, not arrays
    with pytest.raises(WeightsNotFoundError, match="alexnet.ckpt"):
        LPIPS.from_pretrained(path)


def test_choose_results_is_reproducible_and_keyed():
    seeds = list(range(10))
    first = choose_results(seeds, 5, "token-fusion|abc|astronaut|0")
    assert first == choose_results(list(reversed(seeds)), 5, "token-fusion|abc|astronaut|0")
    assert len(first) == 5 and len(set(first)) == 5 and set(first) <= set(seeds)
    others = {tuple(choose_results(seeds, 5, f"key{i}")) for i in range(10)}
    assert len(others) > 1
    assert choose_results([3, 1], 5, "x") == [1, 3]


def test_face_diversity_averages_every_pair(lpips, astronaut):
    crops = [face_crop(astronaut, (181 + dx, 62, 268 + dx, 173)) for dx in (0, 5, 10, 15, 20)]
    value, pairs = face_diversity(crops, lpips)
    assert pairs == 10
    all_pairs = [(i, j) for i in range(5) for j in range(i + 1, 5)]
    expected = lpips.distance([crops[i] for i, _ in all_pairs], [crops[j] for _, j in all_pairs], size=160).mean()
    assert value == pytest.approx(100 * expected.item(), abs=1e-4)
    same, _ = face_diversity([crops[0]] * 5, lpips)
    assert same == 0.0
    assert face_diversity(crops[:1], lpips) == (None, 0)


def test_lpips_value_is_pinned_and_goes_through_the_linear_heads(lpips, astronaut):
    """Pinned on the astronaut (CPU, 2026-11-30): a blurred and a mirrored face crop at 64 px.
    A fault in the normalisation, the scaling layer, the slices or the learned "lin" heads
    moves these values; zeroed heads give zero."""
    import copy

    from PIL import ImageFilter

    face = astronaut.crop((150, 30, 310, 190))
    others = [face.filter(ImageFilter.GaussianBlur(3)), ImageOps.mirror(face)]
    distances = lpips.distance([face, face], others, size=64)
    torch.testing.assert_close(distances, torch.tensor([0.192169, 0.148730]), rtol=0, atol=1e-4)
    headless = copy.deepcopy(lpips)
    for head in headless.heads:
        head.weight.data.zero_()
    assert headless.distance([face], others[:1], size=64).item() == 0.0


def test_unknown_identity_model_is_an_input_error():
    with pytest.raises(InputError, match="unknown identity model 'arcface'"):
        IdentityFidelity.from_name("arcface")
