"""Serialised retrieval answers of one artifact set, kept by query, bounded in bytes.

A keyword index's candidates depend on the query, ``candidates_k`` and the set alone. Turning
them into a response (100 photo ids gathered into Python strings, their scores into Python
floats, each converted again into the message) costs more CPU on a busy server than finding
them; a repeated query instead parses its stored response, one C call over a few kilobytes.
The cache lives in the state it was filled from, so a reload starts an empty one.
"""

from __future__ import annotations

from collections import OrderedDict

# About 2.5 KB per answer of 100 candidates: room for thousands of distinct queries.
DEFAULT_BUDGET_BYTES = 16 * 1024 * 1024


class ResponseCache:
    """Least recently used serialised responses, at most ``budget_bytes`` of them in all.

    Used from the event loop only (no lock): the server reads and fills it between awaits.
    """

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES):
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self._entries: OrderedDict[tuple, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple) -> bytes | None:
        """The response stored under ``key`` (now the most recently used), or None."""
        blob = self._entries.get(key)
        if blob is not None:
            self._entries.move_to_end(key)
        return blob

    def put(self, key: tuple, blob: bytes) -> None:
        """Store ``blob`` under ``key``, evicting the least recently used to stay in budget.

        A blob larger than the whole budget is not kept.
        """
        if len(blob) > self.budget_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.used_bytes -= len(old)
        while self._entries and self.used_bytes + len(blob) > self.budget_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.used_bytes -= len(evicted)
        self._entries[key] = blob
        self.used_bytes += len(blob)
