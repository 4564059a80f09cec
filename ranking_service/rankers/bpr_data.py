"""BPR training data for FM and DeepFM: conversion tensors built once, negatives drawn in bulk."""

from __future__ import annotations

import numpy as np
import torch

from imgsearch.candidates import CandidateLists
from imgsearch.catalogue import Catalogue
from ranking_service.rankers.features import FieldEncoder

NEGATIVE_SAMPLING = ("uniform", "popularity")
# word2vec's exponent: popular photos are drawn more often as negatives, but sub-linearly.
POPULARITY_SAMPLING_EXPONENT = 0.75


class BPRTrainingData:
    """Integer tensors of one training set, built once (no per-row pandas access)."""

    def __init__(
        self,
        encoder: FieldEncoder,
        catalogue: Catalogue,
        candidates: CandidateLists,
        pool: int,
        negative_sampling: str = "uniform",
    ) -> None:
        context, photo_rows = encoder.encode_conversions(catalogue.conversions)
        keep = photo_rows > 0
        self.context = torch.from_numpy(np.ascontiguousarray(context[keep]))
        self.photo_rows = torch.from_numpy(photo_rows[keep])
        self.keyword_local = context[keep, 1] - encoder.offsets[1]
        self.n_photos = encoder.n_photos
        # Row 0 (the unknown keyword) has no pool: its negatives are drawn uniformly.
        start, length, photos = candidates.pools(["", *encoder.keyword_names], pool)
        self.pool_start, self.pool_length = start, length
        self.pool_rows = encoder.photo_rows(photos)
        # Cumulative distribution of the popularity-weighted negatives (None: uniform).
        self.negative_cdf = None
        if negative_sampling == "popularity" and self.n_photos > 0:
            counts = np.bincount(photo_rows[keep] - 1, minlength=self.n_photos)
            weights = (counts + 1.0) ** POPULARITY_SAMPLING_EXPONENT
            self.negative_cdf = np.cumsum(weights) / weights.sum()

    def __len__(self) -> int:
        return len(self.photo_rows)

    def sample_negatives(
        self,
        order: np.ndarray,
        rng: np.random.Generator,
        keyword_negatives: int,
        uniform_negatives: int,
    ) -> np.ndarray:
        """Return ``(n, negatives)`` photo rows: keyword-candidate ones, then uniform ones."""
        n = len(order)
        keyword = self.keyword_local[order]
        start, length = self.pool_start[keyword], self.pool_length[keyword]
        columns = []
        for _ in range(keyword_negatives):
            uniform = rng.integers(1, self.n_photos + 1, n)
            if len(self.pool_rows) == 0:
                columns.append(uniform)
                continue
            pick = np.minimum(
                start + (rng.random(n) * length).astype(np.int64), len(self.pool_rows) - 1
            )
            columns.append(np.where(length > 0, self.pool_rows[pick], uniform))
        for _ in range(uniform_negatives):
            if self.negative_cdf is None:
                columns.append(rng.integers(1, self.n_photos + 1, n))
            else:
                drawn = np.searchsorted(self.negative_cdf, rng.random(n), side="right")
                columns.append(np.minimum(drawn, self.n_photos - 1) + 1)
        return np.stack(columns, axis=1).astype(np.int64)
