"""The live segment's photos in immutable runs: each batch of writes appended as a small run,
runs merged geometrically, so a write costs a search nothing like a rebuild of the segment.

A :class:`Run` holds the keyword postings (a small
:class:`~retrieval_service.keyword_index.KeywordIndex`) and the image embeddings (an exact FAISS
``IndexFlatIP``) of the photos one batch of log changes wrote. A photo written again, or taken
down, leaves its older row in place: :class:`RunSet` keeps an ``owner`` per ``photo_idx`` (the id
of the run holding its live version, -1 for none), and searches keep a run's rows only where
the run owns the photo. After each new run, the last two are merged while the older holds at
most twice the newer's live photos (and both together at most :data:`MAX_MERGED_PHOTOS`), so a
photo is rebuilt into a merged run O(log n) times, and a merge costs at most a few
milliseconds of the tailer's thread. Runs left with no live photo are dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from imgsearch.catalog_log import PhotoChange
from imgsearch.catalogue import normalise_keyword
from retrieval_service.keyword_index import KeywordIndex

# Runs are not merged past this many live photos: a merge stays short (it holds the GIL), and
# a catalogue of millions of live photos is folded into a set by a build, not kept here.
MAX_MERGED_PHOTOS = 4096
NO_RUN = -1


def keyword_rows(record: dict) -> list[tuple[str, float]]:
    """A record's keywords as the build normalises them: normalised text, confidence scaled
    from [0, 100] to [0, 1], the highest kept per keyword."""
    best: dict[str, float] = {}
    for keyword, confidence in record.get("keywords", []):
        text = normalise_keyword(keyword)
        if text:
            value = float(np.clip(float(confidence) / 100.0, 0.0, 1.0))
            best[text] = max(value, best.get(text, 0.0))
    return list(best.items())


def keyword_index(photo_idx: list[int], keywords: list[str], confidence: list[float]):
    """A :class:`KeywordIndex` of (photo, keyword, confidence) rows, ordered as
    :meth:`KeywordIndex.from_keywords` orders them (keyword, confidence down, photo)."""
    photos = np.asarray(photo_idx, np.int64)
    conf = np.asarray(confidence, np.float32)
    words = np.asarray(keywords, dtype=str)
    order = np.lexsort((photos, -conf, words))
    words, photos, conf = words[order], photos[order], conf[order]
    vocabulary, starts = np.unique(words, return_index=True)
    offsets = np.append(starts, len(words)).astype(np.int64)
    return KeywordIndex(vocabulary.astype(object), offsets, photos, conf)


@dataclass(frozen=True)
class Run:
    """The photos one batch of changes wrote (or a merge of runs), immutable.

    Attributes
    ----------
    run_id:
        Unique within its :class:`RunSet`.
    photos:
        The ``photo_idx`` of every photo whose version the run holds.
    keyword:
        Their keyword postings (None when none has a keyword).
    vector_idx, vectors:
        The photos with an embedding and an ``IndexFlatIP`` of them (row ``i`` for
        ``vector_idx[i]``); None when none has one.
    """

    run_id: int
    photos: np.ndarray
    keyword: KeywordIndex | None
    vector_idx: np.ndarray
    vectors: Any

    @classmethod
    def build(cls, run_id: int, changes: Mapping[int, PhotoChange]) -> Run:
        """The run of each photo's change in ``changes`` (``photo_idx`` -> its upsert)."""
        photos = np.fromiter(changes, np.int64, len(changes))
        idx, words, conf = [], [], []
        for photo_idx, change in changes.items():
            for keyword, confidence in keyword_rows(change.record):
                idx.append(photo_idx)
                words.append(keyword)
                conf.append(confidence)
        keyword = keyword_index(idx, words, conf) if idx else None
        with_vector = [i for i, c in changes.items() if c.embedding is not None]
        vector_idx, vectors = np.asarray(with_vector, np.int64), None
        if with_vector:
            import faiss

            matrix = np.stack([changes[i].embedding for i in with_vector])
            vectors = faiss.IndexFlatIP(matrix.shape[1])
            vectors.add(np.ascontiguousarray(matrix, np.float32))
        return cls(run_id, photos, keyword, vector_idx, vectors)


class RunSet:
    """The runs of one server's live photos, and which run owns each photo's live version.

    Not thread-safe: one writer (the log's tailer) calls :meth:`add`, :meth:`drop` and
    :meth:`flush`; searches read the immutable ``(runs, owner)`` snapshots it returns.
    """

    def __init__(self):
        self.runs: list[Run] = []
        self.owner = np.full(0, NO_RUN, np.int64)
        self.pending: dict[int, PhotoChange] = {}
        self._next_id = 0

    def _grow(self, total: int) -> None:
        if len(self.owner) < total:
            grown = np.full(max(total, 2 * len(self.owner)), NO_RUN, np.int64)
            grown[: len(self.owner)] = self.owner
            self.owner = grown

    def add(self, photo_idx: int, change: PhotoChange) -> None:
        """A photo's new live version (in the next run)."""
        self.pending[photo_idx] = change

    def drop(self, photo_idx: int) -> None:
        """A photo no longer live here (taken down)."""
        self.pending.pop(photo_idx, None)
        if photo_idx < len(self.owner):
            self.owner[photo_idx] = NO_RUN

    def flush(self, total: int, current: Mapping[int, PhotoChange]) -> tuple[tuple, np.ndarray]:
        """Append the pending versions as a run, merge, and return the snapshot: the runs and
        a copy of ``owner`` over ``total`` photos. ``current``: every photo's live version
        (what a merge rebuilds from)."""
        self._grow(total)
        if self.pending:
            run = Run.build(self._new_id(), self.pending)
            self.owner[run.photos] = run.run_id
            self.runs.append(run)
            self.pending = {}
            self._compact(current)
        return tuple(self.runs), self.owner[:total].copy()

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def _live(self, run: Run) -> np.ndarray:
        return run.photos[self.owner[run.photos] == run.run_id]

    def _compact(self, current: Mapping[int, PhotoChange]) -> None:
        self.runs = [run for run in self.runs if len(self._live(run))]
        while len(self.runs) >= 2:
            older, newer = self._live(self.runs[-2]), self._live(self.runs[-1])
            if len(older) > 2 * len(newer) or len(older) + len(newer) > MAX_MERGED_PHOTOS:
                return
            photos = np.sort(np.concatenate([older, newer]))
            merged = Run.build(self._new_id(), {p: current[p] for p in photos.tolist()})
            self.owner[merged.photos] = merged.run_id
            self.runs[-2:] = [merged]
