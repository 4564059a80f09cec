"""Retriever interface and the keyword, CLIP and hybrid retrievers' common result type."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from imgsearch.fusion import RetrievalResult

__all__ = ["RetrievalResult", "Retriever"]


class Retriever(ABC):
    """Finds candidate photos for a text query."""

    name: str = ""

    @abstractmethod
    def retrieve(
        self, query: str, candidates_k: int, allowed: np.ndarray | None = None
    ) -> RetrievalResult:
        """Return up to ``candidates_k`` candidates for ``query`` (already normalised).

        ``allowed`` (bool per catalogue ``photo_idx``) restricts them to those photos
        (:mod:`imgsearch.filters`); None: every photo.
        """

    def cheap(self, query: str) -> bool:
        """Whether ``retrieve(query)`` is a lookup cheap enough to run on a server's event
        loop; anything else (model inference, scans) runs in its executor. Default: no."""
        return False
