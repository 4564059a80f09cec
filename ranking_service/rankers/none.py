"""The ``none`` ranker: keep retrieval order (the baseline every other ranker must beat)."""

from __future__ import annotations

from pathlib import Path

from imgsearch.candidates import CandidateLists
from imgsearch.catalogue import Catalogue
from imgsearch.image_embeddings import ImageEmbeddings
from ranking_service.rankers.base import Ranker, RankQuery, RankScores
from ranking_service.rankers.common import (
    as_candidates,
    finalize_scores,
    known_photo_mask,
    read_config,
    retrieval_order_scores,
    write_config,
)


class NoneRanker(Ranker):
    """Score candidates by their retrieval scores (descending rank when those are all equal).

    Photo indexes outside the catalogue score lowest, like in every ranker.
    """

    name = "none"

    def __init__(self) -> None:
        self.n_photos = 0

    def fit(
        self,
        catalogue: Catalogue,
        show_progress: bool = True,
        candidates: CandidateLists | None = None,
        embeddings: ImageEmbeddings | None = None,
    ) -> NoneRanker:
        """Remember the catalogue size; there is nothing to learn."""
        self.n_photos = catalogue.n_photos
        return self

    def score(self, query: RankQuery) -> RankScores:
        """Return the retrieval scores (or descending rank) for ``query.candidates``."""
        candidates = as_candidates(query.candidates)
        scores = retrieval_order_scores(candidates, query.retrieval_scores)
        valid = known_photo_mask(candidates, self.n_photos)
        return RankScores(finalize_scores(scores, valid | query.cold(valid)))

    def save(self, directory: Path) -> None:
        """Write ``config.json`` (the ranker has no parameters)."""
        write_config(Path(directory), self.name, {"n_photos": self.n_photos})

    @classmethod
    def load(cls, directory: Path, catalogue: Catalogue) -> NoneRanker:
        """Read a ranker written by :meth:`save`."""
        read_config(Path(directory), cls.name)
        return cls().fit(catalogue)
