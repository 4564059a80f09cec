"""The demo drawing's dilation: PIL's MaxFilter, pixel for pixel, without its sort."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from imgsearch_tools.demo_data import drawing


def max_filtered(mask: Image.Image, size: int) -> np.ndarray:
    return np.asarray(mask.filter(ImageFilter.MaxFilter(size)))


@pytest.mark.parametrize("size", [3, 5, 7])
def test_dilation_equals_the_rank_filter_on_any_mask(size):
    rng = np.random.default_rng(size)
    # Masks of every shape from one pixel up, sparse to dense, with grey levels: the edges
    # (padded with their own pixels) and windows wider than the mask are where it could differ.
    for _ in range(200):
        height, width = rng.integers(1, 30, 2)
        pixels = (rng.random((height, width)) < rng.random()) * rng.integers(
            0, 256, (height, width)
        )
        mask = Image.fromarray(pixels.astype(np.uint8), "L")
        found = drawing.dilated(mask, size)
        assert found.mode == "L" and found.size == mask.size
        assert np.array_equal(np.asarray(found), max_filtered(mask, size))


@pytest.mark.parametrize("shape", drawing.SHAPES)
def test_dilation_equals_the_rank_filter_on_every_shape_touching_the_edges(shape):
    for cx, cy, radius in ((64, 64, 30), (2, 125, 40), (120, 3, 60)):
        mask = drawing._shape_mask(shape, 128, cx, cy, radius, 0.3)
        assert np.asarray(mask).any()
        assert np.array_equal(np.asarray(drawing.dilated(mask, 5)), max_filtered(mask, 5))
