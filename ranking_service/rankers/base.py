"""The ranker interface every personalization model implements, and the factory by name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgsearch.candidates import CandidateLists
from imgsearch.catalogue import Catalogue
from imgsearch.image_embeddings import ImageEmbeddings


@dataclass
class LiveCandidates:
    """What the live catalogue's log says of candidates beyond the built catalogue.

    A photo written through the live catalogue after the set was built has no row in any
    model. It is given a ``photo_idx`` at or above the catalogue's photo count, and each ranker
    scores it *cold*: as a photo its model has never seen (no conversions, no learned factor),
    from what its record holds. Arrays are per candidate of the query (same order); only the
    rows where :attr:`mask` is True are meaningful.

    Attributes
    ----------
    mask:
        Bool per candidate: a live photo beyond the built catalogue (scored cold).
    embeddings:
        ``(n_candidates, dim)`` float32 image embeddings (zeros where there is none), or None
        when the live photos carry no embedding.
    has_embedding:
        Bool per candidate: a live photo with an image embedding.
    views, downloads:
        The photo's stats from its record (float64).
    keywords:
        Per candidate, its keywords (normalised) and their confidences in [0, 1].
    """

    mask: np.ndarray
    embeddings: np.ndarray | None
    has_embedding: np.ndarray
    views: np.ndarray
    downloads: np.ndarray
    keywords: list[dict[str, float]]

    def take(self, positions: np.ndarray) -> LiveCandidates:
        """The rows of the candidates at ``positions`` (in that order)."""
        return LiveCandidates(
            self.mask[positions],
            None if self.embeddings is None else self.embeddings[positions],
            self.has_embedding[positions],
            self.views[positions],
            self.downloads[positions],
            [self.keywords[i] for i in positions.tolist()],
        )


@dataclass
class RankQuery:
    """One ranking request in integer ids.

    Attributes
    ----------
    user_idx:
        The user's index in the catalogue, or None for a user the catalogue has not seen.
    keyword:
        The normalised query keyword (``normalise_keyword``); may be unknown to the model.
    candidates:
        Candidate photo indexes (int64), in retrieval order.
    retrieval_scores:
        The retrieval score of each candidate (float32), same length as ``candidates``.
    recent_photos:
        Photo indexes the user recently converted (may be empty); used to fold in unseen users.
    country:
        The user's conversion country if known, else "".
    live:
        The candidates beyond the built catalogue that the live catalogue holds (None: none).
    """

    user_idx: int | None
    keyword: str
    candidates: np.ndarray
    retrieval_scores: np.ndarray
    recent_photos: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    country: str = ""
    live: LiveCandidates | None = None

    def cold(self, valid: np.ndarray) -> np.ndarray:
        """Bool per candidate: a live photo beyond the built catalogue (``valid``: the
        candidates the model knows), to be scored cold rather than ranked last."""
        if self.live is None:
            return np.zeros(len(valid), dtype=bool)
        return self.live.mask & ~valid


@dataclass
class RankScores:
    """Scores for each candidate (same order as the query's candidates), higher is better.

    ``fallback_reason`` is empty when the model scored the request itself, else it says why
    it fell back (e.g. "unknown user: popularity order").
    """

    scores: np.ndarray
    fallback_reason: str = ""


class Ranker(ABC):
    """A personalization model: fit on conversions, score candidates, save and load.

    Rankers never fail a request for an unknown user, photo or keyword: they fall back
    (popularity or retrieval order) and say so in ``RankScores.fallback_reason``.
    """

    name: str = ""
    # Rankers that need the artifact set's image embeddings to load, not only to fit.
    uses_embeddings: bool = False
    # Rankers that use the set's image embeddings when it has them, and load without.
    accepts_embeddings: bool = False

    @abstractmethod
    def fit(
        self,
        catalogue: Catalogue,
        show_progress: bool = True,
        candidates: CandidateLists | None = None,
        embeddings: ImageEmbeddings | None = None,
    ) -> Ranker:
        """Train on ``catalogue.conversions`` (already restricted to the training split).

        ``candidates`` are the served retriever's candidates for the conversions' keywords,
        for rankers that sample negatives from them or validate on them while training;
        ``embeddings`` the catalogue's image embeddings (None when the set has no CLIP), for
        rankers that use what the photos show.
        """

    @abstractmethod
    def score(self, query: RankQuery) -> RankScores:
        """Score ``query.candidates`` for ``query.user_idx``."""

    @abstractmethod
    def save(self, directory: Path) -> None:
        """Write the model into ``directory`` (no pickles: .npz, .json, torch state_dict)."""

    @classmethod
    @abstractmethod
    def load(cls, directory: Path, catalogue: Catalogue) -> Ranker:
        """Read a model written by :meth:`save`."""

    def recommend(
        self, user_idx: int | None, n: int, recent_photos: np.ndarray | None = None
    ) -> RankScores:
        """Score the whole catalogue for a user (no query); returns one score per photo.

        The default scores every photo with an empty keyword; models may do better.
        """
        raise NotImplementedError(f"{self.name} does not support whole-catalogue recommendation")
