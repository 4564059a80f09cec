"""The demo catalogue's tables in the Unsplash Lite layout: photos, tags, labels, conversions."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imgsearch_tools import outputs
from imgsearch_tools.demo_data.conversions import TASTE_WEIGHT, TASTES, make_conversion_table
from imgsearch_tools.demo_data.drawing import COLOURS, SCENES, SHAPES
from imgsearch_tools.demo_data.folder import (
    MAKER,
    adopt_legacy_folder,
    table_conflicts,
    write_table,
)
from imgsearch_tools.demo_data.image_files import resumable_folder, write_images
from imgsearch_tools.demo_data.photos import (
    make_color_table,
    make_keyword_table,
    make_label_table,
    make_photo_table,
    make_photos,
)

# Bumped whenever the same seed and sizes give other tables, so `imgsearch demo` regenerates.
# 2: keywords carry an AI tagger's misses and confusions; labels.tsv holds the truth.
GENERATOR_VERSION = 2

PHOTO_SHARD_ROWS = 2_500

SHARD_ROWS = 100_000


def generate(
    out_dir: str | Path,
    n_photos: int = 5000,
    n_users: int = 2000,
    n_conversions: int = 150_000,
    seed: int = 0,
    image_size: int = 64,
    show_progress: bool = True,
    with_images: bool = True,
    *,
    taste: str = "content",
    taste_strength: float = TASTE_WEIGHT,
    photo_shard_rows: int = PHOTO_SHARD_ROWS,
    shard_rows: int = SHARD_ROWS,
    force: bool = False,
    image_workers: int | None = None,
) -> dict:
    """Write a synthetic catalogue in the Unsplash Lite layout into ``out_dir``.

    Each photo shows one shape from :data:`SHAPES` filled with one colour from :data:`COLOURS`
    on one scene from :data:`SCENES`; its keywords name the three (high confidence) plus
    synonyms, generic tags and low-confidence distractors, with the mistakes of an AI tagger
    (:data:`TAG_MISS_RATE`, :data:`TAG_CONFUSION_RATE`); ``labels.tsv000`` holds what each
    photo really shows. Conversions are drawn from planted
    per-user tastes mixed with a latent photo popularity: by default favourite colours and
    shapes (``taste``, :data:`TASTES`).

    Everything is written into a temporary folder beside ``out_dir`` and moved into place at
    the end, with a marker listing the files (:mod:`imgsearch_tools.outputs`). A folder this
    generator wrote is replaced; any other non-empty folder is refused unless ``force``, which
    adds the catalogue beside its files and deletes or overwrites none of them.

    Parameters
    ----------
    out_dir : str or Path
        Folder to write (created if missing).
    n_photos, n_users, n_conversions : int
        Catalogue size. Every user has at least one conversion when
        ``n_conversions >= n_users``.
    seed : int
        Same seed, same sizes: byte-identical tables and images.
    image_size : int
        Side of the square JPEG images in pixels.
    show_progress : bool
        Draw a tqdm progress bar on stderr while drawing images and conversions.
    with_images : bool
        Write ``images/<photo_id>.jpg``; when False no images folder is written.
    taste : str
        What users' tastes are about: ``content`` (colour and shape), ``ids`` (hidden photo
        attributes) or ``none`` (popularity alone); see :data:`TASTES`.
    taste_strength : float
        ``w`` in P(photo) ∝ popularity × exp(w × favourites matched); 0 is no taste. The
        default catalogue (``content``, 2.0) is the same, byte for byte, as before tastes
        could be chosen.
    photo_shard_rows, shard_rows : int
        Rows per shard file for photos and for the other tables (``.tsv000``, ``.tsv001``…).
    force : bool
        Write into a non-empty folder this generator did not make (never into one holding
        tables of the Unsplash Lite layout: they would be read together with the new ones).
    image_workers : int or None
        Processes drawing the images (None: the cores other processes leave idle). The
        images are drawn into ``.<name>.images.partial`` beside ``out_dir`` first: a run
        interrupted while drawing leaves the complete ones there, and the next run of the
        same catalogue draws only the rest (:mod:`imgsearch_tools.demo_data.image_files`).

    Returns
    -------
    dict
        Counts, files written and the vocabulary.
    """
    if n_photos < 1 or n_users < 1 or n_conversions < 0 or image_size < 8:
        raise ValueError("need n_photos >= 1, n_users >= 1, n_conversions >= 0, image_size >= 8")
    if taste not in TASTES:
        raise ValueError(f"taste must be one of {', '.join(TASTES)}, got {taste!r}")
    if not taste_strength >= 0:
        raise ValueError(f"taste strength must be >= 0, got {taste_strength}")
    out_dir = Path(out_dir)
    adopt_legacy_folder(out_dir)
    made = {
        "generator": GENERATOR_VERSION,
        "seed": seed,
        "n_photos": n_photos,
        "n_users": n_users,
        "n_conversions": n_conversions,
        "with_images": with_images,
        "image_size": image_size,
        "taste": taste,
        "taste_strength": taste_strength,
    }
    with outputs.staged_folder(
        out_dir, MAKER, force=force, info=made, conflicts=table_conflicts
    ) as staging:
        # A seventh stream draws the ids taste's hidden attributes; the first six are the same
        # streams as with six (spawned children depend on their index only).
        streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(7)]
        photos = make_photos(n_photos, streams[0])
        # Images first: they are what an interrupted run keeps (see image_files).
        images = None
        if with_images:
            images = write_images(
                photos,
                staging / "images",
                seed,
                image_size,
                show_progress,
                workers=image_workers,
                resume_dir=resumable_folder(out_dir),
                catalogue={"generator": GENERATOR_VERSION},
            )
        photo_table = make_photo_table(photos, streams[1])
        keyword_table = make_keyword_table(photos, streams[2])
        color_table = make_color_table(photos)
        label_table = make_label_table(photos)
        conversion_table, n_active_users = make_conversion_table(
            photos,
            n_users,
            n_conversions,
            streams[3],
            show_progress,
            taste=taste,
            taste_strength=taste_strength,
            hidden_rng=streams[6],
        )
        files = []
        files += write_table(photo_table, staging, "photos", photo_shard_rows)
        files += write_table(keyword_table, staging, "keywords", shard_rows)
        files += write_table(conversion_table, staging, "conversions", shard_rows)
        files += write_table(color_table, staging, "colors", shard_rows)
        files += write_table(label_table, staging, "labels", shard_rows)

    return {
        "out_dir": str(out_dir),
        "seed": seed,
        "n_photos": n_photos,
        "n_users": n_active_users,
        "n_conversions": len(conversion_table),
        "n_keyword_rows": len(keyword_table),
        "n_photographers": int(photos["n_photographers"]),
        "with_images": with_images,
        "image_size": image_size if with_images else None,
        "images": images,
        "taste": taste,
        "taste_strength": taste_strength,
        "files": files,
        "colours": list(COLOURS),
        "shapes": list(SHAPES),
        "scenes": list(SCENES),
    }
