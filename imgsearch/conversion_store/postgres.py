"""The production conversion store: PostgreSQL by DSN, shared by every replica (psycopg 3)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

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

# One statement per batch: the new events go in as arrays, the ones already there are skipped
# (and waited for, when another transaction is inserting the same id right now).
_INSERT = (
    f"INSERT INTO conversion_events ({', '.join(EVENT_COLUMNS)}, logged_at_us) "
    "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::bigint[], "
    "%s::text[], %s::text[], %s::bigint[]) "
    "ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
)
_SELECT = f"SELECT {', '.join(EVENT_COLUMNS)} FROM conversion_events"
# Any constant shared by every imgsearch process: serialises their migrations.
_MIGRATION_LOCK = 0x1D65EA7C


def redact(dsn: str) -> str:
    """The DSN's host, port, database and user, without its password."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        parts = conninfo_to_dict(dsn)
    except Exception:  # noqa: BLE001 - a malformed DSN is reported by connect itself
        return "postgresql (unparsable DSN)"
    host = parts.get("host", "localhost")
    port = parts.get("port", "5432")
    return f"postgresql://{parts.get('user', '')}@{host}:{port}/{parts.get('dbname', '')}"


class PostgresStore(ConversionStore):
    """A :class:`ConversionStore` in a PostgreSQL database (the schema is created if missing).

    ``synchronous_commit`` is forced on for the session, so a commit is on the server's disk
    before ``append`` returns whatever the server's default.
    """

    backend = "postgres"

    def __init__(self, dsn: str, timeout_s: float = 5.0):
        try:
            import psycopg
        except ImportError as exc:
            raise StoreError(
                "the PostgreSQL conversion store needs psycopg: "
                "pip install 'imgsearch-grpc[postgres]'"
            ) from exc
        self._psycopg = psycopg
        self._location = redact(dsn)
        try:
            self.conn = psycopg.connect(
                dsn, autocommit=True, connect_timeout=max(1, round(timeout_s))
            )
            self.conn.execute("SET synchronous_commit = on")
            self.conn.execute(f"SET statement_timeout = {max(1, int(timeout_s * 1000))}")
            self._migrate()
        except psycopg.Error as exc:
            raise StoreError(f"conversion store {self._location}: {exc}") from exc

    @property
    def location(self) -> str:
        return self._location

    @property
    def usable(self) -> bool:
        return not (self.conn.closed or self.conn.broken)

    def _migrate(self) -> None:
        with self.conn.transaction():
            self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            self.conn.execute(migrations.CREATE_VERSIONS_TABLE)
            migrations.apply(
                self.conn.execute, self._version(), self.location, now_us(), placeholder="%s"
            )

    def _version(self) -> int:
        row = self.conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0)

    def schema_version(self) -> int:
        return self._version()

    def append(self, events: Sequence[ConversionEvent]) -> list[Outcome]:
        if not events:
            return []
        first: dict[str, ConversionEvent] = {}
        for event in events:
            first.setdefault(event.event_id, event)
        candidates = list(first.values())
        logged_at = now_us()
        columns = [list(column) for column in zip(*(e.values() for e in candidates))]
        with self.conn.transaction():
            with self.conn.cursor() as cursor:
                cursor.execute(_INSERT, [*columns, [logged_at] * len(candidates)])
                inserted = {row[0] for row in cursor.fetchall()}
                existing = [e.event_id for e in candidates if e.event_id not in inserted]
                stored: dict[str, tuple] = {}
                if existing:
                    cursor.execute(f"{_SELECT} WHERE event_id = ANY(%s)", (existing,))
                    stored = {row[0]: tuple(row[1:]) for row in cursor.fetchall()}
        outcomes, _ = plan_batch(events, stored)
        return outcomes

    def recent(self, user_id: str, limit: int) -> list[ConversionEvent]:
        rows = self.conn.execute(
            f"{_SELECT} WHERE user_id = %s ORDER BY converted_at_us DESC, event_id DESC LIMIT %s",
            (user_id, int(limit)),
        ).fetchall()
        return [ConversionEvent(*row) for row in rows]

    def delete_user(self, user_id: str) -> int:
        tombstone, prune = tombstone_params(user_id, now_us())
        with self.conn.transaction():
            cursor = self.conn.execute(
                "DELETE FROM conversion_events WHERE user_id = %s", (user_id,)
            )
            self.conn.execute(UPSERT_TOMBSTONE.replace("?", "%s"), tombstone)
            self.conn.execute(PRUNE_TOMBSTONES.replace("?", "%s"), prune)
            return int(cursor.rowcount)

    def tombstones(self) -> dict[str, int]:
        rows = self.conn.execute("SELECT user_hash, deleted_at_us FROM deleted_users")
        return {user: int(at) for user, at in rows.fetchall()}

    def scan(self, batch_size: int = 10_000) -> Iterator[ConversionEvent]:
        # A server-side cursor: the table is streamed, never held whole in memory.
        with self.conn.transaction():
            with self.conn.cursor(name="imgsearch_scan") as cursor:
                cursor.itersize = batch_size
                cursor.execute(f"{_SELECT} ORDER BY converted_at_us, event_id")
                for row in cursor:
                    yield ConversionEvent(*row)

    def count(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM conversion_events").fetchone()[0])

    def close(self) -> None:
        self.conn.close()
