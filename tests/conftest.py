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


# The set with images and a tiny CLIP that the CLIP, shard and filter modules serve: the
# longest build of any fixture, so built once per session and only read (a test that changes
# a set changes a copy). Built in shards, it is served whole as well as sharded.
CLIP_SET_SHARDS = 4
# Its build takes minutes on a busy box: the modules that use it allow for it.
CLIP_SET_TIMEOUT = pytest.mark.timeout(900)


@pytest.fixture(scope="session")
def clip_data(tmp_path_factory) -> Path:
    """The data folder the CLIP set is built from: 300 photos with images (only read)."""
    from imgsearch_tools.demo_data import generate

    data = tmp_path_factory.mktemp("clip-data")
    generate(data, n_photos=300, n_users=40, n_conversions=4000, seed=3, show_progress=False)
    return data


@pytest.fixture(scope="session")
def clip_set(clip_data, tmp_path_factory) -> Path:
    """An artifact root: 300 photos with images, a tiny CLIP, none/popularity/ALS/clip_profile,
    4 retrieval shards."""
    from imgsearch_tools.build import build_artifacts

    root = tmp_path_factory.mktemp("clip-artifacts")
    build_artifacts(
        str(clip_data),
        str(root),
        ["none", "popularity", "als", "clip_profile"],
        clip_steps=20,
        show_progress=False,
        shards=CLIP_SET_SHARDS,
    )
    return root


@pytest.fixture(scope="module")
def loop_thread():
    lt = LoopThread()
    yield lt
    lt.close()


class Stack:
    """Three real servers on ephemeral ports (service and admin), started in-process.

    ``store`` sets where gateway and ranking keep logged conversions (``conversions_db`` or
    ``conversions_dsn``); by default the file beside the artifact root. ``stage_overrides``
    go to the retrieval and ranking configs (TLS settings, say), ``gateway_overrides`` to the
    gateway's.
    """

    def __init__(
        self,
        loop_thread: LoopThread,
        artifacts: Path,
        store: dict | None = None,
        stage_overrides: dict | None = None,
        **gateway_overrides,
    ):
        from gateway.server import create_gateway_server
        from imgsearch.config import GatewayConfig, RankingConfig, RetrievalConfig
        from ranking_service.server import create_ranking_server
        from retrieval_service.server import create_retrieval_server

        self.lt = loop_thread
        self.artifacts = str(artifacts)
        self.store = store or {}
        self.stage_overrides = {"admin_port": 0, **(stage_overrides or {})}
        self.retrieval = self.lt.run(
            create_retrieval_server(
                RetrievalConfig(artifacts=self.artifacts, port=0, **self.stage_overrides)
            )
        )
        self.ranking = self.lt.run(
            create_ranking_server(
                RankingConfig(
                    artifacts=self.artifacts, port=0, **self.store, **self.stage_overrides
                )
            )
        )
        self.gateway_config = GatewayConfig(
            artifacts=self.artifacts,
            port=0,
            retrieval_addr=f"127.0.0.1:{self.retrieval.port}",
            ranking_addr=f"127.0.0.1:{self.ranking.port}",
            **self.store,
            **{"admin_port": 0, **gateway_overrides},
        )
        self.gateway = self.lt.run(create_gateway_server(self.gateway_config))
        self.target = f"127.0.0.1:{self.gateway.port}"

    def restart_ranking(self):
        from imgsearch.config import RankingConfig
        from ranking_service.server import create_ranking_server

        self.ranking = self.lt.run(
            create_ranking_server(
                RankingConfig(
                    artifacts=self.artifacts,
                    port=self.ranking.port,
                    **self.store,
                    **self.stage_overrides,
                )
            )
        )

    def stop(self):
        for service in (self.gateway, self.ranking, self.retrieval):
            self.lt.run(service.stop(0))


@pytest.fixture(scope="module")
def stack(loop_thread, artifact_root):
    s = Stack(loop_thread, artifact_root)
    yield s
    s.stop()


def start_ranking_server(loop_thread: LoopThread, servicer) -> tuple:
    """A real gRPC server running a RankingService ``servicer`` on an ephemeral port."""
    import grpc

    from imgsearch.ranking.v1 import ranking_service_pb2_grpc as rank_grpc

    async def start():
        server = grpc.aio.server()
        rank_grpc.add_RankingServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    return loop_thread.run(start())


@pytest.fixture(scope="session")
def catalogue(artifact_root):
    from imgsearch import artifacts
    from imgsearch.catalogue import Catalogue

    return Catalogue.load(artifacts.resolve(artifact_root).file(artifacts.CATALOGUE_DIR))


# PostgreSQL: the conversion store's production backend. CI starts a server (.ci/run) and
# exports the DSN; elsewhere the tests that need it skip when none answers.
POSTGRES_DSN_ENV = "IMGSEARCH_TEST_POSTGRES_DSN"
DEFAULT_POSTGRES_DSN = "postgresql://imgsearch:imgsearch@127.0.0.1:5432/imgsearch_test"


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The DSN of a reachable PostgreSQL server; skips (fails under CI=true) when none is."""
    import os

    dsn = os.environ.get(POSTGRES_DSN_ENV, DEFAULT_POSTGRES_DSN)
    try:
        import psycopg

        psycopg.connect(dsn, connect_timeout=2).close()
    except Exception as exc:  # noqa: BLE001 - any reason means the same: no server to test
        reason = f"no PostgreSQL server for the conversion store tests ({POSTGRES_DSN_ENV}): {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return dsn


@pytest.fixture
def postgres_dsn(postgres_server) -> str:
    """A DSN whose tables live in a fresh schema of their own, dropped after the test."""
    import uuid

    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    schema = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    params = conninfo_to_dict(postgres_server)
    params["options"] = f"-c search_path={schema}"
    yield make_conninfo(**params)
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


# Test tiers (the markers registered in pyproject.toml): every test is `unit` unless its module
# starts imgsearch processes or builds and trains whole artifact sets (`e2e`); the longest
# modules and tests of either tier are also `slow`. `make test-fast` runs "unit and not slow".
E2E_MODULES = {
    "test_bare_chain",
    "test_bench",
    "test_bench_ingest",
    "test_bench_scale",
    "test_cli",
    "test_clip",
    "test_data_safety",
    "test_e2e_clip",
    "test_feedback_bench",
    "test_feedback_durability",
    "test_feedback_retrain",
    "test_filters",
    "test_fuzz",
    "test_go_load",
    "test_live_catalogue",
    "test_multihost",
    "test_ray_embedding",
    "test_selection",
    "test_serve_supervision",
    "test_shards",
    "test_text_encoder",
    "test_tier_cost",
    "test_browser",
}
SLOW_MODULES = {
    "test_bench_ingest",
    "test_bench_scale",
    "test_browser",
    "test_cli",
    "test_demo_images",
    "test_e2e_clip",
    "test_feedback_durability",
    "test_image_worker",
    "test_live_catalogue",
    "test_multihost",
    "test_ray_embedding",
    "test_selection_folds",
    "test_shard_recall",
    "test_shards",
    "test_text_encoder",
}
# Single long tests in otherwise quick modules, by name (parametrized ids included).
SLOW_TESTS = {
    "test_filter_pieces.py::test_filtered_vector_search_returns_min_k_allowed_photos",
    "test_filter_pieces.py::test_dominant_colours_are_computed_from_images_without_a_colors_table",
    "test_evaluation.py::test_models_are_fitted_on_the_training_part_only",
    "test_evaluation.py::test_the_report_pairs_stacked_with_the_best_single_ranker",
    "test_admission.py::test_a_deadline_the_stage_cannot_meet_is_refused_without_running",
    "test_deletion.py::test_a_retraining_leaves_out_a_deleted_users_events_from_the_catalogue",
    "test_demo_data.py::test_same_seed_gives_identical_files_and_another_seed_does_not",
    "test_demo_data.py::test_drawn_colour_and_scene_match_the_keywords",
    "test_serving.py::test_ranking_down_degrades_to_retrieval_order_then_recovers",
    "test_serving.py::test_saturated_gateway_sheds_load_with_resource_exhausted",
    "test_ranking_faults.py::test_tight_client_deadlines_do_not_open_the_breaker",
    "test_ranking_metrics.py::test_cores_busy_elsewhere_leaves_this_process_out",
    "test_ranking_faults.py::test_a_ranking_timeout_with_its_full_budget_opens_the_breaker",
    "test_ranking_faults.py::test_half_open_breaker_lets_exactly_one_probe_through",
    "test_access_control.py::test_refused_calls_to_invented_methods_add_no_metric_series",
    "test_api.py::test_the_command_prints_its_address_serves_and_stops_on_sigterm",
    "test_in_gateway.py::test_serve_gateway_with_a_web_port_prints_the_page_and_stops_on_sigterm",
    "test_serving.py::test_keepalive_pings_of_idle_clients_are_accepted",
    "test_serving.py::test_hot_reload_under_load_fails_no_request_and_switches_version",
    "test_deploy.py::test_each_kustomize_variant_renders_valid_manifests_that_match_the_code",
    "test_evaluation.py::test_cli_writes_json_markdown_and_png",
    "test_rankers.py::test_rankers_needing_embeddings_are_skipped_without",
    "test_rankers.py::test_training_tunes_on_validation_and_writes_a_loadable_artifact",
    "test_rankers.py::test_the_prior_is_validated_without_the_popularity_ranker",
}


def pytest_collection_modifyitems(config, items):
    """Give every test its tier marker (and `slow` where it is one of the long ones)."""
    for item in items:
        module = item.path.stem
        item.add_marker(pytest.mark.e2e if module in E2E_MODULES else pytest.mark.unit)
        name = f"{item.path.name}::{item.name.split('[')[0]}"
        if module in SLOW_MODULES or name in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
