"""The embedded conversion store: one SQLite file in WAL mode, fsynced on every commit."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from imgsearch.conversion_store import (
    EVENT_COLUMNS,
    PRUNE_TOMBSTONES,
    UPSERT_TOMBSTONE,
    ConversionEvent,
    ConversionStore,
    Outcome,
    StoreError,
    migrations,
    now_us,
    plan_batch,
    tombstone_params,
)

logger = logging.getLogger("imgsearch.conversions")

_INSERT = (
    f"INSERT INTO conversion_events ({', '.join(EVENT_COLUMNS)}, logged_at_us) "
    f"VALUES ({', '.join('?' * (len(EVENT_COLUMNS) + 1))})"
)
_SELECT = f"SELECT {', '.join(EVENT_COLUMNS)} FROM conversion_events"
# SQLite's default limit of bound parameters is 32766; stay far below it per lookup.
_LOOKUP_CHUNK = 900


class SQLiteStore(ConversionStore):
    """A :class:`ConversionStore` in one SQLite file (created with its folder when missing).

    WAL mode lets the ranking service read while the gateway writes; ``synchronous=FULL``
    makes each commit durable before ``append`` returns (WAL's default, NORMAL, may lose the
    last commits on power loss).
    """

    backend = "sqlite"

    def __init__(self, path: str | Path, timeout_s: float = 5.0):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit mode: transactions are opened explicitly with BEGIN IMMEDIATE.
            self.conn = sqlite3.connect(
                self.path, timeout=timeout_s, isolation_level=None, check_same_thread=False
            )
            mode = self.conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"{self.path}: cannot use WAL mode (journal_mode is {mode})")
            self.conn.execute("PRAGMA synchronous=FULL")
            # Deleted rows are overwritten with zeros, not left in free pages.
            self.conn.execute("PRAGMA secure_delete=ON")
            self._migrate()
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"conversion store {self.path}: {exc}") from exc

    @property
    def location(self) -> str:
        return str(self.path)

    def _migrate(self) -> None:
        self.conn.execute(migrations.CREATE_VERSIONS_TABLE)
        self.conn.execute("BEGIN IMMEDIATE")  # one migrator at a time
        try:
            migrations.apply(
                self.conn.execute, self._version(), self.location, now_us(), placeholder="?"
            )
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    def _version(self) -> int:
        row = self.conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0)

    def schema_version(self) -> int:
        return self._version()

    def append(self, events: Sequence[ConversionEvent]) -> list[Outcome]:
        if not events:
            return []
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            ids = list({e.event_id for e in events})
            stored: dict[str, tuple] = {}
            for start in range(0, len(ids), _LOOKUP_CHUNK):
                chunk = ids[start : start + _LOOKUP_CHUNK]
                rows = self.conn.execute(
                    f"{_SELECT} WHERE event_id IN ({', '.join('?' * len(chunk))})", chunk
                )
                stored.update((row[0], tuple(row[1:])) for row in rows)
            outcomes, to_insert = plan_batch(events, stored)
            logged_at = now_us()
            self.conn.executemany(
                _INSERT,
                [(*e.values(), logged_at) for e in to_insert],
            )
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise
        return outcomes

    def recent(self, user_id: str, limit: int) -> list[ConversionEvent]:
        rows = self.conn.execute(
            f"{_SELECT} WHERE user_id = ? ORDER BY converted_at_us DESC, event_id DESC LIMIT ?",
            (user_id, int(limit)),
        )
        return [ConversionEvent(*row) for row in rows]

    def delete_user(self, user_id: str) -> int:
        tombstone, prune = tombstone_params(user_id, now_us())
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            deleted = self.conn.execute(
                "DELETE FROM conversion_events WHERE user_id = ?", (user_id,)
            ).rowcount
            self.conn.execute(UPSERT_TOMBSTONE, tombstone)
            self.conn.execute(PRUNE_TOMBSTONES, prune)
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise
        self._checkpoint()
        return int(deleted)

    def _checkpoint(self) -> None:
        # The deleted rows' pages are still in the WAL until a checkpoint copies the file's new
        # pages over them and TRUNCATE empties it; a reader (ranking) holding an old snapshot
        # makes it busy for a moment, so try again within the busy timeout.
        for _ in range(50):
            busy = self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            if not busy:
                return
            time.sleep(0.05)
        logger.warning("%s: WAL checkpoint still busy; the next one purges the WAL", self.path)

    def tombstones(self) -> dict[str, int]:
        rows = self.conn.execute("SELECT user_hash, deleted_at_us FROM deleted_users")
        return {user: int(at) for user, at in rows}

    def scan(self, batch_size: int = 10_000) -> Iterator[ConversionEvent]:
        # One read transaction: a consistent snapshot even while the gateway keeps writing.
        cursor = self.conn.cursor()
        cursor.execute("BEGIN")
        try:
            cursor.execute(f"{_SELECT} ORDER BY converted_at_us, event_id")
            while rows := cursor.fetchmany(batch_size):
                yield from (ConversionEvent(*row) for row in rows)
        finally:
            cursor.execute("COMMIT")
            cursor.close()

    def count(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM conversion_events").fetchone()[0])

    def close(self) -> None:
        self.conn.close()
