"""One request's LightGBM scores through the library's C entry point, on one thread.

``Booster.predict`` checks and converts its input and builds a predictor object on every call:
for the hundred rows of one ranking request that bookkeeping costs more than the trees. The
same C function it ends in (``LGBM_BoosterPredictForMat``, LightGBM's documented C API) is
called here directly on a C-contiguous float64 matrix, with ``num_threads=1``: the same trees,
the same doubles. Where the booster does not expose what that needs (another LightGBM
release), ``Booster.predict`` is used.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

_PARAMETERS = b"num_threads=1"
# LightGBM's C API constants (c_api.h).
_DTYPE_FLOAT64 = 1
_ROW_MAJOR = 1
_PREDICT_NORMAL = 0


@functools.cache
def _library():
    """LightGBM's loaded C library, or None when this release does not expose it."""
    try:
        from lightgbm.basic import _LIB
    except ImportError:
        return None
    return _LIB if hasattr(_LIB, "LGBM_BoosterPredictForMat") else None


def predict_rows(booster, rows: np.ndarray) -> np.ndarray:
    """The booster's raw scores of ``rows`` (n × features), as ``booster.predict`` gives them.

    Raises
    ------
    RuntimeError
        When LightGBM's C function reports an error (its message).
    """
    library = _library()
    handle = getattr(booster, "_handle", None)
    if library is None or handle is None or rows.ndim != 2:
        return booster.predict(rows, num_threads=1)
    data = np.ascontiguousarray(rows, dtype=np.float64)
    scores = np.empty(len(data), dtype=np.float64)
    if len(data) == 0:
        return scores
    written = ctypes.c_int64(0)
    status = library.LGBM_BoosterPredictForMat(
        handle,
        data.ctypes.data_as(ctypes.c_void_p),
        ctypes.c_int(_DTYPE_FLOAT64),
        ctypes.c_int32(data.shape[0]),
        ctypes.c_int32(data.shape[1]),
        ctypes.c_int(_ROW_MAJOR),
        ctypes.c_int(_PREDICT_NORMAL),
        ctypes.c_int(0),
        ctypes.c_int(-1),
        ctypes.c_char_p(_PARAMETERS),
        ctypes.byref(written),
        scores.ctypes.data_as(ctypes.POINTER(ctypes.c_double)),
    )
    if status != 0:
        raise RuntimeError(library.LGBM_GetLastError().decode("utf-8", "replace"))
    if written.value != len(data):
        raise RuntimeError(f"LightGBM wrote {written.value} scores for {len(data)} rows")
    return scores
