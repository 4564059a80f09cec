"""The ``clip_profile`` ranker: a user's taste as a point in CLIP image space.

A user's profile is the recency- and count-weighted mean of the CLIP image embeddings of the
photos they converted: the conversion ``r`` places before their latest weighs
``0.5 ** (r / half_life)``, and a photo converted twice counts twice. Thin histories are
shrunk toward the mean of all converted photos, as if ``shrinkage`` average conversions were
added: ``profile = (Σ w·e + shrinkage·m) / (Σ w + shrinkage)``. A candidate scores
``profile · embedding``, blended with the query's popularity prior
(:mod:`~ranking_service.rankers.prior`).

Two cold starts are covered by content: the request's ``recent_photo_ids`` the model has not
seen for the user join the profile as the newest conversions (a user unknown to the model is
profiled from them alone), and a photo no one has converted still has an embedding, so it
ranks by what it shows. Users with neither a history nor recent photos get popularity order;
candidates without an image score neutrally (their prior decides).

The ranking service loads the embeddings from the artifact set (``image_embeddings.npz``);
the ranker's folder keeps the profiles only, so a set built without CLIP has no such ranker.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp

from imgsearch.candidates import CandidateLists
from imgsearch.catalogue import Catalogue
from imgsearch.image_embeddings import ImageEmbeddings
from ranking_service.rankers.base import Ranker, RankQuery, RankScores
from ranking_service.rankers.common import (
    as_candidates,
    finalize_scores,
    known_photo_mask,
    load_arrays,
    read_config,
    save_arrays,
    sparse_arrays,
    sparse_from_arrays,
    write_config,
)
from ranking_service.rankers.prior import QueryPrior

NEEDS_EMBEDDINGS = (
    "clip_profile needs the catalogue's image embeddings (an artifact set built with CLIP)"
)


class ClipProfileRanker(QueryPrior, Ranker):
    """Scores candidates by the similarity of their image to the user's profile (module doc).

    Parameters
    ----------
    half_life:
        Conversions after which an older conversion weighs half as much.
    shrinkage:
        Pseudo-conversions of the global mean added to every profile.
    popularity:
        Parameters of the :class:`PopularityRanker` used as the fallback and query prior.
    popularity_weight:
        Weight of the query's popularity prior next to the profile's similarity.
    """

    name = "clip_profile"
    uses_embeddings = True

    def __init__(
        self,
        half_life: float = 50.0,
        shrinkage: float = 2.0,
        popularity: dict | None = None,
        popularity_weight: float = 1.0,
    ) -> None:
        self.half_life = float(half_life)
        self.shrinkage = float(shrinkage)
        self.init_prior(popularity, popularity_weight)
        self.embeddings = np.zeros((0, 0), dtype=np.float32)
        self.has_embedding = np.zeros(0, dtype=bool)
        self.profile_sums = np.zeros((0, 0), dtype=np.float32)
        self.profile_weights = np.zeros(0, dtype=np.float32)
        self.global_mean = np.zeros(0, dtype=np.float32)
        self.user_history = sp.csr_matrix((0, 0), dtype=np.float32)

    @property
    def params(self) -> dict:
        """The constructor parameters."""
        return {"half_life": self.half_life, "shrinkage": self.shrinkage, **self.prior_params()}

    def attach(self, embeddings: ImageEmbeddings | None, n_photos: int) -> None:
        """Take the catalogue's image embeddings (by photo index) for scoring."""
        if embeddings is None or embeddings.dim == 0:
            raise ValueError(NEEDS_EMBEDDINGS)
        self.embeddings, self.has_embedding = embeddings.dense(n_photos)

    def fit(
        self,
        catalogue: Catalogue,
        show_progress: bool = True,
        candidates: CandidateLists | None = None,
        embeddings: ImageEmbeddings | None = None,
    ) -> ClipProfileRanker:
        """Build every user's weighted embedding sum from the training conversions.

        Raises
        ------
        ValueError
            Without ``embeddings``.
        """
        self.attach(embeddings, catalogue.n_photos)
        conversions = catalogue.conversions
        users = conversions["user_idx"].to_numpy(dtype=np.int64)
        photos = conversions["photo_idx"].to_numpy(dtype=np.int64)
        keep = (users >= 0) & (users < catalogue.n_users)
        keep &= known_photo_mask(photos, catalogue.n_photos)
        users, photos = users[keep], photos[keep]
        # Conversions are time-sorted: a row's age is how many of its user's rows come later.
        later = _rows_after_within_group(users)
        weight = (0.5 ** (later / self.half_life)).astype(np.float32)
        weight *= self.has_embedding[photos]
        shape = (catalogue.n_users, catalogue.n_photos)
        weighted = sp.csr_matrix((weight, (users, photos)), shape=shape)
        self.profile_sums = np.asarray(weighted @ self.embeddings, dtype=np.float32)
        self.profile_weights = np.asarray(weighted.sum(axis=1), dtype=np.float32).ravel()
        counted = self.has_embedding[photos]
        self.global_mean = (
            self.embeddings[photos[counted]].mean(axis=0)
            if counted.any()
            else np.zeros(self.embeddings.shape[1], dtype=np.float32)
        ).astype(np.float32)
        self.user_history = sp.csr_matrix(
            (np.ones(len(users), np.float32), (users, photos)), shape=shape
        )
        self.user_history.sum_duplicates()
        self.fit_prior(catalogue)
        return self

    def profile(self, user_idx: int | None, recent_photos: np.ndarray) -> np.ndarray | None:
        """The user's profile (trained history plus unseen recent photos), None if empty."""
        total = np.zeros(self.embeddings.shape[1], dtype=np.float64)
        weight = 0.0
        seen = np.zeros(0, dtype=np.int64)
        if user_idx is not None and 0 <= user_idx < len(self.profile_weights):
            total += self.profile_sums[user_idx]
            weight += float(self.profile_weights[user_idx])
            lo, hi = self.user_history.indptr[user_idx], self.user_history.indptr[user_idx + 1]
            seen = self.user_history.indices[lo:hi]
        recent = as_candidates(recent_photos)
        recent = recent[known_photo_mask(recent, len(self.has_embedding))]
        age = np.arange(len(recent))[::-1]  # oldest first: the last one is the newest
        new = self.has_embedding[recent] & ~np.isin(recent, seen)
        if new.any():
            recency = 0.5 ** (age[new] / self.half_life)
            total += recency @ self.embeddings[recent[new]]
            weight += float(recency.sum())
        if weight <= 0.0:
            return None
        return (total + self.shrinkage * self.global_mean) / (weight + self.shrinkage)

    def score(self, query: RankQuery) -> RankScores:
        """Score ``query.candidates`` by ``profile · embedding``, blended with the prior."""
        candidates = as_candidates(query.candidates)
        valid = known_photo_mask(candidates, len(self.has_embedding))
        profile = self.profile(query.user_idx, query.recent_photos)
        if profile is None:
            return self.popularity_fallback(query)
        rows = np.where(valid, candidates, 0)
        scores = self.embeddings[rows] @ profile
        pictured = valid & self.has_embedding[rows]
        if pictured.any():
            scores[~pictured] = scores[pictured].mean()
        scores = self.blend_prior(scores, candidates, query.keyword, valid)
        return RankScores(finalize_scores(scores, valid))

    def save(self, directory: Path) -> None:
        """Write ``config.json``, ``profiles.npz`` and the prior (not the embeddings)."""
        directory = Path(directory)
        write_config(
            directory,
            self.name,
            {"params": self.params, "embedding_dim": int(self.embeddings.shape[1])},
        )
        save_arrays(
            directory / "profiles.npz",
            profile_sums=self.profile_sums,
            profile_weights=self.profile_weights,
            global_mean=self.global_mean,
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
            Without embeddings, or with embeddings of another size than the profiles'.
        """
        directory = Path(directory)
        config = read_config(directory, cls.name)
        ranker = cls(**config["params"])
        ranker.attach(embeddings, catalogue.n_photos)
        if embeddings.dim != config["embedding_dim"]:
            raise ValueError(
                f"clip_profile in {directory} was fitted on {config['embedding_dim']}-d "
                f"embeddings, the set's are {embeddings.dim}-d"
            )
        arrays = load_arrays(directory / "profiles.npz")
        ranker.profile_sums = arrays["profile_sums"]
        ranker.profile_weights = arrays["profile_weights"]
        ranker.global_mean = arrays["global_mean"]
        ranker.user_history = sparse_from_arrays(arrays, "history")
        ranker.load_prior(directory, catalogue)
        return ranker


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
