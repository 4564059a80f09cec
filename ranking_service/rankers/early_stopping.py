"""Early stopping on per-query validation NDCG that does not stop on differences below its noise."""

from __future__ import annotations

import numpy as np

# An epoch counts towards the patience only when it is worse than the best by more than this
# many paired standard errors (about a one-sided 2.5% test): smaller differences are ties.
TIE_STANDARD_ERRORS = 2.0


class EarlyStopping:
    """The best epoch of a training run, and whether to stop, from per-query validation NDCG.

    An epoch whose mean NDCG is higher than the best so far becomes the best. An epoch counts
    towards ``patience`` only when it is clearly worse than the best: by more than
    :data:`TIE_STANDARD_ERRORS` standard errors of the per-query difference between the two
    (paired: both epochs are scored on the same queries). Smaller differences are ties, and a tie
    resets the count. On a validation set of a hundred queries the standard error is about 0.02
    NDCG; counting a tie as a worse epoch let float rounding, which differs between CPUs' BLAS
    kernels, decide after how many epochs a model stopped.

    Parameters
    ----------
    patience:
        Clearly worse epochs in a row before stopping.
    """

    def __init__(self, patience: int) -> None:
        self.patience = int(patience)
        self.best_epoch = 0
        self.best_ndcg = -1.0
        self.worse = 0
        self._best_per_query: np.ndarray | None = None

    def update(self, epoch: int, per_query_ndcg: np.ndarray) -> bool:
        """Record ``epoch``'s NDCG on each validation query; return True when it is the best."""
        per_query_ndcg = np.asarray(per_query_ndcg, dtype=np.float64)
        ndcg = float(per_query_ndcg.mean()) if len(per_query_ndcg) else 0.0
        if ndcg > self.best_ndcg:
            self.best_epoch, self.best_ndcg, self.worse = epoch, ndcg, 0
            self._best_per_query = per_query_ndcg
            return True
        difference = per_query_ndcg - self._best_per_query
        if self.best_ndcg - ndcg > TIE_STANDARD_ERRORS * _standard_error(difference):
            self.worse += 1
        else:
            self.worse = 0
        return False

    @property
    def should_stop(self) -> bool:
        """Whether ``patience`` clearly worse epochs have come in a row."""
        return self.worse >= self.patience


def _standard_error(values: np.ndarray) -> float:
    """Standard error of the mean of ``values`` (0.0 with fewer than two)."""
    if len(values) < 2:
        return 0.0
    return float(values.std(ddof=1) / np.sqrt(len(values)))
