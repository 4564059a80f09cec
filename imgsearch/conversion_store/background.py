"""A conversion store used from an asyncio server: calls run on the store's own thread."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from imgsearch.conversion_store import (
    ConversionEvent,
    ConversionStore,
    Outcome,
    StoreError,
    StoreRefusal,
)

logger = logging.getLogger("imgsearch.conversions")


class BackgroundStore:
    """Runs a :class:`ConversionStore`'s calls on one dedicated thread, off the event loop.

    The store is opened at the first call, in that thread. A store that fails to open, or
    whose connection breaks, is reopened at a later call, at most once per ``retry_s``: while
    the database is down, calls fail at once with :class:`StoreError` instead of each waiting
    for a connection timeout.

    Parameters
    ----------
    opener:
        Opens the store (e.g. ``lambda: open_store(db=..., dsn=...)``).
    retry_s:
        The least time between two attempts to open the store after a failure.
    name:
        The thread's name prefix.
    """

    def __init__(
        self,
        opener: Callable[[], ConversionStore],
        retry_s: float = 1.0,
        name: str = "conversions",
    ):
        self._opener = opener
        self._retry_s = retry_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._store: ConversionStore | None = None
        self._failed_at = -math.inf
        self._last_error = ""
        self.pending = 0

    @property
    def location(self) -> str:
        """Where the open store is ("" before it is open)."""
        return self._store.location if self._store is not None else ""

    def _store_now(self) -> ConversionStore:
        """The open store (in the store's thread), opening it when needed and allowed."""
        if self._store is not None and not self._store.usable:
            self._close_quietly()
        if self._store is None:
            if time.monotonic() - self._failed_at < self._retry_s:
                raise StoreError(self._last_error)
            try:
                self._store = self._opener()
            except StoreError as exc:
                self._failed_at = time.monotonic()
                self._last_error = str(exc)
                raise
        return self._store

    def _close_quietly(self) -> None:
        try:
            self._store.close()
        except Exception:  # noqa: BLE001 - a broken connection may fail to close; drop it
            pass
        self._store = None

    def _run(self, method, *args):
        store = self._store_now()
        try:
            if callable(method):  # a function of the store (e.g. the catalogue log's)
                return method(store, *args)
            return getattr(store, method)(*args)
        except (StoreError, StoreRefusal):
            raise
        except Exception as exc:  # noqa: BLE001 - driver errors differ per backend
            if not store.usable:
                self._failed_at = time.monotonic()
                self._last_error = f"conversion store {store.location}: {exc}"
                self._close_quietly()
            raise StoreError(f"conversion store {store.location}: {exc}") from exc

    async def call(self, method, *args):
        """Run ``store.<method>(*args)`` (or ``method(store, *args)`` for a function) on the
        store's thread and return its result.

        Raises
        ------
        StoreError
            When the store cannot be opened or the call fails.
        """
        self.pending += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._run, method, *args)
        finally:
            self.pending -= 1

    async def open(self) -> None:
        """Open the store now (e.g. at server start), so that errors show early."""
        await self.call("count")

    async def try_open(self, timeout_s: float) -> str:
        """Open the store now if it answers within ``timeout_s``; returns the problem, or ""
        (a server starts either way: the store is opened again at a later call)."""
        try:
            await asyncio.wait_for(self.open(), timeout_s)
        except TimeoutError:
            return f"the conversion store did not open within {timeout_s:.0f} s"
        except StoreError as exc:
            return str(exc)
        return ""

    async def append(self, events: Sequence[ConversionEvent]) -> list[Outcome]:
        """:meth:`ConversionStore.append` off the event loop."""
        return await self.call("append", list(events))

    async def recent(
        self, user_id: str, limit: int, timeout_s: float, max_pending: int = 4
    ) -> tuple[list[ConversionEvent], str]:
        """The user's latest events, or ``([], reason)`` when the store cannot answer in time.

        A store that is slow, down, or already has ``max_pending`` calls waiting is skipped:
        the caller goes on without the events, never fails because of them.
        """
        if self.pending >= max_pending:
            return [], f"conversion store busy ({self.pending} reads waiting)"
        try:
            events = await asyncio.wait_for(self.call("recent", user_id, limit), timeout_s)
        except TimeoutError:
            return [], f"conversion store did not answer within {timeout_s * 1000:.0f} ms"
        except StoreError as exc:
            # The reason reaches clients (Search notes): where the store is and why it failed
            # (paths, host, user) goes to the log only.
            logger.warning("conversion store read failed", extra={"error": str(exc)})
            return [], "conversion store unavailable"
        return events, ""

    async def close(self) -> None:
        """Close the store and stop its thread (waits for the call in progress)."""

        def close_store():
            if self._store is not None:
                self._close_quietly()

        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, close_store)
        self._executor.shutdown(wait=False)
