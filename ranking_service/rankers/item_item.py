"""Item-item rankers: ``ease`` (Steck 2019) and ``item_knn`` (cosine with shrinkage).

Both learn a sparse photo × photo weight matrix ``S`` from the binary user × photo conversion
matrix ``X`` and score a candidate ``j`` for a user by ``Σ_{i ∈ history} S[i, j]``, where the
history is the user's training photos plus the request's ``recent_photos`` (so a user the
model has never seen is personalised from them). Scores are blended with the query's
popularity prior (:mod:`~ranking_service.rankers.prior`); a user with no known photo gets
popularity order.

``S`` keeps each row's ``neighbours`` largest weights (by magnitude), which bounds the artifact
(photos × neighbours) and the cost of a request (history × neighbours).

* **EASE** solves ``min ‖X − XB‖² + λ‖B‖²`` with ``diag(B) = 0`` in closed form:
  ``P = (XᵀX + λI)⁻¹``, ``B = I − P · diag(1 / diag(P))``. The Gram matrix is dense, so EASE is
  fitted on the ``max_items`` most converted photos only (25,000 photos would need a 2.5 GB
  float32 matrix and an inversion of minutes; the photos left out are rarely converted, have
  no weights and rank by the prior alone). The inversion is a Cholesky factorisation in float32.
* **item-kNN** weighs ``S[i, j] = c_ij / (√(n_i n_j) + shrink)``, with ``c_ij`` the users who
  converted both photos and ``n_i`` those who converted ``i``: cosine similarity, shrunk
  towards 0 for photos with few conversions. Computed block by block over the photos, on the
  pairs that share a user only: a block costs its co-conversions, not block × all photos (a
  dense block made the fit quadratic in the photos).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from scipy.linalg import lapack

from imgsearch.candidates import CandidateLists
from imgsearch.catalogue import Catalogue
from imgsearch.image_embeddings import ImageEmbeddings
from ranking_service.rankers.base import Ranker, RankQuery, RankScores
from ranking_service.rankers.common import (
    as_candidates,
    conversion_matrix,
    finalize_scores,
    known_photo_mask,
    load_arrays,
    read_config,
    save_arrays,
    sparse_arrays,
    sparse_from_arrays,
    write_config,
)
from ranking_service.rankers.prior import QueryPrior

BLOCK_ROWS = 1024


def top_weights_per_row(block: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep the ``k`` largest-magnitude non-zero entries of each row of a dense block.

    Returns
    -------
    tuple of numpy.ndarray
        ``(row_lengths, columns, values)``: CSR pieces, columns sorted within each row.
    """
    rows, width = block.shape
    k = min(k, width)
    if k <= 0 or rows == 0:
        return np.zeros(rows, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    magnitude = np.abs(block)
    top = np.argpartition(-magnitude, k - 1, axis=1)[:, :k] if k < width else None
    if top is None:
        top = np.broadcast_to(np.arange(width), (rows, width))
    top = np.sort(top, axis=1)
    values = np.take_along_axis(block, top, axis=1)
    keep = values != 0
    return keep.sum(axis=1).astype(np.int64), top[keep].astype(np.int64), values[keep]


def top_weights_of_sparse_rows(
    matrix: sp.csr_matrix, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep the ``k`` largest-magnitude non-zero entries of each row of a sparse block.

    What :func:`top_weights_per_row` keeps of the same block made dense, without the zeros:
    a row of ``k`` entries or fewer keeps them all; of a longer row, equal magnitudes at the
    cut keep the smaller columns (the dense selection keeps any of them).

    Returns
    -------
    tuple of numpy.ndarray
        ``(row_lengths, columns, values)``: CSR pieces, columns sorted within each row.
    """
    matrix = sp.csr_matrix(matrix)
    matrix.sum_duplicates()  # also sorts each row's columns
    n_rows = matrix.shape[0]
    rows = np.repeat(np.arange(n_rows), np.diff(matrix.indptr))
    columns, values = matrix.indices.astype(np.int64), matrix.data
    nonzero = values != 0
    rows, columns, values = rows[nonzero], columns[nonzero], values[nonzero]
    lengths = np.bincount(rows, minlength=n_rows)
    keep = np.ones(len(rows), bool)
    long_rows = lengths > max(k, 0)
    if long_rows.any():
        # Only the entries of rows longer than k are ranked: by row, then magnitude; lexsort is
        # stable, so equal magnitudes keep their order in the row, the smaller column first.
        crowded = np.flatnonzero(long_rows[rows])
        order = crowded[np.lexsort((-np.abs(values[crowded]), rows[crowded]))]
        ranked = np.bincount(rows[crowded], minlength=n_rows)
        first = np.cumsum(ranked) - ranked  # where each row's entries start in ``order``
        keep[order[np.arange(len(order)) - first[rows[order]] >= k]] = False
    rows, columns, values = rows[keep], columns[keep], values[keep]
    return np.bincount(rows, minlength=n_rows).astype(np.int64), columns, values


class ItemItemRanker(QueryPrior, Ranker):
    """Shared fitting, scoring and saving of the item-item rankers (module docstring).

    Subclasses implement :meth:`item_weights`.

    Parameters
    ----------
    neighbours:
        Weights kept per photo (row of ``S``).
    popularity:
        Parameters of the :class:`PopularityRanker` used as the fallback and query prior.
    popularity_weight:
        Weight of the query's popularity prior next to the history's score.
    """

    def __init__(
        self,
        neighbours: int = 200,
        popularity: dict | None = None,
        popularity_weight: float = 1.0,
    ) -> None:
        self.neighbours = int(neighbours)
        self.init_prior(popularity, popularity_weight)
        self.user_history = sp.csr_matrix((0, 0), dtype=np.float32)
        self.weights = sp.csr_matrix((0, 0), dtype=np.float32)
        self.fit_figures: dict = {}

    @property
    def params(self) -> dict:
        """The constructor parameters."""
        return {"neighbours": self.neighbours, **self.prior_params()}

    @property
    def n_photos(self) -> int:
        """Photos of the catalogue the model was fitted on."""
        return self.weights.shape[0]

    def item_weights(self, conversions: sp.csr_matrix) -> sp.csr_matrix:
        """Return ``S`` (photos × photos, float32) from the binary user × photo matrix."""
        raise NotImplementedError

    def fit(
        self,
        catalogue: Catalogue,
        show_progress: bool = True,
        candidates: CandidateLists | None = None,
        embeddings: ImageEmbeddings | None = None,
    ) -> ItemItemRanker:
        """Fit ``S`` on the training conversions (candidates and embeddings are not used)."""
        start = time.perf_counter()
        self.user_history = conversion_matrix(catalogue, binary=True)
        self.weights = self.item_weights(self.user_history)
        self.fit_figures["weights_seconds"] = round(time.perf_counter() - start, 2)
        self.fit_figures["weights_nnz"] = int(self.weights.nnz)
        self.fit_prior(catalogue)
        return self

    def user_photos(self, user_idx: int | None, recent_photos: np.ndarray) -> np.ndarray:
        """The user's training photos and the request's recent ones (distinct, known only)."""
        recent = as_candidates(recent_photos)
        photos = [recent[known_photo_mask(recent, self.n_photos)]]
        if user_idx is not None and 0 <= user_idx < self.user_history.shape[0]:
            lo, hi = self.user_history.indptr[user_idx], self.user_history.indptr[user_idx + 1]
            photos.append(self.user_history.indices[lo:hi].astype(np.int64))
        return np.unique(np.concatenate(photos))

    def history_scores(self, photos: np.ndarray) -> np.ndarray:
        """``Σ_{i ∈ photos} S[i, :]`` as a dense vector over all photos."""
        indptr = self.weights.indptr
        starts, ends = indptr[photos], indptr[photos + 1]
        lengths = ends - starts
        if lengths.sum() == 0:
            return np.zeros(self.n_photos, dtype=np.float64)
        positions = np.repeat(ends - lengths.cumsum(), lengths) + np.arange(lengths.sum())
        return np.bincount(
            self.weights.indices[positions],
            weights=self.weights.data[positions],
            minlength=self.n_photos,
        )

    def score(self, query: RankQuery) -> RankScores:
        """Score ``query.candidates`` by the user's history, blended with the query's prior.

        A live photo beyond the built catalogue is cold: no photo has a weight towards it, so
        its history score is 0, as for a catalogue photo no one converted.
        """
        candidates = as_candidates(query.candidates)
        valid = known_photo_mask(candidates, self.n_photos)
        photos = self.user_photos(query.user_idx, query.recent_photos)
        if len(photos) == 0:
            return self.popularity_fallback(query)
        scores = self.history_scores(photos)[np.where(valid, candidates, 0)]
        scored = valid | query.cold(valid)
        scores = np.where(valid, scores, 0.0)
        scores = self.blend_prior(scores, candidates, query.keyword, scored)
        return RankScores(finalize_scores(scores, scored))

    def save(self, directory: Path) -> None:
        """Write ``config.json``, ``weights.npz`` (``S`` and the users' photos) and the prior."""
        directory = Path(directory)
        write_config(directory, self.name, {"params": self.params, "fit": self.fit_figures})
        save_arrays(
            directory / "weights.npz",
            **sparse_arrays("weights", self.weights),
            **sparse_arrays("history", self.user_history, values=False),
        )
        self.save_prior(directory)

    @classmethod
    def load(cls, directory: Path, catalogue: Catalogue) -> ItemItemRanker:
        """Read a ranker written by :meth:`save`."""
        directory = Path(directory)
        config = read_config(directory, cls.name)
        ranker = cls(**config["params"])
        ranker.fit_figures = dict(config.get("fit", {}))
        arrays = load_arrays(directory / "weights.npz")
        ranker.weights = sparse_from_arrays(arrays, "weights")
        ranker.user_history = sparse_from_arrays(arrays, "history")
        ranker.load_prior(directory, catalogue)
        return ranker


class EASERanker(ItemItemRanker):
    """EASE (Steck 2019): closed-form item-item regression (module docstring).

    Parameters
    ----------
    l2:
        The L2 weight λ added to the Gram matrix's diagonal.
    max_items:
        The most converted photos the model is fitted on (the Gram matrix is their square).
    **params:
        :class:`ItemItemRanker`'s parameters.
    """

    name = "ease"

    def __init__(self, l2: float = 100.0, max_items: int = 5000, **params) -> None:
        super().__init__(**params)
        self.l2 = float(l2)
        self.max_items = int(max_items)

    @property
    def params(self) -> dict:
        """The constructor parameters."""
        return {**super().params, "l2": self.l2, "max_items": self.max_items}

    def item_weights(self, conversions: sp.csr_matrix) -> sp.csr_matrix:
        """``B`` of the ``max_items`` most converted photos, top ``neighbours`` per row."""
        n_photos = conversions.shape[1]
        counts = np.asarray(conversions.sum(axis=0)).ravel()
        converted = np.flatnonzero(counts > 0)
        order = np.argsort(-counts[converted], kind="stable")[: self.max_items]
        items = np.sort(converted[order])
        self.fit_figures["items"] = len(items)  # of the converted photos, beside it:
        self.fit_figures["converted_photos"] = len(converted)
        if len(items) == 0:
            return sp.csr_matrix((n_photos, n_photos), dtype=np.float32)
        subset = conversions[:, items]
        gram = (subset.T @ subset).toarray().astype(np.float32)
        gram[np.diag_indices_from(gram)] += self.l2
        factor, info = lapack.spotrf(gram, lower=False, overwrite_a=True)
        if info != 0:
            raise np.linalg.LinAlgError(f"EASE: Gram matrix not positive definite ({info})")
        inverse, info = lapack.spotri(factor, lower=False, overwrite_c=True)
        if info != 0:
            raise np.linalg.LinAlgError(f"EASE: inversion failed ({info})")
        # spotri fills the upper triangle only.
        inverse = np.triu(inverse) + np.triu(inverse, 1).T
        diagonal = np.diag(inverse).copy()
        weights = inverse / -diagonal[None, :]
        np.fill_diagonal(weights, 0.0)
        return _rows_to_matrix(weights, items, self.neighbours, n_photos)


class ItemKNNRanker(ItemItemRanker):
    """Item-kNN: cosine similarity of the photos' converting users, with shrinkage.

    Parameters
    ----------
    shrink:
        Added to the cosine's denominator: pairs of rarely converted photos weigh less.
    **params:
        :class:`ItemItemRanker`'s parameters.
    """

    name = "item_knn"

    def __init__(self, shrink: float = 10.0, **params) -> None:
        super().__init__(**params)
        self.shrink = float(shrink)

    @property
    def params(self) -> dict:
        """The constructor parameters."""
        return {**super().params, "shrink": self.shrink}

    def item_weights(self, conversions: sp.csr_matrix) -> sp.csr_matrix:
        """Shrunk cosine similarities, top ``neighbours`` per photo, computed block by block."""
        n_photos = conversions.shape[1]
        by_photo = conversions.T.tocsr()
        norms = np.sqrt(np.asarray(conversions.sum(axis=0)).ravel()).astype(np.float32)
        lengths, columns, values = [], [], []
        for start in range(0, n_photos, BLOCK_ROWS):
            rows = slice(start, min(start + BLOCK_ROWS, n_photos))
            together = sp.csr_matrix(by_photo[rows] @ conversions)
            together.sum_duplicates()
            row = np.repeat(np.arange(rows.stop - rows.start), np.diff(together.indptr))
            column = together.indices
            # The same float32 operations, pair by pair, as over the dense block before.
            together.data = (
                together.data / (norms[row + start] * norms[column] + self.shrink)
            ).astype(np.float32)
            together.data[column == row + start] = 0.0  # a photo is not its own neighbour
            row_lengths, row_columns, row_values = top_weights_of_sparse_rows(
                together, self.neighbours
            )
            lengths.append(row_lengths)
            columns.append(row_columns)
            values.append(row_values)
        indptr = np.r_[0, np.cumsum(np.concatenate(lengths))] if lengths else np.zeros(1)
        return sp.csr_matrix(
            (np.concatenate(values), np.concatenate(columns), indptr.astype(np.int64)),
            shape=(n_photos, n_photos),
        )


def _rows_to_matrix(
    weights: np.ndarray, items: np.ndarray, neighbours: int, n_photos: int
) -> sp.csr_matrix:
    """Turn dense weights between ``items`` into a photos × photos CSR, top per row kept."""
    row_lengths, columns, values = top_weights_per_row(weights, neighbours)
    lengths = np.zeros(n_photos, dtype=np.int64)
    lengths[items] = row_lengths
    indptr = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    return sp.csr_matrix((values, items[columns], indptr), shape=(n_photos, n_photos))
