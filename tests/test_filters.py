"""Photo filters inside retrieval: every filter over gRPC, bad values, shards, an older set."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone

import grpc
import numpy as np
import pandas as pd
import pytest

from imgsearch.ranking.v1 import ranking_service_pb2 as rank_pb
from imgsearch.retrieval.v1 import retrieval_service_pb2 as retr_pb
from imgsearch.retrieval.v1 import retrieval_service_pb2_grpc as retr_grpc
from imgsearch.search.v1 import search_service_pb2 as pb
from imgsearch.search.v1 import search_service_pb2_grpc as pb_grpc
from tests.conftest import CLIP_SET_TIMEOUT, Stack
from tests.test_e2e import bad_request_field
from tests.test_shards import ShardedStack, answer

KEYWORD, CLIP, HYBRID = retr_pb.RETRIEVER_KEYWORD, retr_pb.RETRIEVER_CLIP, retr_pb.RETRIEVER_HYBRID
NONE, ALS = 1, 3
KINDS_MEASURED = ("independent", "correlated", "anti-correlated")
pytestmark = CLIP_SET_TIMEOUT


def timestamp(text: str):
    from google.protobuf.timestamp_pb2 import Timestamp

    stamp = Timestamp()
    stamp.FromDatetime(datetime.fromisoformat(text).replace(tzinfo=timezone.utc))
    return stamp


# ------------------------------------------------------------------- end to end over gRPC
@pytest.fixture(scope="module")
def filtered(loop_thread, clip_set):
    """The session's set with images, a tiny CLIP, 4 shards and ALS, served whole and
    sharded; yields (stack, catalogue)."""
    from imgsearch import artifacts
    from imgsearch.catalogue import Catalogue

    catalogue = Catalogue.load(artifacts.resolve(clip_set).file(artifacts.CATALOGUE_DIR))
    stack = ShardedStack(loop_thread, clip_set)
    yield stack, catalogue
    stack.stop()


def search(port: int, query: str, retriever: int, photo_filter=None, **extra):
    fields = {"k": 50, "candidates_k": 50, "ranker": NONE, **extra}
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return pb_grpc.SearchServiceStub(channel).Search(
            pb.SearchRequest(query=query, retriever=retriever, filter=photo_filter, **fields),
            timeout=30,
        )


def matching(catalogue, photo_filter) -> np.ndarray:
    """The filter's photos, computed from the catalogue tables directly."""
    photos = catalogue.photos
    keep = np.ones(len(photos), bool)
    w, h = photos["photo_width"].to_numpy(), photos["photo_height"].to_numpy()
    shape = {
        retr_pb.ORIENTATION_LANDSCAPE: w > h * 1.01,
        retr_pb.ORIENTATION_PORTRAIT: h > w * 1.01,
        retr_pb.ORIENTATION_SQUARE: np.abs(w - h) <= 0.01 * np.maximum(w, h),
    }
    if photo_filter.orientation:
        keep &= shape[photo_filter.orientation]
    if photo_filter.colors:
        colors = catalogue.colors
        keep &= np.isin(
            np.arange(len(photos)),
            colors[colors["color"].isin(list(photo_filter.colors))]["photo_idx"],
        )
    if photo_filter.photographer_usernames:
        keep &= (
            photos["photographer_username"]
            .isin(list(photo_filter.photographer_usernames))
            .to_numpy()
        )
    if photo_filter.HasField("featured"):
        keep &= photos["photo_featured"].to_numpy() == photo_filter.featured
    submitted = photos["photo_submitted_at"]
    if photo_filter.HasField("submitted_after"):
        keep &= (submitted >= photo_filter.submitted_after.ToDatetime()).to_numpy()
    if photo_filter.HasField("submitted_before"):
        keep &= (submitted < photo_filter.submitted_before.ToDatetime()).to_numpy()
    keep &= photos["stats_downloads"].to_numpy() >= photo_filter.min_downloads
    keep &= photos["stats_views"].to_numpy() >= photo_filter.min_views
    return keep


def filters(catalogue) -> dict[str, retr_pb.PhotoFilter]:
    photos = catalogue.photos
    names = photos["photographer_username"].value_counts().index[:2].tolist()
    middle = photos["photo_submitted_at"].sort_values().iloc[[80, 160]].dt.strftime("%Y-%m-%d")
    return {
        "landscape": retr_pb.PhotoFilter(orientation=retr_pb.ORIENTATION_LANDSCAPE),
        "portrait": retr_pb.PhotoFilter(orientation=retr_pb.ORIENTATION_PORTRAIT),
        "square": retr_pb.PhotoFilter(orientation=retr_pb.ORIENTATION_SQUARE),
        "red": retr_pb.PhotoFilter(colors=["red"]),
        "navy or pink": retr_pb.PhotoFilter(colors=["navy", "pink"]),
        "photographers": retr_pb.PhotoFilter(photographer_usernames=names),
        "featured": retr_pb.PhotoFilter(featured=True),
        "not featured": retr_pb.PhotoFilter(featured=False),
        "submitted": retr_pb.PhotoFilter(
            submitted_after=timestamp(middle.iloc[0]), submitted_before=timestamp(middle.iloc[1])
        ),
        "min downloads": retr_pb.PhotoFilter(
            min_downloads=int(photos["stats_downloads"].quantile(0.9))
        ),
        "min views": retr_pb.PhotoFilter(min_views=int(photos["stats_views"].quantile(0.7))),
        "combined": retr_pb.PhotoFilter(
            orientation=retr_pb.ORIENTATION_LANDSCAPE,
            colors=["beige", "navy"],
            min_views=int(photos["stats_views"].quantile(0.3)),
        ),
    }


FILTER_NAMES = [
    "landscape",
    "portrait",
    "square",
    "red",
    "navy or pink",
    "photographers",
    "featured",
    "not featured",
    "submitted",
    "min downloads",
    "min views",
    "combined",
]


@pytest.mark.parametrize("name", FILTER_NAMES)
def test_each_filter_returns_only_and_as_many_matching_photos(filtered, name):
    stack, catalogue = filtered
    photo_filter = filters(catalogue)[name]
    keep = matching(catalogue, photo_filter)
    assert 0 < keep.sum() < len(keep)
    index = {pid: i for i, pid in enumerate(catalogue.photos["photo_id"])}
    port = stack.gateway_whole.port
    # CLIP: exactly the unfiltered exact ranking's allowed photos, min(k, matching) of them.
    n_photos = len(keep)
    everything = search(port, "red circle", CLIP, k=n_photos, candidates_k=n_photos)
    expected = [r.photo_id for r in everything.results if keep[index[r.photo_id]]][:50]
    got = search(port, "red circle", CLIP, photo_filter)
    assert [r.photo_id for r in got.results] == expected
    assert len(expected) == min(50, int(keep.sum()))
    # Keyword: the keyword's allowed photos, from its filtered posting list.
    keyword = catalogue.keywords
    has_red = np.zeros(len(keep), bool)
    has_red[keyword[keyword["keyword"] == "red"]["photo_idx"]] = True
    got = search(port, "red", KEYWORD, photo_filter)
    assert all(keep[index[r.photo_id]] and has_red[index[r.photo_id]] for r in got.results)
    assert len(got.results) == min(50, int((keep & has_red).sum()))
    # Hybrid, and the same answers from 4 shards.
    for query, retriever in (("red circle", HYBRID), ("red", KEYWORD), ("snow", CLIP)):
        whole = search(port, query, retriever, photo_filter)
        assert all(keep[index[r.photo_id]] for r in whole.results)
        merged = search(stack.gateway_sharded.port, query, retriever, photo_filter)
        assert answer(merged) == answer(whole), (name, query)
    assert len(whole.results) == min(50, int(keep.sum()))


def test_an_empty_filter_restricts_nothing(filtered):
    stack, _ = filtered
    port = stack.gateway_whole.port
    plain = search(port, "red circle", HYBRID)
    empty = search(port, "red circle", HYBRID, retr_pb.PhotoFilter())
    assert answer(plain) == answer(empty)


def test_two_step_and_a_degraded_search_keep_the_filter(filtered):
    stack, catalogue = filtered
    photo_filter = filters(catalogue)["min views"]
    keep = matching(catalogue, photo_filter)
    index = {pid: i for i, pid in enumerate(catalogue.photos["photo_id"])}
    user = catalogue.users["anonymous_user_id"].iloc[0]
    ranker = rank_pb.RANKER_TWO_STEP
    port = stack.gateway_whole.port
    voted = search(port, "red", HYBRID, photo_filter, user_id=user, ranker=ranker, k=10)
    assert voted.ranker == ranker and not voted.degraded
    assert len(voted.results) == 10
    assert all(keep[index[r.photo_id]] for r in voted.results)
    # Ranking unreachable: the search degrades to retrieval order, still filtered.
    from gateway.server import create_gateway_server
    from imgsearch.config import GatewayConfig

    lonely = stack.lt.run(
        create_gateway_server(
            GatewayConfig(
                artifacts=stack.root,
                port=0,
                admin_port=0,
                retrieval_addr=f"127.0.0.1:{stack.whole.port}",
                ranking_addr="127.0.0.1:1",
            )
        )
    )
    stack.services.append(lonely)
    degraded = search(lonely.port, "red", HYBRID, photo_filter, user_id=user, ranker=ALS, k=10)
    assert degraded.degraded and len(degraded.results) == 10
    assert all(keep[index[r.photo_id]] for r in degraded.results)


BAD_FILTERS = [
    ({"orientation": 9}, "filter.orientation", "unknown value 9"),
    ({"colors": ["ultraviolet"]}, "filter.colors", "unknown colour 'ultraviolet'"),
    ({"colors": ["red"] * 1001}, "filter.colors", "at most 1000"),
    ({"photographer_usernames": ["nobody-here"]}, "filter.photographer_usernames", "nobody"),
    ({"min_downloads": -1}, "filter.min_downloads", "must not be negative"),
    ({"min_views": -5}, "filter.min_views", "must not be negative"),
    (
        {"submitted_after": "2019-01-01", "submitted_before": "2018-01-01"},
        "filter.submitted_before",
        "later than filter.submitted_after",
    ),
    (
        {"submitted_after": "2019-01-01", "submitted_before": "2019-01-01"},
        "filter.submitted_before",
        "later than",
    ),
    ({"submitted_after": 10**13}, "filter.submitted_after", "valid timestamp"),
    ({"submitted_before": -(10**12)}, "filter.submitted_before", "valid timestamp"),
    ({"photographer_usernames": ["x"] * 1001}, "filter.photographer_usernames", "at most 1000"),
]


def bad_filter(fields: dict) -> retr_pb.PhotoFilter:
    photo_filter = retr_pb.PhotoFilter()
    for name, value in fields.items():
        if name.startswith("submitted_"):
            stamp = getattr(photo_filter, name)
            if isinstance(value, int):
                stamp.seconds = value
            else:
                stamp.CopyFrom(timestamp(value))
        elif isinstance(value, list):
            getattr(photo_filter, name).extend(value)
        else:
            setattr(photo_filter, name, value)
    return photo_filter


@pytest.mark.parametrize("fields, field, message", BAD_FILTERS)
def test_a_bad_filter_is_refused_naming_its_field(filtered, fields, field, message):
    stack, _ = filtered
    photo_filter = bad_filter(fields)
    for port in (stack.gateway_whole.port, stack.gateway_sharded.port):
        with pytest.raises(grpc.RpcError) as caught:
            search(port, "red", HYBRID, photo_filter)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request_field(caught.value) == field
        assert message in caught.value.details()
    with grpc.insecure_channel(f"127.0.0.1:{stack.whole.port}") as channel:
        with pytest.raises(grpc.RpcError) as caught:
            retr_grpc.RetrievalServiceStub(channel).Retrieve(
                retr_pb.RetrieveRequest(query="red", filter=photo_filter), timeout=30
            )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_field(caught.value) == field


def test_a_set_built_before_filters_serves_unfiltered_and_refuses_filters(
    loop_thread, artifact_root, tmp_path
):
    """A set as builds wrote it before filters: no filter columns, no colours, no record."""
    from imgsearch import artifacts
    from imgsearch.catalogue import FILTER_PHOTO_COLUMNS, Catalogue

    source = artifacts.resolve(artifact_root).path
    old = tmp_path / "set"
    shutil.copytree(source, old)
    catalogue_dir = old / artifacts.CATALOGUE_DIR
    photos = pd.read_parquet(catalogue_dir / "photos.parquet")
    photos.drop(columns=list(FILTER_PHOTO_COLUMNS)).to_parquet(catalogue_dir / "photos.parquet")
    (catalogue_dir / "colors.parquet").unlink()
    manifest = json.loads((old / artifacts.MANIFEST).read_text())
    del manifest["filters"]
    (old / artifacts.MANIFEST).write_text(json.dumps(manifest))
    assert Catalogue.load(catalogue_dir).photos["photo_width"].eq(0).all()

    stack = Stack(loop_thread, old)
    port = stack.gateway.port
    try:
        plain = search(port, "red", KEYWORD)
        assert len(plain.results) > 0
        with pytest.raises(grpc.RpcError) as caught:
            search(port, "red", KEYWORD, retr_pb.PhotoFilter(colors=["red"]))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "built before photo filters" in caught.value.details()
        assert "rebuild" in caught.value.details()
    finally:
        stack.stop()


def test_an_older_copy_of_a_clip_set_refuses_each_filter_on_every_path(filtered, tmp_path):
    """Each filter field, through the gateway on each retriever and through Retrieve itself."""
    from imgsearch import artifacts

    stack, catalogue = filtered
    old = tmp_path / "set"
    shutil.copytree(artifacts.resolve(stack.root).path, old)
    (old / artifacts.CATALOGUE_DIR / "colors.parquet").unlink()
    manifest = json.loads((old / artifacts.MANIFEST).read_text())
    del manifest["filters"]
    (old / artifacts.MANIFEST).write_text(json.dumps(manifest))
    served = Stack(stack.lt, old)
    try:
        assert len(search(served.gateway.port, "red circle", HYBRID).results) == 50
        with grpc.insecure_channel(f"127.0.0.1:{served.retrieval.port}") as channel:
            retrieve = retr_grpc.RetrievalServiceStub(channel).Retrieve
            for name in FILTER_NAMES:
                photo_filter = filters(catalogue)[name]
                for retriever in (KEYWORD, CLIP, HYBRID):
                    with pytest.raises(grpc.RpcError) as caught:
                        search(served.gateway.port, "red", retriever, photo_filter)
                    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, name
                    assert "built before photo filters" in caught.value.details()
                with pytest.raises(grpc.RpcError) as caught:
                    retrieve(retr_pb.RetrieveRequest(query="red", filter=photo_filter), timeout=30)
                assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, name
    finally:
        served.stop()


def test_the_search_command_sends_its_filter_flags(filtered, capsys):
    from imgsearch_tools.cli import main

    stack, catalogue = filtered
    photo_filter = retr_pb.PhotoFilter(
        orientation=retr_pb.ORIENTATION_LANDSCAPE,
        colors=["red", "navy"],
        featured=False,
        submitted_after=timestamp("2016-01-01"),
        submitted_before=timestamp("2019-06-30T12:00:00"),
        min_views=100,
    )
    keep = matching(catalogue, photo_filter)
    index = {pid: i for i, pid in enumerate(catalogue.photos["photo_id"])}
    flags = ["--orientation", "landscape", "--color", "red", "--color", "navy", "--not-featured"]
    flags += ["--submitted-after", "2016-01-01", "--submitted-before", "2019-06-30T12:00:00"]
    flags += ["--min-views", "100", "--retriever", "clip", "--ranker", "none", "-k", "40"]
    target = f"127.0.0.1:{stack.gateway_whole.port}"
    assert main(["search", "red circle", "--target", target, "--json", *flags]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert len(results) == min(40, int(keep.sum()))
    assert all(keep[index[r["photo_id"]]] for r in results)
    # A bad value from the server, and a date the flag cannot read.
    assert main(["search", "red", "--target", target, "--color", "ultraviolet"]) == 1
    assert "filter.colors" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["search", "red", "--target", target, "--submitted-after", "last spring"])
    assert exited.value.code == 2
    assert "expected an ISO date" in capsys.readouterr().err


def test_bench_filters_measures_recall_and_completeness_per_selectivity(filtered, tmp_path):
    from imgsearch_tools.cli import main

    stack, _ = filtered
    out = tmp_path / "bench"
    args = ["bench-filters", "--artifacts", stack.root, "--out", str(out), "--qps", "0"]
    assert main([*args, "--queries", "8", "--selectivities", "0.5,0.05"]) == 0
    report = json.loads((out / "filters.json").read_text())
    rows = {(r["kind"], r["selectivity"]): r for r in report["recall"]}
    assert set(rows) == {(k, s) for k in KINDS_MEASURED for s in (0.5, 0.05)}
    for row in rows.values():
        # A Flat index: the filtered search is the exact one.
        assert row["recall_at_10"] == 1.0 and row["complete_share"] == 1.0
        assert abs(row["matched_share_mean"] - row["selectivity"]) < 0.05
    assert "| correlated | 0.05 |" in (out / "filters.md").read_text()


def test_bench_filters_serves_the_set_and_measures_the_servers_cpu_per_search(filtered, tmp_path):
    from imgsearch_tools.cli import main

    stack, _ = filtered
    out = tmp_path / "served"
    args = ["bench-filters", "--artifacts", stack.root, "--out", str(out), "--queries", "4"]
    args += ["--selectivities", "0.05", "--qps", "20", "--duration", "1.5", "--warmup", "0.3"]
    assert main([*args, "--rounds", "1"]) == 0
    served = json.loads((out / "filters.json").read_text())["served"]
    assert [run["label"] for run in served["runs"]] == ["unfiltered", "filter 0.05"]
    for run in served["runs"]:
        assert run["errors"] == 0 and run["achieved_qps"] > 0
        assert run["server_cpu_ms_per_search"] > 0  # three server processes did the work
    cpu = [run["server_cpu_ms_per_search"] for run in served["runs"]]
    assert served["added_server_cpu_ms"] == round(cpu[1] - cpu[0], 3)
    assert "server CPU per search" in (out / "filters.md").read_text()


def test_the_served_part_compares_filtered_and_unfiltered_rounds(filtered):
    import argparse

    from imgsearch.filters import PhotoAttributes
    from imgsearch_tools.bench.filters import served_overhead

    stack, catalogue = filtered
    attributes = PhotoAttributes.from_tables(catalogue.photos, catalogue.colors)
    # A light load: the servers share this process's one event loop with the load generator,
    # and the point is the report's shape and that every search answers, not a latency.
    settings = argparse.Namespace(
        qps=5.0, duration=2.0, warmup=0.2, rounds=1, seed=0, selectivities="0.05"
    )
    target = f"127.0.0.1:{stack.gateway_whole.port}"
    report = stack.lt.run(served_overhead(target, stack.root, attributes, settings))
    assert [run["label"] for run in report["runs"]] == ["unfiltered", "filter 0.05"]
    for run in report["runs"]:
        assert run["errors"] == 0 and run["degraded"] == 0 and run["achieved_qps"] > 0
    assert report["added_p99_ms"] == round(
        report["runs"][1]["p99_ms"] - report["runs"][0]["p99_ms"], 3
    )
