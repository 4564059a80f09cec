"""The text-runtime gate's exact top 10: a stable full sort's answer, ties at the cut included."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval_service.quantization import top_k_rows


@pytest.mark.parametrize("n_images", [1, 9, 10, 50, 3000])
def test_top_k_rows_equals_a_stable_sort_of_every_score(n_images):
    rng = np.random.default_rng(n_images)
    # Quarters: every product and sum of eight is exact in float32, so a matrix product gives
    # the same scores whatever its blocking (BLAS kernels differ by shape and by CPU), and
    # equal rows tie exactly.
    images = (np.round(rng.standard_normal((n_images, 8)) * 4) / 4).astype(np.float32)
    images[n_images // 2 :] = np.round(images[n_images // 2 :])  # many equal scores
    if n_images > 20:
        images[5:15] = images[0]  # duplicates: ten rows tie, across the cut
    queries = (np.round(rng.standard_normal((37, 8)) * 4) / 4).astype(np.float32)
    queries[0] = 0.0  # every image scores the same
    k = min(10, n_images)
    expected = np.argsort(-(queries @ images.T), axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(top_k_rows(queries, images, k, chunk=5), expected)
