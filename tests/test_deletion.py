"""A deleted user is gone: from the store's files, under every spelling, and from retraining."""

from __future__ import annotations

import shutil

import grpc
import pytest

from imgsearch import artifacts
from imgsearch.catalogue import Catalogue
from imgsearch.conversion_store import ConversionEvent, default_db_path, open_store
from imgsearch.feedback.v1 import feedback_service_pb2 as pb
from imgsearch.feedback.v1 import feedback_service_pb2_grpc as pb_grpc
from imgsearch_tools.cli import main
from tests.test_feedback import Gateway, conversion, stored_events

NEEDLE = "zz-needle-user-7781"
T0 = 1_700_000_000_000_000


def events_of(user: str, n: int, first: int = 0) -> list[ConversionEvent]:
    return [
        ConversionEvent(f"{user}-ev-{i}", user, f"photo-{i}", "red", T0 + i, "FR")
        for i in range(first, first + n)
    ]


def store_bytes(db) -> bytes:
    files = [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]
    return b"".join(path.read_bytes() for path in files if path.exists())


def test_a_deleted_users_events_leave_no_trace_in_the_sqlite_files(tmp_path):
    db = tmp_path / "conversions.sqlite3"
    with open_store(db=db) as store:
        store.append(events_of("someone-else", 50))
        store.append(events_of(NEEDLE, 200))
        assert NEEDLE.encode() in store_bytes(db)
        store.delete_user(NEEDLE)
        # Neither the main file's free pages nor the WAL keep the id or the event ids.
        assert NEEDLE.encode() not in store_bytes(db)
        assert store.count() == 50
        from imgsearch.conversion_store import user_hash

        assert store.tombstones().keys() == {user_hash(NEEDLE)}


def test_tombstones_hold_hashes_and_expire_after_the_stated_retention(tmp_path):
    from imgsearch.conversion_store import TOMBSTONE_RETENTION_DAYS, user_hash

    db = tmp_path / "conversions.sqlite3"
    with open_store(db=db) as store:
        store.delete_user("first")
        stale_us = (TOMBSTONE_RETENTION_DAYS + 1) * 86_400 * 1_000_000
        store.conn.execute(
            "UPDATE deleted_users SET deleted_at_us = deleted_at_us - ?", (stale_us,)
        )
        store.delete_user("second")  # a deletion prunes the tombstones past retention
        assert set(store.tombstones()) == {user_hash("second")}
    assert b"second" not in store_bytes(db)


@pytest.fixture
def feedback_at(loop_thread, artifact_root, tmp_path):
    db = tmp_path / "conversions.sqlite3"
    gateway = Gateway(loop_thread, artifact_root, conversions_db=str(db))
    channel = grpc.insecure_channel(gateway.target)
    yield pb_grpc.FeedbackServiceStub(channel), {"db": db}
    channel.close()
    gateway.stop()


def test_user_ids_are_normalised_once_so_no_spelling_escapes_a_delete(feedback_at, catalogue):
    feedback, location = feedback_at
    photos = catalogue.photos["photo_id"].tolist()
    spellings = [" alice", "alice ", "\talice\n", "alice"]
    events = [conversion(i, photos[i], user_id=user) for i, user in enumerate(spellings)]
    events.append(conversion(9, photos[9], user_id="bob"))
    stored = feedback.LogConversions(pb.LogConversionsRequest(events=events), timeout=10)
    assert stored.stored_count == 5
    assert {e.user_id for e in stored_events(location).values()} == {"alice", "bob"}
    feedback.DeleteUserEvents(pb.DeleteUserEventsRequest(user_id="alice"), timeout=10)
    feedback.DeleteUserEvents(pb.DeleteUserEventsRequest(user_id="  bob "), timeout=10)
    assert stored_events(location) == {}


@pytest.fixture(params=["sqlite", "postgres"])
def any_store(request, tmp_path) -> dict:
    if request.param == "sqlite":
        return {"conversions_db": str(tmp_path / "conversions.sqlite3")}
    return {"conversions_dsn": request.getfixturevalue("postgres_dsn")}


def test_a_nul_character_rejects_its_event_and_never_blocks_the_batch(
    loop_thread, artifact_root, catalogue, any_store
):
    gateway = Gateway(loop_thread, artifact_root, **any_store)
    photos = catalogue.photos["photo_id"].tolist()
    try:
        with grpc.insecure_channel(gateway.target) as channel:
            stub = pb_grpc.FeedbackServiceStub(channel)
            events = [
                conversion(0, photos[0]),
                conversion(1, photos[1], query="red\x00circle"),
                conversion(2, photos[2], user_id="nul\x00user"),
                conversion(3, photos[3]),
            ]
            response = stub.LogConversions(pb.LogConversionsRequest(events=events), timeout=10)
            assert response.stored_count == 2 and response.rejected_count == 2
            for result, field in zip(response.results[1:3], ("query", "user_id")):
                assert result.rejection_reason == pb.REJECTION_REASON_INVALID_TEXT
                assert field in result.detail
            with pytest.raises(grpc.RpcError) as info:
                stub.DeleteUserEvents(pb.DeleteUserEventsRequest(user_id="a\x00"), timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        gateway.stop()


def test_a_retraining_leaves_out_a_deleted_users_events_from_the_catalogue(
    artifact_root, catalogue, tmp_path
):
    root = tmp_path / "artifacts"
    shutil.copytree(artifact_root, root, symlinks=True)
    counts = catalogue.conversions["user_idx"].value_counts()
    user_idx = int(counts.index[0])
    user = str(catalogue.users["anonymous_user_id"].iloc[user_idx])
    with open_store(db=default_db_path(root)) as store:
        store.delete_user(user)  # the user's events are in the data the set was built from
    before = artifacts.resolve(root).version
    assert main(["train", "--artifacts", str(root), "--rankers", "popularity", "--quiet"]) == 0
    retrained = artifacts.resolve(root)
    assert retrained.version != before
    served = Catalogue.load(retrained.file(artifacts.CATALOGUE_DIR))
    assert served.user_idx(user) is None
    assert len(served.conversions) == len(catalogue.conversions) - int(counts.iloc[0])
    assert retrained.manifest["forgotten_conversions"] == int(counts.iloc[0])
    # Every ranker learnt from the catalogue without them (users are renumbered).
    assert set(retrained.rankers) == set(artifacts.resolve(artifact_root).rankers)


def test_a_build_from_data_leaves_out_a_deleted_users_events(demo_data, catalogue, tmp_path):
    root = tmp_path / "artifacts"
    user = str(catalogue.users["anonymous_user_id"].iloc[0])
    with open_store(db=default_db_path(root)) as store:
        store.delete_user(user)  # deleted after the data was written: the data still has them
    build = ["build", "--data", str(demo_data), "--out", str(root), "--rankers", "popularity"]
    assert main([*build, "--no-clip", "--quiet"]) == 0
    built = Catalogue.load(artifacts.resolve(root).file(artifacts.CATALOGUE_DIR))
    assert built.user_idx(user) is None
    assert len(built.users) == len(catalogue.users) - 1
