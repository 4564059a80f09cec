"""Dominant colours computed from the images, for catalogues without Unsplash's colors table.

Each image is shrunk to :data:`THUMB_SIDE` pixels a side and every pixel is named by the
nearest colour of :data:`PALETTE` (in RGB); the names covering at least :data:`MIN_COVERAGE` of
the image are its dominant colours, as the colour filter matches them
(:class:`imgsearch.filters.PhotoAttributes`).
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
from tqdm import tqdm

from imgsearch.catalogue import COLOR_COLUMNS, Catalogue

# Basic colour names and a representative RGB of each.
PALETTE = {
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "white": (240, 240, 240),
    "red": (210, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 30),
    "green": (45, 170, 60),
    "dark green": (25, 65, 35),
    "blue": (35, 85, 230),
    "navy": (20, 28, 75),
    "purple": (135, 50, 190),
    "pink": (245, 125, 185),
    "brown": (110, 70, 40),
    "beige": (220, 200, 155),
}
THUMB_SIDE = 32
MIN_COVERAGE = 0.1


def image_colors(path) -> list[tuple[str, float]]:
    """The dominant colours of one image: ``(name, coverage)``, largest first."""
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(
            image.convert("RGB").resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BILINEAR),
            dtype=np.float32,
        ).reshape(-1, 3)
    centres = np.asarray(list(PALETTE.values()), np.float32)
    nearest = ((pixels[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2).argmin(axis=1)
    coverage = np.bincount(nearest, minlength=len(centres)) / len(pixels)
    names = list(PALETTE)
    order = np.argsort(-coverage, kind="stable")
    return [(names[i], float(coverage[i])) for i in order if coverage[i] >= MIN_COVERAGE]


def colors_from_images(catalogue: Catalogue, show_progress: bool = True) -> pd.DataFrame:
    """The colors table (:data:`~imgsearch.catalogue.COLOR_COLUMNS`) of the photos with an
    image; photos without one have no colours (a colour filter never matches them)."""
    photo_idx, names, coverages = [], [], []
    with_image = catalogue.photos[catalogue.photos["has_image"]]
    for idx, photo_id in tqdm(
        zip(with_image["photo_idx"].tolist(), with_image["photo_id"].tolist()),
        total=len(with_image),
        desc="dominant colours",
        unit="image",
        file=sys.stderr,
        disable=not show_progress,
    ):
        try:
            found = image_colors(catalogue.image_path(photo_id))
        except (OSError, ValueError):
            found = []  # an unreadable image: the photo has no colours
        for name, coverage in found:
            photo_idx.append(idx)
            names.append(name)
            coverages.append(coverage)
    table = pd.DataFrame({"photo_idx": photo_idx, "color": names, "coverage": coverages})
    return table.astype(COLOR_COLUMNS)
