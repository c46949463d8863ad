"""SAME mask maths (eq. 4 and 5): properties that must hold for any input."""

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from freecure.masks import (
    attribute_mask,
    merge_masks,
    normalize_map,
    render_mask,
    render_mask_overlay,
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


def test_overlay_tints_only_inside_mask():
    image = Image.fromarray(np.full((16, 16, 3), 100, np.uint8))
    mask = torch.zeros(16, 16)
    mask[:, :8] = 1
    out = np.asarray(render_mask_overlay(image, mask, color=(255, 0, 0), alpha=0.5))
    assert np.all(out[:, 8:] == 100)
    assert np.all(out[:, :8, 0] > 100) and np.all(out[:, :8, 1] < 100)
    grey = render_mask(mask, size=(32, 32))
    assert grey.size == (32, 32) and grey.mode == "L"
