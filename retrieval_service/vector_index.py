"""FAISS vector index by factory string, inner product on L2-normalised vectors."""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgsearch.latency import percentiles_ms

# Exact search scans every vector: ~4 ms per query at 25k x 512-d on one core (memory bound),
# so from ~50k photos an approximate index pays. The default there is an inverted file
# (IVF<lists>,SQfp16, ``nprobe`` calibrated at build): text queries sit far from every image, and
# an HNSW graph needed efSearch 1,024-2,048 to reach recall@10 0.95 on the demo's 100,000
# photos (3.3 ms a query), where IVF1024,Flat reached 0.98 at nprobe 16 in about 0.3 ms.
# Its lists hold each vector in half precision (IVF_STORAGE): a search reads half the bytes of
# float32 lists (one thread, a million demo photos, IVF4096: 0.8 ms a query against 1.3-1.5 at
# nprobe 128, 3.2 against 4.7 at 512, the same recall@10), the index is half the size, and a
# filtered search that scans every list still scores every allowed row, each within
# half-precision rounding of its exact cosine (filtered_search).
EXACT_LIMIT = 50_000
# How a default inverted file's lists hold the vectors: FAISS's half-precision scalar quantizer,
# each vector's residual to its list's centroid rounded to 11 significant bits per component,
# so a unit query's score is off the exact cosine by at most 2**-11 times the residual's norm
# (Cauchy-Schwarz; at most 2**-10, about 1e-3, for unit vectors and their centroids).
IVF_STORAGE = "SQfp16"
DEFAULT_EF_SEARCH = 128
# Candidates kept while an HNSW graph is built. FAISS's default (40) leaves graphs that text
# queries (far from every image: cosine ~0.6 at best) cannot traverse well: on 100,000 demo
# photos, recall@10 stalled at 0.84 even at efSearch 1,024; at 200 it reaches 0.95 there, for
# about 2.5x the build time (index-stats).
EF_CONSTRUCTION = 200
DEFAULT_NPROBE = 16


# Query classes that may each have a search effort of their own, calibrated at build
# (index_calibration): one-word queries, whose exact top 10 are a few of the many photos of one
# colour or scene, all about as near (the hardest for an approximate index: on 1,000,000 demo
# photos IVF4096 needed nprobe 512 for them), and queries of several words, which reach the same
# recall searching far fewer lists.
ONE_WORD = "one word"
SEVERAL_WORDS = "several words"


def query_class(query: str) -> str:
    """The search-effort class of a normalised query: :data:`ONE_WORD` or :data:`SEVERAL_WORDS`."""
    return SEVERAL_WORDS if " " in query.strip() else ONE_WORD


# Training vectors per IVF list (FAISS warns below 39) and the sample's floor.
IVF_TRAIN_PER_LIST = 40
IVF_TRAIN_SAMPLE = 100_000


def ivf_lists(n: int) -> int:
    """Inverted lists for ``n`` vectors: the power of two nearest ``4 * sqrt(n)``.

    1,024 at 100,000 vectors, 4,096 at 1,000,000, 512 at 25,000 (a quarter shard of 100,000);
    never more than ``n / 39`` (each list's centroid needs training vectors), at least 1.
    """
    n = max(1, int(n))
    lists = 2 ** int(round(math.log2(4 * math.sqrt(n))))
    return int(max(1, min(lists, n // 39)))


def ivf_factory(n: int, storage: str = IVF_STORAGE) -> str:
    """The default inverted-file factory for ``n`` vectors (``"IVF1024,SQfp16"`` at 100,000);
    ``storage`` is how its lists hold the vectors (``SQfp16``, or ``Flat``: float32)."""
    return f"IVF{ivf_lists(n)},{storage}"


def default_factory(n: int) -> str:
    """The index for ``n`` vectors: exact ``"Flat"`` below ~50k, :func:`ivf_factory` above."""
    return "Flat" if n < EXACT_LIMIT else ivf_factory(n)


def factory_choice(n: int, given: str | None = None) -> str:
    """Why an index of ``n`` vectors has its factory, in words (recorded in the manifest)."""
    if given:
        return "given (--index-factory)"
    if n < EXACT_LIMIT:
        return f"default below {EXACT_LIMIT:,} photos: exact search"
    return (
        f"default from {EXACT_LIMIT:,} photos: an inverted file of about 4·sqrt(photos) lists "
        "of half-precision vectors, its nprobe calibrated for recall@10 against exact search"
    )


def shard_factory(factory: str, n: int) -> str:
    """The factory of a shard of ``n`` vectors cut from an index built with ``factory``.

    A default inverted file (``IVF<lists>,SQfp16``, or ``IVF<lists>,Flat`` as sets built before
    half-precision lists have) gets the lists :func:`ivf_factory` gives the shard's size when
    fewer, its lists' storage kept: with the whole index's ``nprobe`` it then scans a larger
    share of its photos than the whole index does, so the merged shards lose no recall. Any
    other factory is kept.
    """
    match = re.fullmatch(r"IVF(\d+),(Flat|SQfp16)", factory)
    if match and ivf_lists(n) < int(match.group(1)):
        return ivf_factory(n, match.group(2))
    return factory


def index_lists(index: object) -> int:
    """The lists of a FAISS inverted file (inside any wrapper), 0 for an index without them."""
    import faiss

    return int(getattr(faiss.try_extract_index_ivf(index), "nlist", 0) or 0)


def set_search_threads(threads: int = 1) -> None:
    """Set FAISS's OpenMP threads.

    Serving searches one query per call; OpenMP fan-out on a single query costs more in
    synchronisation than it saves and competes with the gRPC and torch threads, so servers use
    one thread and scale with concurrent calls or processes. Builds use all cores.
    """
    import faiss

    faiss.omp_set_num_threads(max(1, int(threads)))


def _as_matrix(vectors: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)


@dataclass
class VectorIndex:
    """A FAISS index plus the map from its rows to catalogue ``photo_idx``.

    Attributes
    ----------
    index:
        The FAISS index (inner-product metric).
    row_to_photo_idx:
        ``photo_idx`` (int64) of each FAISS row, in insertion order.
    factory:
        The FAISS factory string it was built from.
    params:
        Search parameters applied (``efSearch`` for HNSW, ``nprobe`` for IVF): what a search
        of no query class, or of a class without parameters of its own, gets.
    params_by_query:
        Search parameters per query class (:func:`query_class`), where the build calibrated
        them apart (:meth:`set_query_params`).
    """

    index: object
    row_to_photo_idx: np.ndarray
    factory: str = "Flat"
    params: dict = field(default_factory=dict)
    params_by_query: dict = field(default_factory=dict)
    _search_params: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        photo_idx: np.ndarray | None = None,
        factory: str | None = None,
        ef_search: int = DEFAULT_EF_SEARCH,
        nprobe: int = DEFAULT_NPROBE,
        seed: int = 0,
        ef_construction: int = EF_CONSTRUCTION,
    ) -> VectorIndex:
        """Build an index over L2-normalised embeddings.

        Parameters
        ----------
        embeddings:
            ``(n, d)`` float32, rows L2-normalised (inner product = cosine).
        photo_idx:
            ``photo_idx`` of each row; ``arange(n)`` when omitted.
        factory:
            A FAISS factory string (``"Flat"``, ``"HNSW32"``, ``"IVF256,Flat"``...);
            :func:`default_factory` when omitted.
        ef_search, nprobe:
            Search-time parameters, applied where the index has them.
        seed:
            Seed of the training sample for indexes that train (IVF, PQ).
        ef_construction:
            Candidates kept while an HNSW graph is built (ignored by other indexes).

        Returns
        -------
        VectorIndex
        """
        import faiss

        embeddings = _as_matrix(embeddings)
        n, dim = embeddings.shape
        factory = factory or default_factory(n)
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        if isinstance(index, faiss.IndexHNSW):
            index.hnsw.efConstruction = int(ef_construction)
        if not index.is_trained:
            # FAISS trains on at most 256 vectors per centroid anyway; a seeded sample keeps
            # builds deterministic and bounded (40 per IVF list, at least 100,000).
            wanted = max(IVF_TRAIN_SAMPLE, IVF_TRAIN_PER_LIST * index_lists(index))
            sample = embeddings
            if n > wanted:
                rng = np.random.default_rng(seed)
                sample = embeddings[np.sort(rng.choice(n, wanted, replace=False))]
            index.train(sample)
        index.add(embeddings)
        rows = np.arange(n, dtype=np.int64) if photo_idx is None else np.asarray(photo_idx)
        if len(rows) != n:
            raise ValueError(f"{len(rows)} photo_idx for {n} embeddings")
        vector_index = cls(index, rows.astype(np.int64), factory)
        vector_index.set_params(ef_search=ef_search, nprobe=nprobe)
        return vector_index

    def set_params(self, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """Apply search parameters the index understands (ignored by exact indexes)."""
        import faiss

        space = faiss.ParameterSpace()
        params = {}
        if ef_search is not None and "HNSW" in self.factory:
            params["efSearch"] = int(ef_search)
        if nprobe is not None and "IVF" in self.factory:
            params["nprobe"] = int(nprobe)
        for name, value in params.items():
            space.set_index_parameter(self.index, name, value)
        self.params.update(params)

    def set_query_params(self, by_query: dict[str, dict]) -> None:
        """Search parameters per query class (``{"one word": {"nprobe": 512}, ...}``, names as
        in :attr:`params`), applied by :meth:`search` to a query of that class.

        Only an index that is itself an inverted file or an HNSW graph takes them (FAISS
        passes them to such an index's search); any other keeps :attr:`params` for every query.
        """
        import faiss

        self.params_by_query = {
            name: {key: int(value) for key, value in params.items()}
            for name, params in by_query.items()
        }
        self._search_params = {}
        for name, params in self.params_by_query.items():
            if "nprobe" in params and isinstance(self.index, faiss.IndexIVF):
                self._search_params[name] = faiss.SearchParametersIVF(nprobe=params["nprobe"])
            elif "efSearch" in params and isinstance(self.index, faiss.IndexHNSW):
                self._search_params[name] = faiss.SearchParametersHNSW(efSearch=params["efSearch"])

    def effort(self, query_class: str | None = None) -> dict:
        """The search parameters a query of ``query_class`` gets (None: :attr:`params`)."""
        if query_class is not None and query_class in self._search_params:
            return self.params_by_query[query_class]
        return self.params

    def search(
        self, queries: np.ndarray, k: int, query_class: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` photos per query, searched with the effort of ``query_class`` (None:
        :attr:`params`; see :meth:`set_query_params`).

        Returns
        -------
        scores : numpy.ndarray
            ``(n_queries, k')`` float32 inner products (cosines), descending.
        photo_idx : numpy.ndarray
            ``(n_queries, k')`` int64; ``-1`` where the index found fewer than ``k``.
            ``k' = min(k, ntotal)``.
        """
        queries = _as_matrix(queries)
        k = max(0, min(int(k), self.ntotal))
        if k == 0:
            empty = np.zeros((len(queries), 0))
            return empty.astype(np.float32), empty.astype(np.int64)
        params = self._search_params.get(query_class) if query_class is not None else None
        if params is None:
            scores, rows = self.index.search(queries, k)
        else:
            scores, rows = self.index.search(queries, k, params=params)
        photo_idx = np.where(rows >= 0, self.row_to_photo_idx[np.maximum(rows, 0)], -1)
        return scores.astype(np.float32), photo_idx.astype(np.int64)

    def save(self, path: str | Path, **extra: object) -> Path:
        """Write ``path`` (a FAISS file) and a JSON sidecar (``vector.faiss`` -> ``vector.json``).

        The sidecar holds the factory, metric, size and search parameters. The row map is
        written beside the index (``.rows.npy``) unless ``extra`` names where it lives, as
        the artifact set does (``row_map="image_embeddings.npz:photo_idx"``).

        Returns
        -------
        pathlib.Path
            The sidecar JSON file.
        """
        import faiss

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        faiss.write_index(self.index, str(tmp))
        os.replace(tmp, path)
        meta = {
            "factory": self.factory,
            "metric": "inner_product",
            "dim": self.dim,
            "ntotal": self.ntotal,
            "params": self.params,
            **({"params_by_query": self.params_by_query} if self.params_by_query else {}),
            **extra,
        }
        if "row_map" not in meta:
            np.save(path.with_suffix(".rows.npy"), self.row_to_photo_idx)
            meta["row_map"] = path.with_suffix(".rows.npy").name
        sidecar = path.with_suffix(".json")
        sidecar.write_text(json.dumps(meta, indent=2))
        return sidecar

    @classmethod
    def load(cls, path: str | Path, row_to_photo_idx: np.ndarray | None = None) -> VectorIndex:
        """Read an index written by :meth:`save`.

        Parameters
        ----------
        path:
            The FAISS file.
        row_to_photo_idx:
            The row map, when the sidecar says it lives elsewhere (e.g. the embeddings file).

        Raises
        ------
        ValueError
            When the row map's length differs from the index's size.
        """
        import faiss

        path = Path(path)
        sidecar = path.with_suffix(".json")
        meta = json.loads(sidecar.read_text()) if sidecar.exists() else {}
        index = faiss.read_index(str(path))
        if row_to_photo_idx is None:
            rows_file = path.parent / meta.get("row_map", path.with_suffix(".rows.npy").name)
            if rows_file.suffix != ".npy" or not rows_file.exists():
                raise ValueError(f"{path}: no row map given and none stored beside the index")
            row_to_photo_idx = np.load(rows_file, allow_pickle=False)
        row_to_photo_idx = np.asarray(row_to_photo_idx, dtype=np.int64)
        if len(row_to_photo_idx) != index.ntotal:
            raise ValueError(
                f"{path}: row map has {len(row_to_photo_idx)} rows, index has {index.ntotal}"
            )
        vector_index = cls(index, row_to_photo_idx, meta.get("factory", "unknown"))
        params = meta.get("params", {})
        vector_index.set_params(ef_search=params.get("efSearch"), nprobe=params.get("nprobe"))
        vector_index.set_query_params(meta.get("params_by_query", {}))
        return vector_index


def exact_index(embeddings: np.ndarray) -> object:
    """An exact ``IndexFlatIP`` over ``embeddings``: the reference for recall figures."""
    import faiss

    embeddings = _as_matrix(embeddings)
    index = faiss.IndexFlatIP(embeddings.shape[1])
    index.add(embeddings)
    return index


def recall_at_k(index: object, exact: object, queries: np.ndarray, k: int = 10) -> float:
    """Mean share of the exact top ``k`` that ``index`` also returns in its top ``k``.

    Parameters
    ----------
    index:
        The index under test (a FAISS index or a :class:`VectorIndex`; rows are compared).
    exact:
        The exact reference (``IndexFlatIP`` over the same rows, see :func:`exact_index`).
    queries:
        ``(n, d)`` query vectors.
    k:
        Cut-off.
    """
    queries = _as_matrix(queries)
    index = index.index if isinstance(index, VectorIndex) else index
    exact = exact.index if isinstance(exact, VectorIndex) else exact
    _, found = index.search(queries, k)
    _, truth = exact.search(queries, k)
    return float(np.mean(shared_rows(found, truth)) / k) if len(truth) else 0.0


def shared_rows(found: np.ndarray, truth: np.ndarray) -> list[int]:
    """Per query, how many of ``truth``'s rows ``found`` also holds (``-1`` is no row)."""
    return [len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) for f, t in zip(found, truth)]


def time_search(index: object, queries: np.ndarray, k: int = 100) -> dict:
    """Per-query latency (one query per call, as in serving): p50, p99 and mean in ms."""
    queries = _as_matrix(queries)
    index = index.index if isinstance(index, VectorIndex) else index
    times = []
    for query in queries:
        start = time.perf_counter()
        index.search(query[None, :], k)
        times.append(time.perf_counter() - start)
    return {**percentiles_ms(times, "_ms"), "queries": len(times)}
