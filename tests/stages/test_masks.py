"""SAME mask maths (eq. 4 and 5): properties that must hold for any input."""

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from freecure.core.labels import CLASS_TO_ID
from freecure.families.tiny import LayoutFaceParser
from freecure.stages.masks import (
    PLACEMENTS,
    above_mask,
    attribute_mask,
    dilate_mask,
    merge_masks,
    normalize_map,
    placement_region,
    render_mask,
    render_mask_overlay,
    resize_map,
    to_latent_resolution,
)


def random_case(seed: int, size=(32, 32), attention=(8, 8)):
    g = torch.Generator().manual_seed(seed)
    heat = torch.rand(attention, generator=g) * 5 - 1
    pd = torch.rand(size, generator=g) > 0.5
    fd = torch.rand(size, generator=g) > 0.4
    return heat, pd, fd


@pytest.mark.parametrize("seed", range(5))
def test_normalize_map_spans_unit_interval(seed):
    heat, _, _ = random_case(seed)
    norm = normalize_map(heat)
    assert norm.min() == 0 and norm.max() == 1
    # order is preserved: argmax and argmin stay where they were
    assert norm.argmax() == heat.argmax() and norm.argmin() == heat.argmin()


def test_constant_map_normalises_to_zero():
    assert torch.count_nonzero(normalize_map(torch.full((4, 4), 3.0))) == 0


@pytest.mark.parametrize("seed", range(5))
def test_attribute_mask_range_and_support(seed):
    heat, pd, fd = random_case(seed)
    mask = attribute_mask(heat, pd, fd)
    assert mask.shape == pd.shape
    assert mask.min() >= 0 and mask.max() <= 1
    # zero wherever either parse mask is zero
    assert torch.all(mask[~pd] == 0) and torch.all(mask[~fd] == 0)
    # and equal to the normalised attention where both are one
    both = pd & fd
    full = attribute_mask(heat, torch.ones_like(pd), torch.ones_like(fd))
    assert torch.allclose(mask[both], full[both])


def test_attribute_mask_rejects_mismatched_parse_masks():
    heat, pd, _ = random_case(0)
    with pytest.raises(ValueError, match="same shape"):
        attribute_mask(heat, pd, pd[:16])


def test_merge_is_max_and_order_free():
    masks = [attribute_mask(*random_case(seed)) for seed in range(3)]
    merged = merge_masks(masks)
    assert torch.equal(merged, torch.maximum(torch.maximum(masks[0], masks[1]), masks[2]))
    for order in itertools.permutations(masks):
        assert torch.equal(merge_masks(list(order)), merged)
    with pytest.raises(ValueError):
        merge_masks([])


def test_latent_resolution_averages_and_broadcasts():
    mask = torch.zeros(64, 64)
    mask[:32] = 1.0  # top half
    latent = to_latent_resolution(mask, (8, 8))
    assert latent.shape == (1, 1, 8, 8)
    assert torch.all(latent[..., :4, :] == 1) and torch.all(latent[..., 4:, :] == 0)
    assert torch.isclose(latent.mean(), mask.mean())


def test_latent_resolution_of_a_non_square_mask_keeps_rows_and_columns():
    mask = torch.zeros(64, 96)  # 64 high, 96 wide
    mask[:16, :24] = 1.0  # the top-left block
    latent = to_latent_resolution(mask, (32, 48))
    assert latent.shape == (1, 1, 32, 48)
    assert torch.all(latent[0, 0, :8, :12] == 1) and latent[0, 0, 8:].sum() == 0 and latent[0, 0, :, 12:].sum() == 0
    up = resize_map(latent[0, 0], (64, 96))
    assert up.shape == (64, 96) and torch.all(up[:14, :22] == 1) and torch.all(up[18:] == 0)


def test_attention_maps_are_upsampled_bilinearly():
    """An attention map goes up to the parse masks' resolution bilinearly (half-pixel centres,
    edges clamped): one hot cell becomes a ramp, not the constant block that area (nearest-like)
    upsampling would give."""
    hot = torch.zeros(2, 2)
    hot[0, 0] = 1.0
    up = resize_map(hot, (8, 8))
    ramp = torch.tensor([1.0, 1.0, 0.875, 0.625, 0.375, 0.125, 0.0, 0.0])
    torch.testing.assert_close(up[0], ramp, rtol=0, atol=1e-6)
    torch.testing.assert_close(up, ramp[:, None] * ramp[None, :], rtol=0, atol=1e-6)  # separable
    assert len(torch.unique(up)) > 2  # area would give only 0 and 1


def test_attention_maps_are_downsampled_by_area():
    """Down-sizing averages each block of cells (area): a lone hot cell keeps its mass (1/16 of its
    4×4 block) and the mean is preserved; bilinear sampling would read only the middle of each block
    and lose the cell."""
    hot = torch.zeros(8, 8)
    hot[0, 0] = 1.0
    down = resize_map(hot, (2, 2))
    assert down[0, 0] == 1 / 16 and down.sum() == 1 / 16
    g = torch.Generator().manual_seed(0)
    heat = torch.rand(32, 48, generator=g)
    down = resize_map(heat, (8, 12))
    torch.testing.assert_close(down, heat.reshape(8, 4, 12, 4).mean(dim=(1, 3)), rtol=0, atol=1e-6)


def test_overlay_tints_only_inside_mask():
    image = Image.fromarray(np.full((16, 16, 3), 100, np.uint8))
    mask = torch.zeros(16, 16)
    mask[:, :8] = 1
    out = np.asarray(render_mask_overlay(image, mask, color=(255, 0, 0), alpha=0.5))
    assert np.all(out[:, 8:] == 100)
    assert np.all(out[:, :8, 0] > 100) and np.all(out[:, :8, 1] < 100)
    grey = render_mask(mask, size=(32, 32))
    assert grey.size == (32, 32) and grey.mode == "L"
    levels = render_mask(torch.tensor([[0.0, 0.5, 1.0, 2.0]]))
    assert np.asarray(levels).tolist() == [[0, 128, 255, 255]]  # rounded, white = 1, clamped


# --- PD-side placement regions (PD's factor of eq. 4) ------------------------------------


def layout_parse(size=(96, 128), extra=None):
    """The synthetic portrait layout of the given (H, W), optionally with one class painted on."""
    parse = LayoutFaceParser()(Image.new("RGB", (size[1], size[0])))
    if extra is not None:
        name, (top, bottom, left, right) = extra
        parse.labels[top:bottom, left:right] = CLASS_TO_ID[name]
    return parse


def mask_of(parse):
    return lambda names: torch.from_numpy(parse.mask(names))


def test_dilate_grows_by_exactly_the_radius():
    mask = torch.zeros(11, 13, dtype=torch.bool)
    mask[5, 6] = True
    grown = dilate_mask(mask, 2)
    assert grown.sum() == 25 and grown[3:8, 4:9].all()
    assert torch.equal(dilate_mask(mask, 0), mask)


def test_above_is_strictly_above_the_topmost_pixel_of_each_column():
    mask = torch.zeros(6, 4, dtype=torch.bool)
    mask[3, 1] = mask[5, 1] = mask[2, 3] = True
    expected = torch.zeros(6, 4, dtype=torch.bool)
    expected[:3, 1] = True
    expected[:2, 3] = True
    assert torch.equal(above_mask(mask), expected)


def test_eyewear_belongs_on_the_eyes_and_brows_dilated_even_when_pd_drew_none():
    parse = layout_parse()
    region = placement_region(mask_of(parse), "eyewear", ("eye_g",))
    eyes_brows = torch.from_numpy(parse.mask(("eyes", "brows")))
    assert not parse.mask("eye_g").any() and region.any()
    assert region[eyes_brows].all() and region.sum() > eyes_brows.sum()
    # dilated by 8% of the face's height, not more
    face_rows = torch.nonzero(torch.from_numpy(parse.mask("face")).any(dim=1)).flatten()
    radius = round(PLACEMENTS["eyewear"].dilate * int(face_rows[-1] - face_rows[0] + 1))
    assert torch.equal(region, dilate_mask(eyes_brows, radius))
    assert not region[torch.from_numpy(parse.mask("lips"))].any()


def test_headwear_belongs_on_the_hair_and_above_the_head():
    parse = layout_parse()
    region = placement_region(mask_of(parse), "hat", ("hat",))
    hair = torch.from_numpy(parse.mask("hair"))
    assert region[hair].all()
    assert region[0, 64] and not region[0, 0]  # above the head, not beside it
    assert not region[torch.from_numpy(parse.mask("face"))].any()


def test_own_class_is_always_kept_and_other_categories_are_literal():
    parse = layout_parse(extra=("eye_g", (0, 4, 0, 4)))
    region = placement_region(mask_of(parse), "eyewear", ("eye_g",))
    assert region[:4, :4].all()
    for category, classes in (("hair", ("hair",)), ("lips", ("lips",)), ("unknown", ("skin",))):
        assert torch.equal(placement_region(mask_of(parse), category, classes), torch.from_numpy(parse.mask(classes)))
    ears = torch.from_numpy(parse.mask(("ears", "ear_r")))
    earrings = placement_region(mask_of(parse), "earrings", ("ear_r",))
    assert earrings[ears].all() and earrings.sum() > ears.sum()
