"""Logged conversion events behind one small interface: SQLite (embedded default) or PostgreSQL.

Both backends hold the same schema (:mod:`imgsearch.conversion_store.migrations`) and keep the
same contract:

- ``append`` commits the new events of a batch in one transaction and returns only once they
  are durable (SQLite ``synchronous=FULL`` in WAL mode; PostgreSQL ``synchronous_commit=on``).
- Events are idempotent by ``event_id``: an id already stored with the same content is a
  ``DUPLICATE`` (not stored twice), with other content a ``CONFLICT`` (not stored at all).
- ``recent`` reads a user's latest events (what the ranking service folds in), ``delete_user``
  removes a user's events, ``scan`` reads them all in time order (export, retraining).
- ``delete_user`` leaves nothing of the events behind in the store (SQLite overwrites the
  freed pages, ``secure_delete``, and checkpoints the WAL into the file) and keeps a
  *tombstone*: the user id's hash (:func:`user_hash`) and when it was deleted, for
  :data:`TOMBSTONE_RETENTION_DAYS`, so that a retraining drops that user's older events
  wherever else they still are (a set's catalogue, an export merged into the data).

The SQLite file lives beside the artifact root, never inside a set (:func:`default_db_path`):
sets are immutable and pruned, the log is neither.
"""

from __future__ import annotations

import enum
import hashlib
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from imgsearch.artifacts import CURRENT, MANIFEST, SETS_DIR

DEFAULT_CONVERSION_TYPE = "download"
DB_SUFFIX = "-conversions.sqlite3"
# How long a deleted user's tombstone is kept: longer than anything made before the deletion
# is used as a build's input (older sets are pruned after 3 newer ones; exports are the
# operator's files: see the access-control guide).
TOMBSTONE_RETENTION_DAYS = 400
_TOMBSTONE_RETENTION_US = TOMBSTONE_RETENTION_DAYS * 86_400 * 1_000_000
# Tombstone statements shared by both backends (``?`` becomes ``%s`` for PostgreSQL).
UPSERT_TOMBSTONE = (
    "INSERT INTO deleted_users (user_hash, deleted_at_us) VALUES (?, ?) "
    "ON CONFLICT (user_hash) DO UPDATE SET deleted_at_us = excluded.deleted_at_us"
)
PRUNE_TOMBSTONES = "DELETE FROM deleted_users WHERE deleted_at_us < ?"


def user_hash(user_id: str) -> str:
    """The tombstone of a user id: its SHA-256 in hex (the id itself is not kept)."""
    return hashlib.sha256(f"imgsearch-user:{user_id}".encode()).hexdigest()


def tombstone_params(user_id: str, deleted_at_us: int) -> tuple[tuple, tuple]:
    """Parameters of :data:`UPSERT_TOMBSTONE` and :data:`PRUNE_TOMBSTONES` for one deletion."""
    return (user_hash(user_id), deleted_at_us), (deleted_at_us - _TOMBSTONE_RETENTION_US,)


class StoreError(RuntimeError):
    """The store cannot be opened or used (missing driver, unreachable server, newer schema)."""


class StoreRefusal(ValueError):
    """The store works but refuses this call's content (e.g. a reused request id)."""


@dataclass(frozen=True)
class ConversionEvent:
    """One logged conversion.

    Attributes
    ----------
    event_id:
        The client's id for the event; the idempotency key.
    user_id:
        The anonymous user id (Unsplash ``anonymous_user_id``).
    photo_id:
        The converted photo.
    keyword:
        The normalised query (``normalise_keyword``), the Unsplash ``keyword`` column.
    converted_at_us:
        When the conversion happened, in microseconds since the Unix epoch (UTC).
    country:
        Unsplash ``conversion_country``, "" when unknown.
    conversion_type:
        Unsplash ``conversion_type`` ("download").
    """

    event_id: str
    user_id: str
    photo_id: str
    keyword: str
    converted_at_us: int
    country: str = ""
    conversion_type: str = DEFAULT_CONVERSION_TYPE

    def content(self) -> tuple:
        """Everything but the id: two events with one id must agree on this."""
        return (
            self.user_id,
            self.photo_id,
            self.keyword,
            self.converted_at_us,
            self.country,
            self.conversion_type,
        )

    def values(self) -> tuple:
        """The id then the content, in :data:`EVENT_COLUMNS` order."""
        return (self.event_id, *self.content())


# Column order shared by both backends' queries (after event_id).
CONTENT_COLUMNS = (
    "user_id",
    "photo_id",
    "keyword",
    "converted_at_us",
    "country",
    "conversion_type",
)
EVENT_COLUMNS = ("event_id", *CONTENT_COLUMNS)


class Outcome(enum.Enum):
    """What ``append`` did with one event."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"


def now_us() -> int:
    """The current time in microseconds since the epoch."""
    return time.time_ns() // 1000


class ConversionStore(ABC):
    """Where conversion events are logged. One instance is one connection: not thread-safe."""

    backend: str = ""

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the store is, for messages (a path, or a DSN without its password)."""

    @property
    def usable(self) -> bool:
        """False once the connection is lost (the caller opens a new store)."""
        return True

    @abstractmethod
    def append(self, events: Sequence[ConversionEvent]) -> list[Outcome]:
        """Store the events that are new, in one transaction; one outcome per event, in order.

        Returns once the transaction is durably committed. An id seen earlier in the same batch
        counts like a stored one (same content: ``DUPLICATE``, else ``CONFLICT``).
        """

    @abstractmethod
    def recent(self, user_id: str, limit: int) -> list[ConversionEvent]:
        """The user's latest ``limit`` events, newest first."""

    @abstractmethod
    def delete_user(self, user_id: str) -> int:
        """Remove every event of ``user_id`` and keep its tombstone; returns how many were
        removed (for the log: callers are not told)."""

    @abstractmethod
    def tombstones(self) -> dict[str, int]:
        """Deleted users still within retention: user hash -> deletion time (us)."""

    @abstractmethod
    def scan(self, batch_size: int = 10_000) -> Iterator[ConversionEvent]:
        """Every event, ordered by ``converted_at_us`` then ``event_id``."""

    @abstractmethod
    def count(self) -> int:
        """How many events are stored."""

    @abstractmethod
    def schema_version(self) -> int:
        """The migration version the store is at."""

    @abstractmethod
    def close(self) -> None:
        """Close the connection."""

    def __enter__(self) -> ConversionStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def plan_batch(
    events: Sequence[ConversionEvent], stored: dict[str, tuple]
) -> tuple[list[Outcome], list[ConversionEvent]]:
    """Decide each event's outcome against what is ``stored`` (id -> content) before the batch.

    Returns the outcomes in order and the events to insert (first occurrence of each new id).
    """
    outcomes: list[Outcome] = []
    to_insert: list[ConversionEvent] = []
    seen: dict[str, tuple] = dict(stored)
    for event in events:
        content = event.content()
        known = seen.get(event.event_id)
        if known is None:
            seen[event.event_id] = content
            to_insert.append(event)
            outcomes.append(Outcome.STORED)
        elif known == content:
            outcomes.append(Outcome.DUPLICATE)
        else:
            outcomes.append(Outcome.CONFLICT)
    return outcomes, to_insert


def default_db_path(artifacts: str | Path) -> Path:
    """The SQLite file of an artifact root: beside the root, named after it.

    ``var/artifacts`` gives ``var/artifacts-conversions.sqlite3``. A set folder (``ROOT/sets/V``)
    gives its root's file, so that every set of a root shares one log and none holds it.
    """
    path = Path(artifacts).resolve()
    if not (path / CURRENT).exists() and (path / MANIFEST).exists():
        # A set folder: the log belongs to its root, or sits beside a standalone set.
        if path.parent.name == SETS_DIR:
            path = path.parent.parent
    return path.parent / f"{path.name}{DB_SUFFIX}"


def open_store(
    db: str | Path = "",
    dsn: str = "",
    timeout_s: float = 5.0,
) -> ConversionStore:
    """Open (creating and migrating when needed) the store at ``dsn`` or else ``db``.

    Parameters
    ----------
    db:
        SQLite file (created with its folder when missing).
    dsn:
        PostgreSQL connection string (``postgresql://user:pass@host:port/db`` or key=value);
        when given it wins over ``db``.
    timeout_s:
        How long a call may wait: SQLite's busy timeout; PostgreSQL's connect and statement
        timeouts.

    Raises
    ------
    StoreError
        When the store cannot be opened, naming where and why.
    """
    if dsn:
        from imgsearch.conversion_store.postgres import PostgresStore

        return PostgresStore(dsn, timeout_s=timeout_s)
    if not db:
        raise StoreError("no conversion store given: a SQLite path or a PostgreSQL DSN")
    from imgsearch.conversion_store.sqlite import SQLiteStore

    return SQLiteStore(db, timeout_s=timeout_s)
