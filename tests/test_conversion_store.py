"""The conversion store's contract, run against SQLite files and a real PostgreSQL server."""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import pytest

from imgsearch.conversion_store import (
    ConversionEvent,
    Outcome,
    StoreError,
    default_db_path,
    migrations,
    open_store,
)
from imgsearch.conversion_store.background import BackgroundStore

T0 = 1_750_000_000_000_000  # microseconds since the epoch (mid 2025)


def event(i: int, user: str = "u1", **changes) -> ConversionEvent:
    fields = {
        "event_id": f"e{i}",
        "user_id": user,
        "photo_id": f"p{i % 7}",
        "keyword": "red circle",
        "converted_at_us": T0 + i * 1_000_000,
        "country": "FR",
    }
    return ConversionEvent(**{**fields, **changes})


@pytest.fixture(params=["sqlite", "postgres"])
def location(request, tmp_path) -> dict:
    """Where a store lives, as open_store's arguments (the same place for every opening)."""
    if request.param == "sqlite":
        return {"db": tmp_path / "store" / "conversions.sqlite3"}
    return {"dsn": request.getfixturevalue("postgres_dsn")}


@pytest.fixture
def store(location):
    with open_store(**location) as opened:
        yield opened


def test_new_events_are_stored_and_read_back_newest_first(store):
    assert store.append([event(i) for i in range(5)]) == [Outcome.STORED] * 5
    assert store.count() == 5
    latest = store.recent("u1", 3)
    assert [e.event_id for e in latest] == ["e4", "e3", "e2"]
    assert latest[0] == event(4)
    assert store.recent("someone-else", 3) == []


def test_a_retried_batch_is_not_stored_twice(store):
    batch = [event(i) for i in range(10)]
    store.append(batch)
    assert store.append(batch) == [Outcome.DUPLICATE] * 10
    assert store.count() == 10


def test_an_id_reused_with_other_content_is_refused_and_the_first_kept(store):
    store.append([event(1)])
    changed = event(1, photo_id="another")
    assert store.append([changed, event(2)]) == [Outcome.CONFLICT, Outcome.STORED]
    assert store.count() == 2
    assert [e.photo_id for e in store.recent("u1", 10) if e.event_id == "e1"] == ["p1"]


def test_repeated_ids_inside_one_batch(store):
    outcomes = store.append([event(1), event(1), event(1, keyword="blue"), event(2)])
    assert outcomes == [Outcome.STORED, Outcome.DUPLICATE, Outcome.CONFLICT, Outcome.STORED]
    assert store.count() == 2
    assert store.recent("u1", 1)[0].keyword == "red circle"


def test_a_batch_that_fails_midway_stores_nothing(store):
    store.append([event(0)])
    batch = [event(i) for i in range(1, 60)]
    # A value no driver can write, late in the batch: the whole transaction must roll back.
    batch[50] = event(51, converted_at_us=object())
    with pytest.raises(Exception):
        store.append(batch)
    assert store.count() == 1
    assert store.append([event(1)]) == [Outcome.STORED]


def test_delete_user_removes_only_that_users_events(store):
    store.append([event(i, user="a") for i in range(4)] + [event(i, user="b") for i in range(4, 6)])
    assert store.delete_user("a") == 4
    assert store.delete_user("a") == 0
    assert store.recent("a", 10) == []
    assert [e.user_id for e in store.recent("b", 10)] == ["b", "b"]


def test_scan_reads_everything_in_time_order(store):
    events = [event(i, converted_at_us=T0 + (i * 7919) % 100) for i in range(30)]
    store.append(events)
    scanned = list(store.scan(batch_size=4))
    assert len(scanned) == 30
    assert scanned == sorted(events, key=lambda e: (e.converted_at_us, e.event_id))


def test_events_survive_reopening_and_the_schema_is_at_the_latest_version(location):
    with open_store(**location) as first:
        first.append([event(i) for i in range(3)])
    with open_store(**location) as second:
        assert second.count() == 3
        assert second.schema_version() == migrations.LATEST_VERSION


def test_commits_are_durable_by_configuration(store):
    if store.backend == "sqlite":
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    else:
        assert store.conn.execute("SHOW synchronous_commit").fetchone()[0] == "on"


def test_two_writers_racing_on_the_same_ids_store_each_once(location):
    stores = [open_store(**location) for _ in range(2)]
    batches = [[event(i) for i in range(k, 200, 1)] for k in (0, 100)]
    results: list[list[Outcome]] = [[], []]
    barrier = threading.Barrier(2)

    def write(n):
        barrier.wait()
        for start in range(0, len(batches[n]), 20):
            results[n] += stores[n].append(batches[n][start : start + 20])

    threads = [threading.Thread(target=write, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert stores[0].count() == 200
        # Every id shared by the two writers was stored by exactly one of them.
        shared = {}
        for n in range(2):
            for e, outcome in zip(batches[n], results[n]):
                shared.setdefault(e.event_id, []).append(outcome)
        for outcomes in shared.values():
            assert outcomes.count(Outcome.STORED) == 1
            assert set(outcomes) <= {Outcome.STORED, Outcome.DUPLICATE}
    finally:
        for s in stores:
            s.close()


def test_an_older_schema_is_migrated_and_a_newer_one_refused(tmp_path):
    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(migrations.CREATE_VERSIONS_TABLE)
    first = migrations.MIGRATIONS[0]
    for statement in first.statements:
        conn.execute(statement)
    conn.execute("INSERT INTO schema_migrations VALUES (1, 'v1', 0)")
    conn.execute(
        "INSERT INTO conversion_events VALUES ('old', 'u', 'p', 'k', 5, '', 'download', 6)"
    )
    with open_store(db=path) as store:
        assert store.schema_version() == migrations.LATEST_VERSION
        assert [e.event_id for e in store.scan()] == ["old"]
    conn.execute("INSERT INTO schema_migrations VALUES (999, 'from the future', 0)")
    conn.close()
    with pytest.raises(RuntimeError, match="newer than this release"):
        open_store(db=path)


def test_postgres_migrations_are_serialised_between_processes_starting_together(postgres_dsn):
    errors = []

    def opener():
        try:
            open_store(dsn=postgres_dsn).close()
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    with open_store(dsn=postgres_dsn) as store:
        assert store.schema_version() == migrations.LATEST_VERSION


def test_default_path_is_beside_the_artifact_root_never_inside_a_set(tmp_path):
    root = tmp_path / "artifacts"
    version = root / "sets" / "v1"
    version.mkdir(parents=True)
    (version / "manifest.json").write_text("{}")
    (root / "current").symlink_to("sets/v1")
    expected = tmp_path / "artifacts-conversions.sqlite3"
    assert default_db_path(root) == expected
    assert default_db_path(version) == expected
    standalone = tmp_path / "one-set"
    standalone.mkdir()
    (standalone / "manifest.json").write_text("{}")
    assert default_db_path(standalone) == tmp_path / "one-set-conversions.sqlite3"


def test_a_missing_store_is_reported_with_where_and_why(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="conversion store"):
        open_store(db=blocker / "sub" / "x.sqlite3")
    with pytest.raises(StoreError, match="127.0.0.1:1"):
        open_store(dsn="postgresql://nobody@127.0.0.1:1/none", timeout_s=1)


def test_background_reads_give_up_on_a_store_that_is_down():
    opened = []

    def opener():
        opened.append(1)
        return open_store(dsn="postgresql://nobody@127.0.0.1:1/none", timeout_s=1)

    async def scenario():
        background = BackgroundStore(opener, retry_s=60)
        first = await background.recent("u", 5, timeout_s=5)
        second = await background.recent("u", 5, timeout_s=5)
        with pytest.raises(StoreError):
            await background.append([event(1)])
        await background.close()
        return first, second

    first, second = asyncio.run(scenario())
    assert first[0] == [] and "unavailable" in first[1]
    assert second[0] == [] and "unavailable" in second[1]
    assert len(opened) == 1  # no new connection attempt within retry_s


def test_background_reads_give_up_on_a_store_that_is_slow(postgres_dsn):
    import psycopg

    with open_store(dsn=postgres_dsn) as store:
        store.append([event(1)])
    locker = psycopg.connect(postgres_dsn)

    async def scenario():
        background = BackgroundStore(lambda: open_store(dsn=postgres_dsn, timeout_s=2))
        await background.open()
        locker.execute("LOCK TABLE conversion_events IN ACCESS EXCLUSIVE MODE")
        slow = await background.recent("u1", 5, timeout_s=0.05)
        locker.rollback()
        await asyncio.sleep(0.1)
        fast = await background.recent("u1", 5, timeout_s=5)
        await background.close()
        return slow, fast

    try:
        slow, fast = asyncio.run(scenario())
    finally:
        locker.close()
    assert slow[0] == [] and "did not answer within 50 ms" in slow[1]
    assert [e.event_id for e in fast[0]] == ["e1"] and fast[1] == ""
