"""The loop through real servers: conversions logged at the gateway personalize the next search."""

from __future__ import annotations

import time

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from imgsearch.feedback.v1 import feedback_service_pb2 as fb_pb
from imgsearch.feedback.v1 import feedback_service_pb2_grpc as fb_grpc
from imgsearch.ranking.v1 import ranking_service_pb2 as rank_pb
from imgsearch.search.v1 import search_service_pb2 as pb
from imgsearch.search.v1 import search_service_pb2_grpc as pb_grpc
from tests.conftest import Stack

UNSEEN = "a-user-the-model-has-never-seen"


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path) -> dict:
    if request.param == "sqlite":
        return {"conversions_db": str(tmp_path / "conversions.sqlite3")}
    return {"conversions_dsn": request.getfixturevalue("postgres_dsn")}


def taste_of_the_most_active_user(catalogue, n: int = 20) -> list[str]:
    user_idx = int(catalogue.conversions["user_idx"].value_counts().idxmax())
    history = catalogue.conversions.loc[catalogue.conversions["user_idx"] == user_idx]
    return catalogue.photo_ids(history["photo_idx"].to_numpy()[-n:])


def log(channel, user_id: str, photo_ids: list[str]) -> fb_pb.LogConversionsResponse:
    stamp = Timestamp()
    stamp.FromNanoseconds(time.time_ns() - 10**9)
    events = [
        fb_pb.ConversionEvent(
            event_id=f"{user_id}-{i}",
            user_id=user_id,
            photo_id=photo_id,
            query="blue",
            converted_at=stamp,
            country="FR",
        )
        for i, photo_id in enumerate(photo_ids)
    ]
    return fb_grpc.FeedbackServiceStub(channel).LogConversions(
        fb_pb.LogConversionsRequest(events=events), timeout=10
    )


def search(channel, user_id: str, recent: list[str] = ()) -> pb.SearchResponse:
    return pb_grpc.SearchServiceStub(channel).Search(
        pb.SearchRequest(
            user_id=user_id,
            query="blue",
            k=10,
            ranker=rank_pb.RANKER_ALS,
            recent_photo_ids=list(recent),
        ),
        timeout=10,
    )


def ids(response: pb.SearchResponse) -> list[str]:
    return [r.photo_id for r in response.results]


def test_logged_conversions_personalize_a_user_the_model_has_never_seen(
    loop_thread, artifact_root, catalogue, store
):
    taste = taste_of_the_most_active_user(catalogue)
    stack = Stack(loop_thread, artifact_root, store=store)
    try:
        with grpc.insecure_channel(stack.target) as channel:
            cold = search(channel, UNSEEN)
            assert any("unknown user" in note for note in cold.notes)

            logged = log(channel, UNSEEN, taste)
            assert logged.stored_count == len(taste)
            warm = search(channel, UNSEEN)
            assert not any("unknown user" in note for note in warm.notes)
            assert not warm.degraded
            assert ids(warm) != ids(cold)
            # Folded in exactly as if the client had sent the photos itself.
            assert ids(warm) == ids(search(channel, "another-unseen-user", recent=taste))

            # After a privacy deletion the user is a stranger again.
            fb_grpc.FeedbackServiceStub(channel).DeleteUserEvents(
                fb_pb.DeleteUserEventsRequest(user_id=UNSEEN), timeout=10
            )
            assert ids(search(channel, UNSEEN)) == ids(cold)
    finally:
        stack.stop()


def test_a_store_that_is_down_means_no_fold_in_never_a_failed_search(
    loop_thread, artifact_root, catalogue
):
    down = {"conversions_dsn": "postgresql://nobody@127.0.0.1:1/none"}
    stack = Stack(loop_thread, artifact_root, store=down)
    try:
        with grpc.insecure_channel(stack.target) as channel:
            for _ in range(3):
                response = search(channel, UNSEEN)
                assert not response.degraded
                assert len(response.results) == 10
                assert any("logged conversions not used" in note for note in response.notes)
            # Known users never wait for the store.
            known = catalogue.users["anonymous_user_id"].iloc[0]
            assert not any("logged" in note for note in search(channel, known).notes)
    finally:
        stack.stop()
