"""One request's LightGBM scores: the trees evaluated in numpy, or LightGBM's C entry point.

A booster whose trees :class:`~ranking_service.rankers.tree_scorer.TreeScorer` evaluates (and
gives the very doubles LightGBM gives on a check of rows built around every threshold) is
scored by it: no branch per node, a few numpy calls per request. Otherwise:

``Booster.predict`` checks and converts its input and builds a predictor object on every call:
for the hundred rows of one ranking request that bookkeeping costs more than the trees. The
same C function it ends in (``LGBM_BoosterPredictForMat``, LightGBM's documented C API) is
called here directly on a float64 matrix in whichever order it is laid out (rows or columns
contiguous, no copy), with ``num_threads=1``: the same trees, the same doubles. Where the
booster does not expose what that needs (another LightGBM release), ``Booster.predict`` is
used.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import weakref

import numpy as np

from ranking_service.rankers.tree_scorer import TreeScorer, UnsupportedModel

log = logging.getLogger(__name__)
# Rows of the check a TreeScorer must pass against LightGBM before it scores a booster.
CHECK_ROWS = 2048

_PARAMETERS = b"num_threads=1"
# LightGBM's C API constants (c_api.h).
_DTYPE_FLOAT64 = 1
_ROW_MAJOR = 1
_COLUMN_MAJOR = 0
_PREDICT_NORMAL = 0


@functools.cache
def _library():
    """LightGBM's loaded C library, or None when this release does not expose it."""
    try:
        from lightgbm.basic import _LIB
    except ImportError:
        return None
    return _LIB if hasattr(_LIB, "LGBM_BoosterPredictForMat") else None


# Per booster, its TreeScorer, or None where LightGBM scores it.
_SCORERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def prepare(booster) -> TreeScorer | None:
    """The booster's :class:`TreeScorer` when it evaluates the model exactly, else None
    (built and checked once per booster, then remembered)."""
    try:
        return _SCORERS[booster]
    except KeyError:
        pass
    scorer = None
    try:
        scorer = TreeScorer(booster.model_to_string())
        rows = check_rows(scorer, np.random.default_rng(0))
        expected = lightgbm_rows(booster, np.ascontiguousarray(rows.T))
        if not np.array_equal(scorer.predict(rows), expected):
            log.warning("stacked: the numpy tree scorer differs from LightGBM; using LightGBM")
            scorer = None
    except UnsupportedModel as error:
        log.info("stacked: LightGBM scores this booster (%s)", error)
        scorer = None
    except Exception:  # a model text this release writes differently: LightGBM still scores it
        log.warning("stacked: the numpy tree scorer could not read this booster", exc_info=True)
        scorer = None
    _SCORERS[booster] = scorer
    return scorer


def check_rows(scorer: TreeScorer, rng: np.random.Generator) -> np.ndarray:
    """Rows (features × rows) at, just above and just below every threshold, with NaN, 0 and
    values within 1e-35 of 0 mixed in: where a tree evaluator can go wrong."""
    n = CHECK_ROWS
    rows = rng.normal(size=(scorer.n_features, n)) * rng.choice([1e-3, 1.0, 1e3], (1, n))
    for feature, thresholds in enumerate(scorer.thresholds):
        if len(thresholds):
            at = rng.choice(thresholds, n)
            near = np.nextafter(at, rng.choice([-np.inf, np.inf], n))
            pick = rng.random(n)
            rows[feature] = np.where(pick < 0.3, at, np.where(pick < 0.5, near, rows[feature]))
    special = rng.random(rows.shape)
    rows[special < 0.08] = np.nan
    rows[(special >= 0.08) & (special < 0.12)] = 0.0
    rows[(special >= 0.12) & (special < 0.14)] = 1e-40
    return rows


def predict_rows(booster, rows: np.ndarray) -> np.ndarray:
    """The booster's raw scores of ``rows`` (n × features), as ``booster.predict`` gives them.

    Raises
    ------
    RuntimeError
        When LightGBM's C function reports an error (its message).
    """
    scorer = prepare(booster) if rows.ndim == 2 else None
    if scorer is not None and rows.shape[1] == scorer.n_features:
        data = rows.T if rows.dtype == np.float64 else rows.T.astype(np.float64)
        return scorer.predict(data)
    return lightgbm_rows(booster, rows)


def lightgbm_rows(booster, rows: np.ndarray) -> np.ndarray:
    """:func:`predict_rows` through LightGBM's C function (or ``Booster.predict``).

    Raises
    ------
    RuntimeError
        When LightGBM's C function reports an error (its message).
    """
    library = _library()
    handle = getattr(booster, "_handle", None)
    if library is None or handle is None or rows.ndim != 2:
        return booster.predict(rows, num_threads=1)
    n_rows, n_features = rows.shape
    if rows.dtype == np.float64 and rows.flags.f_contiguous and not rows.flags.c_contiguous:
        data, layout = rows.T, _COLUMN_MAJOR  # features × rows, as StackFeatures.rows fills it
    else:
        data, layout = np.ascontiguousarray(rows, dtype=np.float64), _ROW_MAJOR
    scores = np.empty(n_rows, dtype=np.float64)
    if n_rows == 0:
        return scores
    written = ctypes.c_int64(0)
    status = library.LGBM_BoosterPredictForMat(
        handle,
        data.ctypes.data_as(ctypes.c_void_p),
        ctypes.c_int(_DTYPE_FLOAT64),
        ctypes.c_int32(n_rows),
        ctypes.c_int32(n_features),
        ctypes.c_int(layout),
        ctypes.c_int(_PREDICT_NORMAL),
        ctypes.c_int(0),
        ctypes.c_int(-1),
        ctypes.c_char_p(_PARAMETERS),
        ctypes.byref(written),
        scores.ctypes.data_as(ctypes.POINTER(ctypes.c_double)),
    )
    if status != 0:
        raise RuntimeError(library.LGBM_GetLastError().decode("utf-8", "replace"))
    if written.value != n_rows:
        raise RuntimeError(f"LightGBM wrote {written.value} scores for {n_rows} rows")
    return scores
