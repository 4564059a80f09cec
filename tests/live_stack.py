"""The live catalogue's test servers and clients: one set served by 2 replicas and 2 shards,
photos to write, searches, and a writer that streams changes."""

from __future__ import annotations

import threading
import time
import uuid

import grpc

from imgsearch.catalog.v1 import catalog_service_pb2 as cat_pb
from imgsearch.catalog.v1 import catalog_service_pb2_grpc as cat_grpc
from imgsearch.retrieval.v1 import retrieval_service_pb2 as retr_pb
from imgsearch.search.v1 import search_service_pb2 as pb
from imgsearch.search.v1 import search_service_pb2_grpc as pb_grpc

SHARDS = 2
# Generous: the servers read the log every 100 ms; this only bounds a broken test.
VISIBLE_WITHIN_S = 10.0


def live_root(clip_set, root):
    """A root of its own serving the shared CLIP set, resharded into :data:`SHARDS`.

    The set's files are hard links (sets are never changed in place): the live tests write a
    log beside ``root`` and build new sets into it, never into the shared set.
    """
    import os
    import shutil

    from imgsearch_tools.reshard import reshard

    shutil.copytree(clip_set, root, symlinks=True, copy_function=os.link)
    reshard(str(root), SHARDS, show_progress=False)
    return root


class LiveStack:
    """One set served by 2 whole replicas and by 2 shards, a gateway over each, one ranking.

    The servers of each tier start together (loading off the event loop, in parallel).
    """

    def __init__(self, loop_thread, root):
        from gateway.server import create_gateway_server
        from imgsearch.config import GatewayConfig, RankingConfig, RetrievalConfig
        from ranking_service.server import create_ranking_server
        from retrieval_service.server import create_retrieval_server

        self.lt = loop_thread
        self.root = root
        common = {"artifacts": str(root), "port": 0, "admin_port": 0, "live_catalogue": True}
        # Only the servers a gateway asks to embed spawn an image-tower process.
        lazy = {**common, "image_worker_at_start": False}
        retrievals = [RetrievalConfig(**lazy) for _ in "ab"]
        retrievals += [RetrievalConfig(**lazy, shard=i) for i in range(SHARDS)]
        self.services = self._start(
            create_ranking_server(RankingConfig(**common)),
            *(create_retrieval_server(config) for config in retrievals),
        )
        ranking, *retrieval = self.services
        self.replicas, self.shards = retrieval[:2], retrieval[2:]
        self.ranking_addr = f"127.0.0.1:{ranking.port}"
        addrs = {
            "replicas": ",".join(f"127.0.0.1:{s.port}" for s in self.replicas),
            "shards": ";".join(f"127.0.0.1:{s.port}" for s in self.shards),
        }
        try:
            gateways = self._start(
                *(
                    create_gateway_server(
                        GatewayConfig(**common, retrieval_addr=a, ranking_addr=self.ranking_addr)
                    )
                    for a in addrs.values()
                )
            )
        except BaseException:
            self.stop()
            raise
        self.services += gateways
        self.gateways = dict(zip(addrs, gateways))

    def _start(self, *coros) -> list:
        import asyncio

        async def together():
            started = await asyncio.gather(*coros, return_exceptions=True)
            failed = [s for s in started if isinstance(s, BaseException)]
            if failed:
                for service in started:
                    if not isinstance(service, BaseException):
                        await service.stop(0)
                raise failed[0]
            return started

        return self.lt.run(together())

    def gateway(self, retrieval_addr: str):
        """Another gateway over ``retrieval_addr`` and this stack's ranking and log."""
        from gateway.server import create_gateway_server
        from imgsearch.config import GatewayConfig

        config = GatewayConfig(
            artifacts=str(self.root),
            port=0,
            admin_port=0,
            live_catalogue=True,
            retrieval_addr=retrieval_addr,
            ranking_addr=self.ranking_addr,
        )
        return self.lt.run(create_gateway_server(config))

    def processes(self, folder) -> tuple[object, object]:
        """A retrieval server of the whole set and a gateway over it as `imgsearch serve`
        processes (not started): (the retrieval server, the gateway). The retrieval server
        spawns its image tower's process at start, as it does by default, so that the tower
        starts while the server loads instead of after it, at the first write."""
        from tests.processes import ServerProcess

        retrieval = ServerProcess(
            "retrieval",
            self.root,
            folder / "retrieval.log",
            "--live-catalogue",
            env={"IMGSEARCH_IMAGE_WORKER_AT_START": "1"},
        )
        gateway = ServerProcess(
            "gateway",
            self.root,
            folder / "gateway.log",
            *("--retrieval-addr", retrieval.target, "--ranking-addr", self.ranking_addr),
            "--live-catalogue",
        )
        return retrieval, gateway

    def stop(self):
        for service in reversed(self.services):
            self.lt.run(service.stop(0))


def new_photo(data, source_id: str, photo_id: str, keywords) -> cat_pb.PhotoRecord:
    """A photo with another photo's image (so its CLIP embedding is that photo's)."""
    return cat_pb.PhotoRecord(
        photo_id=photo_id,
        image=(data / "images" / f"{source_id}.jpg").read_bytes(),
        keywords=[cat_pb.KeywordConfidence(keyword=k, confidence=c) for k, c in keywords],
        description=f"copy of {source_id}",
        photographer="live",
        width=640,
        height=480,
        views=10,
        downloads=1,
    )


def strongest_keyword(data, row: int) -> tuple[str, str]:
    """The photo in ``row`` of the data folder's photos table, and its strongest keyword."""
    import pandas as pd

    photo_id = pd.read_csv(data / "photos.tsv000", sep="\t")["photo_id"].iloc[row]
    keywords = pd.read_csv(data / "keywords.tsv000", sep="\t")
    own = keywords[keywords["photo_id"] == photo_id]
    return photo_id, own.sort_values("ai_service_1_confidence", ascending=False)["keyword"].iloc[0]


def catalog(port):
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return channel, cat_grpc.CatalogServiceStub(channel)


def search_ids(port, query, retriever, k=100) -> tuple[list[str], list[float]]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = pb_grpc.SearchServiceStub(channel).Search(
            pb.SearchRequest(query=query, k=k, candidates_k=k, retriever=retriever, ranker=1),
            timeout=30,
        )
    return [r.photo_id for r in reply.results], [r.retrieval_score for r in reply.results]


def wait_until(condition, within=VISIBLE_WITHIN_S):
    end = time.monotonic() + within
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def retrieve(port, query, retriever, k=50):
    from imgsearch.retrieval.v1 import retrieval_service_pb2_grpc as retr_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return retr_grpc.RetrievalServiceStub(channel).Retrieve(
            retr_pb.RetrieveRequest(query=query, candidates_k=k, retriever=retriever), timeout=30
        )


def retrieve_ids(port, query, retriever, k=50) -> list[str]:
    return list(retrieve(port, query, retriever, k).photo_ids)


SHARED_KEYWORD = "killstream"


class Writer(threading.Thread):
    """Writes photos and takes some down, one change per request, recording what was acked."""

    def __init__(self, target: str, data, sources: list[str], base_victims: list[str]):
        super().__init__(daemon=True)
        self.target = target
        self.data = data
        self.sources = sources
        self.base_victims = list(base_victims)
        self.acked_upserts: list[str] = []
        self.acked_deletes: list[str] = []
        self.failures = 0
        self.done = threading.Event()

    def run(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = cat_grpc.CatalogServiceStub(channel)
            n = 0
            while not self.done.is_set():
                n += 1
                try:
                    if n % 3 == 0 and (self.acked_upserts or self.base_victims):
                        victim = (
                            self.base_victims.pop()
                            if (n % 2 or not self.acked_upserts) and self.base_victims
                            else self.acked_upserts[n % len(self.acked_upserts)]
                        )
                        stub.DeletePhotos(
                            cat_pb.DeletePhotosRequest(
                                request_id=str(uuid.uuid4()), photo_ids=[victim], reason="test"
                            ),
                            timeout=5,
                        )
                        self.acked_deletes.append(victim)
                    else:
                        photo_id = f"kill-{n}-{uuid.uuid4().hex[:6]}"
                        source = self.sources[n % len(self.sources)]
                        photo = new_photo(
                            self.data, source, photo_id, [(SHARED_KEYWORD, 50.0), (photo_id, 90.0)]
                        )
                        stub.UpsertPhotos(
                            cat_pb.UpsertPhotosRequest(
                                request_id=str(uuid.uuid4()), photos=[photo]
                            ),
                            timeout=5,
                        )
                        self.acked_upserts.append(photo_id)
                except grpc.RpcError:
                    self.failures += 1
                    self.done.wait(0.05)


class Searcher(threading.Thread):
    """Searches retrieval servers round-robin until told to stop, recording when each search
    started and what it returned."""

    def __init__(self, ports: list[int], searches: list[tuple[str, int, int]]):
        super().__init__(daemon=True)
        self.ports = ports
        self.searches = searches
        self.done = threading.Event()
        # (server port, started at, photo ids returned)
        self.results: list[tuple[int, float, list[str]]] = []
        self.failures = 0

    def run(self) -> None:
        from imgsearch.retrieval.v1 import retrieval_service_pb2_grpc as retr_grpc

        channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for port in self.ports]
        stubs = [retr_grpc.RetrievalServiceStub(channel) for channel in channels]
        n = 0
        try:
            while not self.done.is_set():
                port, stub = self.ports[n % len(stubs)], stubs[n % len(stubs)]
                query, retriever, k = self.searches[(n // len(stubs)) % len(self.searches)]
                n += 1
                started = time.monotonic()
                try:
                    reply = stub.Retrieve(
                        retr_pb.RetrieveRequest(query=query, candidates_k=k, retriever=retriever),
                        timeout=10,
                    )
                except grpc.RpcError:
                    self.failures += 1
                    continue
                self.results.append((port, started, list(reply.photo_ids)))
        finally:
            for channel in channels:
                channel.close()
