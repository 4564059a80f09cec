"""Keyword → candidate photos from the catalogue's keywords table, for training and validation.

This is the rankers' own light stand-in for keyword retrieval: BPR training samples hard
negatives from a query's candidates, and validation ranks a query's converted photos among
them. The retrieval service has the serving index; this one only has to be fast to build.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from imgsearch.catalogue import normalise_keyword


class KeywordCandidates:
    """Photos tagged with each keyword, best confidence first.

    A keyword found in the table as a whole gives its photos. A multi-word keyword that is not
    gives the photos tagged with all its words, or, when none is, with any of them, scored by the
    sum of the words' confidences. An unknown single word gives no candidates.

    Parameters
    ----------
    keywords:
        The catalogue's keywords table (``photo_idx``, ``keyword``, ``confidence``).
    """

    def __init__(self, keywords: pd.DataFrame) -> None:
        codes, names = pd.factorize(keywords["keyword"].to_numpy(), sort=False)
        confidence = keywords["confidence"].to_numpy(dtype=np.float32)
        photo_idx = keywords["photo_idx"].to_numpy(dtype=np.int64)
        order = np.lexsort((photo_idx, -confidence, codes))
        self._photo_idx = photo_idx[order]
        self._confidence = confidence[order]
        counts = np.bincount(codes[order], minlength=len(names))
        self._ptr = np.concatenate([[0], np.cumsum(counts)])
        self._lookup = {str(name): i for i, name in enumerate(names)}

    def __contains__(self, keyword: str) -> bool:
        return normalise_keyword(keyword) in self._lookup

    def _tagged(self, keyword_id: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self._ptr[keyword_id], self._ptr[keyword_id + 1]
        return self._photo_idx[lo:hi], self._confidence[lo:hi]

    def candidates(self, keyword: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return up to ``k`` candidate photo indexes for ``keyword`` and their scores.

        Parameters
        ----------
        keyword:
            A query keyword (normalised here).
        k:
            The most candidates to return.

        Returns
        -------
        tuple of numpy.ndarray
            ``(photo_idx int64, score float32)``, best first (ties by photo index).
        """
        keyword = normalise_keyword(keyword)
        keyword_id = self._lookup.get(keyword)
        if keyword_id is not None:
            photos, scores = self._tagged(keyword_id)
            return photos[:k], scores[:k]
        words = list(dict.fromkeys(keyword.split()))
        word_ids = [self._lookup[w] for w in words if w in self._lookup]
        if not word_ids:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        photos = np.concatenate([self._tagged(i)[0] for i in word_ids])
        scores = np.concatenate([self._tagged(i)[1] for i in word_ids])
        unique, inverse, hits = np.unique(photos, return_inverse=True, return_counts=True)
        total = np.bincount(inverse, weights=scores, minlength=len(unique))
        every_word = hits == len(words)
        keep = every_word if every_word.any() else np.ones(len(unique), dtype=bool)
        unique, total = unique[keep], total[keep]
        order = np.lexsort((unique, -total))[:k]
        return unique[order], total[order].astype(np.float32)

    def pools(self, keywords: list[str], cap: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return every keyword's tagged photos, to sample negatives from, without copying.

        A keyword found in the table as a whole uses all its photos (no cap: a cap by
        confidence would make the pool narrower than where conversions land). Other keywords
        get their top-``cap`` :meth:`candidates`, appended after the table's own photos.

        Returns
        -------
        tuple of numpy.ndarray
            ``(start, length, photo_idx)``: keyword ``i``'s pool is
            ``photo_idx[start[i] : start[i] + length[i]]`` (empty for a keyword with none).
        """
        start = np.zeros(len(keywords), dtype=np.int64)
        length = np.zeros(len(keywords), dtype=np.int64)
        extra, offset = [], len(self._photo_idx)
        for i, keyword in enumerate(keywords):
            keyword_id = self._lookup.get(normalise_keyword(keyword))
            if keyword_id is not None:
                start[i] = self._ptr[keyword_id]
                length[i] = self._ptr[keyword_id + 1] - self._ptr[keyword_id]
                continue
            photos = self.candidates(keyword, cap)[0]
            start[i], length[i] = offset, len(photos)
            extra.append(photos)
            offset += len(photos)
        return start, length, np.concatenate([self._photo_idx, *extra]).astype(np.int64)
