"""The catalogue log on both store backends: numbered in commit order, idempotent by request id,
all or none, embeddings kept exactly, and concurrent writers never leave a gap."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from imgsearch.catalog_log import (
    DELETE,
    UPSERT,
    CatalogLog,
    PhotoChange,
    RequestConflict,
    replay,
)
from imgsearch.conversion_store import open_store


@pytest.fixture(params=["sqlite", "postgres"])
def location(request, tmp_path) -> dict:
    if request.param == "sqlite":
        return {"db": tmp_path / "store" / "conversions.sqlite3"}
    return {"dsn": request.getfixturevalue("postgres_dsn")}


def upsert(photo_id: str, vector=None) -> PhotoChange:
    record = {"keywords": [["red car", 90.0]], "description": "d"}
    return PhotoChange(photo_id, UPSERT, record, vector)


def test_changes_are_numbered_read_back_and_a_retry_is_not_written_twice(location):
    vector = np.random.default_rng(0).normal(size=16).astype(np.float32)
    with open_store(**location) as store:
        log = CatalogLog(store)
        assert log.high_water() == 0
        assert log.append("r1", "digest-1", [upsert("a", vector), upsert("b")]) == (2, False)
        assert log.append("r1", "digest-1", [upsert("a", vector), upsert("b")]) == (2, True)
        with pytest.raises(RequestConflict):
            log.append("r1", "digest-other", [upsert("c")])
        assert log.append("r2", "digest-2", [PhotoChange("a", DELETE, {"reason": "x"})]) == (
            3,
            False,
        )
        changes = log.since(0)
    assert [(c.seq, c.photo_id, c.operation) for c in changes] == [
        (1, "a", UPSERT),
        (2, "b", UPSERT),
        (3, "a", DELETE),
    ]
    np.testing.assert_array_equal(changes[0].embedding, vector)
    assert changes[1].embedding is None
    final = replay(changes)
    assert final["a"].operation == DELETE and final["b"].record["keywords"] == [["red car", 90.0]]
    with open_store(**location) as store:  # durable: another connection reads it all
        log = CatalogLog(store)
        assert log.high_water() == 3 and log.latest("a").operation == DELETE
        assert [c.seq for c in log.since(1)] == [2, 3]


def test_concurrent_writers_leave_no_gap_and_no_duplicate_number(location):
    def write(worker: int) -> None:
        with open_store(**location, timeout_s=30) as store:
            log = CatalogLog(store)
            for n in range(10):
                log.append(f"w{worker}-{n}", "d", [upsert(f"p{worker}-{n}"), upsert("shared")])

    with open_store(**location):
        pass  # created and migrated once, before the writers race
    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    with open_store(**location) as store:
        seqs = [c.seq for c in CatalogLog(store).since(0)]
    assert seqs == list(range(1, 81))
