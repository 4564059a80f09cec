"""FM and DeepFM score many queries at once (validation, evaluation) as they score one."""

from __future__ import annotations

import numpy as np
import pytest

from imgsearch.evaluation_protocol import temporal_split
from tests.test_rankers import N_PHOTOS, fitted, make_catalogue, query


@pytest.mark.parametrize("name", ["fm", "deepfm"])
@pytest.mark.parametrize("n_queries", [2, 40])
def test_a_batch_scores_as_one_query_at_a_time(name, n_queries):
    catalogue = make_catalogue()
    earlier = catalogue.with_conversions(temporal_split(catalogue.conversions, 0.2).earlier)
    ranker = fitted(name, earlier)
    rng = np.random.default_rng(n_queries)
    queries = [
        query(
            int(rng.integers(0, 110)),  # some users past the catalogue's: unknown
            str(rng.choice(["circle", "red", "square", "unicorn"])),
            candidates=rng.choice(N_PHOTOS + 5, size=int(rng.integers(1, 100)), replace=False),
        )
        for _ in range(n_queries)
    ]
    # 40 queries hold more candidates than the catalogue has photos: the photo side of the
    # model is then computed once for every photo instead of per candidate.
    assert (sum(len(q.candidates) for q in queries) > N_PHOTOS) == (n_queries == 40)
    batch = ranker.score_batch(queries, chunk=16)
    for one_query, batched in zip(queries, batch):
        alone = ranker.score(one_query)
        np.testing.assert_allclose(batched.scores, alone.scores, rtol=1e-5, atol=1e-6)
        assert batched.fallback_reason == alone.fallback_reason
