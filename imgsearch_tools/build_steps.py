"""The build's steps: seconds and peak memory of each, for the manifest and the progress log.

Peak memory is the process's high-water resident set (``ru_maxrss``, which counts what native
libraries allocate, unlike ``tracemalloc``) read after each step: ``peak_rss_mib`` is the peak
so far and ``raised_peak_mib`` how much this step raised it (0 when an earlier step had already
reached more). ``rss_mib`` is what stays resident when the step ends. ``cpu_seconds`` is the
CPU time (user + system, all threads) the process spent in the step: on a shared or niced machine
the wall seconds say how long it waited, the CPU seconds how much work it was.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# ru_maxrss is in KiB on Linux, in bytes on macOS.
_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024


def peak_rss_bytes() -> int:
    """This process's high-water resident set so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _MAXRSS_UNIT


def cpu_seconds() -> float:
    """CPU seconds (user + system, every thread) this process has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_bytes() -> int:
    """This process's resident set now, in bytes (0 where /proc is missing)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * resource.getpagesize()


def _mib(n_bytes: int) -> float:
    return round(n_bytes / 2**20, 1)


class BuildSteps:
    """Records each step's seconds and memory; :attr:`steps` goes into the manifest."""

    def __init__(self, log: Callable[[str], None] | None = None) -> None:
        self.steps: list[dict] = []
        self._log = log

    @contextmanager
    def step(self, name: str) -> Iterator[dict]:
        """Time ``name`` and record its memory; yields its entry, for details of its own."""
        peak_before = peak_rss_bytes()
        started, cpu_before = time.perf_counter(), cpu_seconds()
        entry: dict = {"step": name}
        yield entry
        peak = peak_rss_bytes()
        entry.update(
            seconds=round(time.perf_counter() - started, 2),
            cpu_seconds=round(cpu_seconds() - cpu_before, 2),
            peak_rss_mib=_mib(peak),
            raised_peak_mib=_mib(peak - peak_before),
            rss_mib=_mib(rss_bytes()),
        )
        self.steps.append(entry)
        if self._log:
            self._log(
                f"step {name}: {entry['seconds']}s ({entry['cpu_seconds']} CPU s), "
                f"peak RSS {entry['peak_rss_mib']} MiB "
                f"(+{entry['raised_peak_mib']}), resident {entry['rss_mib']} MiB"
            )
