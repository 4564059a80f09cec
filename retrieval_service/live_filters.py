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
    previous: PhotoAttributes,
    base_count: int,
    total: int,
    changed: Mapping[int, PhotoChange],
    first_logged_us: Mapping[int, int],
) -> PhotoAttributes:
    """The attributes of ``total`` photos: ``previous`` (the set's, or those of the last
    snapshot), extended to ``total`` photos, with the photos of ``changed`` (``photo_idx`` ->
    their new live version) described by their records. Only the changed photos are visited,
    so a batch of writes costs what it wrote, not what the segment holds.

    Parameters
    ----------
    previous:
        The attributes so far (the set's own at first).
    base_count:
        Photos of the set (a new photo's submission time is when the log first wrote it).
    total:
        Photos by ``photo_idx``, the log's new ones included.
    changed:
        The new live version of each photo written or replaced since ``previous``.
    first_logged_us:
        When the log first wrote each photo (microseconds since the epoch).
    """
    extra = total - previous.n_photos

    def extended(values: np.ndarray, fill) -> np.ndarray:
        return np.concatenate([values, np.full(extra, fill, dtype=values.dtype)])

    orientation = extended(previous.orientation, 0)
    featured = extended(previous.featured, False)
    submitted_ns = extended(previous.submitted_ns, UNKNOWN_SUBMITTED)
    downloads = extended(previous.downloads, 0)
    views = extended(previous.views, 0)
    photographer = extended(previous.photographer, -1)
    photographers = dict(previous.photographers)
    next_code = 1 + max(int(photographer.max(initial=-1)), max(photographers.values(), default=-1))
    rows = np.fromiter(changed, np.int64, len(changed))
    if len(rows):
        records = [changed[i].record for i in rows.tolist()]
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
            if i >= base_count or submitted_ns[i] == UNKNOWN_SUBMITTED:
                submitted_ns[i] = logged * 1000 if logged else UNKNOWN_SUBMITTED
    replaced = np.sort(rows[rows < base_count])
    color_photos = {
        name: np.setdiff1d(photos, replaced, assume_unique=True) if len(replaced) else photos
        for name, photos in previous.color_photos.items()
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
