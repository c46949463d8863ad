"""Reading user images: every mode becomes 8-bit RGB by a documented rule; bad files get clear errors."""

import numpy as np
import pytest
from PIL import Image

from freecure.errors import InputError
from freecure.images import load_image, to_rgb


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
