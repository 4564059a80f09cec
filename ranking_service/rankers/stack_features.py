"""Per-candidate features of the ``stacked`` ranker: base rankers, retrieval and photo figures.

One row per candidate of a ranking request. Every feature is a function of the candidate and
of the request alone (never of the candidates' order in the list), so a candidate listed twice
gets the same row and a reversed list the reversed rows:

* the retrieval score, its z-score within the request and its rank (the share of candidates
  scored strictly higher: 0 for the first), whatever retriever produced them (keyword
  confidences, CLIP similarities or fused reciprocal ranks);
* the keyword's own confidence for the photo (0 when the photo is not tagged with it) and the
  photo's CLIP similarity to the keyword's centroid (the mean embedding of the photos tagged
  with it; missing when the keyword or the photo has no embedding);
* per base ranker, its score's z-score and rank within the request;
* the query's popularity prior ``log p(photo | keyword)``;
* the photo's ``log(1 + views)`` and ``log(1 + downloads)``;
* the user's history: ``log(1 + training conversions)`` and ``log(1 + recent photos sent)``.

A live photo beyond the built catalogue (:class:`~ranking_service.rankers.base.LiveCandidates`)
takes its keyword confidence, CLIP similarity, views and downloads from its record and the
embedding it was written with.
"""

from __future__ import annotations

import numpy as np

from imgsearch.catalogue import Catalogue, normalise_keyword
from imgsearch.image_embeddings import ImageEmbeddings
from ranking_service.rankers.base import RankQuery
from ranking_service.rankers.common import all_true, known_photo_mask, retrieval_order_scores

RETRIEVAL_FEATURES = ("retrieval_score", "retrieval_z", "retrieval_rank")
PHOTO_FEATURES = (
    "keyword_confidence",
    "clip_similarity",
    "log_prior",
    "log_views",
    "log_downloads",
    "user_history",
    "recent_photos",
)


def feature_names(bases: tuple[str, ...]) -> list[str]:
    """Column names of :meth:`StackFeatures.rows` for these base rankers."""
    per_base = [f"{name}_{kind}" for name in bases for kind in ("z", "rank")]
    return [*RETRIEVAL_FEATURES, *per_base, *PHOTO_FEATURES]


def rank_share(scores: np.ndarray) -> np.ndarray:
    """Per value, the share of values strictly greater (0 for the best; ties share a rank)."""
    n = len(scores)
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    ordered = np.sort(scores)
    return (n - ordered.searchsorted(scores, side="right")) / n


def standardised_rows(values: np.ndarray) -> np.ndarray:
    """:func:`~ranking_service.rankers.prior.standardised` of each row of ``values`` at once
    (the same numbers: each row is summed in the same order)."""
    n = values.shape[1]
    if n == 0:
        return values.copy()
    centred = values - (np.add.reduce(values, axis=1) / n)[:, None]
    spread = np.sqrt(np.add.reduce(centred * centred, axis=1) / n)[:, None]
    return np.divide(centred, spread, out=np.zeros_like(centred), where=spread > 0)


class StackFeatures:
    """What the features need from the catalogue, computed once at fit and saved as arrays.

    Attributes
    ----------
    keyword_names:
        Keywords with a confidence table and a centroid, sorted.
    keyword_ptr, keyword_photos, keyword_confidence:
        CSR layout: the photos tagged with keyword ``i`` (sorted) and their confidence.
    centroids:
        Per keyword, the unit mean embedding of its photos (zeros without embeddings).
    log_views, log_downloads:
        Per photo.
    user_history:
        Per user, ``log(1 + training conversions)``.
    """

    def __init__(self, arrays: dict[str, np.ndarray], embeddings: ImageEmbeddings | None):
        self.keyword_names = [str(k) for k in arrays["keyword_names"]]
        self._lookup = {k: i for i, k in enumerate(self.keyword_names)}
        self.keyword_ptr = arrays["keyword_ptr"]
        self.keyword_photos = arrays["keyword_photos"]
        self.keyword_confidence = arrays["keyword_confidence"]
        self.centroids = arrays["centroids"]
        self.log_views = arrays["log_views"]
        self.log_downloads = arrays["log_downloads"]
        self.user_history = arrays["user_history"]
        self.arrays = arrays
        self.embeddings = self.has_embedding = None
        if embeddings is not None and embeddings.dim == self.centroids.shape[1]:
            self.embeddings, self.has_embedding = embeddings.dense(len(self.log_views))

    @classmethod
    def fit(cls, catalogue: Catalogue, embeddings: ImageEmbeddings | None) -> StackFeatures:
        """Count what the features need from ``catalogue`` (its conversions: training only)."""
        keywords = catalogue.keywords[["keyword", "photo_idx", "confidence"]].copy()
        keywords["keyword"] = [normalise_keyword(k) for k in keywords["keyword"].astype(str)]
        keywords = (
            keywords.groupby(["keyword", "photo_idx"], sort=True)["confidence"].max().reset_index()
        )
        code, names = keywords["keyword"].factorize(sort=True)
        ptr = np.r_[0, np.cumsum(np.bincount(code, minlength=len(names)))].astype(np.int64)
        photos = keywords["photo_idx"].to_numpy(np.int64)
        n_photos = catalogue.n_photos
        dim = embeddings.dim if embeddings is not None else 1
        centroids = np.zeros((len(names), dim), dtype=np.float32)
        if embeddings is not None:
            dense, has = embeddings.dense(n_photos)
            for i in range(len(names)):
                tagged = photos[ptr[i] : ptr[i + 1]]
                tagged = tagged[has[tagged]]
                if len(tagged):
                    mean = dense[tagged].mean(axis=0)
                    norm = float(np.linalg.norm(mean))
                    centroids[i] = mean / norm if norm > 0 else mean
        stats = catalogue.photos
        history = np.bincount(
            catalogue.conversions["user_idx"].to_numpy(np.int64), minlength=catalogue.n_users
        )
        arrays = {
            "keyword_names": np.asarray(list(names), dtype=str),
            "keyword_ptr": ptr,
            "keyword_photos": photos,
            "keyword_confidence": keywords["confidence"].to_numpy(np.float32),
            "centroids": centroids,
            "log_views": np.log1p(_column(stats, "stats_views", n_photos)),
            "log_downloads": np.log1p(_column(stats, "stats_downloads", n_photos)),
            "user_history": np.log1p(history).astype(np.float32),
        }
        return cls(arrays, embeddings)

    def rows(self, query: RankQuery, base_scores: list[np.ndarray], log_prior) -> np.ndarray:
        """The feature matrix of ``query``'s candidates (:func:`feature_names`' columns).

        ``base_scores`` are the base rankers' scores of the candidates (in the bases' order)
        and ``log_prior`` the query's popularity prior over them. The matrix is filled feature
        by feature (one contiguous row each) and returned as its transpose, candidates ×
        features: the same numbers as filling it column by column, in fewer numpy calls.
        """
        candidates = np.asarray(query.candidates, dtype=np.int64)
        n = len(candidates)
        valid = known_photo_mask(candidates, len(self.log_views))
        known_only = all_true(valid)
        safe = candidates if known_only else np.where(valid, candidates, 0)
        k = len(base_scores)
        matrix = np.empty((len(RETRIEVAL_FEATURES) + 2 * k + len(PHOTO_FEATURES), n))
        # Scores to standardise and rank: the retrieval's, then each base's.
        scores = np.empty((1 + k, n))
        scores[0] = retrieval_order_scores(candidates, query.retrieval_scores)
        for i, base in enumerate(base_scores):
            scores[1 + i] = base
        z = standardised_rows(scores)
        matrix[0] = scores[0]
        matrix[1] = z[0]
        matrix[2] = rank_share(scores[0])
        for i in range(k):
            matrix[3 + 2 * i] = z[1 + i]
            matrix[4 + 2 * i] = rank_share(scores[1 + i])
        photo = matrix[3 + 2 * k :]
        keyword = normalise_keyword(query.keyword)
        photo[0], photo[1] = self._keyword_figures(keyword, candidates, safe, valid)
        photo[2] = log_prior
        if known_only:
            photo[3] = self.log_views.take(candidates)
            photo[4] = self.log_downloads.take(candidates)
        else:
            photo[3] = np.where(valid, self.log_views[safe], np.nan)
            photo[4] = np.where(valid, self.log_downloads[safe], np.nan)
            self._cold_rows(query, keyword, valid, photo)
        user = query.user_idx
        known = user is not None and 0 <= user < len(self.user_history)
        photo[5] = float(self.user_history[user]) if known else 0.0
        photo[6] = np.log1p(len(query.recent_photos))
        return matrix.T

    def _cold_rows(
        self, query: RankQuery, keyword: str, valid: np.ndarray, photo: np.ndarray
    ) -> None:
        """Fill the photo features of live photos beyond the built catalogue from their
        records and the embeddings they were written with (``photo``: the photo rows)."""
        cold = query.cold(valid)
        if not cold.any():
            return
        live = query.live
        photo[3, cold] = np.log1p(np.maximum(live.views[cold], 0.0))
        photo[4, cold] = np.log1p(np.maximum(live.downloads[cold], 0.0))
        rows = np.flatnonzero(cold)
        photo[0, rows] = [live.keywords[i].get(keyword, 0.0) for i in rows.tolist()]
        index = self._lookup.get(keyword)
        if index is not None and live.embeddings is not None and self.embeddings is not None:
            pictured = cold & live.has_embedding
            if live.embeddings.shape[1] == self.centroids.shape[1] and pictured.any():
                photo[1, pictured] = live.embeddings[pictured] @ self.centroids[index]

    def _keyword_figures(
        self, keyword: str, candidates: np.ndarray, safe: np.ndarray, valid: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The keyword's confidence for each candidate and its CLIP similarity to the keyword."""
        n = len(candidates)
        confidence = np.zeros(n, dtype=np.float64)
        similarity = np.full(n, np.nan)
        index = self._lookup.get(keyword)
        if index is None:
            return confidence, similarity
        lo, hi = self.keyword_ptr[index], self.keyword_ptr[index + 1]
        photos = self.keyword_photos[lo:hi]
        if len(photos):
            position = np.minimum(np.searchsorted(photos, candidates), len(photos) - 1)
            tagged = photos[position] == candidates
            confidence = np.where(tagged, self.keyword_confidence[lo:hi][position], 0.0)
        if self.embeddings is not None:
            pictured = valid & self.has_embedding[safe]
            values = self.embeddings[safe] @ self.centroids[index]
            similarity = np.where(pictured, values, np.nan)
        return confidence, similarity


def _column(table, name: str, n: int) -> np.ndarray:
    """A numeric photo column as float64 (zeros when the table lacks it)."""
    if name not in table:
        return np.zeros(n, dtype=np.float64)
    values = np.asarray(table[name].to_numpy(), dtype=np.float64)
    return np.where(np.isfinite(values) & (values > 0), values, 0.0)
