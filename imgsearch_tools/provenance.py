"""Where figures were measured: the machine's facts, its one-line description, the commit."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# The checkout this code runs from: its commit is the one that produced the figures.
CHECKOUT = Path(__file__).resolve().parents[1]


def current_commit(repo: str | Path = CHECKOUT) -> str:
    """Short commit of ``repo``'s HEAD, ``-dirty`` when tracked files differ from it.

    ``unknown`` outside a git checkout (an installed copy), which a committed page may not carry.
    """

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if changed else commit


def _proc_value(path: str, key: str) -> str:
    """The value after ``key:`` on the first matching line of a /proc file ('' if none)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def machine_facts(command: str = "") -> dict:
    """Platform, Python, CPUs (online and usable), CPU model, memory, GPU, load, date, command.

    Library versions that matter to a figure (grpcio for load, torch threads for evaluation)
    are added when the library is already imported, never imported here.
    """
    memory_kib = _proc_value("/proc/meminfo", "MemTotal").split(" ")[0]
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    facts = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "cpu_model": _proc_value("/proc/cpuinfo", "model name") or platform.processor() or "",
        "memory_gib": round(int(memory_kib) / 1024**2, 1) if memory_kib.isdigit() else None,
        "gpu": Path("/dev/nvidia0").exists(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": command,
    }
    if "grpc" in sys.modules:
        facts["grpcio"] = sys.modules["grpc"].__version__
    if "torch" in sys.modules:
        facts["torch_threads"] = sys.modules["torch"].get_num_threads()
    return facts


def machine_description(facts: dict | None = None) -> str:
    """One line naming the machine: usable CPUs and their model, memory, GPU or none."""
    facts = facts or machine_facts()
    memory = f"{facts['memory_gib']} GiB" if facts["memory_gib"] else "memory unknown"
    model = f" {facts['cpu_model']}" if facts["cpu_model"] else ""
    gpu = "a GPU" if facts["gpu"] else "no GPU"
    return f"{facts['usable_cpus']} vCPU{model}, {memory}, {gpu}"
