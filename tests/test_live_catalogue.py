"""The live catalogue through real servers: photos written through CatalogService are found by
keyword and CLIP search on every replica and shard, deletions are never returned (1,000 of
them while searches run included), retries are applied once, a bad batch writes nothing, a
build that folds the log keeps the servers' lists and shards, and servers SIGKILLed during
writes serve every acknowledged change once after a restart."""

from __future__ import annotations

import math
import time
import uuid

import grpc
import pandas as pd
import pytest

from gateway.client import wait_for_serving
from imgsearch.catalog.v1 import catalog_service_pb2 as cat_pb
from imgsearch.catalog_log import DELETE, CatalogLog, replay
from imgsearch.conversion_store import default_db_path, open_store
from imgsearch.retrieval.v1 import retrieval_service_pb2 as retr_pb
from imgsearch.search.v1 import search_service_pb2 as pb
from imgsearch.search.v1 import search_service_pb2_grpc as pb_grpc
from tests.conftest import CLIP_SET_TIMEOUT
from tests.live_stack import (
    SHARDS,
    SHARED_KEYWORD,
    LiveStack,
    Searcher,
    Writer,
    catalog,
    live_root,
    new_photo,
    retrieve,
    retrieve_ids,
    search_ids,
    strongest_keyword,
    wait_until,
)
from tests.test_cli import free_ports

pytestmark = CLIP_SET_TIMEOUT
CLIP = retr_pb.RETRIEVER_CLIP


@pytest.fixture(scope="module")
def live(loop_thread, clip_set, clip_data, tmp_path_factory):
    """The session's CLIP set (images, a tiny CLIP) resharded into 2 shards, served live."""
    stack = LiveStack(loop_thread, live_root(clip_set, tmp_path_factory.mktemp("live") / "root"))
    stack.data = clip_data
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def source(live):
    """A photo of the set with an image, and its strongest keyword."""
    return strongest_keyword(live.data, 3)


def test_a_written_photo_is_found_by_keyword_and_clip_on_replicas_and_shards(live, source):
    source_id, keyword = source
    channel, stub = catalog(live.gateways["replicas"].port)
    photo_id = f"live-{uuid.uuid4().hex[:8]}"
    with channel:
        reply = stub.UpsertPhotos(
            cat_pb.UpsertPhotosRequest(
                request_id=str(uuid.uuid4()),
                photos=[new_photo(live.data, source_id, photo_id, [("zebracorn", 95.0)])],
            ),
            timeout=60,
        )
    assert reply.sequence >= 1 and not reply.duplicate
    # Every replica applies it: the gateway's searches below may reach either.
    for replica in live.replicas:
        assert wait_until(
            lambda p=replica.port: (
                retrieve_ids(p, "zebracorn", retr_pb.RETRIEVER_KEYWORD) == [photo_id]
            )
        ), f"replica on port {replica.port}: not found by keyword"
    for name, gateway in live.gateways.items():
        port = gateway.port

        def by_keyword():
            return search_ids(port, "zebracorn", retr_pb.RETRIEVER_KEYWORD)[0] == [photo_id]

        assert wait_until(by_keyword), f"{name}: not found by keyword"

        # Filters test it by its record (photographer "live", 640x480: landscape). Every replica
        # learns the new photographer when it applies the change; until then (within the same
        # second) a replica answers that it does not know that photographer.
        def by_filter():
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                try:
                    filtered = pb_grpc.SearchServiceStub(channel).Search(
                        pb.SearchRequest(
                            query=keyword,
                            k=100,
                            retriever=CLIP,
                            ranker=1,
                            filter=retr_pb.PhotoFilter(
                                photographer_usernames=["live"],
                                orientation=retr_pb.ORIENTATION_LANDSCAPE,
                            ),
                        ),
                        timeout=30,
                    )
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
                    assert "unknown photographer 'live'" in exc.details(), exc
                    return False
            return [r.photo_id for r in filtered.results] == [photo_id]

        assert wait_until(by_filter), f"{name}: not found with a filter on its record"
        ids, scores = search_ids(port, keyword, CLIP, k=1000)
        # The same image: the same embedding, so the same CLIP score as its source.
        assert photo_id in ids and source_id in ids, name
        assert scores[ids.index(photo_id)] == pytest.approx(scores[ids.index(source_id)], abs=1e-5)


def test_feedback_takes_conversions_of_a_live_photo(live, source):
    source_id, _ = source
    channel, stub = catalog(live.gateways["replicas"].port)
    photo_id = f"live-{uuid.uuid4().hex[:8]}"
    with channel:
        stub.UpsertPhotos(
            cat_pb.UpsertPhotosRequest(
                request_id=str(uuid.uuid4()),
                photos=[new_photo(live.data, source_id, photo_id, [("griffinox", 95.0)])],
            ),
            timeout=60,
        )
    port = live.gateways["shards"].port
    assert wait_until(
        lambda: search_ids(port, "griffinox", retr_pb.RETRIEVER_KEYWORD)[0] == [photo_id]
    )
    # At once: the gateway that takes the conversion reads the log before rejecting a photo.
    # FeedbackService takes conversions of the live photo (the gateway read it from the log).
    from google.protobuf.timestamp_pb2 import Timestamp

    from imgsearch.feedback.v1 import feedback_service_pb2 as fb_pb
    from imgsearch.feedback.v1 import feedback_service_pb2_grpc as fb_grpc

    now = Timestamp()
    now.GetCurrentTime()
    event = fb_pb.ConversionEvent(
        event_id=str(uuid.uuid4()), user_id="u1", photo_id=photo_id, query="zebracorn"
    )
    event.converted_at.CopyFrom(now)
    with grpc.insecure_channel(f"127.0.0.1:{live.gateways['shards'].port}") as channel:
        logged = fb_grpc.FeedbackServiceStub(channel).LogConversions(
            fb_pb.LogConversionsRequest(events=[event]), timeout=10
        )
    assert logged.stored_count == 1, logged


def test_a_deleted_photo_is_never_returned_and_k_results_still_come_back(live, source):
    _, query = source
    port = live.gateways["shards"].port
    victim = search_ids(port, query, CLIP, k=20)[0][0]
    keywords = pd.read_csv(live.data / "keywords.tsv000", sep="\t")
    victim_keyword = keywords.loc[keywords["photo_id"] == victim, "keyword"].iloc[0]
    assert victim in search_ids(port, victim_keyword, retr_pb.RETRIEVER_KEYWORD, k=200)[0]
    channel, stub = catalog(port)
    with channel:
        stub.DeletePhotos(
            cat_pb.DeletePhotosRequest(
                request_id=str(uuid.uuid4()), photo_ids=[victim], reason="legal"
            ),
            timeout=10,
        )
        for name, gateway in live.gateways.items():
            for text, retriever, k in (
                (query, CLIP, 20),
                (victim_keyword, retr_pb.RETRIEVER_KEYWORD, 200),
            ):

                def gone():
                    found, _ = search_ids(gateway.port, text, retriever, k=k)
                    return victim not in found and (len(found) == k or k == 200)

                assert wait_until(gone), f"{name}: {victim} still returned"
        with pytest.raises(grpc.RpcError) as error:
            stub.GetPhoto(cat_pb.GetPhotoRequest(photo_id=victim), timeout=10)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_retry_is_applied_once_and_a_bad_batch_writes_nothing(live, source):
    source_id, _ = source
    port = live.gateways["replicas"].port
    channel, stub = catalog(port)
    request_id = str(uuid.uuid4())
    good = new_photo(live.data, source_id, "retry-photo", [("quokkaline", 80.0)])
    with channel:
        request = cat_pb.UpsertPhotosRequest(request_id=request_id, photos=[good])
        first = stub.UpsertPhotos(request, timeout=60)
        again = stub.UpsertPhotos(request, timeout=60)
        assert again.duplicate and again.sequence == first.sequence
        broken = cat_pb.PhotoRecord(
            photo_id="broken-photo",
            image=b"not an image",
            keywords=[cat_pb.KeywordConfidence(keyword="quokkaline", confidence=50)],
        )
        other = new_photo(live.data, source_id, "innocent-photo", [("quokkaline", 99.0)])
        with pytest.raises(grpc.RpcError) as error:
            stub.UpsertPhotos(
                cat_pb.UpsertPhotosRequest(request_id=str(uuid.uuid4()), photos=[other, broken]),
                timeout=60,
            )
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "photos[1].image" in error.value.details()
        assert "broken-photo" in error.value.details()
        with pytest.raises(grpc.RpcError) as error:
            stub.UpsertPhotos(
                cat_pb.UpsertPhotosRequest(request_id=request_id, photos=[other]), timeout=60
            )
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request_id" in error.value.details()
        got = stub.GetPhoto(cat_pb.GetPhotoRequest(photo_id="retry-photo"), timeout=10)
        assert got.sequence == first.sequence and got.photo.keywords[0].keyword == "quokkaline"
    assert wait_until(
        lambda: search_ids(port, "quokkaline", retr_pb.RETRIEVER_KEYWORD)[0] == ["retry-photo"]
    )
    time.sleep(0.5)  # several polls: the refused batch's photo would have shown by now
    assert search_ids(port, "quokkaline", retr_pb.RETRIEVER_KEYWORD)[0] == ["retry-photo"]


def test_the_cli_adds_reads_ingests_and_takes_down_photos(live, source, tmp_path, capsys):
    from imgsearch_tools.cli import main

    source_id, _ = source
    port = live.gateways["replicas"].port
    target = ["--target", f"127.0.0.1:{port}"]
    image = live.data / "images" / f"{source_id}.jpg"
    add = ["catalog", "add", "cli-photo", "--image", str(image), "--keyword", "clicat=70"]
    assert main([*add, *target]) == 0
    assert main(["catalog", "get", "cli-photo", *target]) == 0
    assert '"clicat"' in capsys.readouterr().out
    folder = tmp_path / "new-photos"
    (folder / "images").mkdir(parents=True)
    (folder / "photos.tsv").write_text("photo_id\tphoto_description\nin-1\tone\nin-2\ttwo\n")
    (folder / "keywords.tsv").write_text(
        "photo_id\tkeyword\tai_service_1_confidence\nin-1\tclicat\t90\nin-2\tclicat\t80\n"
    )
    for photo_id in ("in-1", "in-2"):
        (folder / "images" / f"{photo_id}.jpg").write_bytes(image.read_bytes())
    assert main(["ingest", str(folder), *target]) == 0
    assert main(["ingest", str(folder), *target]) == 0  # again: nothing written twice
    assert "already written earlier: 2" in capsys.readouterr().out
    assert wait_until(
        lambda: (
            search_ids(port, "clicat", retr_pb.RETRIEVER_KEYWORD)[0]
            == ["in-1", "in-2", "cli-photo"]
        )
    )
    assert main(["catalog", "delete", "in-1", "--reason", "test", *target]) == 0
    assert wait_until(
        lambda: search_ids(port, "clicat", retr_pb.RETRIEVER_KEYWORD)[0] == ["in-2", "cli-photo"]
    )
    assert main(["catalog", "get", "in-1", *target]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_a_write_is_embedded_by_another_target_when_the_first_is_down(live, source):
    """Shard 0 down (shard 1 embeds), a replica down (the other one embeds); with every
    target down the write is refused and nothing is written."""
    dead = f"127.0.0.1:{free_ports(1)[0]}"
    addrs = [f"{dead};127.0.0.1:{live.shards[1].port}", f"{dead},127.0.0.1:{live.replicas[0].port}"]
    gateways = [live.gateway(addr) for addr in [*addrs, dead]]
    port = live.replicas[0].port
    try:
        for n, gateway in enumerate(gateways):
            photo = new_photo(live.data, source[0], f"failover-{n}", [(f"failover{n}", 90.0)])
            channel, stub = catalog(gateway.port)
            with channel:
                request = cat_pb.UpsertPhotosRequest(request_id=str(uuid.uuid4()), photos=[photo])
                if gateway is gateways[-1]:
                    with pytest.raises(grpc.RpcError) as refused:
                        stub.UpsertPhotos(request, timeout=60)
                    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                    assert "nothing of this batch was written" in refused.value.details()
                    with pytest.raises(grpc.RpcError) as missing:
                        stub.GetPhoto(cat_pb.GetPhotoRequest(photo_id="failover-2"), timeout=10)
                    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
                    continue
                assert stub.UpsertPhotos(request, timeout=60).sequence >= 1, addrs[n]
            # Found by CLIP as well: its image was embedded, not left out.
            assert wait_until(
                lambda: (
                    f"failover-{n}" in retrieve_ids(port, f"failover{n}", CLIP, k=1000)
                    and retrieve_ids(port, f"failover{n}", retr_pb.RETRIEVER_KEYWORD)
                    == [photo.photo_id]
                )
            ), addrs[n]
    finally:
        for gateway in gateways:
            live.lt.run(gateway.stop(0))


LOAD_DELETIONS = 1000
DELETE_BATCH = 10
LOAD_KEYWORD = "loadvictim"
GONE_AFTER_S = 1.0


def test_no_search_returns_a_photo_deleted_a_second_before_it_started_under_load(live):
    """1,000 deletions while searches run on every replica and shard: no search that started
    1 s or more after a deletion was acknowledged returns that photo."""
    from imgsearch import artifacts
    from imgsearch.catalog_log import UPSERT, PhotoChange
    from retrieval_service.embedding import load_embeddings

    # 1,000 live photos, written to the log as the gateway writes them (each with the
    # embedding of a set photo, so CLIP finds them beside it).
    _, vectors = load_embeddings(artifacts.resolve(str(live.root)).file(artifacts.EMBEDDINGS))
    victims = [f"load-{i:04d}" for i in range(LOAD_DELETIONS)]
    record = {
        "keywords": [[LOAD_KEYWORD, 60.0]],
        "description": "",
        "photographer": "load",
        "width": 1,
        "height": 1,
        "views": 0,
        "downloads": 0,
    }
    with open_store(db=default_db_path(live.root)) as store:
        log = CatalogLog(store)
        for start in range(0, LOAD_DELETIONS, 250):
            changes = [
                PhotoChange(p, UPSERT, record, vectors[i % len(vectors)])
                for i, p in enumerate(victims[start : start + 250], start)
            ]
            log.append(str(uuid.uuid4()), str(uuid.uuid4()), changes)
    ports = [s.port for s in (*live.replicas, *live.shards)]

    def all_visible():
        whole = [retrieve_ids(p, LOAD_KEYWORD, retr_pb.RETRIEVER_KEYWORD, k=1000) for p in ports]
        return all(len(ids) == LOAD_DELETIONS for ids in whole[:2]) and (
            sorted(whole[2] + whole[3]) == victims
        )

    assert wait_until(all_visible, within=60)
    searches = [
        (LOAD_KEYWORD, retr_pb.RETRIEVER_KEYWORD, 1000),
        (f"a {LOAD_KEYWORD} picture", CLIP, 200),
    ]
    searchers = [Searcher(ports, searches) for _ in range(3)]
    acked: dict[str, float] = {}
    channel, stub = catalog(live.gateways["replicas"].port)
    began = time.monotonic()
    try:
        for searcher in searchers:
            searcher.start()
        with channel:
            for start in range(0, LOAD_DELETIONS, DELETE_BATCH):
                batch = victims[start : start + DELETE_BATCH]
                stub.DeletePhotos(
                    cat_pb.DeletePhotosRequest(
                        request_id=str(uuid.uuid4()), photo_ids=batch, reason="load"
                    ),
                    timeout=30,
                )
                now = time.monotonic()
                acked.update((p, now) for p in batch)
        last = max(acked.values())
        time.sleep(GONE_AFTER_S + 0.5)  # searches that start after every deadline passed
    finally:
        for searcher in searchers:
            searcher.done.set()
        for searcher in searchers:
            searcher.join(30)
    results = [r for s in searchers for r in s.results]
    late = [
        (port, photo_id)
        for port, started, ids in results
        for photo_id in ids
        if acked.get(photo_id, math.inf) <= started - GONE_AFTER_S
    ]
    during = [r for r in results if began <= r[1] <= last]
    print(
        f"{len(results)} searches in {time.monotonic() - began:.1f} s "
        f"({len(during) / max(last - began, 1e-9):.0f}/s while {LOAD_DELETIONS} photos were "
        f"deleted in {last - began:.1f} s); {sum(s.failures for s in searchers)} failed"
    )
    assert not late, f"{len(late)} results held a photo deleted >= 1 s before: {late[:5]}"
    # Each server was searched while deletions were in flight, and after the last deadline.
    for port in ports:
        assert any(r[0] == port for r in during), port
        assert any(r[0] == port and r[1] >= last + GONE_AFTER_S for r in results), port
    assert sum(s.failures for s in searchers) == 0


def test_a_build_that_folds_the_log_returns_the_live_servers_candidates(live, source):
    from types import SimpleNamespace

    from imgsearch import artifacts
    from imgsearch.config import RetrievalConfig
    from imgsearch_tools.build import build_artifacts
    from imgsearch_tools.build_inputs import read_catalog_changes
    from retrieval_service.keyword_index import KeywordIndex
    from retrieval_service.server import create_retrieval_server
    from retrieval_service.sharding import shard_dir

    source_id, keyword = source
    photos = pd.read_csv(live.data / "photos.tsv000", sep="\t")["photo_id"].tolist()
    port = live.gateways["replicas"].port
    channel, stub = catalog(port)
    with channel:
        # Taken down first: once the later write shows, the deletions are applied too.
        stub.DeletePhotos(
            cat_pb.DeletePhotosRequest(request_id=str(uuid.uuid4()), photo_ids=photos[30:33]),
            timeout=10,
        )
        stub.UpsertPhotos(
            cat_pb.UpsertPhotosRequest(
                request_id=str(uuid.uuid4()),
                photos=[
                    new_photo(live.data, photos[10 + i], f"fold-{i}", [(keyword, 40 + 10 * i)])
                    for i in range(4)
                ]
                # A set photo replaced: new keywords, another image.
                + [new_photo(live.data, photos[20], photos[21], [("foldmark", 70.0)])],
            ),
            timeout=60,
        )
    served = artifacts.resolve(str(live.root))
    fp32 = {"artifacts": str(served.path), "port": 0, "admin_port": 0, "live_catalogue": True}
    fp32 |= {"text_runtime": "torch-fp32", "image_worker_at_start": False}  # one text encoder
    before = live.lt.run(create_retrieval_server(RetrievalConfig(**fp32)))
    assert wait_until(
        lambda: retrieve_ids(before.port, "foldmark", retr_pb.RETRIEVER_KEYWORD) == [photos[21]]
    )
    folded = {f"fold-{i}" for i in range(4)} | {photos[21]}

    def live_owners() -> dict[str, int]:
        found = {}
        for shard, server in enumerate(live.shards):
            for query in (keyword, "foldmark"):
                ids = retrieve_ids(server.port, query, retr_pb.RETRIEVER_KEYWORD, k=1000)
                found.update((p, shard) for p in ids if p in folded)
        return found

    assert wait_until(lambda: set(live_owners()) == folded)
    owners = live_owners()
    queries = [
        keyword,
        "foldmark",
        *pd.read_csv(live.data / "keywords.tsv000", sep="\t")["keyword"].drop_duplicates().head(12),
    ]
    # CLIP queries that are no keyword: both servers encode them alike (a set's table of
    # keyword embeddings is computed in batches that differ from set to set).
    lists = {
        (q, retr_pb.RETRIEVER_KEYWORD): retrieve(before.port, q, retr_pb.RETRIEVER_KEYWORD)
        for q in queries
    }
    for q in queries:
        text = f"a {q} picture"
        lists[text, CLIP] = retrieve(before.port, text, CLIP)
    built = build_artifacts(
        str(live.data),
        str(live.root),
        [],  # no ranker: the check compares candidate lists, which no ranker orders
        clip_model="imgsearch-tiny-clip",
        clip_pretrained=str(served.path / artifacts.CLIP_DIR),
        show_progress=False,
        shards=SHARDS,  # the set the other tests' shard servers load next
        catalog_log=read_catalog_changes(SimpleNamespace(artifacts=str(live.root))),
    )
    after = live.lt.run(
        create_retrieval_server(RetrievalConfig(**{**fp32, "artifacts": str(built)}))
    )
    try:
        manifest = artifacts.resolve(str(built)).manifest
        assert manifest["catalog_log_seq"] >= 1
        for (query, retriever), expected in lists.items():
            got = retrieve(after.port, query, retriever)
            pairs = [list(zip(r.photo_ids, r.scores)) for r in (got, expected)]
            assert pairs[0] == pairs[1], (query, [p[-6:] for p in pairs])
        assert photos[30] not in retrieve_ids(after.port, photos[30], retr_pb.RETRIEVER_KEYWORD)
        # Each photo the build folded in stays on the shard that served it live.
        ids = pd.read_parquet(built / artifacts.CATALOGUE_DIR / "photos.parquet")["photo_id"]
        for shard in range(SHARDS):
            index = KeywordIndex.load(shard_dir(built, shard) / artifacts.KEYWORD_INDEX)
            held = {ids.iloc[i] for q in (keyword, "foldmark") for i in index.keyword_photos(q)[0]}
            assert held & folded == {p for p, s in owners.items() if s == shard}, shard
    finally:
        for service in (before, after):
            live.lt.run(service.stop(0))


def test_every_acknowledged_change_is_in_effect_once_after_sigkills(live, tmp_path):
    root = live.root
    servers = list(live.processes(tmp_path))  # a retrieval server and a gateway (ranking: ours)
    gateway = servers[-1]
    photos = pd.read_csv(live.data / "photos.tsv000", sep="\t")["photo_id"].tolist()
    writer = Writer(gateway.target, live.data, photos[:5], photos[-10:])
    try:
        for server in servers:
            server.start()
        for server in servers:
            wait_for_serving(server.target, timeout=180)
        writer.start()
        # Enough of a stream for the check: upserts, and deletions of set and live photos.
        assert wait_until(
            lambda: len(writer.acked_upserts) >= 4 and len(writer.acked_deletes) >= 2, within=60
        )
        for server in servers:  # mid-stream: some writes are in flight
            server.kill()
        writer.done.set()
        writer.join(10)
        assert writer.acked_deletes and writer.acked_upserts
        # Nothing is written after the restart: the retrieval server spawns no image tower.
        servers[0].env["IMGSEARCH_IMAGE_WORKER_AT_START"] = "0"
        for server in servers:
            server.start()
        for server in servers:
            wait_for_serving(server.target, timeout=180)

        with open_store(db=default_db_path(root)) as store:
            log = CatalogLog(store)
            final = replay(log.since(0, 1_000_000))
        live_ids = {p for p, c in final.items() if c.operation != DELETE}
        deleted = set(writer.acked_deletes)
        # Every acknowledged change is in the log (and unacknowledged ones may be too).
        assert set(writer.acked_upserts) <= set(final)
        assert all(final[p].operation == DELETE for p in deleted if p in final)
        assert deleted <= set(final)
        found, _ = search_ids(gateway.port, SHARED_KEYWORD, retr_pb.RETRIEVER_KEYWORD, k=1000)
        assert len(found) == len(set(found)), "a photo returned twice"
        written_live = {p for p in live_ids if p.startswith("kill-")}
        assert set(found) == written_live
        assert not deleted & set(found)
        every, _ = search_ids(gateway.port, "kill", CLIP, k=1000)
        assert len(every) == len(set(every)), "a photo returned twice by CLIP"
        assert not deleted & set(every)
        assert written_live <= set(every)
    finally:
        writer.done.set()
        for server in servers:
            server.stop()
