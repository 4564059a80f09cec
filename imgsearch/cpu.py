"""How busy the machine's CPUs are, and torch thread sizing for offline jobs from it."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager


def machine_busy_seconds(count_niced: bool = True) -> float | None:
    """CPU seconds every CPU of the machine has spent busy since boot (/proc/stat).

    ``count_niced=False`` leaves out the time of processes running at a positive niceness.
    None where /proc/stat is not available (not Linux).
    """
    try:
        with open("/proc/stat") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user..steal; guest time is already inside user
    if not count_niced:
        busy -= fields[1]
    return busy / os.sysconf("SC_CLK_TCK")


def autogroup_scheduling() -> bool:
    """Whether the kernel shares CPU between sessions first (``sched_autogroup_enabled``).

    Then niceness orders processes only within a session: a niced job started in another
    session takes as much CPU as one that is not niced.
    """
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as handle:
            return handle.read().strip() not in ("", "0")
    except OSError:
        return False


def cores_busy_elsewhere(window_s: float = 0.5, niceness: int | None = None) -> float:
    """Cores that other processes keep busy, measured now over ``window_s``.

    This process's own CPU time in the window is left out, so work it has just finished does
    not count (the load average would still count it for a minute). So is the time of niced
    processes when this process runs at ``niceness`` 0 or less (its own by default) and the
    kernel schedules by niceness across sessions (:func:`autogroup_scheduling` off): the
    scheduler gives them what it leaves, so they take no core from it. Falls back to the
    1-minute load average where /proc/stat is missing, and to 0 where that is missing too.
    """
    if niceness is None:
        niceness = os.nice(0) if hasattr(os, "nice") else 0
    count_niced = niceness > 0 or autogroup_scheduling()
    start_machine, start_self = machine_busy_seconds(count_niced), time.process_time()
    if start_machine is None:
        try:
            return os.getloadavg()[0]
        except OSError:
            return 0.0
    start = time.perf_counter()
    time.sleep(window_s)
    wall = time.perf_counter() - start
    machine = machine_busy_seconds(count_niced) - start_machine
    own = time.process_time() - start_self
    return max(0.0, (machine - own) / wall)


def auto_threads() -> int:
    """Torch intra-op threads for an offline job: the cores other processes leave idle.

    On a shared machine, intra-op threads beyond the idle cores spin-wait on each other: a
    tiny-CLIP training step measured 4-10x slower with 2 threads than with 1 while two other
    jobs ran on the 2 cores. Other processes' use is measured over half a second, leaving this
    process out: a 1-minute load average would count the work it has just done itself (eval
    trains the rankers right before CLIP) and halve CLIP's threads for nothing. At least 1.
    """
    cores = os.cpu_count() or 1
    return int(min(cores, max(1, round(cores - cores_busy_elsewhere() + 0.25))))


@contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run a block with ``threads`` torch intra-op threads, then restore the process's setting.

    Parameters
    ----------
    threads:
        Threads to use; None takes the idle cores (:func:`auto_threads`); 0 or less keeps the
        process's setting.

    Yields
    ------
    int
        The threads in use inside the block.
    """
    import torch

    previous = torch.get_num_threads()
    if threads is None:
        threads = auto_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
