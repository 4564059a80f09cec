"""Shared fixtures: a small generated catalogue, its artifact set, and real in-process servers."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

SMALL = {"n_photos": 400, "n_users": 80, "n_conversions": 6000, "seed": 7}


class LoopThread:
    """An asyncio loop in a background thread, so sync tests can drive grpc.aio servers."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """A small synthetic catalogue in the Unsplash Lite layout, without images (fast)."""
    from imgsearch_tools.demo_data import generate

    out = tmp_path_factory.mktemp("demo-data")
    generate(out, with_images=False, show_progress=False, **SMALL)
    return out


@pytest.fixture(scope="session")
def artifact_root(demo_data, tmp_path_factory) -> Path:
    """An artifact root with one published set: keyword index and none/popularity/ALS."""
    from imgsearch_tools.build import build_artifacts

    root = tmp_path_factory.mktemp("artifacts")
    build_artifacts(str(demo_data), str(root), ["none", "popularity", "als"], show_progress=False)
    return root


@pytest.fixture(scope="module")
def loop_thread():
    lt = LoopThread()
    yield lt
    lt.close()


class Stack:
    """Three real servers on ephemeral ports, started in-process."""

    def __init__(self, loop_thread: LoopThread, artifacts: Path, **gateway_overrides):
        from gateway.server import create_gateway_server
        from imgsearch.config import GatewayConfig, RankingConfig, RetrievalConfig
        from ranking_service.server import create_ranking_server
        from retrieval_service.server import create_retrieval_server

        self.lt = loop_thread
        self.artifacts = str(artifacts)
        self.retrieval = self.lt.run(
            create_retrieval_server(RetrievalConfig(artifacts=self.artifacts, port=0))
        )
        self.ranking = self.lt.run(
            create_ranking_server(RankingConfig(artifacts=self.artifacts, port=0))
        )
        self.gateway_config = GatewayConfig(
            artifacts=self.artifacts,
            port=0,
            retrieval_addr=f"127.0.0.1:{self.retrieval.port}",
            ranking_addr=f"127.0.0.1:{self.ranking.port}",
            **gateway_overrides,
        )
        self.gateway = self.lt.run(create_gateway_server(self.gateway_config))
        self.target = f"127.0.0.1:{self.gateway.port}"

    def restart_ranking(self):
        from imgsearch.config import RankingConfig
        from ranking_service.server import create_ranking_server

        self.ranking = self.lt.run(
            create_ranking_server(RankingConfig(artifacts=self.artifacts, port=self.ranking.port))
        )

    def stop(self):
        for service in (self.gateway, self.ranking, self.retrieval):
            self.lt.run(service.stop(0))


@pytest.fixture(scope="module")
def stack(loop_thread, artifact_root):
    s = Stack(loop_thread, artifact_root)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def catalogue(artifact_root):
    from imgsearch import artifacts
    from imgsearch.catalogue import Catalogue

    return Catalogue.load(artifacts.resolve(artifact_root).file(artifacts.CATALOGUE_DIR))
