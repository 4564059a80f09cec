"""Validation NDCG@10 of a ranker on held-out (user, keyword) queries, for tuning and stopping."""

from __future__ import annotations

import numpy as np
import pandas as pd

from imgsearch.candidates import CandidateLists
from imgsearch.catalogue import Catalogue
from imgsearch.metrics import metrics_from_hits, rank_by_scores
from imgsearch.protocol import recent_photos
from ranking_service.rankers.base import Ranker, RankQuery


class ValidationSet:
    """Held-out ranking queries with their relevant photos, prepared once and scored many times.

    Build it with :meth:`build`; :meth:`ndcg` scores any fitted ranker on it.

    Attributes
    ----------
    queries:
        One :class:`RankQuery` per evaluated (user, keyword) pair; candidates are the keyword's
        top ``candidates_k`` candidates from the served retriever's
        :class:`~imgsearch.candidates.CandidateLists`, with the retriever's scores.
    relevant:
        For each query, the converted photos that are among its candidates.
    n_skipped:
        Pairs left out because none of their converted photos was a candidate (a retrieval
        miss: no ranker can place them, so they would only dilute the comparison). Counted
        over all pairs; ``max_queries`` then draws among the usable ones.
    """

    def __init__(self, queries: list[RankQuery], relevant: list[np.ndarray], n_skipped: int):
        self.queries = queries
        self.relevant = relevant
        self.n_skipped = n_skipped

    def __len__(self) -> int:
        return len(self.queries)

    @classmethod
    def build(
        cls,
        catalogue: Catalogue,
        val_conversions: pd.DataFrame,
        candidates: CandidateLists,
        candidates_k: int = 100,
        max_queries: int | None = None,
        seed: int = 0,
        recent_k: int = 20,
    ) -> ValidationSet:
        """Prepare the validation queries of ``val_conversions``.

        Parameters
        ----------
        catalogue:
            The catalogue the ranker was trained on; its ``conversions`` are the training ones
            and give each user's ``recent_photos`` (their last ``recent_k`` training photos).
        val_conversions:
            Held-out conversions, later in time than the training ones.
        candidates:
            The served retriever's candidates for the keywords of ``val_conversions``.
        candidates_k:
            Candidates per query.
        max_queries:
            Evaluate at most this many (user, keyword) pairs, drawn with ``seed``; None for all.
        seed:
            Seed of that draw.
        recent_k:
            How many recent training photos each query carries.

        Returns
        -------
        ValidationSet
        """
        if len(val_conversions) == 0:
            return cls([], [], 0)
        users = val_conversions["user_idx"].to_numpy(dtype=np.int64)
        keyword_code, keyword_names = pd.factorize(val_conversions["keyword"].astype(str))
        photos = val_conversions["photo_idx"].to_numpy(dtype=np.int64)
        countries = val_conversions["conversion_country"].to_numpy()
        candidates_of = [candidates.top(name, candidates_k) for name in keyword_names]
        # Which conversions land among their keyword's candidates, for all rows at once.
        width = max(int(photos.max(initial=0)), 0) + 1
        width = max(width, 1 + max((int(c.max(initial=0)) for c, _ in candidates_of), default=0))
        candidate_keys = np.concatenate(
            [code * width + c for code, (c, _) in enumerate(candidates_of)] or [np.zeros(0)]
        )
        hit = np.isin(keyword_code * width + photos, candidate_keys)
        pair = val_conversions.groupby(["user_idx", "keyword"], sort=False).ngroup().to_numpy()
        order = np.argsort(pair, kind="stable")
        bounds = np.r_[np.flatnonzero(np.r_[True, np.diff(pair[order]) != 0]), len(order)]
        pair_hits = np.add.reduceat(hit[order], bounds[:-1]) > 0
        usable = np.flatnonzero(pair_hits)
        n_skipped = int(len(pair_hits) - len(usable))
        if max_queries is not None and len(usable) > max_queries:
            usable = np.sort(np.random.default_rng(seed).choice(usable, max_queries, False))
        recent = recent_photos(catalogue.conversions, recent_k)
        no_recent = np.zeros(0, dtype=np.int64)
        queries, relevant = [], []
        for g in usable:
            rows = order[bounds[g] : bounds[g + 1]]
            first = rows[0]
            candidates, confidence = candidates_of[keyword_code[first]]
            user = int(users[first])
            queries.append(
                RankQuery(
                    user_idx=user,
                    keyword=str(keyword_names[keyword_code[first]]),
                    candidates=candidates,
                    retrieval_scores=confidence,
                    recent_photos=recent.get(user, no_recent),
                    country=str(countries[first]),
                )
            )
            relevant.append(np.unique(photos[rows][hit[rows]]))
        return cls(queries, relevant, n_skipped)

    def ndcg(self, ranker: Ranker, k: int = 10) -> float:
        """Return the mean NDCG@``k`` of ``ranker`` over the queries (0.0 when there are none).

        Candidates are ordered as the evaluation orders them
        (:func:`~imgsearch.metrics.rank_by_scores`: ties keep retrieval order), so a ranker that
        cannot tell candidates apart scores as retrieval order does. A ranker with a
        ``score_batch(queries)`` method is scored through it.
        """
        if not self.queries:
            return 0.0
        # Rankers with a batched path (FM, DeepFM) score all queries in a few forward passes.
        score_batch = getattr(ranker, "score_batch", None)
        if score_batch is not None:
            results = score_batch(self.queries)
        else:
            results = [ranker.score(query) for query in self.queries]
        hits = np.zeros((len(self.queries), k), dtype=bool)
        for q, (query, result) in enumerate(zip(self.queries, results)):
            top = rank_by_scores(query.candidates, result.scores)[:k]
            hits[q, : len(top)] = np.isin(top, self.relevant[q])
        n_relevant = np.asarray([len(r) for r in self.relevant], dtype=np.int64)
        return float(metrics_from_hits(hits, n_relevant)["ndcg"].mean())


def validation_ndcg(
    ranker: Ranker,
    catalogue: Catalogue,
    val_conversions: pd.DataFrame,
    candidates_k: int = 100,
    max_queries: int | None = None,
    seed: int = 0,
) -> float:
    """Return NDCG@10 of ``ranker`` on held-out conversions.

    Each (user, keyword) pair of ``val_conversions`` is one query: the keyword's top
    ``candidates_k`` photos by keyword confidence are ranked, and the pair's converted photos
    among them are the relevant ones. Pairs whose conversions all fall outside the candidates
    are skipped (see :class:`ValidationSet`).

    Parameters
    ----------
    ranker:
        A fitted ranker.
    catalogue:
        The catalogue it was trained on (``conversions`` = the training conversions).
    val_conversions:
        Held-out conversions, later in time than the training ones.
    candidates_k:
        Candidates per query.
    max_queries:
        Evaluate at most this many pairs (a seeded draw); None for all of them.
    seed:
        Seed of that draw.

    Returns
    -------
    float
        Mean NDCG@10 over the evaluated pairs.
    """
    validation = ValidationSet.build(
        catalogue, val_conversions, candidates_k=candidates_k, max_queries=max_queries, seed=seed
    )
    return validation.ndcg(ranker)
