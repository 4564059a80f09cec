"""Inverted keyword index: keyword -> photos by confidence, with token-matching fallback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from imgsearch.catalogue import normalise_keyword
from retrieval_service.keyword_postings import keyword_codes, posting_lists
from retrieval_service.retrievers import RetrievalResult, Retriever
from retrieval_service.token_match import MAX_DEPTH, TokenPostings, match

# A token fallback reading at most this many postings runs on the event loop (well under a
# millisecond once its tokens are cached); a larger one runs beside it.
INLINE_POSTINGS = 20_000
# So does a fallback over at most this many known tokens, however common: two tokens are read a
# cell of their levels at a time (token_subsets), 0.45 ms of CPU on average at a million photos
# and 6 ms at most (two tokens a tagger confuses). Measured in the retrieval server at a million
# photos, 200 unseen two-word Retrieve calls a second, the hop to the executor thread cost more
# than it spared the loop: 1.7 against 1.7-2.1 ms of CPU per call, p99 6.2-6.5 against 5.5-11.6 ms.
INLINE_TOKENS = 2


class KeywordIndex(Retriever):
    """Keyword retrieval over the catalogue's (photo, keyword, confidence) table.

    An exact keyword match returns its photos ordered by confidence. A multi-word or unseen
    query falls back to token matching: each photo scores the mean, over the query's tokens,
    of its best confidence for a keyword containing that token, so a photo must match every
    token to reach the top and scores stay in [0, 1] and comparable across queries. The fallback
    is exact: it scores the photos holding every token (an AND of per-token bitsets) and widens
    to photos missing a token only while those could still reach the top
    (:mod:`retrieval_service.token_subsets`); a query of more than six known tokens adds up
    each token's best ``MAX_DEPTH`` photos instead (:mod:`retrieval_service.token_match`).

    A shard's index (:meth:`shard`) keeps the whole catalogue's vocabulary: a query that is a
    keyword anywhere is an exact match on every shard (with no photos on a shard that has none
    of its photos), so no shard falls back to token matching on its own.
    """

    name = "keyword"

    def __init__(
        self, vocabulary: np.ndarray, offsets: np.ndarray, photo_idx: np.ndarray, conf: np.ndarray
    ):
        self.vocabulary = vocabulary  # sorted keyword strings
        self.offsets = offsets  # CSR row offsets into photo_idx/conf, len(vocabulary)+1
        self.photo_idx = photo_idx  # per keyword, sorted by descending confidence
        self.conf = conf
        self._keyword_row = {k: i for i, k in enumerate(vocabulary.tolist())}
        token_rows: dict[str, list[int]] = {}
        for row, keyword in enumerate(vocabulary.tolist()):
            for token in set(keyword.split()):
                token_rows.setdefault(token, []).append(row)
        self._token_rows = {t: np.asarray(r, np.int64) for t, r in token_rows.items()}
        lengths = np.diff(offsets)
        # Postings a token's fallback reads: what decides whether it may run on the event loop.
        self._token_postings = {t: int(lengths[r].sum()) for t, r in self._token_rows.items()}
        # Token -> its photos and best confidences, filled on first use (bounded by the vocabulary).
        self._token_best: dict[str, TokenPostings] = {}

    @classmethod
    def from_keywords(cls, keywords: pd.DataFrame) -> KeywordIndex:
        """Build from a normalised keywords table (photo_idx, keyword, confidence).

        Linear in the rows, in cache-sized pieces (:mod:`retrieval_service.keyword_postings`):
        the keywords are numbered by one dictionary encoding and each keyword's rows ordered
        by descending confidence, then photo, without comparing strings row by row.
        """
        codes, vocabulary = keyword_codes(keywords["keyword"])
        offsets, photo_idx, conf = posting_lists(
            codes,
            keywords["confidence"].to_numpy(np.float32),
            keywords["photo_idx"].to_numpy(),
            len(vocabulary),
        )
        return cls(vocabulary, offsets, photo_idx, conf)

    def shard(self, keep: np.ndarray) -> KeywordIndex:
        """The index over the photos where ``keep[photo_idx]`` is True, same vocabulary.

        Each keyword's photos keep their order (confidence, then ``photo_idx``) and their
        catalogue-wide ``photo_idx``.
        """
        kept = np.asarray(keep, bool)[self.photo_idx]
        kept_before = np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)
        return KeywordIndex(
            self.vocabulary, kept_before[self.offsets], self.photo_idx[kept], self.conf[kept]
        )

    def save(self, path: Path) -> None:
        """Write the index as an .npz (no pickles)."""
        np.savez(
            path,
            vocabulary=self.vocabulary.astype(str),
            offsets=self.offsets,
            photo_idx=self.photo_idx,
            conf=self.conf,
        )

    @classmethod
    def load(cls, path: Path, warm: bool = True) -> KeywordIndex:
        """Read an index written by :meth:`save`; with ``warm``, :meth:`warm` it."""
        with np.load(path, allow_pickle=False) as data:
            index = cls(
                data["vocabulary"].astype(object),
                data["offsets"],
                data["photo_idx"],
                data["conf"],
            )
        if warm:
            index.warm()
        return index

    def warm(self, min_postings: int = INLINE_POSTINGS) -> list[str]:
        """Build now what the token fallback builds on a token's first use (its photos by photo
        and by confidence, its bitset and levels), for each token whose keywords hold more than
        ``min_postings`` postings; the tokens built.

        A common token's first use sorts all its postings: 40-110 ms of CPU at a million photos,
        long enough for the first searches after a load to miss their deadline on a busy
        machine. Built at load, they cost the same memory the cache holds once every token has
        been asked for (about 24 bytes a posting), and the load takes that much longer (about
        2 s of CPU for the demo's 46 tokens at a million photos). Rare tokens stay lazy: they
        are cheap to build when asked for.
        """
        built = []
        for token, postings in self._token_postings.items():
            if postings > min_postings:
                self.token_photos(token).levels()
                built.append(token)
        return built

    def __contains__(self, keyword: str) -> bool:
        return keyword in self._keyword_row

    def cheap(self, query: str) -> bool:
        """An exact keyword is a slice of the index; so is a token fallback over few postings
        (at most :data:`INLINE_POSTINGS`) or over at most :data:`INLINE_TOKENS` known tokens,
        whose top the cells of their levels bound. Three or more common tokens: not cheap."""
        query = normalise_keyword(query)
        if query in self._keyword_row:
            return True
        postings = self._token_postings
        known = [postings[t] for t in set(query.split()) if t in postings]
        return len(known) <= INLINE_TOKENS or sum(known) <= INLINE_POSTINGS

    def token_photos(self, token: str) -> TokenPostings | None:
        """Photos holding a keyword that contains ``token``, each with its best confidence over
        those keywords; None for a token no keyword has. Computed once per token."""
        best = self._token_best.get(token)
        if best is None:
            rows = self._token_rows.get(token)
            if rows is None:
                return None
            idx = np.concatenate(
                [self.photo_idx[self.offsets[r] : self.offsets[r + 1]] for r in rows]
            )
            cf = np.concatenate([self.conf[self.offsets[r] : self.offsets[r + 1]] for r in rows])
            order = np.lexsort((-cf, idx))
            idx, cf = idx[order], cf[order]
            # (A shard keeps the whole vocabulary, so a token's keywords may hold no photo here.)
            first = np.ones(len(idx), bool)
            first[1:] = idx[1:] != idx[:-1]
            best = self._token_best[token] = TokenPostings.from_best(idx[first], cf[first])
        return best

    def keyword_photos(self, keyword: str) -> tuple[np.ndarray, np.ndarray]:
        """Photos and confidences of one exact keyword (empty arrays when unknown)."""
        row = self._keyword_row.get(keyword)
        if row is None:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        lo, hi = self.offsets[row], self.offsets[row + 1]
        return self.photo_idx[lo:hi], self.conf[lo:hi]

    def retrieve(
        self, query: str, candidates_k: int, allowed: np.ndarray | None = None
    ) -> RetrievalResult:
        """Return up to ``candidates_k`` photos for ``query``, best first.

        ``allowed`` (bool per ``photo_idx``) filters the posting lists before they are cut.
        """
        query = normalise_keyword(query)
        if query in self._keyword_row:
            photos, conf = self.keyword_photos(query)
            if allowed is not None:
                kept = allowed[photos]
                photos, conf = photos[kept], conf[kept]
            top = slice(0, candidates_k)
            return RetrievalResult(photos[top], conf[top], {"keyword": conf[top]}, keyword=query)
        tokens = list(dict.fromkeys(query.split()))
        if not tokens:
            return RetrievalResult.empty(note="empty query")
        matched = [t for t in tokens if t in self._token_rows]
        if not matched:
            return RetrievalResult.empty(note=f"no keyword matches any of: {', '.join(tokens)}")
        note = f"no exact keyword '{query}': token match on {', '.join(matched)}"
        if len(matched) < len(tokens):
            unknown = [t for t in tokens if t not in matched]
            note += f" (unknown: {', '.join(unknown)})"
        found = match([self.token_photos(t) for t in matched], len(tokens), candidates_k, allowed)
        if not found.complete:
            note += f" (read the best {MAX_DEPTH} photos of each token)"
        scores = found.scores
        return RetrievalResult(found.photos, scores, {"keyword": scores}, note=note)
