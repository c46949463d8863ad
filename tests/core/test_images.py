"""Reading user images: every mode becomes 8-bit RGB by a documented rule; bad files get clear errors."""

import numpy as np
import pytest
from PIL import Image

from freecure.core.errors import InputError
from freecure.core.images import load_image, to_rgb


def test_rgba_is_composited_over_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (255, 0, 0, 255))  # one opaque red pixel
    rgb = np.asarray(to_rgb(rgba))
    assert rgb.shape == (4, 4, 3)
    assert tuple(rgb[0, 0]) == (255, 0, 0)
    assert tuple(rgb[1, 1]) == (255, 255, 255)


def test_16_bit_greyscale_is_rescaled_from_full_range(tmp_path):
    array = np.array([[0, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(array).save(path)
    rgb = np.asarray(load_image(path))
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 3, 3)
    assert list(rgb[0, :, 0]) == [0, 128, 255]


def test_greyscale_and_palette_expand_to_rgb():
    grey = Image.new("L", (2, 2), 77)
    assert np.all(np.asarray(to_rgb(grey)) == 77)
    palette = Image.new("P", (2, 2))
    palette.putpalette([10, 20, 30] * 256)
    assert tuple(np.asarray(to_rgb(palette))[0, 0]) == (10, 20, 30)


def test_arrays_float_and_integer():
    assert np.asarray(load_image(np.ones((2, 2, 3), np.float32)))[0, 0, 0] == 255
    assert np.asarray(load_image(np.full((2, 2), 65535, np.uint16)))[0, 0, 0] == 255
    with pytest.raises(InputError, match="shape"):
        load_image(np.zeros((2, 2, 5), np.uint8))


def test_missing_unreadable_and_directory_inputs(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(InputError, match="cannot read"):
        load_image(tmp_path / "notes.png")
    with pytest.raises(InputError, match="directory"):
        load_image(tmp_path)


def rotated_phone_photo(path):
    """A JPEG stored sideways with EXIF orientation 6 ("rotate 90° clockwise to view"), as
    phones write them: stored 40×20, red on the stored left half, blue on the right."""
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    stored.save(path, format="JPEG", quality=95, exif=exif.tobytes())
    return path


def test_exif_orientation_is_applied_to_files_and_pil_images(tmp_path):
    path = rotated_phone_photo(tmp_path / "phone.jpg")
    for source in (path, Image.open(path)):
        upright = np.asarray(load_image(source)).astype(int)
        assert upright.shape == (40, 20, 3)  # shown 20 wide, 40 tall
        # rotated clockwise: the stored left (red) half is now on top, the blue half below
        assert upright[5, 10, 0] > 200 and upright[5, 10, 2] < 60
        assert upright[35, 10, 2] > 200 and upright[35, 10, 0] < 60


def test_every_reader_of_user_photos_applies_the_orientation(tmp_path):
    """References of `generate`/the pipeline and of the evaluation identities go through
    freecure.images.load_reference, which applies EXIF orientation too."""
    from freecure.core.images import load_reference

    path = rotated_phone_photo(tmp_path / "phone.jpg")
    assert load_reference(path, min_side=16).size == (20, 40)
    with pytest.raises(InputError, match="too small to hold a face"):
        load_reference(path)  # 20 px < 32 px


def test_decompression_bombs_are_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(InputError, match="too large to decode safely"):
        load_image(path)
