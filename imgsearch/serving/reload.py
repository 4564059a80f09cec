"""The serving state of one server, swapped atomically when a new artifact set is loaded."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

StateT = TypeVar("StateT")


class Reloadable(Generic[StateT]):
    """Holds the serving state (models + artifact version) and swaps it atomically.

    Handlers read ``holder.state`` once per request and use only that object, so a request
    never mixes two artifact versions; a swap is a single reference assignment. Loads are
    serialised: each one loads the folder it was given and reports the state it replaced.

    Parameters
    ----------
    loader:
        Builds a state from an artifact path (run off the event loop).
    path:
        What an argument-less :meth:`load` loads (the server's configured artifacts).
    """

    def __init__(self, loader: Callable[[str], StateT], path: str = ""):
        self._loader = loader
        self.path = path
        self.state: StateT | None = None
        # Why no state is served yet, beyond loading (e.g. a store the load waits for).
        self.waiting_for = ""
        self._lock = asyncio.Lock()

    def wait_for(self, reason: str) -> None:
        """Say why the load waits ("" once it no longer does); callable from any thread."""
        self.waiting_for = reason

    async def load(self, path: str | None = None) -> StateT:
        """Load ``path`` (default: the configured one) off the event loop, then swap it in."""
        return (await self.swap(path))[1]

    async def swap(self, path: str | None = None) -> tuple[StateT | None, StateT]:
        """Like :meth:`load`; returns (the state replaced, the new state)."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            new_state = await loop.run_in_executor(None, self._loader, path or self.path)
            previous, self.state = self.state, new_state
            return previous, new_state
