"""Candidate lists: what a retriever returns for each query keyword, handed to rankers as data.

Ranker training needs candidates twice: validation ranks a (user, keyword) query's
candidates, and BPR draws hard negatives from them. Both must see what serving retrieves, so
the build asks the served retriever for every keyword of the conversions and passes the lists
to training; the ranking service never generates candidates itself.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from imgsearch.catalogue import normalise_keyword


class CandidateLists:
    """Per query keyword, the retriever's candidate photos, best first (CSR arrays).

    Parameters
    ----------
    keywords:
        Normalised keywords, one list each.
    offsets:
        ``len(keywords) + 1`` row offsets into ``photo_idx`` and ``scores``.
    photo_idx, scores:
        The concatenated lists.
    retriever:
        Name of the retriever that produced them (recorded in manifests).
    depth:
        The most candidates asked per keyword.
    """

    def __init__(
        self,
        keywords: list[str],
        offsets: np.ndarray,
        photo_idx: np.ndarray,
        scores: np.ndarray,
        retriever: str = "",
        depth: int = 0,
    ) -> None:
        self.keywords = list(keywords)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.photo_idx = np.asarray(photo_idx, dtype=np.int64)
        self.scores = np.asarray(scores, dtype=np.float32)
        self.retriever = retriever
        self.depth = int(depth)
        self._row = {keyword: i for i, keyword in enumerate(self.keywords)}

    @classmethod
    def collect(
        cls,
        keywords: Iterable[str],
        retrieve: Callable[[str, int], Any],
        depth: int,
        retriever: str = "",
        show_progress: bool = False,
    ) -> CandidateLists:
        """Ask ``retrieve(keyword, depth)`` for every distinct normalised keyword.

        Parameters
        ----------
        keywords:
            Query keywords (normalised here; duplicates and empty ones dropped).
        retrieve:
            A retriever's ``retrieve``: returns an object with ``photo_idx`` and ``scores``.
        depth:
            Candidates asked per keyword.
        retriever:
            The retriever's name.
        show_progress:
            A progress bar on stderr.
        """
        names = sorted({normalise_keyword(str(k)) for k in keywords} - {""})
        parts_idx, parts_scores = [], []
        offsets = np.zeros(len(names) + 1, dtype=np.int64)
        from tqdm.auto import tqdm

        for i, keyword in enumerate(
            tqdm(
                names,
                desc=f"candidates ({retriever or 'retriever'})",
                unit="keyword",
                file=sys.stderr,
                disable=not show_progress,
            )
        ):
            result = retrieve(keyword, depth)
            photo_idx = np.asarray(result.photo_idx, dtype=np.int64)[:depth]
            parts_idx.append(photo_idx)
            parts_scores.append(np.asarray(result.scores, dtype=np.float32)[: len(photo_idx)])
            offsets[i + 1] = offsets[i] + len(photo_idx)
        empty_i, empty_s = np.zeros(0, np.int64), np.zeros(0, np.float32)
        return cls(
            names,
            offsets,
            np.concatenate(parts_idx) if parts_idx else empty_i,
            np.concatenate(parts_scores) if parts_scores else empty_s,
            retriever=retriever,
            depth=depth,
        )

    def __len__(self) -> int:
        return len(self.keywords)

    def __contains__(self, keyword: str) -> bool:
        return normalise_keyword(keyword) in self._row

    def top(self, keyword: str, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The first ``k`` candidates of ``keyword`` and their scores (empty when unknown)."""
        row = self._row.get(normalise_keyword(keyword))
        if row is None:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        lo, hi = self.offsets[row], self.offsets[row + 1]
        if k is not None:
            hi = min(hi, lo + max(0, int(k)))
        return self.photo_idx[lo:hi], self.scores[lo:hi]

    def pools(self, keywords: list[str], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each keyword's first ``k`` candidates as slices of one array, without copying.

        Returns
        -------
        tuple of numpy.ndarray
            ``(start, length, photo_idx)``: keyword ``i``'s pool is
            ``photo_idx[start[i] : start[i] + length[i]]`` (empty for a keyword with none).
        """
        start = np.zeros(len(keywords), dtype=np.int64)
        length = np.zeros(len(keywords), dtype=np.int64)
        for i, keyword in enumerate(keywords):
            row = self._row.get(normalise_keyword(keyword))
            if row is not None:
                start[i] = self.offsets[row]
                length[i] = min(self.offsets[row + 1] - self.offsets[row], k)
        return start, length, self.photo_idx
