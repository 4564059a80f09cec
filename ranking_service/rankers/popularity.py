"""The ``popularity`` ranker: training conversions per photo, per keyword when it has enough."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from imgsearch.candidates import CandidateLists
from imgsearch.catalogue import Catalogue, normalise_keyword
from imgsearch.image_embeddings import ImageEmbeddings
from ranking_service.rankers.base import Ranker, RankQuery, RankScores
from ranking_service.rankers.common import (
    all_true,
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
from ranking_service.rankers.photo_rates import stats_rates

UNKNOWN_KEYWORD = "unknown keyword: global popularity"


class PopularityRanker(Ranker):
    """Order candidates by how often they were converted in training; ties by retrieval score.

    With ``per_keyword``, a keyword seen in at least ``min_keyword_conversions`` training
    conversions uses its own counts, shrunk towards the global shares:
    ``(count_kw(p) + keyword_prior * share(p)) / (n_kw + keyword_prior)`` — a keyword with few
    conversions stays close to global popularity, a frequent one follows its own counts.

    With ``stats_strength`` ``a > 0``, the counts ``c`` of the candidates converted for the
    keyword are combined with what the photos' own stats predict
    (:func:`~ranking_service.rankers.photo_rates.stats_rates`, spread over those candidates as
    expected counts ``m``) as the posterior mean of a Gamma-Poisson model,
    ``m · (c + a) / (m + a)``: a photo with few conversions leans on its views and downloads,
    one with many keeps about its count. ``a = 0`` is the counts alone.

    Parameters
    ----------
    per_keyword:
        Use per-keyword counts where the keyword has enough conversions.
    keyword_prior:
        Pseudo-conversions of global popularity blended into each keyword's counts.
    min_keyword_conversions:
        Keywords with fewer training conversions use global popularity only.
    stats_strength:
        Strength ``a`` of the stats prior, in conversions; 0 ignores the stats.
    """

    name = "popularity"

    def __init__(
        self,
        per_keyword: bool = True,
        keyword_prior: float = 20.0,
        min_keyword_conversions: int = 5,
        stats_strength: float = 0.0,
    ) -> None:
        if not stats_strength >= 0:
            raise ValueError(f"stats_strength must be >= 0, got {stats_strength}")
        self.per_keyword = bool(per_keyword)
        self.stats_strength = float(stats_strength)
        self.keyword_prior = float(keyword_prior)
        self.min_keyword_conversions = int(min_keyword_conversions)
        self.photo_counts = np.zeros(0, dtype=np.int64)
        self.stats_rates = np.zeros(0, dtype=np.float64)
        self.keyword_names: list[str] = []
        self.keyword_ptr = np.zeros(1, dtype=np.int64)
        self.keyword_photos = np.zeros(0, dtype=np.int64)
        self.keyword_counts = np.zeros(0, dtype=np.int64)
        self._keyword_lookup: dict[str, int] = {}
        self._keyword_totals: list[int] = []
        self._total = 1
        self._memo: dict | None = None

    @property
    def params(self) -> dict:
        """The constructor parameters."""
        return {
            "per_keyword": self.per_keyword,
            "keyword_prior": self.keyword_prior,
            "min_keyword_conversions": self.min_keyword_conversions,
            "stats_strength": self.stats_strength,
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
        self.stats_rates = (
            stats_rates(catalogue.photos, self.photo_counts)
            if self.stats_strength > 0
            else np.zeros(0, dtype=np.float64)
        )
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
        # Each keyword's conversions, summed once rather than per request.
        self._keyword_totals = [
            int(self.keyword_counts[lo:hi].sum())
            for lo, hi in zip(self.keyword_ptr[:-1].tolist(), self.keyword_ptr[1:].tolist())
        ]
        # Counted once: a sum over every photo per request grows with the catalogue.
        self._total = max(int(self.photo_counts.sum()), 1)

    def popularity(
        self, candidates: np.ndarray, keyword: str, cold: np.ndarray | None = None
    ) -> tuple[np.ndarray, str]:
        """Return each candidate's blended popularity share and the fallback reason, if any.

        Parameters
        ----------
        candidates:
            Photo indexes (int64); out-of-range ones get -1.
        keyword:
            The query keyword.
        cold:
            Bool per candidate: a live photo beyond the built catalogue, which gets the share
            of a photo without conversions (0) instead of -1.

        Returns
        -------
        tuple
            ``(popularity float64, fallback_reason)``.
        """
        share, reason, _ = self._shares(candidates, keyword, cold)
        return share, reason

    def log_prior(self, candidates: np.ndarray, keyword: str) -> np.ndarray:
        """``log`` of each candidate's share plus half a conversion's share (never -inf).

        The half conversion keeps photos no one has converted yet a finite prior, a little
        below those converted once, rather than an abyss that no personal score can climb out
        of; out-of-range candidates get that floor too.
        """
        share, _, denominator = self._shares(candidates, keyword)
        return np.log(np.maximum(share, 0.0) + 0.5 / denominator)

    @contextmanager
    def counting_once(self):
        """Within the block, each (keyword, candidates) is counted once, then remembered.

        For a caller that asks the same query's popularity several times (the ``stacked``
        ranker: its popularity base, its other bases' priors and its prior feature). The
        memory lasts the block only, so it never outlives the counts it was taken from.
        """
        self._memo = {}
        try:
            yield self
        finally:
            self._memo = None

    def _shares(
        self, candidates: np.ndarray, keyword: str, cold: np.ndarray | None = None
    ) -> tuple[np.ndarray, str, float]:
        """Shares, fallback reason and the shares' denominator (conversions they count)."""
        if cold is not None and not cold.any():
            cold = None  # no live photo: the same count as a caller that passes no mask
        memo = self._memo
        if memo is None:
            return self._count_shares(candidates, keyword, cold)
        key = (keyword, candidates.tobytes(), None if cold is None else cold.tobytes())
        found = memo.get(key)
        if found is None:
            found = memo[key] = self._count_shares(candidates, keyword, cold)
            found[0].setflags(write=False)
        return found

    def _count_shares(
        self, candidates: np.ndarray, keyword: str, cold: np.ndarray | None = None
    ) -> tuple[np.ndarray, str, float]:
        """:meth:`_shares`, counted."""
        known = known_photo_mask(candidates, len(self.photo_counts))
        total = self._total
        if cold is None and all_true(known):  # nearly every request: no mask to apply
            valid = known
            share = self.photo_counts.take(candidates) / total
        else:
            valid = known if cold is None else known | cold
            share = np.full(len(candidates), -1.0)
            share[valid] = 0.0  # a cold photo: no conversions
            share[known] = self.photo_counts[candidates[known]] / total
        keyword_id = self._keyword_lookup.get(normalise_keyword(keyword))
        if not self.per_keyword or keyword_id is None:
            reason = UNKNOWN_KEYWORD if self.per_keyword else ""
            counts = np.where(valid, share * total, 0.0)
            shares = self._with_stats(counts, counts > 0, total, candidates, valid, total)
            return shares, reason, float(total)
        lo, hi = self.keyword_ptr[keyword_id], self.keyword_ptr[keyword_id + 1]
        photos, counts = self.keyword_photos[lo:hi], self.keyword_counts[lo:hi]
        position = np.minimum(photos.searchsorted(candidates), len(photos) - 1)
        keyword_count = np.where(photos[position] == candidates, counts[position], 0)
        n_conversions = self._keyword_totals[keyword_id]
        denominator = n_conversions + self.keyword_prior
        pseudo_counts = keyword_count + self.keyword_prior * share
        converted = keyword_count > 0
        blended = self._with_stats(
            pseudo_counts, converted, n_conversions, candidates, valid, denominator
        )
        return blended, "", float(denominator)

    def _with_stats(
        self,
        counts: np.ndarray,
        converted: np.ndarray,
        n_conversions: float,
        candidates: np.ndarray,
        valid: np.ndarray,
        denominator: float,
    ) -> np.ndarray:
        """``counts / denominator``, through the stats prior when it is on; -1 where invalid.

        The prior spreads ``n_conversions`` over the ``converted`` candidates (those with
        conversions for the keyword) in proportion to their stats rates, the expected counts
        ``m``, and replaces each of their counts ``c`` by ``m · (c + a) / (m + a)``. Candidates
        without conversions keep their (backed-off) count: conversions say which photos answer
        the query, the stats only how popular those are, so a much-viewed photo that does not
        match is not lifted above the ones that do.
        """
        every = all_true(valid)
        observed = np.maximum(counts if every else counts[valid], 0.0)
        supported = converted if every else converted[valid]
        if self.stats_strength > 0 and len(self.stats_rates) and supported.any():
            rows = candidates if every else candidates[valid]
            rows = np.where(rows < len(self.stats_rates), rows, 0)  # cold photos: unsupported
            rates = np.where(supported, self.stats_rates[rows], 0.0)
            expected = max(n_conversions, 1.0) * rates / max(rates.sum(), 1e-12)
            strength = self.stats_strength
            posterior = expected * (observed + strength) / np.maximum(expected + strength, 1e-12)
            observed = np.where(supported, posterior, observed)
        if every:
            return observed / max(denominator, 1.0)
        shares = np.full(len(candidates), -1.0)
        shares[valid] = observed / max(denominator, 1.0)
        return shares

    def score(self, query: RankQuery) -> RankScores:
        """Return ordinal scores: popularity first, then retrieval score, then retrieval order.

        A live photo beyond the built catalogue is cold: it has no conversions, so it ranks
        among the candidates no one converted, by its retrieval score.
        """
        candidates = as_candidates(query.candidates)
        valid = known_photo_mask(candidates, len(self.photo_counts))
        cold = query.cold(valid)
        popularity, reason = self.popularity(candidates, query.keyword, cold)
        scores = ordinal_scores(
            popularity, retrieval_order_scores(candidates, query.retrieval_scores)
        )
        return RankScores(finalize_scores(scores, valid | cold), fallback_reason=reason)

    def save(self, directory: Path) -> None:
        """Write ``config.json`` (parameters, keyword vocabulary) and ``counts.npz``."""
        directory = Path(directory)
        write_config(
            directory, self.name, {"params": self.params, "keyword_names": self.keyword_names}
        )
        save_arrays(
            directory / "counts.npz",
            photo_counts=self.photo_counts,
            stats_rates=self.stats_rates,
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
        # Sets saved before the stats prior have no rates (and a stats_strength of 0).
        ranker.stats_rates = arrays.get("stats_rates", np.zeros(0, dtype=np.float64))
        ranker.keyword_ptr = arrays["keyword_ptr"]
        ranker.keyword_photos = arrays["keyword_photos"]
        ranker.keyword_counts = arrays["keyword_counts"]
        ranker.keyword_names = list(config["keyword_names"])
        ranker._index_keywords()
        return ranker
