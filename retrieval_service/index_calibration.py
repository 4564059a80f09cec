"""Search effort calibrated at build: the smallest efSearch (HNSW) or nprobe (IVF) whose recall@k
against exact search reaches a target for every kind of query the index will serve.

A fixed efSearch is right for one catalogue and wrong for the next: how hard a graph is to search
depends on the embeddings and on the queries (text queries sit far from every image: on the
demo's 100,000 photos, two-word queries and descriptions reached recall@10 0.95 at efSearch 128,
one-word keyword queries only at 2,048). The build therefore tries growing values on half of each
family of queries, keeps the first that reaches the target on every family (or the best one,
marked as short of it), measures it on the other halves, and records the whole curve, so a
reader of the manifest sees what recall the served index has and what more effort would buy.
"""

from __future__ import annotations

import time

import numpy as np

from retrieval_service.vector_index import exact_index, index_lists, shared_rows

TARGET_RECALL = 0.95
# Up to 8,192: on 100,000 demo photos one-word queries needed 2,048 (their exact top 10 are a few
# of the ~12,500 photos of one colour, all about as near to the query); more photos need more.
EF_SEARCH_STEPS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
# Powers of two up to 256; an inverted file of more lists goes on doubling up to all of them
# (nprobe_steps): on the demo's 1,000,000 photos IVF4096 gave its one-word keywords recall@10
# 0.915 at nprobe 256 and 0.965 at 512.
NPROBE_STEPS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MAX_QUERIES = 1000  # per family and half: exact search over 1M x 512-d takes them in seconds


def nprobe_steps(lists: int) -> tuple[int, ...]:
    """The nprobe values to try on an inverted file of ``lists`` lists (0: not known).

    Powers of two below ``lists``, then ``lists`` itself: searching every list of an inverted
    file of float32 or half-precision vectors scores every vector (exactly, or within
    half-precision rounding), so a target recall is always reached on the ladder. Where
    ``lists`` is not known, :data:`NPROBE_STEPS`.
    """
    if lists <= 0:
        return NPROBE_STEPS
    steps, value = [], 1
    while value < lists:
        steps.append(value)
        value *= 2
    return (*steps, lists)


def _parameter(vector_index) -> tuple[str | None, tuple[int, ...]]:
    if "HNSW" in vector_index.factory and hasattr(vector_index.index, "hnsw"):
        return "efSearch", EF_SEARCH_STEPS
    if "IVF" in vector_index.factory:
        return "nprobe", nprobe_steps(index_lists(vector_index.index))
    return None, ()


def split_families(
    families: dict[str, np.ndarray], seed: int = 0
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Each family's queries halved at random: ``(tuning, unseen)``, at most MAX_QUERIES each."""
    rng = np.random.default_rng(seed)
    tuning, unseen = {}, {}
    for name, queries in families.items():
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        order = rng.permutation(len(queries))
        half = (len(order) + 1) // 2
        tuning[name] = queries[order[:half][:MAX_QUERIES]]
        unseen[name] = queries[order[half:][:MAX_QUERIES]]
    return tuning, unseen


class _Truth:
    """Each family's exact top ``k``, computed once."""

    def __init__(self, exact, families: dict[str, np.ndarray], k: int):
        self.families = {name: q for name, q in families.items() if len(q)}
        self.truth = {name: exact.search(q, k)[1] for name, q in self.families.items()}
        self.k = k

    def recalls(self, index, names=None) -> dict[str, float]:
        """recall@k of ``index`` (a FAISS index, at its current settings) per family (those
        in ``names``; None: every one)."""
        figures = {}
        for name, queries in self.families.items():
            if names is not None and name not in names:
                continue
            _, found = index.search(queries, self.k)
            truth = self.truth[name]
            hits = np.sum(shared_rows(found, truth))
            figures[name] = round(float(hits) / max(1, int(np.count_nonzero(truth >= 0))), 4)
        return figures


def calibrate(
    vector_index,
    embeddings: np.ndarray,
    families: dict[str, np.ndarray],
    target: float = TARGET_RECALL,
    k: int = 10,
    seed: int = 0,
    classes: dict[str, tuple[str, ...]] | None = None,
) -> dict:
    """Set the index's search effort to the smallest value reaching ``target`` on every family,
    and each query class's to the smallest reaching it on that class's families.

    Parameters
    ----------
    vector_index:
        A :class:`~retrieval_service.vector_index.VectorIndex` over ``embeddings`` (its rows in
        the same order); its ``efSearch`` / ``nprobe`` is set to the chosen value.
    embeddings:
        ``(n, d)`` float32, the index's vectors: the exact reference is computed over them.
    families:
        Query embeddings by kind (``{"keyword": ..., "held-out": ...}``): half of each tunes,
        the other half measures the chosen value (see :func:`split_families`).
    target:
        The recall@``k`` against exact search to reach, on each family.
    k:
        Cut-off.
    seed:
        Seed of the halving.
    classes:
        Query classes served with an effort of their own (see
        :func:`~retrieval_service.vector_index.query_class`) and the families that stand for
        each (``{"one word": ("single keyword",), ...}``). Each class gets the first value
        of the ladder at which its families reach ``target`` (set with
        :meth:`~retrieval_service.vector_index.VectorIndex.set_query_params`): a class of
        easier queries searches less of the index. None: one value for every query.

    Returns
    -------
    dict
        ``parameter`` (``"efSearch"``, ``"nprobe"``, or None for an exact index), ``value``,
        ``recall`` (the lowest family's, on the tuning halves) at it, ``target``, ``reached``,
        ``queries`` (per family and half), ``tried`` (each value with its recall per family),
        and ``unseen_recall`` / ``unseen_by_family``: the chosen value on the other halves;
        with ``classes``, ``by_query``: each class's ``value``, ``recall`` (tuning halves) and
        ``unseen_by_family`` (its families' other halves at its value), and ``unseen_recall``
        is then the lowest of those, the recall the index serves.
    """
    tuning, unseen = split_families(families, seed)
    parameter, steps = _parameter(vector_index)
    setting = {"efSearch": "ef_search", "nprobe": "nprobe"}.get(parameter)
    record = {
        "parameter": parameter,
        "target": target,
        "k": k,
        "queries": {name: len(q) for name, q in tuning.items()},
    }
    exact = exact_index(embeddings)
    tuned, measured = _Truth(exact, tuning, k), _Truth(exact, unseen, k)
    started = time.perf_counter()
    if parameter is None or not tuned.families:
        value, recall, reached, tried = None, (1.0 if parameter is None else None), None, []
    else:
        tried = []
        for value in steps:
            vector_index.set_params(**{setting: value})
            by_family = tuned.recalls(vector_index.index)
            tried.append({"value": value, "recall": min(by_family.values()), **by_family})
            if tried[-1]["recall"] >= target:
                break
        reached = tried[-1]["recall"] >= target
        # Short of the target: the best recall, and of equal ones the cheapest.
        chosen = tried[-1] if reached else max(tried, key=lambda t: (t["recall"], -t["value"]))
        value, recall = chosen["value"], chosen["recall"]
    by_query = {}
    if parameter is not None and tried:
        for name, members in (classes or {}).items():
            present = [f for f in members if f in tuned.families]
            if not present:
                continue
            first = next((t for t in tried if min(t[f] for f in present) >= target), None)
            # Short of the target: the value chosen for every query.
            entry = first or next(t for t in tried if t["value"] == value)
            vector_index.set_params(**{setting: entry["value"]})
            by_query[name] = {
                "value": entry["value"],
                "recall": min(entry[f] for f in present),
                "unseen_by_family": measured.recalls(vector_index.index, present),
            }
        vector_index.set_params(**{setting: value})
        vector_index.set_query_params(
            {name: {parameter: figures["value"]} for name, figures in by_query.items()}
        )
    unseen_by_family = measured.recalls(vector_index.index)
    served = [r for c in by_query.values() for r in c["unseen_by_family"].values()]
    if not served:
        served = list(unseen_by_family.values())
    record.update(
        value=value,
        recall=recall,
        reached=reached,
        tried=tried,
        unseen_recall=min(served) if served else None,
        unseen_by_family=unseen_by_family,
        **({"by_query": by_query} if by_query else {}),
        seconds=round(time.perf_counter() - started, 2),
    )
    return record
