"""Rankers score photos written through the live catalogue after the set was built: cold, from
their record and embedding, not last; and a ranking server reads them from the log."""

from __future__ import annotations

import time
import uuid

import grpc
import numpy as np
import pytest

from imgsearch.catalog_log import DELETE, UPSERT, CatalogLog, PhotoChange
from imgsearch.conversion_store import open_store
from imgsearch.evaluation_protocol import temporal_split
from imgsearch.ranking.v1 import ranking_service_pb2 as pb
from imgsearch.ranking.v1 import ranking_service_pb2_grpc as pb_grpc
from ranking_service.rankers import RANKER_NAMES
from ranking_service.rankers.base import LiveCandidates, RankQuery
from tests.test_rankers import (
    COLOURS,
    EMBEDDINGS,
    N_PHOTOS,
    SHAPES,
    fitted,
    make_catalogue,
    photo_colour,
)

# Scored as the model's unknown photo (its reserved ids), not as any one catalogue photo.
UNKNOWN_PHOTO_ROW = {"fm", "deepfm"}


@pytest.fixture(scope="module")
def split():
    catalogue = make_catalogue()
    parts = temporal_split(catalogue.conversions, 0.2)
    return catalogue, catalogue.with_conversions(parts.earlier)


def live_copies(catalogue, copies: list[int], n_known: int) -> LiveCandidates:
    """Candidates ``n_known ...``: live photos with the record and image of ``copies``."""
    dense, has = EMBEDDINGS.dense(N_PHOTOS)
    n = n_known + len(copies)
    live = LiveCandidates(
        mask=np.arange(n) >= n_known,
        embeddings=np.zeros((n, dense.shape[1]), np.float32),
        has_embedding=np.zeros(n, bool),
        views=np.zeros(n),
        downloads=np.zeros(n),
        keywords=[{} for _ in range(n)],
    )
    keywords = catalogue.keywords
    for j, photo in enumerate(copies):
        i = n_known + j
        live.embeddings[i], live.has_embedding[i] = dense[photo], has[photo]
        live.views[i] = catalogue.photos["stats_views"].iloc[photo]
        live.downloads[i] = catalogue.photos["stats_downloads"].iloc[photo]
        own = keywords[keywords["photo_idx"] == photo]
        live.keywords[i] = dict(zip(own["keyword"], own["confidence"].astype(float)))
    return live


@pytest.mark.parametrize("name", RANKER_NAMES)
def test_a_live_photo_scores_as_a_catalogue_photo_no_one_converted(name, split):
    """A photo beyond the built catalogue is cold: no conversions, no learned row. Written with
    the record and image of a set photo no one converted, it gets that photo's score (FM and
    DeepFM: their unknown photo's, the same for every cold photo), never the floor below every
    known photo that unknown ids get."""
    catalogue, train = split
    converted = set(train.conversions["photo_idx"].tolist())
    circles = np.arange(0, N_PHOTOS, len(SHAPES))
    fresh = [int(p) for p in circles if p not in converted and p >= 10][:3]
    assert len(fresh) == 3
    retrieval = np.linspace(1.0, 0.5, len(circles)).astype(np.float32)
    copies_retrieval = [retrieval[list(circles).index(p)] for p in fresh]
    candidates = np.r_[circles, N_PHOTOS + np.arange(len(fresh))]
    query = RankQuery(
        3,
        "circle",
        candidates,
        np.r_[retrieval, copies_retrieval].astype(np.float32),
        live=live_copies(catalogue, fresh, len(circles)),
    )
    ranker = fitted(name, train)
    scores = ranker.score(query).scores
    known, live = scores[: len(circles)], scores[len(circles) :]
    assert np.isfinite(scores).all()
    assert live.min() > known.min() - 1.0  # not the floor of an unknown id
    if name in UNKNOWN_PHOTO_ROW:
        assert np.ptp(live) == 0.0
    else:
        originals = [known[list(circles).index(p)] for p in fresh]
        np.testing.assert_allclose(live, originals, rtol=1e-5, atol=1e-5)
    # The same ids without the live catalogue's description: unknown, ranked below all.
    bare = ranker.score(RankQuery(3, "circle", candidates, query.retrieval_scores)).scores
    assert bare[len(circles) :].max() < bare[: len(circles)].min()


def test_a_live_photo_matching_the_users_taste_ranks_by_its_score(split):
    """clip_profile scores live photos from the embedding they were written with: among live
    photos only (none in the set's models), those of the user's favourite colour come first."""
    catalogue, train = split
    ranker = fitted("clip_profile", train)
    user = 3
    liked = train.conversions["photo_idx"][train.conversions["user_idx"] == user]
    favourite = np.bincount(photo_colour(liked), minlength=len(COLOURS)).argmax()
    sources = np.arange(10, N_PHOTOS, len(SHAPES))  # circles of every colour, with an image
    candidates = N_PHOTOS + np.arange(len(sources))
    query = RankQuery(
        user,
        "circle",
        candidates,
        np.ones(len(sources), np.float32),
        live=live_copies(catalogue, sources.tolist(), 0),
    )
    scores = ranker.score(query).scores
    top = sources[np.argsort(-scores, kind="stable")[: len(sources) // len(COLOURS)]]
    assert np.mean(photo_colour(top) == favourite) > 0.6
    assert np.mean(photo_colour(sources) == favourite) < 0.3


def _rank(port: int, photo_ids: list[str], ranker: int, user_id: str = "") -> pb.RankResponse:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return pb_grpc.RankingServiceStub(channel).Rank(
            pb.RankRequest(
                user_id=user_id,
                query="",
                candidate_photo_ids=photo_ids,
                retrieval_scores=np.linspace(1.0, 0.5, len(photo_ids)).tolist(),
                k=len(photo_ids),
                ranker=ranker,
            ),
            timeout=10,
        )


def test_the_ranking_server_reads_live_photos_from_the_log(
    loop_thread, artifact_root, catalogue, tmp_path
):
    """A ranking server serving the live catalogue reads the log: a photo written after the
    set was built is ranked cold (popularity: as a photo without conversions, by its retrieval
    score), not last with a note; once taken down it is unknown again."""
    from imgsearch.config import RankingConfig
    from ranking_service.server import create_ranking_server

    db = tmp_path / "log.sqlite3"
    service = loop_thread.run(
        create_ranking_server(
            RankingConfig(
                artifacts=str(artifact_root),
                port=0,
                admin_port=0,
                live_catalogue=True,
                conversions_db=str(db),
                catalog_poll_ms=20,
            )
        )
    )
    try:
        counts = np.bincount(catalogue.conversions["photo_idx"], minlength=catalogue.n_photos)
        never = [catalogue.photo_ids([i])[0] for i in np.flatnonzero(counts == 0)[:3]]
        popular = catalogue.photo_ids([int(counts.argmax())])
        assert len(never) == 3
        live_id = f"live-{uuid.uuid4().hex[:8]}"
        # Retrieval order: the popular photo, the live one, then photos no one converted.
        photo_ids = [*popular, live_id, *never]
        ranked = _rank(service.port, photo_ids, pb.RANKER_POPULARITY)
        assert [r.photo_id for r in ranked.results][-1] == live_id
        assert "unknown photo" in ranked.fallback_reason
        record = {"keywords": [["zebracorn", 90.0]], "views": 5, "downloads": 1}
        with open_store(db=str(db)) as store:
            CatalogLog(store).append("w1", "d1", [PhotoChange(live_id, UPSERT, record)])
        deadline = time.monotonic() + 10
        while "unknown photo" in ranked.fallback_reason and time.monotonic() < deadline:
            time.sleep(0.02)
            ranked = _rank(service.port, photo_ids, pb.RANKER_POPULARITY)
        assert [r.photo_id for r in ranked.results] == photo_ids, ranked
        assert "unknown photo" not in ranked.fallback_reason
        for ranker in (pb.RANKER_NONE, pb.RANKER_ALS):
            reply = _rank(service.port, photo_ids, ranker, user_id="someone-new")
            assert "unknown photo" not in reply.fallback_reason, reply
        with open_store(db=str(db)) as store:
            CatalogLog(store).append("w2", "d2", [PhotoChange(live_id, DELETE, {})])
        deadline = time.monotonic() + 10
        while "unknown photo" not in ranked.fallback_reason and time.monotonic() < deadline:
            time.sleep(0.02)
            ranked = _rank(service.port, photo_ids, pb.RANKER_POPULARITY)
        assert [r.photo_id for r in ranked.results][-1] == live_id
    finally:
        loop_thread.run(service.stop(0))
