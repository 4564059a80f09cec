"""A retrieval server's side of the live catalogue: replay the log at load and tail it while
serving (images written to it are embedded by :mod:`retrieval_service.image_worker`)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from imgsearch.catalog_log import CatalogLog
from imgsearch.conversion_store import StoreError, open_store
from imgsearch.filters import PhotoAttributes
from imgsearch.polling import Poller
from retrieval_service.live_catalogue import (
    LiveCatalogue,
    LiveClipRetriever,
    LiveKeywordRetriever,
    LiveView,
)
from retrieval_service.retrievers import Retriever
from retrieval_service.sharding import BY_INDEX

# The manifest key of a set's high-water mark: the last log change folded into the set.
HIGH_WATER_KEY = "catalog_log_seq"
READ_BATCH = 5_000
logger = logging.getLogger("imgsearch.retrieval")


def catch_up(catalogue: LiveCatalogue, log: CatalogLog) -> int:
    """Apply every change the log holds after what ``catalogue`` has applied; returns how many."""
    applied = 0
    while changes := log.since(catalogue.seq, READ_BATCH):
        catalogue.apply(changes)
        applied += len(changes)
    return applied


class LogReplay:
    """Replays the log at each load of a set, from the store at ``location``.

    A server must not serve a set before it has replayed the log on top of it (it could show a
    taken-down photo). The first load therefore waits for the store: each failed attempt is
    logged, handed to ``report`` (the server's holder shows it in refusals and ``GetStatus``),
    and retried after a backoff that doubles from ``first_retry_s`` to ``max_retry_s``.
    A later load (a reload while serving) fails at once instead, so the set served keeps
    serving. :meth:`close` ends a wait.
    """

    def __init__(self, location: dict, first_retry_s: float = 0.25, max_retry_s: float = 10.0):
        self.location = location
        self.first_retry_s = first_retry_s
        self.max_retry_s = max_retry_s
        self.report: Callable[[str], None] = lambda reason: None
        self.loaded = False
        self.closed = threading.Event()

    def replay(self, catalogue: LiveCatalogue) -> int:
        """Apply every change after the catalogue's mark; returns how many.

        Raises
        ------
        StoreError
            On a reload (or after :meth:`close`) when the store cannot be opened or read.
        """
        delay = self.first_retry_s
        while True:
            try:
                with open_store(**self.location) as store:
                    replayed = catch_up(catalogue, CatalogLog(store))
            except StoreError as exc:
                if self.loaded or self.closed.is_set():
                    raise
                self.report(f"waiting to replay the catalogue log: {exc}")
                logger.warning(
                    "not serving until the catalogue log is replayed; retrying",
                    extra={"error": str(exc), "retry_in_s": delay},
                )
                if self.closed.wait(delay):
                    raise StoreError(f"stopped while waiting: {exc}") from exc
                delay = min(delay * 2, self.max_retry_s)
                continue
            self.report("")
            self.loaded = True
            return replayed

    def close(self) -> None:
        self.closed.set()


def live_retrievers(
    retrievers: dict[str, Retriever],
    photo_ids: np.ndarray,
    manifest: dict,
    log_replay: LogReplay,
    shard: int,
    shard_count: int,
    attributes: PhotoAttributes | None = None,
) -> tuple[dict[str, Retriever], LiveView]:
    """The set's retrievers with the log applied on top (replayed now, from the set's
    high-water mark, see :class:`LogReplay`), and the view the tailer updates. ``attributes``
    (the set's, for filters) gain the live photos (:mod:`retrieval_service.live_filters`).

    Raises
    ------
    StoreError
        When the conversion store cannot be opened or read on a reload.
    """
    from retrieval_service.semantic import HybridRetriever

    catalogue = LiveCatalogue(
        photo_ids,
        int(manifest.get(HIGH_WATER_KEY, 0)),
        shard=shard,
        shard_count=shard_count,
        assignment=(manifest.get("shards") or {}).get("assignment", BY_INDEX),
        attributes=attributes,
    )
    replayed = log_replay.replay(catalogue)
    if replayed:
        logger.info("catalogue log replayed", extra={"changes": replayed, "seq": catalogue.seq})
    view = LiveView(catalogue)
    wrapped: dict[str, Retriever] = {"keyword": LiveKeywordRetriever(retrievers["keyword"], view)}
    if "clip" in retrievers:
        wrapped["clip"] = LiveClipRetriever(retrievers["clip"], view)
        hybrid = retrievers["hybrid"]
        wrapped["hybrid"] = HybridRetriever(
            wrapped["keyword"],
            wrapped["clip"],
            method=hybrid.method,
            rrf_k=hybrid.rrf_k,
            weights=hybrid.weights,
            depth=hybrid.depth,
        )
    return wrapped, view


class LogTailer:
    """Polls the log every ``poll_s`` and applies new changes to the served state's view.

    Reads and segment updates run on the tailer's own thread; a store that fails is logged and
    read again at the next poll (:class:`~imgsearch.polling.Poller`).
    """

    def __init__(self, holder, location: dict, poll_s: float, log_replay: LogReplay | None = None):
        self.holder = holder
        self.log_replay = log_replay
        self.location = location
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="catalog-log")
        self.store = None
        self.poller = Poller(self.step, poll_s, logger, "catalogue log unreadable")

    def _poll(self, catalogue: LiveCatalogue) -> int:
        if self.store is None:
            self.store = open_store(**self.location)
        try:
            return catch_up(catalogue, CatalogLog(self.store))
        except Exception:
            self.store.close()
            self.store = None
            raise

    async def step(self) -> None:
        """Apply the log's new changes to the served state's view (on the tailer's thread)."""
        view = getattr(self.holder.state, "live", None)
        if view is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self.executor, self._poll, view.catalogue)

    def start(self) -> None:
        self.poller.start()

    async def close(self) -> None:
        if self.log_replay is not None:
            self.log_replay.close()
        await self.poller.close()
        store, self.store = self.store, None  # a second close has nothing left to do
        if store is not None:
            self.executor.submit(store.close).result()
            self.executor.shutdown(wait=False)
