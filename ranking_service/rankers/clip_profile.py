"""The ``clip_profile`` ranker: a user's taste as a direction in CLIP image space.

The model is a conditional logit over the query's choices: a user converts photo ``p`` for a
query with probability ``∝ prior(p | keyword) · exp(θ_u · e_p)``, where ``e_p`` is the photo's
CLIP image embedding and ``θ_u`` the user's taste. ``θ_u`` is one ridge-damped Newton step from
"no taste" (``θ = 0``), in closed form:

* **the gradient** is the user's conversions minus what the query alone predicts: the
  recency-weighted sum of ``e_p − c_k``, with ``c_k`` the mean embedding of all training
  conversions for the conversion's keyword. Searching "red" and converting a red photo says
  nothing about taste; converting the circle among the red photos does. (A plain mean of the
  converted embeddings would also count the query's own words, the scene a user often searches
  for, as a taste.)
* **the curvature** is the within-keyword covariance of those residuals, ``Σ = V D Vᵀ``, times the
  user's conversion weight ``n_u``: ``θ_u = V (n_u D + ridge)⁻¹ Vᵀ g_u``. Directions along which a
  query's choices barely differ (a shape CLIP encodes faintly) are amplified; thin histories stay
  near 0, so the prior decides for them.

A candidate scores ``θ_u · e_p + popularity_weight · log prior(p | keyword)``: both are log-odds of
the same model, so the personal score keeps its per-user scale (a user with three conversions is
not personalised as hard as one with three hundred). The conversion ``r`` places before the
user's latest weighs ``0.5 ** (r / half_life)``.

Two cold starts are covered by content: the request's ``recent_photo_ids`` the model has not
seen for the user join the gradient as the newest conversions (against the mean of all converted
photos, their keyword being unknown), so a user unknown to the model is profiled from them
alone; and a photo no one has converted still has an embedding, so it ranks by what it shows.
Users with neither a history nor recent photos get popularity order; candidates without an
image score neutrally (their prior decides).

The ranking service loads the embeddings from the artifact set (``image_embeddings.npz``);
the ranker's folder keeps the gradients, weights and the covariance's eigenbasis only, so a set
built without CLIP has no such ranker.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from imgsearch.candidates import CandidateLists
from imgsearch.catalogue import Catalogue
from imgsearch.image_embeddings import ImageEmbeddings
from ranking_service.rankers.base import Ranker, RankQuery, RankScores
from ranking_service.rankers.common import (
    OutdatedRankerError,
    all_true,
    as_candidates,
    finalize_scores,
    known_photo_mask,
    load_arrays,
    read_config,
    remember,
    save_arrays,
    sparse_arrays,
    sparse_from_arrays,
    write_config,
)
from ranking_service.rankers.prior import QueryPrior

# (User, recent photos) whose taste is remembered (about 8 bytes a dimension each).
PROFILE_CACHE = 8192
# What ``config.json`` records as the model, so that a ranker saved as mean profiles is refused.
MODEL = "newton-step taste"
NEEDS_EMBEDDINGS = (
    "clip_profile needs the catalogue's image embeddings (an artifact set built with CLIP)"
)


class ClipProfileRanker(QueryPrior, Ranker):
    """Scores candidates by the user's taste direction in CLIP space (module doc).

    Parameters
    ----------
    half_life:
        Conversions after which an older conversion weighs half as much.
    ridge:
        Ridge of the Newton step: the conversion weight at which a user's taste along a
        direction of unit curvature is trusted half-way. Larger keeps thin histories closer
        to the prior.
    popularity:
        Parameters of the :class:`PopularityRanker` used as the fallback and query prior.
    popularity_weight:
        Weight of the log popularity prior next to the taste score (both log-odds).
    """

    name = "clip_profile"
    uses_embeddings = True

    def __init__(
        self,
        half_life: float = 50.0,
        ridge: float = 0.1,
        popularity: dict | None = None,
        popularity_weight: float = 1.0,
    ) -> None:
        if not ridge > 0:
            raise ValueError(f"ridge must be > 0, got {ridge}")
        self.half_life = float(half_life)
        self.ridge = float(ridge)
        self.init_prior(popularity, popularity_weight)
        self.embeddings = np.zeros((0, 0), dtype=np.float32)
        self.has_embedding = np.zeros(0, dtype=bool)
        self.gradients = np.zeros((0, 0), dtype=np.float32)
        self.profile_weights = np.zeros(0, dtype=np.float32)
        self.global_mean = np.zeros(0, dtype=np.float32)
        self.curvature = np.zeros(0, dtype=np.float64)
        self.basis = np.zeros((0, 0), dtype=np.float64)
        self.user_history = sp.csr_matrix((0, 0), dtype=np.float32)
        self._profile_cache: dict[tuple, np.ndarray | None] = {}

    @property
    def params(self) -> dict:
        """The constructor parameters."""
        return {"half_life": self.half_life, "ridge": self.ridge, **self.prior_params()}

    def attach(self, embeddings: ImageEmbeddings | None, n_photos: int) -> None:
        """Take the catalogue's image embeddings (by photo index) for scoring."""
        if embeddings is None or embeddings.dim == 0:
            raise ValueError(NEEDS_EMBEDDINGS)
        self.embeddings, self.has_embedding = embeddings.dense(n_photos)
        self._profile_cache = {}  # tastes drawn from recent photos depend on the embeddings

    def fit(
        self,
        catalogue: Catalogue,
        show_progress: bool = True,
        candidates: CandidateLists | None = None,
        embeddings: ImageEmbeddings | None = None,
    ) -> ClipProfileRanker:
        """Sum every user's weighted residuals and take the residuals' covariance.

        Raises
        ------
        ValueError
            Without ``embeddings``.
        """
        self.attach(embeddings, catalogue.n_photos)
        dim = self.embeddings.shape[1]
        conversions = catalogue.conversions
        users = conversions["user_idx"].to_numpy(dtype=np.int64)
        photos = conversions["photo_idx"].to_numpy(dtype=np.int64)
        keep = (users >= 0) & (users < catalogue.n_users)
        keep &= known_photo_mask(photos, catalogue.n_photos)
        users, photos = users[keep], photos[keep]
        keywords, _ = pd.factorize(conversions["keyword"].to_numpy()[keep])
        shape = (catalogue.n_users, catalogue.n_photos)
        self.user_history = sp.csr_matrix(
            (np.ones(len(users), np.float32), (users, photos)), shape=shape
        )
        self.user_history.sum_duplicates()
        self.user_history.sort_indices()  # each row's photos sorted (_sorted_contains)
        self.fit_prior(catalogue)
        # Conversions are time-sorted: a row's age is how many of its user's rows come later.
        pictured = self.has_embedding[photos]
        later = _rows_after_within_group(users)[pictured]
        users, photos, keywords = users[pictured], photos[pictured], keywords[pictured]
        weight = 0.5 ** (later / self.half_life)
        self.profile_weights = np.bincount(
            users, weights=weight, minlength=catalogue.n_users
        ).astype(np.float32)
        if not len(photos):
            self.gradients = np.zeros((catalogue.n_users, dim), dtype=np.float32)
            self.global_mean = np.zeros(dim, dtype=np.float32)
            self.curvature, self.basis = np.zeros(dim), np.eye(dim)
            return self
        # Sparse counts times the embeddings: memory grows with users, photos and keywords,
        # not with conversions (no per-conversion embedding rows).
        embeddings = self.embeddings.astype(np.float64)
        n_keywords = int(keywords.max()) + 1
        ones = np.ones(len(photos))
        by_keyword = sp.csr_matrix(
            (ones, (keywords, photos)), shape=(n_keywords, catalogue.n_photos)
        )
        keyword_counts = np.asarray(by_keyword.sum(axis=1)).ravel()
        centroids = np.asarray(by_keyword @ embeddings) / keyword_counts[:, None]
        photo_counts = np.bincount(photos, minlength=catalogue.n_photos).astype(np.float64)
        self.global_mean = (photo_counts @ embeddings / len(photos)).astype(np.float32)
        # Σ (e − c_k)(e − c_k)ᵀ over conversions = Σ e eᵀ − Σ_k n_k c_k c_kᵀ (c_k: k's mean).
        second_moment = (embeddings * photo_counts[:, None]).T @ embeddings
        second_moment -= (centroids * keyword_counts[:, None]).T @ centroids
        covariance = (second_moment + second_moment.T) / (2.0 * len(photos))
        self.curvature, self.basis = np.linalg.eigh(covariance)
        self.curvature = np.clip(self.curvature, 0.0, None)
        user_photo = sp.csr_matrix((weight, (users, photos)), shape=shape)
        user_keyword = sp.csr_matrix(
            (weight, (users, keywords)), shape=(catalogue.n_users, n_keywords)
        )
        gradients = np.asarray(user_photo @ embeddings) - np.asarray(user_keyword @ centroids)
        self.gradients = gradients.astype(np.float32)
        return self

    def profile(self, user_idx: int | None, recent_photos: np.ndarray) -> np.ndarray | None:
        """The user's taste ``θ`` (trained history plus unseen recent photos), None if empty.

        Remembered per (user, recent photos) for the last :data:`PROFILE_CACHE` of them: a
        user's searches in a row send the same recent photos.
        """
        recent = as_candidates(recent_photos)
        known = user_idx is not None and 0 <= user_idx < len(self.profile_weights)
        key = (int(user_idx) if known else None, recent.tobytes())
        if key in self._profile_cache:
            return self._profile_cache[key]
        seen = np.zeros(0, dtype=np.int64)
        if known:
            lo, hi = self.user_history.indptr[user_idx], self.user_history.indptr[user_idx + 1]
            seen = self.user_history.indices[lo:hi]
        recent = recent[known_photo_mask(recent, len(self.has_embedding))]
        new = self.has_embedding[recent] & ~_sorted_contains(seen, recent)
        profile = self._taste(user_idx if known else None, recent, new)
        return remember(self._profile_cache, key, profile, PROFILE_CACHE)

    def _taste(self, user_idx: int | None, recent: np.ndarray, new: np.ndarray):
        """The Newton step from the user's trained gradient and the ``new`` recent photos."""
        gradient = np.zeros(self.embeddings.shape[1], dtype=np.float64)
        weight = 0.0
        if user_idx is not None:
            gradient += self.gradients[user_idx]
            weight += float(self.profile_weights[user_idx])
        age = np.arange(len(recent))[::-1]  # oldest first: the last one is the newest
        if new.any():
            recency = 0.5 ** (age[new] / self.half_life)
            gradient += recency @ (self.embeddings[recent[new]] - self.global_mean)
            weight += float(recency.sum())
        if weight <= 0.0:
            return None
        step = (self.basis.T @ gradient) / (weight * self.curvature + self.ridge)
        return self.basis @ step

    def score(self, query: RankQuery) -> RankScores:
        """Score ``query.candidates`` by ``θ · embedding`` plus the weighted log prior.

        A live photo beyond the built catalogue is scored from the embedding its image was
        given when it was written, as any photo of the set (its prior: a photo without
        conversions).
        """
        candidates = as_candidates(query.candidates)
        valid = known_photo_mask(candidates, len(self.has_embedding))
        profile = self.profile(query.user_idx, query.recent_photos)
        if profile is None:
            return self.popularity_fallback(query)
        rows = np.where(valid, candidates, 0)
        vectors = self.embeddings[rows].astype(np.float64)
        pictured = valid & self.has_embedding[rows]
        cold = query.cold(valid)
        if cold.any() and query.live.embeddings is not None:
            live = cold & query.live.has_embedding
            if query.live.embeddings.shape[1] == vectors.shape[1]:
                vectors[live] = query.live.embeddings[live]
                pictured |= live
        scores = vectors @ profile
        if not all_true(pictured) and pictured.any():  # nearly every request: all pictured
            scores[~pictured] = scores[pictured].mean()
        scored = valid | cold
        scores = self.add_log_prior(scores, candidates, query.keyword, scored)
        return RankScores(finalize_scores(scores, scored))

    def save(self, directory: Path) -> None:
        """Write ``config.json``, ``profiles.npz`` and the prior (not the embeddings)."""
        directory = Path(directory)
        write_config(
            directory,
            self.name,
            {
                "params": self.params,
                "embedding_dim": int(self.embeddings.shape[1]),
                "model": MODEL,
            },
        )
        save_arrays(
            directory / "profiles.npz",
            gradients=self.gradients,
            profile_weights=self.profile_weights,
            global_mean=self.global_mean,
            curvature=self.curvature,
            basis=self.basis,
            **sparse_arrays("history", self.user_history, values=False),
        )
        self.save_prior(directory)

    @classmethod
    def load(
        cls, directory: Path, catalogue: Catalogue, embeddings: ImageEmbeddings | None = None
    ) -> ClipProfileRanker:
        """Read a ranker written by :meth:`save`, scoring with the set's ``embeddings``.

        Raises
        ------
        ValueError
            Without embeddings, with embeddings of another size than the profiles', or for a
            ranker saved in an earlier format (mean profiles).
        """
        directory = Path(directory)
        config = read_config(directory, cls.name)
        if config.get("model") != MODEL:
            raise OutdatedRankerError(
                f"clip_profile in {directory} was saved in an earlier format (mean profiles); "
                "retrain it: imgsearch train --artifacts DIR --rankers clip_profile"
            )
        ranker = cls(**config["params"])
        ranker.attach(embeddings, catalogue.n_photos)
        if embeddings.dim != config["embedding_dim"]:
            raise ValueError(
                f"clip_profile in {directory} was fitted on {config['embedding_dim']}-d "
                f"embeddings, the set's are {embeddings.dim}-d"
            )
        arrays = load_arrays(directory / "profiles.npz")
        ranker.gradients = arrays["gradients"]
        ranker.profile_weights = arrays["profile_weights"]
        ranker.global_mean = arrays["global_mean"]
        ranker.curvature = arrays["curvature"]
        ranker.basis = arrays["basis"]
        ranker.user_history = sparse_from_arrays(arrays, "history")
        ranker.user_history.sort_indices()  # each row's photos sorted (_sorted_contains)
        ranker.load_prior(directory, catalogue)
        return ranker


def _sorted_contains(sorted_values: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``np.isin(values, sorted_values)`` for sorted ``sorted_values``, by binary search."""
    if len(sorted_values) == 0:
        return np.zeros(len(values), dtype=bool)
    position = np.minimum(np.searchsorted(sorted_values, values), len(sorted_values) - 1)
    return sorted_values[position] == values


def _rows_after_within_group(groups: np.ndarray) -> np.ndarray:
    """For each row, how many later rows share its group value (0 for a group's last row)."""
    order = np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    starts = np.flatnonzero(np.r_[True, np.diff(sorted_groups) != 0])
    sizes = np.diff(np.r_[starts, len(groups)])
    position = np.arange(len(groups)) - np.repeat(starts, sizes)
    later = np.empty(len(groups), dtype=np.float64)
    later[order] = np.repeat(sizes, sizes) - 1 - position
    return later
