"""The in-process baseline of a load run: the served retrievers and rankers called directly
(no gRPC, no protobuf), so ``e2e p50 / in-process p50`` is the cost of the three RPC hops."""

from __future__ import annotations

import time
from pathlib import Path

from imgsearch.latency import percentiles_ms
from imgsearch_tools.bench.queries import BenchQuery


class InProcessPipeline:
    """The served retrievers and rankers called directly: no gRPC, no protobuf, no network.

    Parameters
    ----------
    artifacts_path:
        The artifact root or set the servers serve.
    """

    def __init__(self, artifacts_path: str | Path):
        from ranking_service.server import load_ranking_state
        from retrieval_service.server import load_retrieval_state

        self.retrieval = load_retrieval_state(str(artifacts_path))
        self.ranking = load_ranking_state(str(artifacts_path))
        self.version = self.retrieval.version

    def _names(self, retriever: str, ranker: str) -> tuple[str, str]:
        retriever_name = self.retrieval.default_retriever if retriever == "default" else retriever
        ranker_name = self.ranking.default_ranker if ranker == "default" else ranker
        if retriever_name not in self.retrieval.retrievers:
            raise ValueError(
                f"retriever {retriever_name!r} is not in artifact set {self.version} "
                f"(available: {', '.join(self.retrieval.retrievers)})"
            )
        if ranker_name not in self.ranking.rankers:
            raise ValueError(
                f"ranker {ranker_name!r} has no in-process equivalent in artifact set "
                f"{self.version} (available: {', '.join(self.ranking.rankers)})"
            )
        return retriever_name, ranker_name

    def search(
        self, query: BenchQuery, retriever: str, ranker: str, k: int, candidates_k: int
    ) -> tuple[list[str], float, float]:
        """One search the way the servers do it; returns (photo ids, retrieve s, rank s)."""
        import numpy as np

        from imgsearch.catalogue import normalise_keyword
        from ranking_service.rankers.base import RankQuery
        from ranking_service.server import top_k

        retriever_name, ranker_name = self._names(retriever, ranker)
        start = time.perf_counter()
        text = normalise_keyword(query.query)
        result = self.retrieval.retrievers[retriever_name].retrieve(text, candidates_k)
        retrieved = time.perf_counter()
        photo_idx = np.asarray(result.photo_idx, dtype=np.int64)
        if len(photo_idx):
            catalogue = self.ranking.catalogue
            user_idx = catalogue.user_idx(query.user_id) if query.user_id else None
            rank_query = RankQuery(
                user_idx=user_idx,
                keyword=normalise_keyword(result.keyword or text),
                candidates=photo_idx,
                retrieval_scores=np.asarray(result.scores, dtype=np.float32),
                country=self.ranking.user_country.get(user_idx, "") if user_idx is not None else "",
            )
            scores = self.ranking.rankers[ranker_name].score(rank_query).scores
            order = top_k(np.asarray(scores, dtype=np.float64), k)
            photo_idx = photo_idx[order]
        ids = self.retrieval.photo_ids[photo_idx].tolist()
        return ids, retrieved - start, time.perf_counter() - retrieved

    def measure(
        self,
        queries: list[BenchQuery],
        retriever: str,
        ranker: str,
        k: int = 10,
        candidates_k: int = 100,
        warmup: int = 20,
    ) -> dict:
        """Latency of :meth:`search` over ``queries``, one at a time, in milliseconds."""
        self._names(retriever, ranker)
        for query in queries[:warmup]:
            self.search(query, retriever, ranker, k, candidates_k)
        totals, retrieve, rank = [], [], []
        for query in queries:
            _, retrieve_s, rank_s = self.search(query, retriever, ranker, k, candidates_k)
            retrieve.append(retrieve_s)
            rank.append(rank_s)
            totals.append(retrieve_s + rank_s)
        return {
            "requests": len(queries),
            "latency_ms": percentiles_ms(totals),
            "retrieve_ms": percentiles_ms(retrieve),
            "rank_ms": percentiles_ms(rank),
        }


def network_ratio(result: dict, in_process: dict | None) -> float | None:
    """End-to-end p50 over in-process p50: what the RPC hops multiply a search by."""
    if not in_process or "latency_ms" not in in_process:
        return None
    e2e = result["latency_ms"]["p50"]
    local = in_process["latency_ms"]["p50"]
    if e2e is None or not local:
        return None
    return round(e2e / local, 1)
