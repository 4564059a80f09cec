"""Validation NDCG@10 of a ranker on held-out (user, keyword) queries, for tuning and stopping."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from imgsearch.candidates import CandidateLists
from imgsearch.catalogue import Catalogue
from imgsearch.evaluation_protocol import of_users, recent_photos
from imgsearch.ranking_metrics import metrics_from_hits, rank_by_scores
from ranking_service.rankers.base import Ranker, RankQuery


class ValidationSet:
    """Held-out ranking queries with their relevant photos, prepared once and scored many times.

    Build it with :meth:`build`; :meth:`ndcg` scores any fitted ranker on it.

    Attributes
    ----------
    queries:
        One :class:`RankQuery` per evaluated (user, keyword) pair; candidates are the keyword's
        top ``candidates_k`` candidates from the served retriever's
        :class:`~imgsearch.candidates.CandidateLists`, with the retriever's scores, minus the
        photos the user converted before (as ``imgsearch eval`` filters the training photos:
        a search engine does not recommend them again, and re-conversions of popular photos
        would otherwise reward whatever ranks popular photos first).
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
        filter_seen: bool = True,
        min_pair: int = 1,
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
        filter_seen:
            Remove from each query's candidates the photos its user converted in
            ``catalogue.conversions``.
        min_pair:
            Conversions a (user, keyword) pair needs in ``val_conversions`` to be a query.

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
        seen_keys = np.zeros(0, dtype=np.int64)
        if filter_seen and len(catalogue.conversions):
            width = max(width, catalogue.n_photos)
            # Only the users of rows that hit can make a query: their earlier pairs alone are
            # looked at (an isin on user numbers is a table lookup, not a sort of all pairs).
            train_users = catalogue.conversions["user_idx"].to_numpy(dtype=np.int64)
            hits = np.flatnonzero(hit)
            theirs = np.isin(train_users, np.unique(users[hits]))
            seen_keys = np.unique(
                train_users[theirs] * width
                + catalogue.conversions["photo_idx"].to_numpy(dtype=np.int64)[theirs]
            )
            hit[hits] &= ~np.isin(users[hits] * width + photos[hits], seen_keys)
        pair = val_conversions.groupby(["user_idx", "keyword"], sort=False).ngroup().to_numpy()
        order = np.argsort(pair, kind="stable")
        bounds = np.r_[np.flatnonzero(np.r_[True, np.diff(pair[order]) != 0]), len(order)]
        pair_hits = np.add.reduceat(hit[order], bounds[:-1]) > 0
        pair_hits &= np.diff(bounds) >= min_pair
        usable = np.flatnonzero(pair_hits)
        n_skipped = int(len(pair_hits) - len(usable))
        if max_queries is not None and len(usable) > max_queries:
            usable = np.sort(np.random.default_rng(seed).choice(usable, max_queries, False))
        recent = recent_photos(
            of_users(catalogue.conversions, users[order[bounds[usable]]]), recent_k
        )
        no_recent = np.zeros(0, dtype=np.int64)
        queries, relevant = [], []
        for g in usable:
            rows = order[bounds[g] : bounds[g + 1]]
            first = rows[0]
            candidates, confidence = candidates_of[keyword_code[first]]
            user = int(users[first])
            if len(seen_keys):
                lo, hi = np.searchsorted(seen_keys, [user * width, (user + 1) * width])
                keep = ~np.isin(candidates, seen_keys[lo:hi] - user * width)
                candidates, confidence = candidates[keep], confidence[keep]
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
        (:func:`~imgsearch.ranking_metrics.rank_by_scores`: ties keep retrieval order), so a
        ranker that cannot tell candidates apart scores as retrieval order does. A ranker with a
        ``score_batch(queries)`` method is scored through it.
        """
        if not self.queries:
            return 0.0
        return float(self.per_query_ndcg(ranker, k).mean())

    def per_query_ndcg(self, ranker: Ranker, k: int = 10) -> np.ndarray:
        """NDCG@``k`` of ``ranker`` on each query, in query order (see :meth:`ndcg`)."""
        if not self.queries:
            return np.zeros(0, dtype=np.float64)
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
        return np.asarray(metrics_from_hits(hits, n_relevant)["ndcg"], dtype=np.float64)

    def split(self, share: float = 0.5, seed: int = 0) -> tuple[ValidationSet, ValidationSet]:
        """Two disjoint parts of the queries: ``share`` of them (drawn with ``seed``), the rest.

        Tuning chooses on one part and the default ranker is chosen on the other, so the
        comparison that picks it is not flattered by the choices tuning made.
        """
        n = len(self.queries)
        first = np.zeros(n, dtype=bool)
        first[np.random.default_rng(seed).permutation(n)[: int(round(n * share))]] = True
        parts = []
        for keep in (first, ~first):
            index = np.flatnonzero(keep)
            parts.append(
                ValidationSet(
                    [self.queries[i] for i in index],
                    [self.relevant[i] for i in index],
                    self.n_skipped,
                )
            )
        return parts[0], parts[1]

    def without(self, other: ValidationSet) -> ValidationSet:
        """The queries whose (user, keyword) pair is not one of ``other``'s."""
        taken = {(q.user_idx, q.keyword) for q in other.queries}
        index = [i for i, q in enumerate(self.queries) if (q.user_idx, q.keyword) not in taken]
        return ValidationSet(
            [self.queries[i] for i in index], [self.relevant[i] for i in index], self.n_skipped
        )

    def fingerprint(self) -> str:
        """A short hash of the queries, their candidates and relevant photos.

        Two validation sets with the same fingerprint score any ranker identically, so
        per-query figures stored with one can be compared with figures measured on the other.
        """
        digest = hashlib.sha256()
        for query, relevant in zip(self.queries, self.relevant):
            digest.update(f"{query.user_idx}|{query.keyword}|".encode())
            digest.update(np.asarray(query.candidates, dtype=np.int64).tobytes())
            digest.update(np.asarray(relevant, dtype=np.int64).tobytes())
        return digest.hexdigest()[:16]
