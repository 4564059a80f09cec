"""A catalogue's image embeddings as an artifact set stores them (``image_embeddings.npz``).

The retrieval service searches them; the ranking service scores users' tastes with them. The
file holds ``photo_idx`` (int64) and ``embeddings`` (float32, L2-normalised rows), one row per
photo that has an image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ImageEmbeddings:
    """One embedding per photo with an image.

    Attributes
    ----------
    photo_idx:
        The photos' catalogue indexes (int64), one per row.
    vectors:
        ``(len(photo_idx), dim)`` float32 embeddings.
    """

    photo_idx: np.ndarray
    vectors: np.ndarray

    @classmethod
    def load(cls, path: str | Path) -> ImageEmbeddings:
        """Read an embeddings file (``allow_pickle=False``)."""
        with np.load(path, allow_pickle=False) as data:
            return cls(data["photo_idx"].astype(np.int64), data["embeddings"].astype(np.float32))

    @property
    def dim(self) -> int:
        """Dimensions of an embedding."""
        return int(self.vectors.shape[1]) if self.vectors.ndim == 2 else 0

    def dense(self, n_photos: int) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings indexed by photo: ``(matrix (n_photos, dim), has_embedding mask)``.

        Photos without an embedding (no image, or an index outside ``n_photos``) get a zero row.
        """
        matrix = np.zeros((n_photos, self.dim), dtype=np.float32)
        keep = (self.photo_idx >= 0) & (self.photo_idx < n_photos)
        matrix[self.photo_idx[keep]] = self.vectors[keep]
        has = np.zeros(n_photos, dtype=bool)
        has[self.photo_idx[keep]] = True
        return matrix, has
