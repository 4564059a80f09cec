"""Helpers shared by the rankers: candidate checks, tie-safe ordinal scores, config files."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

CONFIG_FILE = "config.json"
FORMAT_VERSION = 1


# Guards the eviction of the rankers' remembered results (FM and DeepFM score on threads).
_REMEMBER_LOCK = threading.Lock()


def remember(cache: dict, key, value: np.ndarray | None, limit: int) -> np.ndarray | None:
    """Put a read-only ``value`` in ``cache`` under ``key``, evicting the oldest at ``limit``."""
    if value is not None:
        value.setflags(write=False)
    with _REMEMBER_LOCK:
        if len(cache) >= limit:
            del cache[next(iter(cache))]  # the oldest entry
        cache[key] = value
    return value


class OutdatedRankerError(ValueError):
    """A saved ranker in a format this version no longer reads: retrain it."""


_INT64 = np.dtype(np.int64)


def as_candidates(candidates: np.ndarray | list[int]) -> np.ndarray:
    """Return ``candidates`` as a flat int64 array (a copy only when needed)."""
    if type(candidates) is np.ndarray and candidates.dtype is _INT64 and candidates.ndim == 1:
        return candidates  # what the server passes: no numpy call at all
    return np.asarray(candidates, dtype=np.int64).reshape(-1)


def all_true(mask: np.ndarray) -> bool:
    """Whether every item of a boolean array is true (``mask.all()`` without its Python
    wrapper: one C call, a quarter of the time on the hundred candidates of a request)."""
    return np.count_nonzero(mask) == mask.size


def known_photo_mask(candidates: np.ndarray, n_photos: int) -> np.ndarray:
    """Return which candidates are valid photo indexes of a catalogue of ``n_photos``."""
    return (candidates >= 0) & (candidates < n_photos)


def all_known(candidates: np.ndarray, n_photos: int) -> bool:
    """Whether every candidate is a valid photo index of a catalogue of ``n_photos`` (true
    for none): two C reductions instead of building :func:`known_photo_mask` and counting it."""
    return not candidates.size or (
        np.minimum.reduce(candidates) >= 0 and np.maximum.reduce(candidates) < n_photos
    )


def retrieval_order_scores(candidates: np.ndarray, retrieval_scores: np.ndarray) -> np.ndarray:
    """Return the retrieval scores as float64, or descending rank scores when they carry no order.

    Missing, mis-sized or constant retrieval scores mean "the candidates are in retrieval
    order": the first gets ``n``, the last ``1``. Non-finite scores count as the lowest.
    """
    n = len(candidates)
    scores = np.array(retrieval_scores, dtype=np.float64).reshape(-1)  # a copy of its own
    if len(scores) != n or n == 0:
        return np.arange(n, 0, -1, dtype=np.float64)
    finite = np.isfinite(scores)
    if all_true(finite):  # nearly every request: no mask to apply
        if np.maximum.reduce(scores) == np.minimum.reduce(scores):
            return np.arange(n, 0, -1, dtype=np.float64)
        return scores
    if not finite.any() or np.ptp(scores[finite]) == 0.0:
        return np.arange(n, 0, -1, dtype=np.float64)
    return np.where(finite, scores, scores[finite].min() - 1.0)


def ordinal_scores(primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """Return scores in (0, 1] that order by ``primary``, then by ``secondary``.

    Used where a ranker's own scores tie often (popularity counts): the order is exactly the
    lexicographic one, with no epsilon that could swamp small differences. Candidates equal on
    both keys (a duplicated photo) get equal scores, so a stable sort keeps their input order.
    """
    n = len(primary)
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    # lexsort: the last key is the primary one; ascending, so the best come last.
    order = np.lexsort((secondary, primary))
    first, second = primary[order], secondary[order]
    step = np.empty(n, dtype=bool)
    step[0] = True
    np.not_equal(first[1:], first[:-1], out=step[1:])
    step[1:] |= second[1:] != second[:-1]
    scores = np.empty(n, dtype=np.float64)
    scores[order] = np.cumsum(step) / n
    return scores


def finalize_scores(scores: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """Return float32 scores where invalid candidates score strictly below every valid one.

    Out-of-range photo indexes get ``min(valid scores) - 1`` (or ``-1`` when none is valid), so
    every score stays finite and an unknown photo never outranks a known one. ``valid`` None:
    every candidate is valid.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if valid is None:
        # A finite sum means every score is finite (one reduction, no mask); a sum that
        # overflows takes the general path below, which answers the same for finite scores.
        if math.isfinite(np.add.reduce(scores)):
            return scores.astype(np.float32)  # nothing to floor (nearly every call)
        valid = np.ones(len(scores), dtype=bool)
    finite = np.isfinite(scores)
    if all_true(finite) and all_true(valid):
        return scores.astype(np.float32)  # nothing to floor
    scores = scores.copy()
    scores[~finite] = np.nan
    ok = valid & ~np.isnan(scores)
    floor = (scores[ok].min() - 1.0) if ok.any() else -1.0
    scores[~ok] = floor
    return scores.astype(np.float32)


def write_config(directory: Path, name: str, config: dict[str, Any]) -> None:
    """Write ``config`` with the ranker's name and format version as ``config.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"ranker": name, "format_version": FORMAT_VERSION, **config}
    (directory / CONFIG_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True))


def read_config(directory: Path, name: str) -> dict[str, Any]:
    """Read ``config.json`` written by :func:`write_config`, checking it belongs to ``name``."""
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}: not a saved ranker")
    config = json.loads(path.read_text())
    if config.get("ranker") != name:
        raise ValueError(f"{path} holds a {config.get('ranker')!r} ranker, not {name!r}")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format version {config.get('format_version')}")
    return config


def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    """Write plain numeric arrays as an ``.npz`` (no object arrays, so no pickles)."""
    for key, value in arrays.items():
        if np.asarray(value).dtype == object:
            raise TypeError(f"array {key!r} has dtype object; refusing to pickle it")
    np.savez(path, **arrays)


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    """Read an ``.npz`` written by :func:`save_arrays` with ``allow_pickle=False``."""
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def conversion_matrix(catalogue, binary: bool = False) -> sp.csr_matrix:
    """The user × photo matrix of a catalogue's conversions: counts, or 1 where any (float32).

    Rows outside the catalogue's users or photos are dropped.
    """
    users = catalogue.conversions["user_idx"].to_numpy(dtype=np.int64)
    photos = catalogue.conversions["photo_idx"].to_numpy(dtype=np.int64)
    keep = (users >= 0) & (users < catalogue.n_users) & (photos >= 0)
    keep &= photos < catalogue.n_photos
    ones = np.ones(int(keep.sum()), dtype=np.float32)
    shape = (catalogue.n_users, catalogue.n_photos)
    counts = sp.coo_matrix((ones, (users[keep], photos[keep])), shape=shape).tocsr()
    counts.sum_duplicates()
    if binary:
        counts.data[:] = 1.0
    return counts


def sparse_arrays(name: str, matrix: sp.csr_matrix, values: bool = True) -> dict[str, np.ndarray]:
    """A CSR matrix as plain arrays for :func:`save_arrays`, keys prefixed by ``name``.

    Without ``values`` only the pattern is kept (a matrix of ones, e.g. who converted what).
    """
    arrays = {
        f"{name}_shape": np.asarray(matrix.shape, dtype=np.int64),
        f"{name}_indptr": matrix.indptr,
        f"{name}_indices": matrix.indices,
    }
    if values:
        arrays[f"{name}_data"] = matrix.data
    return arrays


def sparse_from_arrays(arrays: dict[str, np.ndarray], name: str) -> sp.csr_matrix:
    """The CSR matrix :func:`sparse_arrays` wrote (ones where it kept only the pattern)."""
    indices = arrays[f"{name}_indices"]
    data = arrays.get(f"{name}_data")
    if data is None:
        data = np.ones(len(indices), dtype=np.float32)
    return sp.csr_matrix(
        (data, indices, arrays[f"{name}_indptr"]), shape=tuple(arrays[f"{name}_shape"])
    )
