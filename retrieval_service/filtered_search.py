"""Vector search restricted to the photos a filter allows, inside FAISS.

The allowed rows travel to FAISS as an ``IDSelectorBitmap`` in the search parameters, so the
index only ever returns allowed photos. How it searches depends on how many rows are allowed:

* few (at most :data:`EXACT_ROWS`, or :data:`EXACT_SHARE` of the index): exact search over the
  allowed rows, on the index's flat storage (an HNSW graph keeps its vectors in one);
* more, on an HNSW graph: the graph search with ``efSearch`` raised as the allowed share drops
  (a graph search collects about ``efSearch`` nearby rows, of which only the allowed count), up
  to :data:`MAX_EF_SEARCH`; when it still finds fewer than ``min(k, allowed)`` rows, the exact
  search answers instead;
* more, on an inverted file (IVF): the lists search with ``nprobe`` raised as the allowed
  share drops, up to every list; the search over every allowed row is the same search over
  every list (``nprobe = nlist``: scanning every list scores every allowed row, exactly in an
  ``IVF...,Flat`` index, within half-precision rounding of the exact cosine in the default
  ``IVF...,SQfp16``, see ``vector_index.IVF_STORAGE``). It answers when few rows are allowed,
  and when the raised ``nprobe`` still finds fewer than ``min(k, allowed)``;
* an exact index (``Flat``) is searched with the selector directly.

So ``min(k, allowed)`` photos come back, unless the index keeps neither flat storage nor
inverted lists (a bare PQ...), where the approximate search with the selector is the answer;
on an inverted file of coarser codes (IVF-PQ) the scan of every list is as approximate as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Allowed rows up to which the exact search over them is used. On 100,000 demo photos (HNSW32,
# efSearch 2,048 calibrated at build) bench-filters measured, in CPU per search: at 50% allowed
# the graph 8-10 ms against 12-13 ms exact, at 30% both 9-11 ms, at 10% exact 5-6 ms; below
# a fifth of the index, scanning the allowed rows costs no more and finds the exact answer.
EXACT_ROWS = 2_000
EXACT_SHARE = 0.2
# efSearch of a filtered graph search: the index's own (calibrated at build, see
# index_calibration) over the allowed share, capped here, but never below the index's own (a
# large catalogue's calibration may need more than this cap).
MAX_EF_SEARCH = 2_048


@dataclass
class FilteredSearch:
    """How one filtered search ran: the path taken and the efSearch used (graph search)."""

    path: str
    allowed: int
    ef_search: int = 0
    nprobe: int = 0


def _flat_storage(index):
    """The index itself when it is flat, an HNSW graph's flat storage, else None."""
    import faiss

    if isinstance(index, faiss.IndexFlat):
        return index
    storage = getattr(index, "storage", None)
    if storage is None:
        return None
    storage = faiss.downcast_index(storage)
    return storage if isinstance(storage, faiss.IndexFlat) else None


def search_allowed(
    vector_index, query: np.ndarray, k: int, allowed: np.ndarray, query_class: str | None = None
) -> tuple[np.ndarray, np.ndarray, FilteredSearch]:
    """The top ``k`` allowed photos for one query.

    Parameters
    ----------
    vector_index:
        A :class:`~retrieval_service.vector_index.VectorIndex`.
    query:
        ``(d,)`` or ``(1, d)`` float32.
    k:
        How many photos.
    allowed:
        Bool per catalogue ``photo_idx`` (the whole catalogue's, also on a shard).
    query_class:
        The query's search-effort class: its efSearch or nprobe is the one raised
        (:meth:`~retrieval_service.vector_index.VectorIndex.effort`).

    Returns
    -------
    scores, photo_idx : numpy.ndarray
        ``(m,)`` with ``m <= min(k, allowed rows)``, best first.
    how : FilteredSearch
        The path taken.
    """
    import faiss

    index = vector_index.index
    query = np.ascontiguousarray(np.atleast_2d(query), dtype=np.float32)
    rows_allowed = np.asarray(allowed, bool)[vector_index.row_to_photo_idx]
    n_allowed = int(np.count_nonzero(rows_allowed))
    k = min(int(k), n_allowed)
    if k <= 0:
        empty = np.zeros(0)
        return empty.astype(np.float32), empty.astype(np.int64), FilteredSearch("empty", 0)
    bitmap = np.packbits(rows_allowed, bitorder="little")
    selector = faiss.IDSelectorBitmap(len(rows_allowed), faiss.swig_ptr(bitmap))
    flat = _flat_storage(index)
    graph = "HNSW" in vector_index.factory and isinstance(index, faiss.IndexHNSW)
    few = n_allowed <= max(EXACT_ROWS, EXACT_SHARE * len(rows_allowed))
    how = FilteredSearch("exact", n_allowed)
    rows = None
    if graph and not (few and flat is not None):
        base_ef = int(vector_index.effort(query_class).get("efSearch", index.hnsw.efSearch))
        share = n_allowed / len(rows_allowed)
        ef = min(max(MAX_EF_SEARCH, base_ef), max(base_ef, k, math.ceil(base_ef / share)))
        params = faiss.SearchParametersHNSW(sel=selector, efSearch=ef)
        scores, rows = index.search(query, k, params=params)
        how = FilteredSearch("graph", n_allowed, ef)
        if flat is not None and np.count_nonzero(rows[0] >= 0) < k:
            rows = None  # too few found: the exact search below answers
            how = FilteredSearch("graph, then exact", n_allowed, ef)
    ivf = faiss.try_extract_index_ivf(index) if flat is None and not graph else None
    if ivf is not None:
        base = int(vector_index.effort(query_class).get("nprobe", ivf.nprobe))
        scores, rows, how = _search_ivf(vector_index, ivf, query, k, selector, n_allowed, few, base)
    if rows is None:
        searched = flat if flat is not None else index
        scores, rows = searched.search(query, k, params=faiss.SearchParameters(sel=selector))
    del bitmap  # the selector points into it: kept alive until here
    found = rows[0] >= 0
    photo_idx = vector_index.row_to_photo_idx[rows[0][found]]
    return scores[0][found].astype(np.float32), photo_idx.astype(np.int64), how


def _search_ivf(vector_index, ivf, query, k, selector, n_allowed: int, few: bool, base: int):
    """An inverted file searched with the selector: ``nprobe`` (``base`` unfiltered) raised by
    the allowed share, or every list (the exact scan of the allowed rows) when few are allowed
    or too few were found.
    """
    import faiss

    nlist = int(ivf.nlist)
    if not few:
        share = n_allowed / vector_index.ntotal
        nprobe = min(nlist, max(base, math.ceil(base / share)))
        params = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
        scores, rows = vector_index.index.search(query, k, params=params)
        if nprobe >= nlist:
            return scores, rows, FilteredSearch("lists, every one", n_allowed, nprobe=nprobe)
        if np.count_nonzero(rows[0] >= 0) >= k:
            return scores, rows, FilteredSearch("lists", n_allowed, nprobe=nprobe)
        path = "lists, then every list"
    else:
        path = "exact, every list"
    params = faiss.SearchParametersIVF(sel=selector, nprobe=nlist)
    scores, rows = vector_index.index.search(query, k, params=params)
    return scores, rows, FilteredSearch(path, n_allowed, nprobe=nlist)
