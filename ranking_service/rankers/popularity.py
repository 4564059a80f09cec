"""The ``popularity`` ranker: training conversions per photo, per keyword when it has enough."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from imgsearch.candidates import CandidateLists
from imgsearch.catalogue import Catalogue, normalise_keyword
from imgsearch.image_embeddings import ImageEmbeddings
from ranking_service.rankers.base import Ranker, RankQuery, RankScores
from ranking_service.rankers.common import (
    as_candidates,
    finalize_scores,
    known_photo_mask,
    load_arrays,
    ordinal_scores,
    read_config,
    retrieval_order_scores,
    save_arrays,
    write_config,
)

UNKNOWN_KEYWORD = "unknown keyword: global popularity"


class PopularityRanker(Ranker):
    """Order candidates by how often they were converted in training; ties by retrieval score.

    With ``per_keyword``, a keyword seen in at least ``min_keyword_conversions`` training
    conversions uses its own counts, shrunk towards the global shares:
    ``(count_kw(p) + keyword_prior * share(p)) / (n_kw + keyword_prior)`` — a keyword with few
    conversions stays close to global popularity, a frequent one follows its own counts.

    Parameters
    ----------
    per_keyword:
        Use per-keyword counts where the keyword has enough conversions.
    keyword_prior:
        Pseudo-conversions of global popularity blended into each keyword's counts.
    min_keyword_conversions:
        Keywords with fewer training conversions use global popularity only.
    """

    name = "popularity"

    def __init__(
        self,
        per_keyword: bool = True,
        keyword_prior: float = 20.0,
        min_keyword_conversions: int = 5,
    ) -> None:
        self.per_keyword = bool(per_keyword)
        self.keyword_prior = float(keyword_prior)
        self.min_keyword_conversions = int(min_keyword_conversions)
        self.photo_counts = np.zeros(0, dtype=np.int64)
        self.keyword_names: list[str] = []
        self.keyword_ptr = np.zeros(1, dtype=np.int64)
        self.keyword_photos = np.zeros(0, dtype=np.int64)
        self.keyword_counts = np.zeros(0, dtype=np.int64)
        self._keyword_lookup: dict[str, int] = {}

    @property
    def params(self) -> dict:
        """The constructor parameters."""
        return {
            "per_keyword": self.per_keyword,
            "keyword_prior": self.keyword_prior,
            "min_keyword_conversions": self.min_keyword_conversions,
        }

    def fit(
        self,
        catalogue: Catalogue,
        show_progress: bool = True,
        candidates: CandidateLists | None = None,
        embeddings: ImageEmbeddings | None = None,
    ) -> PopularityRanker:
        """Count training conversions per photo and per (keyword, photo)."""
        conversions = catalogue.conversions
        photos = conversions["photo_idx"].to_numpy(dtype=np.int64)
        photos = photos[(photos >= 0) & (photos < catalogue.n_photos)]
        self.photo_counts = np.bincount(photos, minlength=catalogue.n_photos).astype(np.int64)
        pairs = (
            conversions.groupby(["keyword", "photo_idx"], sort=True).size().reset_index(name="n")
        )
        totals = pairs.groupby("keyword", sort=True)["n"].transform("sum")
        pairs = pairs[totals >= self.min_keyword_conversions]
        codes, names = pd.factorize(pairs["keyword"], sort=True)
        self.keyword_names = [str(name) for name in names]
        self.keyword_ptr = np.r_[0, np.cumsum(np.bincount(codes, minlength=len(names)))].astype(
            np.int64
        )
        self.keyword_photos = pairs["photo_idx"].to_numpy(dtype=np.int64)
        self.keyword_counts = pairs["n"].to_numpy(dtype=np.int64)
        self._index_keywords()
        return self

    def _index_keywords(self) -> None:
        self._keyword_lookup = {name: i for i, name in enumerate(self.keyword_names)}

    def popularity(self, candidates: np.ndarray, keyword: str) -> tuple[np.ndarray, str]:
        """Return each candidate's blended popularity share and the fallback reason, if any.

        Parameters
        ----------
        candidates:
            Photo indexes (int64); out-of-range ones get -1.
        keyword:
            The query keyword.

        Returns
        -------
        tuple
            ``(popularity float64, fallback_reason)``.
        """
        share, reason, _ = self._shares(candidates, keyword)
        return share, reason

    def log_prior(self, candidates: np.ndarray, keyword: str) -> np.ndarray:
        """``log`` of each candidate's share plus half a conversion's share (never -inf).

        The half conversion keeps photos no one has converted yet a finite prior, a little
        below those converted once, rather than an abyss that no personal score can climb out
        of; out-of-range candidates get that floor too.
        """
        share, _, denominator = self._shares(candidates, keyword)
        return np.log(np.maximum(share, 0.0) + 0.5 / denominator)

    def _shares(self, candidates: np.ndarray, keyword: str) -> tuple[np.ndarray, str, float]:
        """Shares, fallback reason and the shares' denominator (conversions they count)."""
        valid = known_photo_mask(candidates, len(self.photo_counts))
        total = max(int(self.photo_counts.sum()), 1)
        share = np.full(len(candidates), -1.0)
        share[valid] = self.photo_counts[candidates[valid]] / total
        if not self.per_keyword:
            return share, "", float(total)
        keyword_id = self._keyword_lookup.get(normalise_keyword(keyword))
        if keyword_id is None:
            return share, UNKNOWN_KEYWORD, float(total)
        lo, hi = self.keyword_ptr[keyword_id], self.keyword_ptr[keyword_id + 1]
        photos, counts = self.keyword_photos[lo:hi], self.keyword_counts[lo:hi]
        position = np.clip(np.searchsorted(photos, candidates), 0, len(photos) - 1)
        keyword_count = np.where(photos[position] == candidates, counts[position], 0)
        denominator = counts.sum() + self.keyword_prior
        blended = (keyword_count + self.keyword_prior * share) / denominator
        return np.where(valid, blended, -1.0), "", float(denominator)

    def score(self, query: RankQuery) -> RankScores:
        """Return ordinal scores: popularity first, then retrieval score, then retrieval order."""
        candidates = as_candidates(query.candidates)
        popularity, reason = self.popularity(candidates, query.keyword)
        scores = ordinal_scores(
            popularity, retrieval_order_scores(candidates, query.retrieval_scores)
        )
        valid = known_photo_mask(candidates, len(self.photo_counts))
        return RankScores(finalize_scores(scores, valid), fallback_reason=reason)

    def save(self, directory: Path) -> None:
        """Write ``config.json`` (parameters, keyword vocabulary) and ``counts.npz``."""
        directory = Path(directory)
        write_config(
            directory, self.name, {"params": self.params, "keyword_names": self.keyword_names}
        )
        save_arrays(
            directory / "counts.npz",
            photo_counts=self.photo_counts,
            keyword_ptr=self.keyword_ptr,
            keyword_photos=self.keyword_photos,
            keyword_counts=self.keyword_counts,
        )

    @classmethod
    def load(cls, directory: Path, catalogue: Catalogue) -> PopularityRanker:
        """Read a ranker written by :meth:`save`."""
        directory = Path(directory)
        config = read_config(directory, cls.name)
        ranker = cls(**config["params"])
        arrays = load_arrays(directory / "counts.npz")
        ranker.photo_counts = arrays["photo_counts"]
        ranker.keyword_ptr = arrays["keyword_ptr"]
        ranker.keyword_photos = arrays["keyword_photos"]
        ranker.keyword_counts = arrays["keyword_counts"]
        ranker.keyword_names = list(config["keyword_names"])
        ranker._index_keywords()
        return ranker
