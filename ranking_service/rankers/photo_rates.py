"""What a photo's own statistics predict of its conversions: a Poisson regression on its stats.

Counting conversions is a noisy estimate of how popular a photo is: a photo converted twice
and one converted never may be equally liked, and every new photo starts at zero. The photos
table carries evidence gathered outside the training window, its views and downloads (Unsplash
Lite's ``stats_views`` and ``stats_downloads``). :func:`stats_rates` fits training conversions
per photo as ``Poisson(exp(β · x))`` on ``x = (1, log(1 + views), log(1 + downloads), no
stats)`` (standardised; ridge-damped Newton steps) and returns each photo's predicted rate: the
prior mean of a Gamma-Poisson model, which
:class:`~ranking_service.rankers.popularity.PopularityRanker` combines with the counts. A
catalogue without stats (all zeros) gets the same rate for every photo, so the counts alone
decide. Milliseconds for 25,000 photos.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

NEWTON_STEPS = 25
RIDGE = 1e-3
STAT_COLUMNS = ("stats_views", "stats_downloads")


def photo_features(photos: pd.DataFrame) -> np.ndarray:
    """``(n_photos, 4)`` design: intercept, standardised log views and downloads, no stats."""
    logs = []
    for name in STAT_COLUMNS:
        values = (
            photos[name].to_numpy(dtype=np.float64) if name in photos else np.zeros(len(photos))
        )
        logs.append(np.log1p(np.clip(values, 0.0, None)))
    no_stats = ((logs[0] == 0) & (logs[1] == 0)).astype(np.float64)
    design = [np.ones(len(photos))]
    for column in (*logs, no_stats):
        spread = column.std()
        design.append((column - column.mean()) / spread if spread > 0 else np.zeros_like(column))
    return np.stack(design, axis=1)


def poisson_regression(features: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Coefficients of ``counts ~ Poisson(exp(features @ beta))`` (damped Newton, light ridge)."""
    counts = np.asarray(counts, dtype=np.float64)
    beta = np.zeros(features.shape[1])
    beta[0] = np.log(max(counts.mean(), 1e-9))
    penalty = RIDGE * np.eye(features.shape[1])
    penalty[0, 0] = 0.0
    for _ in range(NEWTON_STEPS):
        rate = np.exp(np.clip(features @ beta, -30.0, 30.0))
        gradient = features.T @ (counts - rate) - penalty @ beta
        hessian = (features * rate[:, None]).T @ features + penalty
        step = np.linalg.solve(hessian + 1e-9 * np.eye(len(beta)), gradient)
        beta += np.clip(step, -2.0, 2.0)
        if np.abs(step).max() < 1e-8:
            break
    return beta


def stats_rates(photos: pd.DataFrame, counts: np.ndarray) -> np.ndarray:
    """Each photo's conversion rate predicted from its stats (float64, sums to ``counts``'s sum).

    Parameters
    ----------
    photos:
        The catalogue's photos table, one row per photo index.
    counts:
        Training conversions per photo index.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if len(counts) == 0 or counts.sum() <= 0:
        return np.zeros(len(counts))
    features = photo_features(photos)
    rates = np.exp(np.clip(features @ poisson_regression(features, counts), -30.0, 30.0))
    return rates * counts.sum() / rates.sum()
