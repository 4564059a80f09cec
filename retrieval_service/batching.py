"""Micro-batching of query encodings: concurrent cache misses share one forward pass."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from imgsearch.admission import QUEUE_WAIT, SHED, DeadlineExpired

DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_WAIT_MS = 2.0
# An encoder that encodes one text in at most this much CPU (its recent average) is cheap: a
# text that finds the batcher idle is then better encoded by its caller's own job than handed
# to the encoder thread, which costs two thread hand-offs and up to max_wait_ms of waiting for
# texts that are not coming (tiny CLIP: about 0.6 ms; a ViT-B-32 text tower: several ms).
INLINE_MAX_CPU_MS = 2.0
_SMOOTHING = 0.1  # weight of the newest one-text encoding in the running average


@dataclass
class _Pending:
    text: str
    deadline: float | None  # time.monotonic() seconds; None: no deadline
    future: asyncio.Future
    queued_at: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """Collects texts submitted from the event loop and encodes them in batches off it.

    A batch starts when ``max_batch`` texts are waiting, or when the oldest waiting text has
    waited ``max_wait_ms``; while one batch is being encoded the next one fills up, so under
    load batches grow by themselves and the wait is only paid when the encoder is idle (light
    load: at most ``max_wait_ms`` added). Encoding runs on one dedicated thread, so the event
    loop keeps serving, and one batch at a time takes the encoder's core.

    A cheap encoder (:data:`INLINE_MAX_CPU_MS`) is not batched while the batcher is idle:
    :meth:`inline` says so, and the caller encodes the text in its own job with
    :meth:`encode_now`.

    Each text may carry a deadline; texts whose deadline has passed when their batch is formed
    are dropped with :class:`DeadlineExpired` instead of being encoded for a caller who is
    gone, and so are texts whose caller was cancelled. Identical texts in one batch are
    encoded once.

    How long each text waited for its batch goes to ``imgsearch_queue_wait_seconds`` (queue
    "encoder"), and each dropped one to ``imgsearch_shed_total`` (reason "expired").

    Parameters
    ----------
    encode:
        ``encode(texts) -> (len(texts), d)`` array; called on the encoder thread.
    max_batch:
        Texts per forward pass at most.
    max_wait_ms:
        How long the oldest text may wait for others before its batch starts (0: never wait).
    service:
        The service's name in those metrics.
    queue:
        The queue's name in ``imgsearch_queue_wait_seconds``.
    inline_max_cpu_ms:
        The CPU an encoding of one text may take on average for the encoder to count as
        cheap (:meth:`inline`).
    """

    def __init__(
        self,
        encode: Callable[[list[str]], np.ndarray],
        max_batch: int = DEFAULT_MAX_BATCH,
        max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
        service: str = "retrieval",
        queue: str = "encoder",
        inline_max_cpu_ms: float = INLINE_MAX_CPU_MS,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must not be negative, got {max_wait_ms}")
        self.encode = encode
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.queue = queue
        self.inline_max_cpu_ms = float(inline_max_cpu_ms)
        self._queue: deque[_Pending] = deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._waited = QUEUE_WAIT.labels(service, queue)
        self._dropped = SHED.labels(service, "expired")
        # Figures for metrics and tests.
        self.batches = 0
        self.encoded = 0
        self.expired = 0
        self.largest_batch = 0
        self.inlined = 0
        self.one_text_cpu_ms: float | None = None  # running average of one-text encodings

    def encode_now(self, texts: list[str]) -> np.ndarray:
        """``encode(texts)`` on the calling thread, timed in its CPU when it is one text."""
        started = time.thread_time()
        embeddings = self.encode(texts)
        if len(texts) == 1:
            cpu_ms = 1000.0 * (time.thread_time() - started)
            last = self.one_text_cpu_ms
            self.one_text_cpu_ms = cpu_ms if last is None else last + _SMOOTHING * (cpu_ms - last)
        return embeddings

    def inline(self) -> bool:
        """Whether a text is better encoded now by its caller (:meth:`encode_now`, counted
        in ``inlined``) than submitted: the encoder is cheap and no batch is waiting or
        running. Unknown until a text was encoded alone."""
        average = self.one_text_cpu_ms
        cheap = average is not None and average <= self.inline_max_cpu_ms
        if cheap and not self._queue and (self._worker is None or self._worker.done()):
            self.inlined += 1
            return True
        return False

    async def submit(self, text: str, deadline: float | None = None) -> np.ndarray:
        """Encode ``text`` in the next batch and return its embedding row.

        Parameters
        ----------
        text:
            The text to encode.
        deadline:
            ``time.monotonic()`` instant after which the result is of no use; None: none.

        Raises
        ------
        DeadlineExpired
            When the deadline passed before the text's batch was formed.
        """
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append(_Pending(text, deadline, future))
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._drain())
        elif self._arrived is not None:
            self._arrived.set()
        return await future

    def close(self) -> None:
        """Stop the encoder thread once its current batch is done."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def _drain(self) -> None:
        """Form and encode batches until the queue is empty, then end (restarted on demand)."""
        loop = asyncio.get_running_loop()
        self._arrived = asyncio.Event()  # bound to this loop
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.queue)
        while self._queue:
            await self._fill()
            batch = self._take()
            if not batch:
                continue
            texts = list(dict.fromkeys(item.text for item in batch))
            try:
                embeddings = await loop.run_in_executor(self._executor, self.encode_now, texts)
            except Exception as exc:  # noqa: BLE001 - every waiter of the batch gets the error
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            self.batches += 1
            self.encoded += len(texts)
            self.largest_batch = max(self.largest_batch, len(texts))
            row_of = {text: i for i, text in enumerate(texts)}
            for item in batch:
                if not item.future.done():
                    row = np.asarray(embeddings[row_of[item.text]], dtype=np.float32)
                    row.setflags(write=False)
                    item.future.set_result(row)

    async def _fill(self) -> None:
        """Wait until a batch is full or its oldest text has waited ``max_wait``."""
        while len(self._queue) < self.max_batch:
            remaining = self._queue[0].queued_at + self.max_wait - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    def _take(self) -> list[_Pending]:
        """Pop up to ``max_batch`` live texts; drop expired and abandoned ones on the way."""
        now = time.monotonic()
        batch: list[_Pending] = []
        while self._queue and len(batch) < self.max_batch:
            item = self._queue.popleft()
            self._waited.observe(now - item.queued_at)
            expired = item.deadline is not None and item.deadline <= now
            if item.future.done():  # the caller was cancelled (at its deadline, often)
                if expired:
                    self._dropped.inc()
                continue
            if expired:
                self.expired += 1
                self._dropped.inc()
                item.future.set_exception(
                    DeadlineExpired(
                        "dropped before encoding: the deadline passed "
                        f"{1000 * (now - item.deadline):.0f} ms ago"
                    )
                )
                continue
            batch.append(item)
        return batch
