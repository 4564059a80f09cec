"""What filters test for the live catalogue's photos: the set's attributes, with the photos the
log wrote or replaced described by their records.

A live photo's orientation comes from its width and height, its views, downloads and
photographer from its record, and its submission time from when the log first wrote it. The
log holds no colours and no "featured" mark: a live photo has no dominant colour (a colour filter
leaves it out) and is not featured. A set photo that the log replaced takes the same values from
its new record (its colours, those of its former image, are dropped).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from imgsearch.catalog_log import PhotoChange
from imgsearch.filters import PhotoAttributes, orientation_of

# How the attributes mark an unknown submission time (a filter on time leaves it out).
UNKNOWN_SUBMITTED = np.iinfo(np.int64).min


def live_attributes(
    base: PhotoAttributes,
    total: int,
    current: Mapping[int, PhotoChange],
    first_logged_us: Mapping[int, int],
) -> PhotoAttributes:
    """The attributes of ``total`` photos: the set's ``base`` for the first ``base.n_photos``,
    with the photos of ``current`` (``photo_idx`` -> their live version) described by their
    records.

    Parameters
    ----------
    base:
        The set's attributes.
    total:
        Photos by ``photo_idx``, the log's new ones included.
    current:
        The live version of each photo written or replaced through the log.
    first_logged_us:
        When the log first wrote each photo of ``current`` (microseconds since the epoch).
    """
    n = base.n_photos
    extra = total - n

    def extended(values: np.ndarray, fill) -> np.ndarray:
        return np.concatenate([values, np.full(extra, fill, dtype=values.dtype)])

    orientation = extended(base.orientation, 0)
    featured = extended(base.featured, False)
    submitted_ns = extended(base.submitted_ns, UNKNOWN_SUBMITTED)
    downloads = extended(base.downloads, 0)
    views = extended(base.views, 0)
    photographer = extended(base.photographer, -1)
    photographers = dict(base.photographers)
    next_code = 1 + max(int(photographer.max(initial=-1)), max(photographers.values(), default=-1))
    rows = np.fromiter(current, np.int64, len(current))
    if len(rows):
        records = [current[i].record for i in rows.tolist()]
        orientation[rows] = orientation_of(
            [r.get("width", 0) for r in records], [r.get("height", 0) for r in records]
        )
        featured[rows] = False
        downloads[rows] = [int(r.get("downloads", 0)) for r in records]
        views[rows] = [int(r.get("views", 0)) for r in records]
        for i, record in zip(rows.tolist(), records):
            name = str(record.get("photographer", "")).strip()
            if name and name not in photographers:
                photographers[name], next_code = next_code, next_code + 1
            photographer[i] = photographers[name] if name else -1
            logged = first_logged_us.get(i, 0)
            if i >= n or submitted_ns[i] == UNKNOWN_SUBMITTED:
                submitted_ns[i] = logged * 1000 if logged else UNKNOWN_SUBMITTED
    replaced = rows[rows < n]
    color_photos = {
        name: np.setdiff1d(photos, replaced, assume_unique=True) if len(replaced) else photos
        for name, photos in base.color_photos.items()
    }
    return PhotoAttributes(
        orientation=orientation,
        featured=featured,
        submitted_ns=submitted_ns,
        downloads=downloads,
        views=views,
        photographer=photographer,
        photographers=photographers,
        color_photos=color_photos,
    )
