"""The conversion store's schema as numbered migrations, the same SQL for SQLite and PostgreSQL.

A store records every applied version in ``schema_migrations``; opening a store applies the
missing ones in order inside one transaction, under a lock each backend provides, so that two
servers starting together do not race. A store at a version this code does not know is
refused rather than written by older code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    """One schema step: a version, what it does, and its statements (portable SQL)."""

    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "conversion_events, keyed by event id, with a user + time index",
        (
            """
            CREATE TABLE conversion_events (
                event_id TEXT PRIMARY KEY,
                user_id TEXT NOT NULL,
                photo_id TEXT NOT NULL,
                keyword TEXT NOT NULL,
                converted_at_us BIGINT NOT NULL,
                country TEXT NOT NULL,
                conversion_type TEXT NOT NULL,
                logged_at_us BIGINT NOT NULL
            )
            """,
            # A user's latest events (fold-in) and a user's deletion read this index only.
            "CREATE INDEX conversion_events_user_time ON conversion_events "
            "(user_id, converted_at_us)",
        ),
    ),
    Migration(
        2,
        "time index for export and retraining in time order",
        ("CREATE INDEX conversion_events_time ON conversion_events (converted_at_us, event_id)",),
    ),
    Migration(
        3,
        "deleted_users: tombstones (hashed user ids) that keep builds from bringing events back",
        (
            """
            CREATE TABLE deleted_users (
                user_hash TEXT PRIMARY KEY,
                deleted_at_us BIGINT NOT NULL
            )
            """,
        ),
    ),
    Migration(
        4,
        "catalog_changes: the live catalogue's change log, and its request ids",
        (
            # seq is given by the writer under the table's write lock: gap-free, in commit order.
            """
            CREATE TABLE catalog_changes (
                seq BIGINT PRIMARY KEY,
                request_id TEXT NOT NULL,
                photo_id TEXT NOT NULL,
                operation TEXT NOT NULL,
                record TEXT NOT NULL,
                embedding TEXT NOT NULL,
                logged_at_us BIGINT NOT NULL
            )
            """,
            "CREATE INDEX catalog_changes_photo ON catalog_changes (photo_id, seq)",
            """
            CREATE TABLE catalog_requests (
                request_id TEXT PRIMARY KEY,
                digest TEXT NOT NULL,
                last_seq BIGINT NOT NULL
            )
            """,
        ),
    ),
)
LATEST_VERSION = MIGRATIONS[-1].version

CREATE_VERSIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at_us BIGINT NOT NULL
)
"""


def pending(current: int, location: str) -> list[Migration]:
    """The migrations to apply to a store at version ``current``.

    Raises
    ------
    RuntimeError
        When the store is newer than this code (it was migrated by a later release).
    """
    if current > LATEST_VERSION:
        raise RuntimeError(
            f"conversion store {location} is at schema version {current}, newer than this "
            f"release knows ({LATEST_VERSION}); upgrade imgsearch before using it"
        )
    return [m for m in MIGRATIONS if m.version > current]


def apply(
    execute: Callable[..., object],
    current: int,
    location: str,
    applied_at_us: int,
    placeholder: str,
) -> int:
    """Apply the pending migrations with ``execute(sql, params)``; returns the new version.

    The caller holds the transaction and the lock; ``placeholder`` is the driver's (``?`` or
    ``%s``).
    """
    version = current
    for migration in pending(current, location):
        for statement in migration.statements:
            execute(statement)
        execute(
            "INSERT INTO schema_migrations (version, description, applied_at_us) "
            f"VALUES ({placeholder}, {placeholder}, {placeholder})",
            (migration.version, migration.description, applied_at_us),
        )
        version = migration.version
    return version
