"""The query's popularity prior, blended into any ranker's own scores with a validated weight.

A personal score knows the user but not the query: on its own it lifts whatever the user likes
among the candidates, including photos that match only part of a query ("yellow triangle":
the yellow squares of a user who likes squares). Rankers that mix in
:class:`QueryPrior` therefore score ``z(own) + popularity_weight · z(log p(photo | keyword))``
over the candidates (z: standardised over the valid candidates; a ranker whose own scores are
log-odds adds ``popularity_weight · log p`` to them instead), with ``p`` the per-keyword
popularity of :class:`~ranking_service.rankers.popularity.PopularityRanker`, smoothed by half a
conversion so that a photo no one has converted yet keeps a finite prior and can still rise on
its own score. The weight is chosen on the validation slice (``ranking_service.training``);
0 keeps the ranker's own order.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from imgsearch.catalogue import Catalogue
from ranking_service.rankers.base import RankQuery, RankScores
from ranking_service.rankers.common import remember
from ranking_service.rankers.popularity import PopularityRanker

PRIOR_DIR = "popularity"
# (keyword, candidates) whose weighted prior a ranker keeps: about 1 KB each.
PRIOR_CACHE = 4096
UNKNOWN_USER = "unknown user: popularity order"


def standardised(values: np.ndarray) -> np.ndarray:
    """``values`` minus their mean, over their standard deviation (zeros when constant).

    The arithmetic of ``values.std()`` (ddof 0) with the mean and the differences computed
    once: the same numbers in a third of the numpy calls.
    """
    n = values.size
    # Python floats for the scalars: the same IEEE operations (sqrt included) without a
    # numpy scalar's dispatch.
    centred = values - float(np.add.reduce(values)) / n
    spread = math.sqrt(float(np.add.reduce(centred * centred)) / n)
    return centred / spread if spread > 0 else np.zeros_like(values)


class QueryPrior:
    """Mixin: a fitted :class:`PopularityRanker` as fallback and as the query's prior.

    Classes using it call :meth:`init_prior` in their constructor, :meth:`fit_prior` in
    ``fit``, :meth:`save_prior` / :meth:`load_prior` when saving and loading, and
    :meth:`blend_prior` on their own scores.
    """

    popularity: PopularityRanker
    popularity_weight: float

    def init_prior(self, popularity: dict | None, popularity_weight: float) -> None:
        """Set up the unfitted prior with ``PopularityRanker(**popularity)`` and its weight."""
        self.popularity = PopularityRanker(**(popularity or {}))
        self.popularity_weight = float(popularity_weight)

    def prior_params(self) -> dict:
        """The prior's constructor parameters, for the ranker's ``params``."""
        return {"popularity": self.popularity.params, "popularity_weight": self.popularity_weight}

    def fit_prior(self, catalogue: Catalogue) -> None:
        """Count the training conversions the prior and the fallback use."""
        self.popularity.fit(catalogue)

    def blend_prior(
        self, scores: np.ndarray, candidates: np.ndarray, keyword: str, valid: np.ndarray | None
    ) -> np.ndarray:
        """Return ``z(scores) + popularity_weight · z(log prior)`` over the valid candidates
        (``valid`` None: all of them).

        Unchanged (as float64) when the weight is 0 or fewer than two candidates are valid.
        """
        n_valid = len(scores) if valid is None else np.count_nonzero(valid)
        if not self.popularity_weight or n_valid < 2:
            return np.array(scores, dtype=np.float64)
        weighted = self._weighted_prior(candidates, keyword, valid)
        if len(weighted) == len(scores):  # every candidate valid: no mask, no copy to write
            return standardised(np.asarray(scores, dtype=np.float64)) + weighted
        scores = np.array(scores, dtype=np.float64)
        scores[valid] = standardised(scores[valid]) + weighted
        return scores

    def _weighted_prior(self, candidates: np.ndarray, keyword: str, valid: np.ndarray | None):
        """``popularity_weight · z(log prior)`` over the valid candidates, remembered."""
        return self._remembered("z", candidates, keyword, valid)

    def _remembered(
        self, kind: str, candidates: np.ndarray, keyword: str, valid: np.ndarray | None
    ):
        """``popularity_weight`` times the log prior (``kind`` ``"log"``) or its z-score
        (``"z"``) over the valid candidates (``valid`` None: all), remembered.

        It depends on the query alone, not the user, and a keyword's candidates are the same
        for every user who searches it: the last :data:`PRIOR_CACHE` (keyword, candidates)
        are kept (read-only arrays, safe to share between threads).
        """
        # The weight and the prior are part of the key: a copy of a ranker shares its cache.
        key = (
            kind,
            self.popularity_weight,
            id(self.popularity),
            keyword,
            candidates.tobytes(),
            None if valid is None else valid.tobytes(),
        )
        cache = self.__dict__.get("_prior_cache")
        if cache is None:
            cache = self.__dict__.setdefault("_prior_cache", {})
        weighted = cache.get(key)
        if weighted is None:
            prior = self.popularity.log_prior(candidates, keyword)
            if valid is not None:
                prior = prior[valid]
            weighted = self.popularity_weight * (standardised(prior) if kind == "z" else prior)
            remember(cache, key, weighted, PRIOR_CACHE)
        return weighted

    def add_log_prior(
        self, scores: np.ndarray, candidates: np.ndarray, keyword: str, valid: np.ndarray
    ) -> np.ndarray:
        """Return ``scores + popularity_weight · log prior`` over the valid candidates.

        For rankers whose own scores are already log-odds of a choice model, where
        standardising them per query (:meth:`blend_prior`) would erase how sure the model is
        of one user against another.
        """
        scores = np.asarray(scores, dtype=np.float64).copy()
        if self.popularity_weight:
            scores[valid] += self._remembered("log", candidates, keyword, valid)
        return scores

    def popularity_fallback(self, query: RankQuery, reason: str = UNKNOWN_USER) -> RankScores:
        """Popularity order (ties by retrieval), for a request the model cannot personalise."""
        return RankScores(self.popularity.score(query).scores, fallback_reason=reason)

    def save_prior(self, directory: Path) -> None:
        """Write the prior under ``directory/popularity``."""
        self.popularity.save(Path(directory) / PRIOR_DIR)

    def load_prior(self, directory: Path, catalogue: Catalogue) -> None:
        """Read the prior written by :meth:`save_prior`.

        A ranker saved before it had one serves its own scores alone (weight 0) and falls back
        to popularity counted from ``catalogue``.
        """
        path = Path(directory) / PRIOR_DIR
        if path.exists():
            self.popularity = PopularityRanker.load(path, catalogue)
        else:
            self.popularity_weight = 0.0
            self.popularity.fit(catalogue)
