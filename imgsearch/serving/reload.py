"""The serving state of one server, swapped atomically when a new artifact set is loaded."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import sys
from collections.abc import Callable
from functools import cache
from typing import Generic, TypeVar

StateT = TypeVar("StateT")


def settle_heap() -> None:
    """Collect the garbage there is now, then take every object still alive out of the cyclic
    collector's sight (``gc.freeze``); what an earlier call froze is let go first, so a
    replaced state's reference cycles are collected too.

    A server's state (the catalogue's tables, indexes, models) lives until the next swap, and
    each full collection walks every object the collector tracks, holding the GIL: at a million
    photos the retrieval server's state is 460,000 such objects, and a full collection in the
    middle of a load test stopped its event loop for 230-260 ms (the gateway's for 96-127).
    Frozen, a collection walks only what requests allocated since (retrieval's 25-37 ms).
    Then the memory freed so far goes back to the kernel (:func:`release_free_memory`).
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    release_free_memory()  # what the collection and the load freed


@cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Hand the memory loading freed back to the kernel now, not at some later ``free``.

    pyarrow's memory pool keeps what reading the tables freed, and glibc's heap its free
    pages (``malloc_trim(0)``). At a million photos the ranking server held 2.7 GiB resident
    after loading and 2.1 GiB with this (the pool gave back 635 MiB in 7-9 ms); the 1.3 GiB
    more that its first full collection under load released is not accounted for yet.
    """
    arrow = sys.modules.get("pyarrow")  # only if loading used it
    if arrow is not None:
        arrow.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class Reloadable(Generic[StateT]):
    """Holds the serving state (models + artifact version) and swaps it atomically.

    Handlers read ``holder.state`` once per request and use only that object, so a request
    never mixes two artifact versions; a swap is a single reference assignment. Loads are
    serialised: each one loads the folder it was given and reports the state it replaced.
    After each swap the process's heap is settled (:func:`settle_heap`): the new state is
    frozen out of the cyclic collector's walks.

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
            if previous is None:
                settle_heap()
            else:
                # Once the caller has let go of the state it replaced (next loop iteration).
                loop.call_soon(settle_heap)
            return previous, new_state
