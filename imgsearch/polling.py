"""A task on a server's event loop that runs one step every interval until it is closed.

The live catalogue's readers (a retrieval server's log tailer, a ranking server's live photos)
poll the change log this way: a step that fails is logged once, with its error, and tried
again at the next interval; the warning comes back only after a step has succeeded again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable


class Poller:
    """Runs ``step()`` every ``interval_s`` seconds on the running loop (:meth:`start`).

    Parameters
    ----------
    step:
        The coroutine function run at each interval.
    interval_s:
        Seconds between the end of one step and the start of the next.
    logger, failure:
        Where a failing step is reported, and what the warning says.
    """

    def __init__(
        self,
        step: Callable[[], Awaitable[object]],
        interval_s: float,
        logger: logging.Logger,
        failure: str,
    ):
        self.step = step
        self.interval_s = interval_s
        self.logger = logger
        self.failure = failure
        self.task: asyncio.Task | None = None
        self.failing = False

    async def run(self) -> None:
        while True:
            try:
                await self.step()
                self.failing = False
            except Exception as exc:  # noqa: BLE001 - a failing step is tried again next time
                if not self.failing:
                    self.logger.warning(self.failure, extra={"error": str(exc)})
                self.failing = True
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        """Start polling on the running loop."""
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def close(self) -> None:
        """Stop polling (waits for the step in progress to be cancelled)."""
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
