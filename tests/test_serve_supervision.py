"""`serve all` with the real CLI: children die with it and never show its secrets."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.client import wait_for_serving
from tests.test_cli import free_ports

GRACE_S = 1
PASSWORD = "pw-that-must-not-show-4417"


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after its ')'.
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def port_free(port: int) -> bool:
    """Whether a server could listen on ``port`` now (as gRPC does, with SO_REUSEADDR, so
    that connections closing in TIME_WAIT do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
    return True


def serve_all(root, ports: list[int]) -> subprocess.Popen:
    gateway, retrieval, ranking, *admin = ports
    env = {
        **os.environ,
        "IMGSEARCH_GRACE_S": str(GRACE_S),
        # A store nobody answers: the servers start without it, and its password is a secret.
        "IMGSEARCH_CONVERSIONS_DSN": f"postgresql://imgsearch:{PASSWORD}@127.0.0.1:1/x",
    }
    command = [sys.executable, "-m", "imgsearch_tools.cli", "serve", "all"]
    command += ["--artifacts", str(root), "--log-level", "WARNING"]
    for flag, port in zip(
        (
            "--gateway-port",
            "--retrieval-port",
            "--ranking-port",
            "--gateway-admin-port",
            "--retrieval-admin-port",
            "--ranking-admin-port",
        ),
        (gateway, retrieval, ranking, *admin),
    ):
        command += [flag, str(port)]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; Linux prctl")
def test_after_kill_9_of_serve_all_its_children_exit_and_a_new_one_binds(artifact_root):
    ports = free_ports(6)
    parent = serve_all(artifact_root, ports)
    second = None
    children: list[int] = []
    try:
        for port in ports[:3]:
            wait_for_serving(f"127.0.0.1:{port}", timeout=180)
        children = children_of(parent.pid)
        assert len(children) == 3
        for child in children:
            assert PASSWORD not in Path(f"/proc/{child}/cmdline").read_text()
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        killed_at = time.monotonic()
        while any(alive(c) for c in children) and time.monotonic() - killed_at < GRACE_S + 2:
            time.sleep(0.05)
        assert not any(alive(c) for c in children), "a child outlived its grace period + 2 s"
        while not all(port_free(p) for p in ports) and time.monotonic() - killed_at < 2:
            time.sleep(0.05)
        assert all(port_free(p) for p in ports), "ports still held 2 s after kill -9"
        second = serve_all(artifact_root, ports)
        wait_for_serving(f"127.0.0.1:{ports[0]}", timeout=180)
        assert second.poll() is None
    finally:
        for process in (parent, second):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
        for child in children:  # whatever outlived the parent is not left behind
            if alive(child):
                os.kill(child, signal.SIGKILL)


def test_secrets_go_to_children_by_environment_not_command_line():
    from imgsearch.config import GatewayConfig, RankingConfig
    from imgsearch_tools.serve import serve_command, serve_environment

    dsn = f"postgresql://imgsearch:{PASSWORD}@db.internal/imgsearch"
    gateway = GatewayConfig(conversions_dsn=dsn)
    ranking = RankingConfig(conversions_dsn=dsn)
    for name, config in (("gateway", gateway), ("ranking", ranking)):
        assert not any(PASSWORD in part for part in serve_command(name, config))
    assert serve_environment(gateway, ranking)["IMGSEARCH_CONVERSIONS_DSN"] == dsn
