"""A server as a child process (`imgsearch serve NAME`) that tests can SIGKILL and restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from tests.test_cli import free_ports


class ServerProcess:
    """One `imgsearch serve NAME` child process that can be SIGKILLed and started again."""

    def __init__(self, service: str, root, log_path, *flags: str, env: dict | None = None):
        self.port, admin_port = free_ports(2)
        self.target = f"127.0.0.1:{self.port}"
        self.command = [
            sys.executable,
            "-m",
            "imgsearch_tools.cli",
            "serve",
            service,
            "--artifacts",
            str(root),
            "--port",
            str(self.port),
            "--admin-port",
            str(admin_port),
            "--log-level",
            "WARNING",
            *flags,
        ]
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env
            )

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
