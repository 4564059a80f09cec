"""The served photos' metadata on the gateway: read as columns at load, a photo's message built
the first time a search shows it.

Building every photo's ``Photo`` message at load was a Python loop over the catalogue: at a
million photos it took about 70 s of the gateway's start and 2.4 GiB of its memory, for photos
most of which no search shows. The columns are read in one pass instead, a photo's message is
built when it is first asked for, and the most recently shown ones are kept built.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, MutableMapping

import numpy as np

from imgsearch.search.v1 import search_service_pb2 as pb

# Photos a search result shows, with their descriptions (the first ones by confidence).
KEYWORDS_PER_PHOTO = 8
# Messages kept built: the photos searches showed last (about 1-2 KB each).
BUILT_PHOTOS = 262_144
_TEXT_FIELDS = {
    "url": "photo_image_url",
    "description": "photo_description",
    "ai_description": "ai_description",
    "photographer_username": "photographer_username",
}
PHOTO_COLUMNS = ["photo_idx", "photo_id", *_TEXT_FIELDS.values()]  # what it reads of photos


class PhotoMetadata(MutableMapping):
    """Photo id -> ``Photo`` message for the catalogue's photos, plus the live catalogue's
    changes (set: a photo written; deleted: a photo taken down), which win over the set's.

    Parameters
    ----------
    photos:
        The set's ``photos.parquet`` (``photo_idx``, ``photo_id`` and the text fields).
    keywords:
        The set's ``keywords.parquet`` (``photo_idx``, ``keyword``, ``confidence``).
    built:
        How many built messages to keep (least recently shown dropped first).
    """

    def __init__(self, photos, keywords, built: int = BUILT_PHOTOS):
        import pandas as pd

        self._ids = photos["photo_id"].tolist()
        self._row = dict(zip(self._ids, range(len(self._ids))))
        # The text columns stay as read (Arrow buffers, not a Python string per photo).
        self._text = {field: photos[column].array for field, column in _TEXT_FIELDS.items()}
        # Each photo's best keywords by confidence, as one array cut per row.
        top = keywords.sort_values(["photo_idx", "confidence"], ascending=[True, False])
        top = top.groupby("photo_idx", sort=False).head(KEYWORDS_PER_PHOTO)
        rows = pd.Index(photos["photo_idx"]).get_indexer(top["photo_idx"])  # -1: no such photo
        kept = rows >= 0
        order = np.argsort(rows[kept], kind="stable")
        # Keywords as codes into the distinct ones (a catalogue has few), not a string each.
        codes, vocabulary = pd.factorize(top["keyword"])
        self._words = codes[kept][order]
        self._vocabulary = np.asarray(vocabulary, dtype=object)
        counts = np.bincount(rows[kept], minlength=len(self._ids))
        self._starts = np.concatenate(([0], np.cumsum(counts)))
        self._changed: dict[str, pb.Photo | None] = {}
        self._built: OrderedDict[str, pb.Photo] = OrderedDict()
        self._capacity = int(built)

    def _build(self, row: int) -> pb.Photo:
        start, end = self._starts[row], self._starts[row + 1]
        return pb.Photo(
            photo_id=self._ids[row],
            keywords=self._vocabulary[self._words[start:end]].tolist(),
            **{field: values[row] for field, values in self._text.items()},
        )

    def __getitem__(self, photo_id: str) -> pb.Photo:
        if photo_id in self._changed:
            photo = self._changed[photo_id]
            if photo is None:
                raise KeyError(photo_id)
            return photo
        photo = self._built.get(photo_id)
        if photo is not None:
            self._built.move_to_end(photo_id)
            return photo
        photo = self._build(self._row[photo_id])
        self._built[photo_id] = photo
        if len(self._built) > self._capacity:
            self._built.popitem(last=False)
        return photo

    def __contains__(self, photo_id: object) -> bool:
        if photo_id in self._changed:
            return self._changed[photo_id] is not None
        return photo_id in self._row

    def __setitem__(self, photo_id: str, photo: pb.Photo) -> None:
        self._changed[photo_id] = photo
        self._built.pop(photo_id, None)

    def __delitem__(self, photo_id: str) -> None:
        if photo_id not in self:
            raise KeyError(photo_id)
        self._changed[photo_id] = None
        self._built.pop(photo_id, None)

    def __iter__(self) -> Iterator[str]:
        """The set's photos in catalogue order, then the live catalogue's new ones."""
        for photo_id in self._ids:
            if photo_id in self:
                yield photo_id
        for photo_id, photo in list(self._changed.items()):
            if photo is not None and photo_id not in self._row:
                yield photo_id

    def __len__(self) -> int:
        changes = self._changed.items()
        deleted = sum(1 for p, photo in changes if photo is None and p in self._row)
        added = sum(1 for p, photo in changes if photo is not None and p not in self._row)
        return len(self._ids) - deleted + added
