"""Photos beyond the built catalogue on a ranking server: the live catalogue's log, read.

Retrieval serves a photo written through the live catalogue (:mod:`imgsearch.catalog_log`)
about a poll after it is acknowledged, long before a rebuild gives it a row in any model. The
ranking server reads the same log (every ``poll_s``, from the served set's high-water mark) and
keeps each such photo's last version: its record's stats and keywords and the image embedding
it was written with. A ranking request's candidates that the set does not hold but the log
does are given ``photo_idx`` values past the set's photos (stable per photo while the set is
served) and described by :class:`~ranking_service.rankers.base.LiveCandidates`, so every ranker
scores them cold instead of ranking them last. Set photos the log replaced keep their model
rows (their conversions still speak for them); photos taken down are forgotten.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from imgsearch.catalog_log import DELETE, CatalogLog, PhotoChange
from imgsearch.catalogue import normalise_keyword
from imgsearch.conversion_store.background import BackgroundStore
from imgsearch.polling import Poller
from ranking_service.rankers.base import LiveCandidates

# The manifest key of a set's high-water mark (the last log change folded into the set).
HIGH_WATER_KEY = "catalog_log_seq"
READ_BATCH = 5_000
logger = logging.getLogger("imgsearch.ranking")


def _since(store, seq: int) -> list[PhotoChange]:
    return CatalogLog(store).since(seq, READ_BATCH)


class LivePhotos:
    """The log's photos beyond one served set, by id.

    Parameters
    ----------
    set_photos:
        How many photos the set holds (new photos are numbered after them).
    is_set_photo:
        Whether the set holds a photo id.
    seq:
        The set's high-water mark: changes up to it are in the set already.
    """

    def __init__(self, set_photos: int, is_set_photo, seq: int = 0):
        self.set_photos = set_photos
        self.is_set_photo = is_set_photo
        self.seq = int(seq)
        # photo_id -> (its number past the set's photos, its last upsert). Replaced whole by
        # apply (copy on write), so a request reads one consistent version.
        self.photos: dict[str, tuple[int, PhotoChange]] = {}
        self._next = 0

    def apply(self, changes: Sequence[PhotoChange]) -> None:
        """Apply changes in sequence order (those at or below the applied mark are skipped)."""
        photos = dict(self.photos)
        for change in changes:
            if change.seq <= self.seq:
                continue
            self.seq = change.seq
            if self.is_set_photo(change.photo_id):
                continue  # ranked by its model row
            if change.operation == DELETE:
                photos.pop(change.photo_id, None)
                continue
            known = photos.get(change.photo_id)
            number = known[0] if known is not None else self._next
            self._next += known is None
            photos[change.photo_id] = (number, change)
        self.photos = photos

    def candidates(
        self, photo_ids: Sequence[str], candidate_idx: list[int | None]
    ) -> LiveCandidates | None:
        """Number the live photos among ``photo_ids`` in ``candidate_idx`` (in place: the set's
        unknown ids, None, become ``set_photos + number``) and describe them; None when none
        of the unknown ids is live."""
        photos = self.photos
        live = [
            (i, photos[photo_ids[i]])
            for i, idx in enumerate(candidate_idx)
            if idx is None and photo_ids[i] in photos
        ]
        if not live:
            return None
        n = len(candidate_idx)
        mask = np.zeros(n, dtype=bool)
        views, downloads = np.zeros(n), np.zeros(n)
        keywords: list[dict[str, float]] = [{} for _ in range(n)]
        dims = {len(c.embedding) for _, (_, c) in live if c.embedding is not None}
        embeddings = np.zeros((n, dims.pop()), np.float32) if len(dims) == 1 else None
        has_embedding = np.zeros(n, dtype=bool)
        for i, (number, change) in live:
            candidate_idx[i] = self.set_photos + number
            mask[i] = True
            record = change.record
            views[i] = float(record.get("views", 0))
            downloads[i] = float(record.get("downloads", 0))
            for keyword, confidence in record.get("keywords", []):
                text = normalise_keyword(keyword)
                value = min(max(float(confidence) / 100.0, 0.0), 1.0)
                keywords[i][text] = max(value, keywords[i].get(text, 0.0))
            if embeddings is not None and change.embedding is not None:
                embeddings[i] = change.embedding
                has_embedding[i] = True
        return LiveCandidates(mask, embeddings, has_embedding, views, downloads, keywords)


class LivePhotosTailer:
    """Reads the log every ``poll_s`` into the served state's :class:`LivePhotos`.

    A new set (a reload) starts a new table from its high-water mark; a store that fails is
    logged once and read again at the next poll (:class:`~imgsearch.polling.Poller`).
    """

    def __init__(self, holder, store: BackgroundStore, poll_s: float):
        self.holder = holder
        self.store = store
        self.poller = Poller(self.catch_up, poll_s, logger, "catalogue log unreadable")

    async def catch_up(self) -> None:
        """Apply the log's new changes to the served state's live photos."""
        state = self.holder.state
        if state is None:
            return
        live = state.live
        if live is None:
            catalogue = state.catalogue
            live = LivePhotos(
                catalogue.n_photos,
                lambda photo_id: catalogue.photo_idx(photo_id) is not None,
                state.catalog_log_seq,
            )
        while changes := await self.store.call(_since, live.seq):
            live.apply(changes)
        state.live = live

    def start(self) -> None:
        self.poller.start()

    async def close(self) -> None:
        await self.poller.close()
        await self.store.close()
