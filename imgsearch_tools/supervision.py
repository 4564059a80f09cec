"""Child processes of `imgsearch serve all`: started tied to the parent, stopped together.

Each child runs in a session of its own (a Ctrl-C in the terminal reaches the parent, which
stops them in order), and asks the kernel for SIGTERM when the parent dies
(``PR_SET_PDEATHSIG``): killed with SIGKILL, by the OOM killer or a hard stop, the parent
cannot forward anything, and without it its children would keep serving and keep their
ports. SIGTERM gives each child its graceful stop (its grace period), after which its ports
are free for the next `serve all`.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


def _libc_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl()


def die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A ``preexec_fn`` that has the child get SIGTERM when ``parent_pid`` dies (Linux).

    Runs in the child between fork and exec (the setting survives exec). If the parent died
    before the call, the child ends itself at once rather than serve unsupervised.
    """

    def arrange() -> None:
        if _PRCTL is not None:
            _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGTERM)

    return arrange


def start_children(
    commands: dict[str, list[str]], env: dict[str, str] | None = None
) -> dict[str, subprocess.Popen]:
    """Start one process per command, each ended by the kernel if this process dies."""
    parent = os.getpid()
    return {
        name: subprocess.Popen(
            command, env=env, start_new_session=True, preexec_fn=die_with_parent(parent)
        )
        for name, command in commands.items()
    }


def supervise(children: dict[str, subprocess.Popen], grace: float = 10.0) -> int:
    """Wait for children; on SIGTERM/SIGINT forward SIGTERM and wait for clean exits."""
    stopping = {"flag": False}

    def forward(signum, frame):
        stopping["flag"] = True

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(
        signal.SIGHUP, lambda s, f: [c.send_signal(signal.SIGHUP) for c in children.values()]
    )
    try:
        while not stopping["flag"]:
            dead = {n: c.returncode for n, c in children.items() if c.poll() is not None}
            if dead:
                print(f"error: service exited: {dead}", file=sys.stderr)
                stopping["flag"] = True
                break
            time.sleep(0.2)
    finally:
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in children.values():
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    codes = [c.returncode for c in children.values()]
    return 0 if all(code == 0 for code in codes) else 1
