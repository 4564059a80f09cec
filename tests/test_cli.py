"""The real command line: build errors name file and line; `serve all` starts, serves, stops."""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from gateway.client import search, wait_for_serving


def imgsearch_here(*args: str, capsys) -> subprocess.CompletedProcess:
    """The command line run in this process, its exit status as the interpreter would set it.

    Seconds faster than a child (which imports gRPC, pandas and the models again): for the
    commands whose behaviour is their output and status, not the process itself.
    """
    from imgsearch_tools.cli import main

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        status = main(list(args))
    except SystemExit as exc:  # what Python does with it at the top of a process
        status = exc.code if isinstance(exc.code, int) or exc.code is None else 1
        if not isinstance(exc.code, int) and exc.code is not None:
            print(exc.code, file=sys.stderr)
    finally:  # `serve` sets up logging for its process: not for the tests after this one
        root.handlers[:] = handlers
        root.setLevel(level)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, status or 0, captured.out, captured.err)


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def copy_data(demo_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    return data


def test_build_rejects_a_missing_required_column_with_file_and_line(demo_data, tmp_path, capsys):
    data = copy_data(demo_data, tmp_path)
    shard = data / "photos.tsv000"
    lines = shard.read_text().splitlines()
    header = lines[0].split("\t")
    col = header.index("photo_image_url")
    rows = ["\t".join(f for i, f in enumerate(line.split("\t")) if i != col) for line in lines]
    shard.write_text("\n".join(rows) + "\n")
    out = str(tmp_path / "a")
    result = imgsearch_here("build", "--data", str(data), "--out", out, "--quiet", capsys=capsys)
    assert result.returncode != 0
    assert "photos.tsv000:1" in result.stderr
    assert "photo_image_url" in result.stderr
    assert not (tmp_path / "a" / "current").exists()


def test_build_rejects_a_broken_field_with_file_and_line(demo_data, tmp_path, capsys):
    data = copy_data(demo_data, tmp_path)
    shard = data / "photos.tsv000"
    lines = shard.read_text().splitlines()
    col = lines[0].split("\t").index("stats_views")
    fields = lines[5].split("\t")
    fields[col] = "lots"
    lines[5] = "\t".join(fields)
    shard.write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "a")
    result = imgsearch_here("build", "--data", str(data), "--out", out, "--quiet", capsys=capsys)
    assert result.returncode != 0
    assert "photos.tsv000:6" in result.stderr
    assert "stats_views" in result.stderr


def test_serve_all_reaches_serving_searches_and_exits_cleanly_on_sigterm(artifact_root, capsys):
    gateway, retrieval, ranking, *admin = free_ports(6)
    env = {**os.environ, "IMGSEARCH_LOG_FORMAT": "json"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "imgsearch_tools.cli",
            "serve",
            "all",
            "--artifacts",
            str(artifact_root),
            "--gateway-port",
            str(gateway),
            "--retrieval-port",
            str(retrieval),
            "--ranking-port",
            str(ranking),
            "--gateway-admin-port",
            str(admin[0]),
            "--retrieval-admin-port",
            str(admin[1]),
            "--ranking-admin-port",
            str(admin[2]),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for port in (retrieval, ranking, gateway):
            wait_for_serving(f"127.0.0.1:{port}", timeout=120)
        response = search(f"127.0.0.1:{gateway}", "blue", "someone", k=4)
        assert len(response.results) == 4
        assert all(r.photo.url for r in response.results)
        target = f"127.0.0.1:{gateway}"
        out = imgsearch_here("search", "blue", "--target", target, "-k", "3", capsys=capsys)
        assert out.returncode == 0, out.stderr
        assert "timings: retrieval" in out.stdout
        # Reload goes to the admin ports, each child's from the flags `serve all` passed on.
        targets = ",".join(f"127.0.0.1:{port}" for port in admin)
        out = imgsearch_here("reload", "--targets", targets, capsys=capsys)
        assert out.returncode == 0, out.stderr
        assert out.stdout.count(" -> ") == 3
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr[-2000:]
        assert "shutting down" in stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    # Nothing is left listening.
    time.sleep(0.2)
    for port in (gateway, retrieval, ranking, *admin):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0


def free_consecutive_ports(n: int) -> int:
    """A base port such that base .. base + n - 1 are all free now."""
    for _ in range(100):
        base = free_ports(1)[0]
        sockets = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no run of free ports")


def test_services_started_one_by_one_with_one_metrics_env_each_get_their_own_port(artifact_root):
    import urllib.request

    from imgsearch.config import METRICS_PORT_OFFSETS

    base = free_consecutive_ports(3)
    env = {**os.environ, "IMGSEARCH_METRICS_PORT": str(base), "IMGSEARCH_LOG_FORMAT": "json"}
    ports = dict(zip(("retrieval", "ranking", "gateway"), free_ports(3)))
    processes = {
        name: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "imgsearch_tools.cli",
                "serve",
                name,
                "--port",
                str(port),
                "--artifacts",
                str(artifact_root),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for name, port in ports.items()
    }
    try:
        for name, port in ports.items():
            wait_for_serving(f"127.0.0.1:{port}", timeout=120)
        for name, process in processes.items():
            assert process.poll() is None, (name, process.stderr.read()[-2000:])
            url = f"http://127.0.0.1:{base + METRICS_PORT_OFFSETS[name]}/metrics"
            with urllib.request.urlopen(url, timeout=10) as reply:
                text = reply.read().decode()
            # Each port is its own service's: the in-flight gauge carries that service only.
            services = set(re.findall(r'imgsearch_inflight_requests\{service="(\w+)"\}', text))
            assert services == {name}, (name, services)
    finally:
        for process in processes.values():
            process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()


def test_metrics_ports_are_the_same_alone_or_under_serve_all(monkeypatch):
    from imgsearch_tools.cli import build_parser
    from imgsearch_tools.serve import resolve_configs

    def ports(*argv) -> dict[str, int]:
        configs = resolve_configs(build_parser().parse_args(["serve", *argv]))
        return {name: config.metrics_port for name, config in configs.items()}

    assert ports("all") == {"gateway": 0, "retrieval": 0, "ranking": 0}
    monkeypatch.setenv("IMGSEARCH_METRICS_PORT", "9100")
    together = ports("all")
    assert together == {"gateway": 9100, "retrieval": 9101, "ranking": 9102}
    for name in together:
        assert ports(name)[name] == together[name]
    # The flag is the port of one service, and the base under `serve all`.
    assert ports("ranking", "--metrics-port", "9300")["ranking"] == 9300
    assert ports("all", "--metrics-port", "9300")["ranking"] == 9302
    monkeypatch.setenv("IMGSEARCH_RANKING_METRICS_PORT", "9999")
    assert ports("ranking")["ranking"] == 9999 and ports("all")["retrieval"] == 9101


def test_serve_refuses_a_missing_artifact_set(tmp_path, capsys):
    missing = str(tmp_path / "none")
    result = imgsearch_here(
        "serve", "retrieval", "--artifacts", missing, "--port", "0", capsys=capsys
    )
    assert result.returncode == 1
    assert "imgsearch build" in result.stderr


@pytest.mark.parametrize("argv", [["--help"], ["search", "--help"], ["build", "--help"]])
def test_help_works(argv, capsys):
    result = imgsearch_here(*argv, capsys=capsys)
    assert result.returncode == 0 and result.stdout.startswith("usage: ")


def test_train_publishes_tuned_rankers_as_a_new_version_sharing_the_rest(artifact_root, tmp_path):
    from imgsearch import artifacts
    from imgsearch_tools.retrain import retrain_rankers
    from ranking_service.server import load_ranking_state

    root = tmp_path / "root"
    shutil.copytree(artifact_root, root, symlinks=True)
    before = artifacts.resolve(root)
    als_dir = before.file(artifacts.RANKERS_DIR) / "als"
    old_bytes = {p: p.read_bytes() for p in als_dir.rglob("*") if p.is_file()}

    retrain_rankers(str(root), ["als"], tune=True, show_progress=False)
    after = artifacts.resolve(root)
    assert after.version != before.version
    assert after.manifest["parent_version"] == before.version
    assert "tuning" in after.manifest["rankers"]["als"]
    assert set(after.rankers) == set(before.rankers)
    # The keyword index is shared (same inode), the old set's ALS is untouched.
    assert (
        after.file(artifacts.KEYWORD_INDEX).stat().st_ino
        == before.file(artifacts.KEYWORD_INDEX).stat().st_ino
    )
    assert old_bytes
    for path, data in old_bytes.items():
        assert path.read_bytes() == data
    state = load_ranking_state(str(root))
    assert state.version == after.version and "als" in state.rankers


def test_train_refuses_a_folder_that_is_not_an_artifact_root(tmp_path, capsys):
    result = imgsearch_here("train", "--artifacts", str(tmp_path), "--quiet", capsys=capsys)
    assert result.returncode == 1
    assert "not an artifact root" in result.stderr


def test_demo_regenerates_data_made_by_an_older_generator(tmp_path, monkeypatch):
    import argparse

    from imgsearch_tools import commands, outputs
    from imgsearch_tools.demo_data import GENERATOR_VERSION

    builds = []
    monkeypatch.setattr(
        commands, "build_artifacts", lambda data, root, rankers, **kw: builds.append(1)
    )
    args = argparse.Namespace(
        data=str(tmp_path / "data"),
        artifacts=str(tmp_path / "artifacts"),
        photos=30,
        users=5,
        conversions=40,
        seed=0,
    )
    commands.ensure_demo(args)
    data = tmp_path / "data"
    assert outputs.read_marker(data, "demo-data")["generator"] == GENERATOR_VERSION
    assert (tmp_path / "data" / "labels.tsv000").exists() and len(builds) == 1

    from imgsearch import artifacts

    monkeypatch.setattr(artifacts, "resolve", lambda root: root)  # a set is published now
    commands.ensure_demo(args)  # up to date: nothing to do
    assert len(builds) == 1
    (tmp_path / "data" / "labels.tsv000").unlink()
    record = outputs.read_marker(data, "demo-data")
    stale = {**record, "generator": GENERATOR_VERSION - 1}
    outputs.write_marker(data, "demo-data", record["files"], stale, record["folders"])
    commands.ensure_demo(args)  # stale generator: new data, and a new set built from it
    assert (tmp_path / "data" / "labels.tsv000").exists() and len(builds) == 2


def test_encoder_settings_come_from_flags_then_environment(monkeypatch):
    from imgsearch.config import RetrievalConfig
    from imgsearch_tools.serve import add_serve_arguments, resolve_configs, serve_command

    monkeypatch.setenv("IMGSEARCH_ENCODE_BATCH", "8")
    monkeypatch.setenv("IMGSEARCH_ENCODE_WAIT_MS", "0.5")
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["all", "--encode-wait-ms", "3", "--text-runtime", "onnx-fp32"])
    retrieval = resolve_configs(args)["retrieval"]
    assert (retrieval.encode_batch, retrieval.encode_wait_ms) == (8, 3.0)
    assert retrieval.text_runtime == "onnx-fp32"
    command = serve_command("retrieval", retrieval)  # what `serve all` starts
    assert command[command.index("--encode-batch") + 1] == "8"
    assert command[command.index("--text-runtime") + 1] == "onnx-fp32"
    with pytest.raises(SystemExit):
        parser.parse_args(["all", "--text-runtime", "tensorrt"])
    monkeypatch.setenv("IMGSEARCH_ENCODE_BATCH", "0")
    with pytest.raises(SystemExit, match="encode batch must be at least 1"):
        RetrievalConfig()
    monkeypatch.setenv("IMGSEARCH_ENCODE_BATCH", "many")
    with pytest.raises(SystemExit, match="IMGSEARCH_ENCODE_BATCH='many' is not an integer"):
        RetrievalConfig()


def test_demo_keeps_and_can_replace_a_folder_marked_by_the_old_demo(tmp_path, monkeypatch):
    import argparse
    import json

    from imgsearch import artifacts
    from imgsearch_tools import commands, outputs
    from imgsearch_tools.demo_data import GENERATOR_VERSION, generate

    data = tmp_path / "data"
    generate(data, n_photos=30, n_users=5, n_conversions=40, show_progress=False)
    (data / outputs.MARKER).unlink()  # as `imgsearch demo` left it before output markers
    (data / ".complete").write_text(json.dumps({"generator": GENERATOR_VERSION}))
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    builds = []
    monkeypatch.setattr(
        commands, "build_artifacts", lambda data, root, rankers, **kw: builds.append(1)
    )
    monkeypatch.setattr(artifacts, "resolve", lambda root: root)
    args = argparse.Namespace(
        data=str(data), artifacts=str(tmp_path / "a"), photos=30, users=5, conversions=40, seed=0
    )
    commands.ensure_demo(args)  # up to date: reused as it is
    assert not builds
    assert all(path.read_bytes() == content for path, content in before.items())
    (data / ".complete").write_text(json.dumps({"generator": GENERATOR_VERSION - 1}))
    (data / outputs.MARKER).unlink()
    commands.ensure_demo(args)  # stale: its own files are replaced, without --force
    assert len(builds) == 1
    assert not (data / ".complete").exists()
    assert outputs.read_marker(data, "demo-data")["generator"] == GENERATOR_VERSION


def test_demo_serves_with_every_serve_setting(tmp_path, monkeypatch):
    from imgsearch_tools import commands
    from imgsearch_tools.serve import resolve_configs, serve_command

    monkeypatch.setenv("IMGSEARCH_MAX_CONNECTION_AGE_S", "30")
    configs = resolve_configs(commands.demo_serve_args(str(tmp_path / "artifacts")))
    for name, config in configs.items():
        assert config.artifacts == str(tmp_path / "artifacts")
        assert config.max_connection_age_s == 30.0
        command = serve_command(name, config, "WARNING")  # what `make run` starts
        assert command[command.index("--max-connection-age-s") + 1] == "30.0"


def test_the_demos_gateway_serves_the_page_in_its_own_process(tmp_path, monkeypatch):
    from imgsearch_tools import commands
    from imgsearch_tools.serve import resolve_configs, serve_command

    monkeypatch.setenv("IMGSEARCH_WEB_PORT", "8093")
    data = tmp_path / "data"
    configs = resolve_configs(commands.demo_serve_args(str(tmp_path / "artifacts"), str(data)))
    gateway = serve_command("gateway", configs["gateway"], "WARNING")
    assert gateway[gateway.index("--web-port") + 1] == "8093"
    assert gateway[gateway.index("--web-images") + 1] == str(data / "images")
    for name in ("retrieval", "ranking"):
        assert "--web-port" not in serve_command(name, configs[name], "WARNING")
    # Without the demo's data, `serve all` starts no door.
    plain = resolve_configs(commands.demo_serve_args(str(tmp_path / "artifacts")))["gateway"]
    assert plain.web_port == -1
