"""Retriever interface and the keyword, CLIP and hybrid retrievers' common result type."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np


@dataclass
class RetrievalResult:
    """Candidates for one query, best first.

    Attributes
    ----------
    photo_idx:
        Candidate photo indexes (int64), best first.
    scores:
        The retriever's score per candidate (float32), descending.
    source_scores:
        Per source name ("keyword", "clip"), the score that source gave each candidate
        (NaN where that source did not find it).
    keyword:
        The catalogue keyword the query resolved to, "" when it matched none exactly.
    note:
        A human-readable note on fallbacks taken, "" when none.
    """

    photo_idx: np.ndarray
    scores: np.ndarray
    source_scores: dict[str, np.ndarray] = field(default_factory=dict)
    keyword: str = ""
    note: str = ""

    @classmethod
    def empty(cls, keyword: str = "", note: str = "") -> RetrievalResult:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.float32), {}, keyword, note)

    def sources(self, i: int) -> str:
        """The names of the sources that found candidate ``i``, joined by '+'."""
        names = [n for n, s in self.source_scores.items() if not np.isnan(s[i])]
        return "+".join(names)


class Retriever(ABC):
    """Finds candidate photos for a text query."""

    name: str = ""

    @abstractmethod
    def retrieve(self, query: str, candidates_k: int) -> RetrievalResult:
        """Return up to ``candidates_k`` candidates for ``query`` (already normalised)."""

    def cheap(self, query: str) -> bool:
        """Whether ``retrieve(query)`` is a lookup cheap enough to run on a server's event
        loop; anything else (model inference, scans) runs in its executor. Default: no."""
        return False
