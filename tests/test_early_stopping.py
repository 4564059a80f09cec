"""Early stopping counts only epochs clearly worse than the best, beyond the validation noise."""

from __future__ import annotations

import numpy as np

from ranking_service.rankers.early_stopping import EarlyStopping

N_QUERIES = 150


def epoch_ndcg(mean: float, seed: int, spread: float = 0.3) -> np.ndarray:
    """Per-query NDCG of one epoch: the same queries' base values, shifted to ``mean``."""
    base = np.random.default_rng(0).uniform(0.0, 1.0, N_QUERIES)
    noise = np.random.default_rng(seed).normal(0.0, spread, N_QUERIES)
    values = base + noise
    return values - values.mean() + mean


def test_ties_with_the_best_do_not_count_towards_patience():
    stopping = EarlyStopping(patience=2)
    assert stopping.update(1, epoch_ndcg(0.40, 1))
    # Below the best by far less than the paired standard error (about 0.035 here): ties.
    for epoch in range(2, 8):
        assert not stopping.update(epoch, epoch_ndcg(0.399, epoch))
        assert not stopping.should_stop and stopping.worse == 0
    assert stopping.best_epoch == 1 and abs(stopping.best_ndcg - 0.40) < 1e-9


def test_clearly_worse_epochs_in_a_row_stop_and_a_tie_resets_the_count():
    stopping = EarlyStopping(patience=2)
    stopping.update(1, epoch_ndcg(0.40, 1, spread=0.01))
    assert not stopping.update(2, epoch_ndcg(0.30, 2, spread=0.01))
    assert stopping.worse == 1 and not stopping.should_stop
    stopping.update(3, epoch_ndcg(0.3999, 3, spread=0.01))  # a tie
    assert stopping.worse == 0
    stopping.update(4, epoch_ndcg(0.30, 4, spread=0.01))
    stopping.update(5, epoch_ndcg(0.30, 5, spread=0.01))
    assert stopping.should_stop and stopping.best_epoch == 1


def test_a_higher_mean_is_the_new_best_however_small_the_gain():
    stopping = EarlyStopping(patience=1)
    stopping.update(1, epoch_ndcg(0.40, 1))
    assert stopping.update(2, epoch_ndcg(0.4001, 2))
    assert stopping.best_epoch == 2 and stopping.worse == 0


def test_a_single_query_counts_any_drop():
    stopping = EarlyStopping(patience=1)
    stopping.update(1, np.array([0.5]))
    stopping.update(2, np.array([0.49]))
    assert stopping.should_stop
