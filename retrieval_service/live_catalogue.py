"""The live catalogue on a retrieval server: the change log applied on top of a built set.

A built set is immutable (a CSR keyword index, a FAISS index). The photos the log adds or
changes after the set's high-water mark live in a small :class:`LiveSegment` beside it: their
keyword postings (a small :class:`~retrieval_service.keyword_index.KeywordIndex`) and their image
embeddings (searched exactly), merged with the set's results at query time. The set's photos
that the log deleted or replaced are *hidden*: left out inside the FAISS search (an
``IDSelectorBitmap``, :mod:`retrieval_service.filtered_search`) and out of the keyword postings
before they are cut, so ``k`` results still come back when ``k`` exist.

Every server reading the same log from the same set numbers the new photos alike: a photo the
set does not hold gets ``photo_idx`` = the set's photo count + the order in which the log first
wrote it. On a sharded set a photo belongs to the shard given by a hash of its id, as the set's
own photos are placed (:mod:`retrieval_service.sharding`): stable whatever ``photo_idx`` it
gets, so a rebuild that folds it into the set leaves it on its shard.

Each batch of changes appends a small immutable run of the photos it wrote
(:mod:`retrieval_service.live_runs`, merged geometrically) and swaps in a new snapshot by one
assignment, so a search reads one consistent snapshot and a write never rebuilds the segment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from imgsearch.catalog_log import DELETE, PhotoChange
from imgsearch.catalogue import normalise_keyword
from imgsearch.filters import PhotoAttributes
from retrieval_service.keyword_index import KeywordIndex
from retrieval_service.live_filters import live_attributes
from retrieval_service.live_runs import Run, RunSet, keyword_rows
from retrieval_service.retrievers import RetrievalResult, Retriever
from retrieval_service.sharding import BY_ID, BY_INDEX, shard_of_id


def owner_shard(
    photo_id: str, photo_idx: int, base_count: int, shard_count: int, assignment: str = BY_ID
) -> int:
    """The shard a photo lives on: the one drawn from a CRC-32 of its id (as the set's own
    photos are placed, so a rebuild that renumbers the photo does not move it), except a photo
    of a set sharded by ``photo_idx`` (:data:`~retrieval_service.sharding.BY_INDEX`)."""
    if assignment == BY_INDEX and photo_idx < base_count:
        return photo_idx % shard_count
    return shard_of_id(photo_id, shard_count)


__all__ = ["LiveCatalogue", "LiveSegment", "keyword_rows", "owner_shard"]


@dataclass
class LiveSegment:
    """What the log changed on top of one set, as one immutable snapshot.

    Attributes
    ----------
    seq:
        The last log sequence number applied.
    photo_ids:
        Every photo id by ``photo_idx``: the set's, then the new ones.
    hidden:
        Bool per ``photo_idx``: not to be returned from the set's own indexes (deleted, or
        replaced by a newer version in this segment, or a new photo not live now).
    runs:
        The live photos' keyword postings and embeddings, in runs
        (:mod:`retrieval_service.live_runs`).
    owner:
        Per ``photo_idx``, the id of the run holding its live version (-1: none); a run's rows
        count only where it owns the photo.
    live:
        How many photos of this server (its shard) the segment holds.
    """

    seq: int
    photo_ids: np.ndarray
    hidden: np.ndarray
    base_count: int
    runs: tuple[Run, ...] = ()
    owner: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    live: int = 0
    # Whether the log changed anything on this server (else the set answers alone).
    changed: bool = False
    # What filters test, per photo_idx (set and new photos); None for a set without filters.
    attributes: PhotoAttributes | None = None
    # Bool per photo_idx: taken down.
    removed: np.ndarray | None = None

    def keyword_parts(self, keyword: str, from_segment: np.ndarray) -> list:
        """Each run's (photos, confidences) of an exact keyword, its live rows that
        ``from_segment`` allows."""
        parts = []
        for run in self.runs:
            if run.keyword is not None:
                photos, conf = run.keyword.keyword_photos(keyword)
                keep = from_segment[photos] & (self.owner[photos] == run.run_id)
                parts.append((photos[keep], conf[keep]))
        return parts

    def has_keyword(self, keyword: str) -> bool:
        """Whether a live photo of this segment has ``keyword``."""
        for run in self.runs:
            if run.keyword is not None and keyword in run.keyword:
                photos, _ = run.keyword.keyword_photos(keyword)
                if (self.owner[photos] == run.run_id).any():
                    return True
        return False

    def allowed(self, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Bool per ``photo_idx`` (set and new photos): what a search may return from the set's
        indexes, and from the segment's. ``allowed`` is a filter's mask over
        :attr:`attributes` (every photo); a shorter one, over the set's photos only, keeps the
        new photos out."""
        from_set = ~self.hidden
        from_segment = np.ones(len(self.hidden), bool) if self.removed is None else ~self.removed
        if allowed is not None:
            allowed = np.asarray(allowed, bool)
            from_set[: len(allowed)] &= allowed
            from_segment[: len(allowed)] = allowed
            from_segment[len(allowed) :] = False
        return from_set, from_segment


class LiveCatalogue:
    """Applies log changes to a set's photos and makes :class:`LiveSegment` snapshots.

    Parameters
    ----------
    photo_ids:
        The set's photo ids by ``photo_idx``.
    seq:
        The set's high-water mark (changes up to it are in the set already).
    shard, shard_count:
        The shard this server holds (``shard_count`` 0: the whole catalogue).
    assignment:
        How the set placed its photos on shards (its layout's ``assignment``).
    attributes:
        The set's filter attributes (None: a set built before filters).
    """

    def __init__(
        self,
        photo_ids: np.ndarray,
        seq: int = 0,
        shard: int = 0,
        shard_count: int = 0,
        assignment: str = BY_ID,
        attributes: PhotoAttributes | None = None,
    ):
        self.base_count = len(photo_ids)
        self.assignment = assignment
        self.attributes = attributes
        # photo_idx -> when the log first wrote it (its submission time for filters), and its
        # live version whatever shard holds it (filters know every photographer alike).
        self.first_logged_us: dict[int, int] = {}
        self.described: dict[int, PhotoChange] = {}
        self.ids = list(photo_ids.tolist())
        self.index = {photo_id: i for i, photo_id in enumerate(self.ids)}
        self.seq = int(seq)
        self.shard = shard
        self.shard_count = shard_count
        # photo_idx -> the live version's change (only photos of this shard), and deletions.
        self.current: dict[int, PhotoChange] = {}
        self.deleted: set[int] = set()
        self.runs = RunSet()
        # Photos described since the last snapshot (any shard's), for the filters' attributes.
        self.described_since: dict[int, PhotoChange] = {}
        self.segment = self.snapshot()

    def owns(self, photo_id: str, photo_idx: int) -> bool:
        """Whether this server's shard holds the photo."""
        if not self.shard_count:
            return True
        owner = owner_shard(photo_id, photo_idx, self.base_count, self.shard_count, self.assignment)
        return owner == self.shard

    def apply(self, changes: Sequence[PhotoChange]) -> LiveSegment:
        """Apply changes in sequence order (those at or below the applied mark are skipped)
        and return the new snapshot (also kept as :attr:`segment`)."""
        for change in changes:
            if change.seq and change.seq <= self.seq:
                continue
            photo_idx = self.index.get(change.photo_id)
            if photo_idx is None:
                if change.operation == DELETE:
                    self.seq = max(self.seq, change.seq)
                    continue  # a photo never written: nothing to take down
                photo_idx = self.index[change.photo_id] = len(self.ids)
                self.ids.append(change.photo_id)
            if change.operation == DELETE:
                self.deleted.add(photo_idx)
                self.current.pop(photo_idx, None)
                self.described.pop(photo_idx, None)
                self.runs.drop(photo_idx)
            else:
                self.deleted.discard(photo_idx)
                self.first_logged_us.setdefault(photo_idx, change.logged_at_us)
                self.described[photo_idx] = change
                self.described_since[photo_idx] = change
                if self.owns(change.photo_id, photo_idx):
                    self.current[photo_idx] = change
                    self.runs.add(photo_idx, change)
            self.seq = max(self.seq, change.seq)
        self.segment = self.snapshot()
        return self.segment

    def snapshot(self) -> LiveSegment:
        """The segment of everything applied so far: the photos written since the last
        snapshot become a new run (:class:`~retrieval_service.live_runs.RunSet`), taken-down
        ones lose their owner; nothing already built is built again (but for the occasional
        merge of small runs)."""
        total = len(self.ids)
        runs, owner = self.runs.flush(total, self.current)
        removed = np.zeros(total, bool)
        removed[np.fromiter(self.deleted, np.int64, len(self.deleted))] = True
        hidden = removed.copy()
        hidden[self.base_count :] = True  # new photos: served from the segment only
        live = owner >= 0
        hidden |= live  # the set's older version, if any
        segment = LiveSegment(
            self.seq,
            np.asarray(self.ids, dtype=object),
            hidden,
            self.base_count,
            runs=runs,
            owner=owner,
            live=int(live.sum()),
            changed=bool(live.any()) or bool(hidden[: self.base_count].any()),
            removed=removed,
        )
        previous = getattr(self, "segment", None)
        if self.attributes is not None:
            if previous is None or previous.attributes is None:
                segment.attributes = self.attributes
            else:
                segment.attributes = previous.attributes
            if self.described_since or total > segment.attributes.n_photos:
                segment.attributes = live_attributes(
                    segment.attributes,
                    self.base_count,
                    total,
                    self.described_since,
                    self.first_logged_us,
                )
        self.described_since = {}
        return segment


class LiveView:
    """The segment a server's retrievers read now (swapped whole by the log's tailer)."""

    def __init__(self, catalogue: LiveCatalogue):
        self.catalogue = catalogue

    @property
    def segment(self) -> LiveSegment:
        return self.catalogue.segment


def _merge(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated (photo_idx, score) lists, best first (equal scores in photo order), cut."""
    idx = np.concatenate([np.asarray(p, np.int64) for p, _ in parts])
    scores = np.concatenate([np.asarray(s, np.float32) for _, s in parts])
    order = np.lexsort((idx, -scores))[:k]
    return idx[order], scores[order]


class LiveKeywordRetriever(Retriever):
    """The set's keyword index with the live segment's postings merged in at query time.

    A query that is a keyword of either index is an exact match in both (as in one index
    holding every photo); any other falls back to token matching in both. A photo is in exactly
    one of the two, so its score is the one a single index over all photos would give.
    """

    name = "keyword"

    def __init__(self, base: KeywordIndex, view: LiveView):
        self.base = base
        self.view = view

    def __contains__(self, keyword: str) -> bool:
        return keyword in self.base or self.view.segment.has_keyword(keyword)

    def cheap(self, query: str) -> bool:
        return self.base.cheap(query)

    def __getattr__(self, name: str):
        # Everything else (caches, counters, the index) is the set's retriever's.
        return getattr(self.base, name)

    def retrieve(
        self, query: str, candidates_k: int, allowed: np.ndarray | None = None
    ) -> RetrievalResult:
        segment = self.view.segment
        if not segment.changed:  # the set alone, called as any retriever
            filtered = {} if allowed is None else {"allowed": allowed[: segment.base_count]}
            return self.base.retrieve(query, candidates_k, **filtered)
        query = normalise_keyword(query)
        from_set, from_segment = segment.allowed(allowed)
        if query in self.base or segment.has_keyword(query):
            photos, conf = self.base.keyword_photos(query)
            parts = [(photos[from_set[photos]], conf[from_set[photos]])]
            parts += segment.keyword_parts(query, from_segment)
            idx, conf = _merge(parts, candidates_k)
            return RetrievalResult(idx, conf, {"keyword": conf}, keyword=query)
        results = [self.base.retrieve(query, candidates_k, allowed=from_set)]
        for run in segment.runs:
            if run.keyword is not None:
                owned = from_segment & (segment.owner == run.run_id)
                results.append(run.keyword.retrieve(query, candidates_k, allowed=owned))
        found = [r for r in results if len(r.photo_idx)]
        note = (found or results)[0].note
        idx, scores = _merge([(r.photo_idx, r.scores) for r in results], candidates_k)
        return RetrievalResult(idx, scores, {"keyword": scores}, note=note)


class LiveClipRetriever(Retriever):
    """The set's CLIP retriever with the live segment's embeddings searched beside it.

    The set's index is searched without its hidden photos (inside FAISS); the segment's few
    vectors exactly; the two lists are merged by score.
    """

    name = "clip"

    def __init__(self, base, view: LiveView):
        self.base = base
        self.view = view

    def __getattr__(self, name: str):
        # Everything else (caches, counters, the index) is the set's retriever's.
        return getattr(self.base, name)

    def retrieve(
        self,
        query: str,
        candidates_k: int,
        allowed: np.ndarray | None = None,
        query_embedding: np.ndarray | None = None,
    ) -> RetrievalResult:
        segment = self.view.segment
        if not segment.changed:  # the set alone, called as any retriever
            if allowed is not None:
                allowed = allowed[: segment.base_count]
            given = {"allowed": allowed, "query_embedding": query_embedding}
            return self.base.retrieve(
                query, candidates_k, **{k: v for k, v in given.items() if v is not None}
            )
        query = normalise_keyword(query)
        if not query or candidates_k <= 0:
            return RetrievalResult.empty(note="empty query" if not query else "")
        if query_embedding is None:
            query_embedding = self.base.embed_query(query)
        from_set, from_segment = segment.allowed(allowed)
        base = self.base.retrieve(
            query,
            candidates_k,
            allowed=from_set[: segment.base_count],
            query_embedding=query_embedding,
        )
        parts = [(base.photo_idx, base.scores)]
        query_row = np.ascontiguousarray(np.atleast_2d(query_embedding), np.float32)
        for run in segment.runs:
            if run.vectors is None:
                continue
            # FAISS scores them, as it scores the set's rows: equal vectors, equal scores.
            scores, rows = run.vectors.search(query_row, run.vectors.ntotal)
            rows, scores = rows[0], scores[0]
            photos = run.vector_idx[np.maximum(rows, 0)]
            keep = (rows >= 0) & from_segment[photos] & (segment.owner[photos] == run.run_id)
            parts.append((photos[keep], scores[keep]))
        idx, scores = _merge(parts, candidates_k)
        return RetrievalResult(idx, scores, {"clip": scores.copy()})
