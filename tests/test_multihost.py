"""Many hosts on one machine: network namespaces, replicas and shards, one of each tier killed.

Every server runs in its own network namespace ("host") with one address on a private
bridge, itself inside a namespace of its own, so the test adds nothing to the machine's own
network: two retrieval shards with two replicas each, two ranking replicas and two gateways,
each started as ``ip netns exec HOST python -m imgsearch_tools.cli serve ...`` and listening
on its host's address only (its admin port on that host's own loopback). ``imgsearch bench``
runs on a client host and balances over both gateways while one replica of each tier is
killed and restarted: frozen (SIGSTOP) for a moment first, so that requests are in flight on
it when it dies (SIGKILL), as on a host that hangs and is then lost. Skipped (with the
reason) where namespaces cannot be made, unless ``CI=true``: then it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUBNET = "10.213.7"  # private; it exists only on the test's own bridge
PORTS = {"retrieval": 50052, "ranking": 50053, "gateway": 50051}
# host name -> (service, shard); addresses .2, .3, ... in this order.
HOSTS = {
    "r0a": ("retrieval", 0),
    "r0b": ("retrieval", 0),
    "r1a": ("retrieval", 1),
    "r1b": ("retrieval", 1),
    "ka": ("ranking", None),
    "kb": ("ranking", None),
    "ga": ("gateway", None),
    "gb": ("gateway", None),
    "client": (None, None),
}
KILLED = ("r0a", "ka", "ga")  # one replica of each tier
TIER_METHODS = ("Retrieve", "Rank", "Search")  # what each killed replica answers
LOAD_QPS = 40
KILL_LOAD_S = 15.0  # each kill waits for the load to reach its replica; the kills take ~2.5 s
RECOVERY_LOAD_S = 3.0
# Rounds of load after the restarts before a replica that takes none fails the test: gRPC
# retries a connection that failed after up to a few seconds (its reconnect backoff).
MAX_RECOVERY_ROUNDS = 10
FROZEN_S = 0.3  # at LOAD_QPS, about six requests wait on each replica when it dies


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def namespaces_unavailable() -> str:
    """Why this machine cannot make the test's hosts ("" when it can)."""
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"imgsearch-probe-{os.getpid()}"
    made = ip("netns", "add", probe)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    ip("netns", "del", probe)
    return ""


class Hosts:
    """Network namespaces joined by a bridge (in a namespace of its own), and their servers."""

    def __init__(self, log_dir: Path):
        self.prefix = f"imgsearch-{os.getpid()}"
        self.switch = f"{self.prefix}-switch"
        self.log_dir = log_dir
        self.address = {name: f"{SUBNET}.{i}" for i, name in enumerate(HOSTS, start=2)}
        self.made: list[str] = []
        self.procs: dict[str, subprocess.Popen] = {}
        self.starts: dict[str, int] = {}

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def _ip(self, *args: str) -> None:
        done = ip(*args)
        if done.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")

    def create(self) -> None:
        self._ip("netns", "add", self.switch)
        self.made.append(self.switch)
        self._ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        self._ip("-n", self.switch, "link", "set", "br0", "up")
        for i, host in enumerate(HOSTS):
            ns, port = self.ns(host), f"v{i}"
            self._ip("netns", "add", ns)
            self.made.append(ns)
            # Both ends are made inside their namespaces: nothing touches the machine's own.
            self._ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port,
                     "netns", self.switch)  # fmt: skip
            self._ip("-n", self.switch, "link", "set", port, "master", "br0")
            self._ip("-n", self.switch, "link", "set", port, "up")
            self._ip("-n", ns, "addr", "add", f"{self.address[host]}/24", "dev", "eth0")
            self._ip("-n", ns, "link", "set", "eth0", "up")
            self._ip("-n", ns, "link", "set", "lo", "up")

    def run(self, host: str, *args: str, **kwargs) -> subprocess.Popen:
        """``python ARGS`` on ``host`` (the repository's code, like the tests)."""
        command = ["ip", "netns", "exec", self.ns(host), sys.executable, *args]
        return subprocess.Popen(command, cwd=REPO, **kwargs)

    def target(self, host: str) -> str:
        return f"{self.address[host]}:{PORTS[HOSTS[host][0]]}"

    def serve(self, host: str, artifacts: str) -> None:
        """Start ``host``'s server (a fresh log file per start)."""
        service, shard = HOSTS[host]
        command = ["-m", "imgsearch_tools.cli", "serve", service, "--artifacts", artifacts,
                   "--host", self.address[host], "--port", str(PORTS[service])]  # fmt: skip
        if shard is not None:
            command += ["--shard", str(shard)]
        if service == "gateway":
            shards = [
                ",".join(self.target(h) for h, s in HOSTS.items() if s == ("retrieval", i))
                for i in (0, 1)
            ]
            ranking = ",".join(self.target(h) for h, s in HOSTS.items() if s[0] == "ranking")
            command += ["--retrieval-addr", ";".join(shards), "--ranking-addr", ranking]
            # The test's bridge is a private network of its own: no token is asked here.
            command += ["--insecure-public"]
        self.starts[host] = self.starts.get(host, 0) + 1
        log = open(self.log_path(host), "wb")
        env = {**os.environ, "IMGSEARCH_ACCESS_LOG": "1", "IMGSEARCH_METRICS_PORT": "0"}
        self.procs[host] = self.run(host, *command, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()

    def log_path(self, host: str, start: int | None = None) -> Path:
        return self.log_dir / f"{host}.{start or self.starts[host]}.log"

    def wait_serving(self, hosts: list[str], timeout: float = 120.0) -> None:
        """Poll the hosts' health from the client host until every one is SERVING."""
        for host in hosts:
            if self.procs[host].poll() is not None:
                raise RuntimeError(f"{host} exited: {self.log_path(host).read_text()[-2000:]}")
        code = (
            "import sys\nfrom gateway.client import wait_for_serving\n"
            "for target in sys.argv[2:]:\n    wait_for_serving(target, float(sys.argv[1]))\n"
        )
        targets = [self.target(h) for h in hosts]
        waiter = self.run("client", "-c", code, str(timeout), *targets, stderr=subprocess.PIPE)
        _, err = waiter.communicate(timeout=timeout + 30)
        if waiter.returncode != 0:
            raise RuntimeError(f"not SERVING: {err.decode()[-2000:]}")

    def kill(self, host: str) -> None:
        """Freeze ``host``'s server while requests reach it, then kill it."""
        proc = self.procs[host]
        proc.send_signal(signal.SIGSTOP)
        time.sleep(FROZEN_S)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def remove(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
        for ns in reversed(self.made):  # a namespace's veth end goes with it
            ip("netns", "del", ns)
        self.made.clear()


@pytest.fixture
def hosts(tmp_path):
    reason = namespaces_unavailable()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the multi-host test cannot run: {reason}")
        pytest.skip(reason)
    made = Hosts(tmp_path / "logs")
    made.log_dir.mkdir()
    try:
        made.create()
        yield made
    finally:
        made.remove()
    assert not [n for n in ip("netns", "list").stdout.split() if n.startswith(made.prefix)]


def served_ok(log: Path, method: str) -> int:
    """How many ``method`` RPCs a server's access log shows answered OK."""
    count = 0
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if (
            entry.get("msg") == "rpc"
            and entry.get("code") == "OK"
            and entry.get("method") == method
        ):
            count += 1
    return count


def start_bench(hosts: Hosts, root: Path, seconds: float, name: str) -> subprocess.Popen:
    """``imgsearch bench`` on the client host, over both gateways, for ``seconds``."""
    gateways = ",".join(hosts.target(h) for h in ("ga", "gb"))
    log = open(hosts.log_dir / f"{name}.log", "wb")
    bench = hosts.run(
        "client", "-m", "imgsearch_tools.cli", "bench", "--target", gateways,
        "--qps", str(LOAD_QPS), "--duration", str(seconds), "--warmup", "1",
        "--retriever", "keyword", "--ranker", "popularity", "--artifacts", str(root),
        "--no-in-process", "--json", str(hosts.log_dir / f"{name}.json"),
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()
    return bench


def bench_result(hosts: Hosts, bench: subprocess.Popen, seconds: float, name: str) -> dict:
    """The finished bench's result, after checking that no search failed or degraded."""
    bench.wait(timeout=seconds + 120)
    output = (hosts.log_dir / f"{name}.log").read_text()
    assert bench.returncode == 0, output[-3000:]
    result = json.loads((hosts.log_dir / f"{name}.json").read_text())["result"]
    assert result["sent"] >= LOAD_QPS * seconds * 0.9
    assert result["error_count"] == 0, (name, result["errors"])
    assert result["ok"] == result["completed"] == result["sent"]
    assert result["degraded"] == 0, (name, result["degraded_reasons"])
    return result


def load_reached(
    hosts: Hosts, bench: subprocess.Popen, host: str, method: str, timeout: float = 120.0
) -> None:
    """Wait until ``host`` has answered the bench's load (its start takes seconds, and a
    gateway balances over a replica only once its connection to it is ready)."""
    deadline = time.monotonic() + timeout
    while not served_ok(hosts.log_path(host), method):
        assert bench.poll() is None, f"the load ended before it reached {host}"
        assert time.monotonic() < deadline, f"no {method} reached {host}"
        time.sleep(0.1)


def restarted_and_serving(hosts: Hosts) -> bool:
    """Whether each killed replica's second start has answered its tier's method OK."""
    return all(
        served_ok(hosts.log_path(host, 2), method) > 0 for host, method in zip(KILLED, TIER_METHODS)
    )


def test_killing_one_replica_of_each_tier_under_load_fails_no_search(hosts, demo_data, tmp_path):
    from imgsearch_tools.build import build_artifacts

    root = tmp_path / "artifacts"
    build_artifacts(
        str(demo_data), str(root), ["none", "popularity"], show_progress=False, shards=2
    )
    servers = [h for h, (service, _) in HOSTS.items() if service]
    for host in servers:
        hosts.serve(host, str(root))
    hosts.wait_serving(servers)

    # Under load, one replica of each tier dies in turn and is started again at once.
    bench = start_bench(hosts, root, KILL_LOAD_S, "bench-kills")
    for host, method in zip(KILLED, TIER_METHODS):
        load_reached(hosts, bench, host, method)
        hosts.kill(host)
        hosts.serve(host, str(root))
        time.sleep(0.5)
    bench_result(hosts, bench, KILL_LOAD_S, "bench-kills")
    # However long the restarts took on this machine: once each replica is SERVING again,
    # the load that follows reaches it (gRPC reconnects with backoff, hence rounds) and still
    # no search fails or degrades.
    hosts.wait_serving(list(KILLED))
    rounds = 0
    while not restarted_and_serving(hosts):
        assert rounds < MAX_RECOVERY_ROUNDS, "a restarted replica took no traffic"
        name = f"bench-recovered-{rounds}"
        bench_result(hosts, start_bench(hosts, root, RECOVERY_LOAD_S, name), RECOVERY_LOAD_S, name)
        rounds += 1
    # Both gateways took searches.
    assert served_ok(hosts.log_path("gb"), "Search") > 0
