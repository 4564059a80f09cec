"""The services under test as child processes, and the CPU each one uses."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

from imgsearch.cpu import machine_busy_seconds
from imgsearch_tools.serve import SERVICES, serve_command, serve_environment

LOADGEN = "bench (load generator)"


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ServiceProcesses:
    """Retrieval, ranking and the gateway as three `imgsearch serve X` child processes.

    Separate processes (one GIL each, as `serve all` runs them) that can be killed and
    restarted one at a time; logs go to ``log_dir/<service>.log``. ``overrides`` maps a
    service name (or ``"all"``) to config settings (TLS files, say). With ``shards`` (2 or
    more, of a sharded set) retrieval is that many processes, ``retrieval-0``, ``retrieval-1``,
    ... (``--shard I`` each), and the gateway is given one target per shard.
    """

    def __init__(
        self,
        artifacts: str,
        log_dir: Path,
        host: str = "127.0.0.1",
        store: dict | None = None,
        overrides: dict[str, dict] | None = None,
        shards: int = 0,
    ):
        self.artifacts = artifacts
        self.store = store or {}  # conversions_db / conversions_dsn of every service
        self.overrides = overrides or {}
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        retrieval = [f"retrieval-{i}" for i in range(shards)] if shards > 1 else ["retrieval"]
        self.names = [*retrieval, *(n for n in SERVICES if n != "retrieval")]
        self.ports = {name: free_port(host) for name in self.names}
        self.admin_ports = {name: free_port(host) for name in self.names}
        self.procs: dict[str, subprocess.Popen] = {}

    def address(self, name: str) -> str:
        """HOST:PORT of a service's own API."""
        return f"{self.host}:{self.ports[name]}"

    def admin_address(self, name: str) -> str:
        """HOST:PORT of a service's admin port (AdminService and plaintext health)."""
        return f"{self.host}:{self.admin_ports[name]}"

    def command(self, name: str) -> list[str]:
        """The `imgsearch serve` command line of one service, on its own free port."""
        from imgsearch.config import GatewayConfig, RankingConfig, RetrievalConfig

        service, _, shard = name.partition("-")
        common = {
            "artifacts": self.artifacts,
            "host": self.host,
            "port": self.ports[name],
            "admin_host": self.host,
            "admin_port": self.admin_ports[name],
            **self.overrides.get("all", {}),
            **self.overrides.get(service, {}),
        }
        if service == "gateway":
            shards = [self.address(n) for n in self.names if n.startswith("retrieval")]
            config = GatewayConfig(
                **common,
                **self.store,
                retrieval_addr=";".join(shards),
                ranking_addr=self.address("ranking"),
            )
        elif service == "ranking":
            config = RankingConfig(**common, **self.store)
        else:
            shard = {"shard": int(shard)} if shard else {}
            config = RetrievalConfig(**common, **self.store, **shard)
        return serve_command(service, config, log_level="WARNING")

    def start(self, name: str) -> None:
        """Spawn one service (it loads its artifact set; see :meth:`wait_serving`)."""
        self.start_process(name, self.command(name))

    def start_process(self, name: str, command: list[str]) -> None:
        """Spawn ``command`` as ``name``: logged, stopped and CPU-metered like the services."""
        with open(self.log_dir / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # A PostgreSQL DSN (and its password) goes by environment, not command line.
                env=serve_environment(SimpleNamespace(**self.store)),
            )

    def wait_serving(self, name: str, timeout: float = 300.0) -> None:
        """Poll health until ``name`` is SERVING; fail early if its process died."""
        wait_process_serving(
            name,
            lambda: self.procs[name],
            self.admin_address(name),
            self.log_dir / (name + ".log"),
            timeout,
        )

    def start_all(self, timeout: float = 300.0) -> None:
        for name in self.names:
            self.start(name)
        for name in self.names:
            self.wait_serving(name, timeout)

    def stop(self, name: str, timeout: float = 20.0) -> int:
        """SIGTERM one service (graceful shutdown) and wait for its exit status."""
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        return self._wait(proc, timeout)

    @staticmethod
    def _wait(proc: subprocess.Popen, timeout: float) -> int:
        # One SIGTERM only: a second one may land after the server restored the default
        # handler on its way out and turn a clean exit into "killed by SIGTERM".
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return proc.returncode

    def stop_all(self, timeout: float = 20.0) -> dict[str, int]:
        """SIGTERM every service at once, then collect their exit statuses."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        return {name: self._wait(proc, timeout) for name, proc in self.procs.items()}

    def cpu_seconds(self) -> dict[str, float]:
        """User + system CPU seconds each running service has used so far."""
        return process_cpu_seconds(self.procs)


def wait_process_serving(name: str, proc, address: str, log: Path, timeout: float) -> None:
    """Poll health at ``address`` until SERVING; fail early if the process (``proc()``, the
    current one: it may be restarted meanwhile) died, naming its ``log``."""
    from gateway.client import wait_for_serving

    deadline = time.monotonic() + timeout
    while True:
        process = proc()
        if process.poll() is not None:
            raise RuntimeError(
                f"{name} exited with code {process.returncode} before serving; see {log}"
            )
        try:
            wait_for_serving(address, timeout=2.0)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise


def process_cpu_seconds(procs: dict[str, subprocess.Popen]) -> dict[str, float]:
    """User + system CPU seconds each running process has used so far, from ``/proc``.

    The processes' own accounting (all their threads), not the caller's: a load generator's
    CPU never counts here. A process that has exited is left out.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    used = {}
    for name, proc in procs.items():
        try:
            stat = Path(f"/proc/{proc.pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        used[name] = (int(fields[11]) + int(fields[12])) / ticks
    return used


class CpuMeter:
    """CPU share of each service (and of this process, the load generator) over a window."""

    def __init__(self, services: ServiceProcesses):
        self.services = services
        self.start()

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.cpu0 = self.services.cpu_seconds()
        self.self0 = time.process_time()
        self.machine0 = machine_busy_seconds()

    def used(self) -> tuple[dict[str, float], float]:
        """CPU seconds per process since :meth:`start`, and the wall seconds elapsed."""
        wall = max(1e-9, time.perf_counter() - self.t0)
        now = self.services.cpu_seconds()
        used = {name: now[name] - self.cpu0[name] for name in now if name in self.cpu0}
        used[LOADGEN] = time.process_time() - self.self0
        return used, wall

    def record(self, result: dict) -> None:
        """Add CPU % per process, CPU ms per search and the CPU-bound ceiling to ``result``.

        CPU time per search hardly moves when other work shares the machine, unlike
        latency; the ceiling is what the measured cost per search allows on this machine's
        CPUs if the four processes had them to themselves.
        """
        used, wall = self.used()
        if "loadgen_cpu_s" in result:  # a compiled load generator: its own process's time
            used[LOADGEN] = result["loadgen_cpu_s"]
        completed = max(1, result["completed"])
        per_search = {name: round(1000.0 * sec / completed, 3) for name, sec in used.items()}
        total = sum(per_search.values())
        result["cpu_percent"] = {name: round(100.0 * sec / wall, 1) for name, sec in used.items()}
        result["cpu_ms_per_search"] = {**per_search, "total": round(total, 3)}
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        result["cpu_bound_ceiling_qps"] = round(cpus * 1000.0 / total) if total else None
        busy = machine_busy_seconds()
        if busy is not None and self.machine0 is not None:
            # Cores kept busy by everything else on the machine while this scenario ran.
            others = (busy - self.machine0 - sum(used.values())) / wall
            result["other_processes_cores"] = round(max(0.0, others), 2)
