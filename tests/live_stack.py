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


class LiveStack:
    """One set served by 2 whole replicas and by 2 shards, a gateway over each, one ranking."""

    def __init__(self, loop_thread, root):
        from gateway.server import create_gateway_server
        from imgsearch.config import GatewayConfig, RankingConfig, RetrievalConfig
        from ranking_service.server import create_ranking_server
        from retrieval_service.server import create_retrieval_server

        self.lt = loop_thread
        self.services = []
        common = {"artifacts": str(root), "port": 0, "admin_port": 0, "live_catalogue": True}

        def start(coro):
            service = loop_thread.run(coro)
            self.services.append(service)
            return service

        self.replicas = [start(create_retrieval_server(RetrievalConfig(**common))) for _ in "ab"]
        self.shards = [
            start(create_retrieval_server(RetrievalConfig(**common, shard=i)))
            for i in range(SHARDS)
        ]
        self.root = root
        ranking = start(create_ranking_server(RankingConfig(**common)))
        self.ranking_addr = ranking_addr = f"127.0.0.1:{ranking.port}"

        def gateway(addr):
            config = GatewayConfig(**common, retrieval_addr=addr, ranking_addr=ranking_addr)
            return start(create_gateway_server(config))

        self.gateways = {
            "replicas": gateway(",".join(f"127.0.0.1:{s.port}" for s in self.replicas)),
            "shards": gateway(";".join(f"127.0.0.1:{s.port}" for s in self.shards)),
        }

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
