"""The ``als`` ranker: implicit-feedback ALS (``implicit``) on the user × photo conversion counts.

Known users score candidates by user · item factor dot products. An unseen user with recent
photos is folded in with the closed-form least-squares step ALS itself uses (Hu, Koren and
Volinsky 2008, eq. 4): ``x_u = (YᵀY + λI + Yᵀ(Cᵘ − I)Y)⁻¹ YᵀCᵘp(u)``. Anyone else falls back to
popularity order. The dot product is blended with the query's popularity prior
(:mod:`ranking_service.rankers.prior`), with a weight chosen on the validation slice.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from implicit.cpu.als import AlternatingLeastSquares
from implicit.nearest_neighbours import bm25_weight
from threadpoolctl import threadpool_limits

from imgsearch.candidates import CandidateLists
from imgsearch.catalogue import Catalogue
from imgsearch.image_embeddings import ImageEmbeddings
from ranking_service.rankers.base import Ranker, RankQuery, RankScores
from ranking_service.rankers.common import (
    all_known,
    as_candidates,
    conversion_matrix,
    finalize_scores,
    known_photo_mask,
    load_arrays,
    read_config,
    save_arrays,
    write_config,
)
from ranking_service.rankers.prior import UNKNOWN_USER, QueryPrior

__all__ = ["UNKNOWN_USER", "ALSRanker"]


class ALSRanker(QueryPrior, Ranker):
    """Implicit-feedback matrix factorisation (``implicit.cpu.als.AlternatingLeastSquares``).

    Parameters
    ----------
    factors:
        Latent dimensions.
    regularization:
        L2 weight λ (also used by the fold-in of unseen users).
    alpha:
        Confidence scale applied to the (weighted) counts.
    iterations:
        ALS sweeps.
    bm25:
        Weight the counts with ``implicit.nearest_neighbours.bm25_weight`` applied to the
        photo × user matrix (as implicit's examples do), instead of raw counts.
    bm25_k1, bm25_b:
        BM25 saturation and length normalisation.
    num_threads:
        Threads for ALS fitting; 0 lets implicit use every core.
    random_state:
        Seed of the factor initialisation.
    popularity:
        Parameters of the :class:`PopularityRanker` used as the fallback and query prior.
    popularity_weight:
        Weight of the query's popularity prior next to the user's affinity
        (:mod:`~ranking_service.rankers.prior`); 0 scores by the dot product alone.
    """

    name = "als"

    def __init__(
        self,
        factors: int = 32,
        regularization: float = 10.0,
        alpha: float = 1.0,
        iterations: int = 15,
        bm25: bool = False,
        bm25_k1: float = 100.0,
        bm25_b: float = 0.8,
        num_threads: int = 0,
        random_state: int = 0,
        popularity: dict | None = None,
        popularity_weight: float = 2.0,
    ) -> None:
        self.factors = int(factors)
        self.regularization = float(regularization)
        self.alpha = float(alpha)
        self.iterations = int(iterations)
        self.bm25 = bool(bm25)
        self.bm25_k1 = float(bm25_k1)
        self.bm25_b = float(bm25_b)
        self.num_threads = int(num_threads)
        self.random_state = int(random_state)
        self.init_prior(popularity, popularity_weight)
        self.user_factors = np.zeros((0, self.factors), dtype=np.float32)
        self.item_factors = np.zeros((0, self.factors), dtype=np.float32)
        self.known_users = np.zeros(0, dtype=bool)
        self.item_length_norm = np.zeros(0, dtype=np.float32)
        self._gram: np.ndarray | None = None

    @property
    def params(self) -> dict:
        """The constructor parameters."""
        return {
            "factors": self.factors,
            "regularization": self.regularization,
            "alpha": self.alpha,
            "iterations": self.iterations,
            "bm25": self.bm25,
            "bm25_k1": self.bm25_k1,
            "bm25_b": self.bm25_b,
            "num_threads": self.num_threads,
            "random_state": self.random_state,
            **self.prior_params(),
        }

    def fit(
        self,
        catalogue: Catalogue,
        show_progress: bool = True,
        candidates: CandidateLists | None = None,
        embeddings: ImageEmbeddings | None = None,
        iteration_callback: Callable[[int], None] | None = None,
    ) -> ALSRanker:
        """Fit ALS on the training conversions (and the popularity fallback).

        Parameters
        ----------
        catalogue:
            The catalogue; ``conversions`` are the training ones.
        show_progress:
            Show implicit's progress bar.
        candidates, embeddings:
            Not used: ALS learns from the conversions alone.
        iteration_callback:
            Called with the number of sweeps done after each one, with the ranker ready to
            score (used by tuning to pick ``iterations`` from a single fit).
        """
        counts = conversion_matrix(catalogue)
        self.known_users = np.diff(counts.indptr) > 0
        photo_totals = np.asarray(counts.sum(axis=0)).ravel()
        mean_total = photo_totals.mean() if len(photo_totals) else 1.0
        self.item_length_norm = (
            (1.0 - self.bm25_b) + self.bm25_b * photo_totals / max(mean_total, 1e-12)
        ).astype(np.float32)
        if self.bm25:
            weighted = bm25_weight(counts.T.tocoo(), K1=self.bm25_k1, B=self.bm25_b)
            confidence = weighted.T.tocsr().astype(np.float32)
        else:
            confidence = counts.astype(np.float32)

        def on_iteration(iteration: int, elapsed: float, loss: float | None) -> None:
            if iteration_callback is not None:
                self._set_factors(model.user_factors, model.item_factors)
                iteration_callback(iteration + 1)

        # implicit's own threads do the work; a multi-threaded BLAS underneath only contends.
        with threadpool_limits(1, "blas"):
            model = AlternatingLeastSquares(
                factors=self.factors,
                regularization=self.regularization,
                alpha=self.alpha,
                iterations=self.iterations,
                num_threads=self.num_threads,
                random_state=self.random_state,
            )
            model.fit(confidence, show_progress=show_progress, callback=on_iteration)
        self._set_factors(model.user_factors, model.item_factors)
        self.fit_prior(catalogue)
        return self

    def _set_factors(self, user_factors: np.ndarray, item_factors: np.ndarray) -> None:
        self.user_factors = np.ascontiguousarray(user_factors, dtype=np.float32)
        self.item_factors = np.ascontiguousarray(item_factors, dtype=np.float32)
        item64 = self.item_factors.astype(np.float64)
        self._gram = item64.T @ item64

    def confidence(self, photos: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Return the ALS confidence of one user's (photo, count) row, as in training.

        With BM25 this is the weight ``bm25_weight`` gives that row in the photo × user matrix
        (photo length normalisation from training, user IDF from the row itself), times alpha.
        """
        counts = counts.astype(np.float64)
        if self.bm25:
            n_photos = len(self.item_factors)
            idf = np.log(n_photos) - np.log1p(len(photos))
            norm = self.item_length_norm[photos]
            counts = counts * (self.bm25_k1 + 1.0) / (self.bm25_k1 * norm + counts) * idf
        return self.alpha * counts

    def fold_in(self, recent_photos: np.ndarray) -> np.ndarray | None:
        """Solve the factor of an unseen user from their recent photos (None if none is known).

        The closed-form ALS user step with the trained item factors and regularisation.
        """
        recent = as_candidates(recent_photos)
        recent = recent[known_photo_mask(recent, len(self.item_factors))]
        if len(recent) == 0 or self._gram is None:
            return None
        photos, counts = np.unique(recent, return_counts=True)
        confidence = self.confidence(photos, counts)
        rows = self.item_factors[photos].astype(np.float64)
        system = self._gram + self.regularization * np.eye(self.factors)
        system += (rows.T * (confidence - 1.0)) @ rows
        return np.linalg.solve(system, confidence @ rows).astype(np.float32)

    def user_vector(self, user_idx: int | None, recent_photos: np.ndarray) -> np.ndarray | None:
        """Return the user's factor (trained, or folded in from recent photos), else None."""
        if user_idx is not None and 0 <= user_idx < len(self.known_users):
            if self.known_users[user_idx]:
                return self.user_factors[user_idx]
        return self.fold_in(recent_photos)

    def score(self, query: RankQuery) -> RankScores:
        """Return user · item affinities of exactly ``query.candidates``, blended with the prior.

        A live photo beyond the built catalogue is cold: the factor ALS solves for a photo with
        no conversions is zero (its regularised least squares), so its affinity is 0.
        """
        candidates = as_candidates(query.candidates)
        user_vector = self.user_vector(query.user_idx, query.recent_photos)
        if user_vector is None:
            return self.popularity_fallback(query)
        if all_known(candidates, len(self.item_factors)):
            # Nearly every call: the rows read in place, no mask, no masked index or copy.
            scores = self.item_factors.take(candidates, axis=0) @ user_vector
            scored = None
        else:
            valid = known_photo_mask(candidates, len(self.item_factors))
            scores = self.item_factors[np.where(valid, candidates, 0)] @ user_vector
            scores = np.where(valid, scores, 0.0)
            scored = valid | query.cold(valid)
        scores = self.blend_prior(scores, candidates, query.keyword, scored)
        return RankScores(finalize_scores(scores, scored))

    def recommend(
        self, user_idx: int | None, n: int, recent_photos: np.ndarray | None = None
    ) -> RankScores:
        """Score every photo of the catalogue for a user (no query); one score per photo.

        The caller takes the top ``n``. A user with no factor and no known recent photo gets
        global popularity order (``fallback_reason`` says so).
        """
        recent = np.zeros(0, dtype=np.int64) if recent_photos is None else recent_photos
        user_vector = self.user_vector(user_idx, recent)
        if user_vector is None:
            counts = self.popularity.photo_counts.astype(np.float64)
            return RankScores(counts.astype(np.float32), fallback_reason=UNKNOWN_USER)
        return RankScores((self.item_factors @ user_vector).astype(np.float32))

    def save(self, directory: Path) -> None:
        """Write ``config.json``, ``factors.npz`` and the fallback under ``popularity/``."""
        directory = Path(directory)
        write_config(directory, self.name, {"params": self.params})
        save_arrays(
            directory / "factors.npz",
            user_factors=self.user_factors,
            item_factors=self.item_factors,
            known_users=self.known_users,
            item_length_norm=self.item_length_norm,
        )
        self.save_prior(directory)

    @classmethod
    def load(cls, directory: Path, catalogue: Catalogue) -> ALSRanker:
        """Read a ranker written by :meth:`save`."""
        directory = Path(directory)
        config = read_config(directory, cls.name)
        # Sets saved before the query prior existed were validated without it.
        ranker = cls(**{"popularity_weight": 0.0, **config["params"]})
        arrays = load_arrays(directory / "factors.npz")
        ranker._set_factors(arrays["user_factors"], arrays["item_factors"])
        ranker.known_users = arrays["known_users"]
        ranker.item_length_norm = arrays["item_length_norm"]
        ranker.load_prior(directory, catalogue)
        return ranker
