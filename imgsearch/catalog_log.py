"""The live catalogue's change log: photo upserts and deletions, numbered, in the conversion store.

Every change gets a sequence number when it is committed. Writers take the table's write lock
(SQLite ``BEGIN IMMEDIATE``; PostgreSQL ``LOCK TABLE ... IN EXCLUSIVE MODE``, which readers do
not wait for) and number their changes after the highest one stored, so the numbers have no gaps
and follow commit order: a reader that has applied everything up to ``n`` and asks for what is
after ``n`` never misses a change committed later with a smaller number (a database sequence
could hand out 7 to a transaction that commits after 8).

A batch is idempotent by its request id: the id, a digest of the batch and its last sequence
number are committed with the changes, so a retry is answered from the first commit and a
different batch under the same id is refused. The image embedding of an upsert is stored with it
(base64 of float32 bytes), so replicas and rebuilds never embed the image again.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from imgsearch.conversion_store import ConversionStore, StoreRefusal, now_us

UPSERT = "upsert"
DELETE = "delete"


class RequestConflict(StoreRefusal):
    """A request id already committed with other content."""


@dataclass(frozen=True)
class PhotoChange:
    """One change of the live catalogue.

    Attributes
    ----------
    photo_id:
        The photo changed.
    operation:
        :data:`UPSERT` or :data:`DELETE`.
    record:
        An upsert's fields (``keywords`` as ``[[keyword, confidence], ...]``, ``description``,
        ``photographer``, ``width``, ``height``, ``views``, ``downloads``); a deletion's
        ``reason``.
    embedding:
        An upsert's image embedding (float32), None for a deletion or a photo without one.
    seq:
        The log sequence number (0 before it is committed).
    logged_at_us:
        When it was committed, in microseconds since the epoch (0 before).
    """

    photo_id: str
    operation: str
    record: dict = field(default_factory=dict)
    embedding: np.ndarray | None = None
    seq: int = 0
    logged_at_us: int = 0


def request_digest(payload: bytes) -> str:
    """The digest a request id is committed with (SHA-256 of the request's bytes)."""
    return hashlib.sha256(payload).hexdigest()


def _encode_vector(vector: np.ndarray | None) -> str:
    if vector is None:
        return ""
    return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode("ascii")


def _decode_vector(text: str) -> np.ndarray | None:
    if not text:
        return None
    return np.frombuffer(base64.b64decode(text), "<f4").astype(np.float32)


_COLUMNS = "seq, photo_id, operation, record, embedding, logged_at_us"


def _change(row) -> PhotoChange:
    seq, photo_id, operation, record, embedding, logged_at_us = row
    vector = _decode_vector(embedding)
    return PhotoChange(photo_id, operation, json.loads(record), vector, int(seq), int(logged_at_us))


class CatalogLog:
    """The change log in an open :class:`~imgsearch.conversion_store.ConversionStore` (SQLite or
    PostgreSQL; the tables come with the store's schema migrations). Not thread-safe, like the
    store: one per thread."""

    def __init__(self, store: ConversionStore):
        self.store = store
        self.conn = store.conn
        self.postgres = store.backend == "postgres"
        self.mark = "%s" if self.postgres else "?"

    def _sql(self, statement: str) -> str:
        return statement.replace("?", self.mark)

    def _rows(self, statement: str, params: Sequence = ()) -> list:
        return list(self.conn.execute(self._sql(statement), tuple(params)).fetchall())

    @contextmanager
    def _write_lock(self) -> Iterator[None]:
        if self.postgres:
            with self.conn.transaction():
                self.conn.execute("LOCK TABLE catalog_changes IN EXCLUSIVE MODE")
                yield
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise

    def committed(self, request_id: str, digest: str) -> int | None:
        """The last sequence number of a request already committed with this digest, None when
        the request id is new.

        Raises
        ------
        RequestConflict
            When the id was committed with another digest.
        """
        rows = self._rows(
            "SELECT digest, last_seq FROM catalog_requests WHERE request_id = ?", (request_id,)
        )
        if not rows:
            return None
        if rows[0][0] != digest:
            raise RequestConflict(
                f"request_id {request_id!r} was already used for another batch; use a new id"
            )
        return int(rows[0][1])

    def append(
        self, request_id: str, digest: str, changes: Sequence[PhotoChange]
    ) -> tuple[int, bool]:
        """Commit ``changes`` (all or none) under ``request_id``; returns once durable.

        Returns
        -------
        (int, bool)
            The last sequence number of the batch, and whether the request id was already
            committed (then nothing is written again).

        Raises
        ------
        RequestConflict
            When the id was committed with another digest.
        """
        with self._write_lock():
            done = self.committed(request_id, digest)
            if done is not None:
                return done, True
            last = self.high_water()
            logged_at = now_us()
            rows = []
            for change in changes:
                last += 1
                rows.append(
                    (
                        last,
                        request_id,
                        change.photo_id,
                        change.operation,
                        json.dumps(change.record, sort_keys=True),
                        _encode_vector(change.embedding),
                        logged_at,
                    )
                )
            cursor = self.conn.cursor()
            cursor.executemany(
                self._sql(
                    "INSERT INTO catalog_changes (seq, request_id, photo_id, operation, record, "
                    "embedding, logged_at_us) VALUES (?, ?, ?, ?, ?, ?, ?)"
                ),
                rows,
            )
            self.conn.execute(
                self._sql(
                    "INSERT INTO catalog_requests (request_id, digest, last_seq) VALUES (?, ?, ?)"
                ),
                (request_id, digest, last),
            )
        return last, False

    def high_water(self) -> int:
        """The highest committed sequence number (0 for an empty log)."""
        return int(self._rows("SELECT COALESCE(MAX(seq), 0) FROM catalog_changes")[0][0])

    def since(self, seq: int, limit: int = 5_000) -> list[PhotoChange]:
        """Up to ``limit`` changes after ``seq``, in sequence order."""
        rows = self._rows(
            f"SELECT {_COLUMNS} FROM catalog_changes WHERE seq > ? ORDER BY seq LIMIT ?",
            (int(seq), int(limit)),
        )
        return [_change(row) for row in rows]

    def latest(self, photo_id: str) -> PhotoChange | None:
        """The photo's last change, None when the log holds none."""
        rows = self._rows(
            f"SELECT {_COLUMNS} FROM catalog_changes WHERE photo_id = ? ORDER BY seq DESC LIMIT 1",
            (photo_id,),
        )
        return _change(rows[0]) if rows else None


def replay(changes: Sequence[PhotoChange]) -> dict[str, PhotoChange]:
    """Each photo's last change (what a sequence of changes leaves in effect), in the order the
    photos were first written."""
    final: dict[str, PhotoChange] = {}
    for change in changes:
        final[change.photo_id] = change
    return final
