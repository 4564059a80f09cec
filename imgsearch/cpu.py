"""How busy the machine's CPUs are, for sizing thread pools and for benchmark reports."""

from __future__ import annotations

import os
import time


def machine_busy_seconds() -> float | None:
    """CPU seconds every CPU of the machine has spent busy since boot (/proc/stat).

    None where /proc/stat is not available (not Linux).
    """
    try:
        with open("/proc/stat") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user..steal; guest time is already inside user
    return busy / os.sysconf("SC_CLK_TCK")


def cores_busy_elsewhere(window_s: float = 0.5) -> float:
    """Cores that other processes keep busy, measured now over ``window_s``.

    This process's own CPU time in the window is left out, so work it has just finished does
    not count (the load average would still count it for a minute). Falls back to the 1-minute
    load average where /proc/stat is missing, and to 0 where that is missing too.
    """
    start_machine, start_self = machine_busy_seconds(), time.process_time()
    if start_machine is None:
        try:
            return os.getloadavg()[0]
        except OSError:
            return 0.0
    start = time.perf_counter()
    time.sleep(window_s)
    wall = time.perf_counter() - start
    machine = machine_busy_seconds() - start_machine
    own = time.process_time() - start_self
    return max(0.0, (machine - own) / wall)
