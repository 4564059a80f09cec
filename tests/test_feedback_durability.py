"""Acknowledged means stored: LogConversions under load while the gateway is SIGKILLed."""

from __future__ import annotations

import random
import threading
import time

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from gateway.client import wait_for_serving
from imgsearch.conversion_store import open_store
from imgsearch.feedback.v1 import feedback_service_pb2 as pb
from imgsearch.feedback.v1 import feedback_service_pb2_grpc as pb_grpc
from tests.processes import ServerProcess

KILLS = 2
BATCH = 25


class Gateway(ServerProcess):
    """`imgsearch serve gateway` as a child process that can be killed and started again."""

    def __init__(self, artifacts, store_flags: list[str], log_path):
        super().__init__("gateway", artifacts, log_path, *store_flags)

    def start(self) -> None:
        super().start()
        wait_for_serving(self.target, timeout=60)


class Load:
    """Sends batches one after another; retries each batch (same ids) until acknowledged.

    Every batch also carries an event of an unknown photo, which must never be stored.
    """

    def __init__(self, target: str, photo_ids: list[str], seed: int):
        self.target = target
        self.photo_ids = photo_ids
        self.rng = random.Random(seed)
        self.sent: dict[str, tuple] = {}
        self.acknowledged: set[str] = set()
        self.failed_calls = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def batch(self, k: int) -> pb.LogConversionsRequest:
        events = []
        for j in range(BATCH):
            stamp = Timestamp()
            stamp.FromMicroseconds(1_700_000_000_000_000 + k * 1000 + j)
            event = pb.ConversionEvent(
                event_id=f"b{k}-{j}",
                user_id=f"user-{self.rng.randrange(50)}",
                photo_id=self.rng.choice(self.photo_ids),
                query="red",
                converted_at=stamp,
                country="FR",
            )
            self.sent[event.event_id] = (event.user_id, event.photo_id, stamp.ToMicroseconds())
            events.append(event)
        events.append(pb.ConversionEvent(event_id=f"b{k}-bad", user_id="u", photo_id="nope"))
        return pb.LogConversionsRequest(events=events)

    def run(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = pb_grpc.FeedbackServiceStub(channel)
            k = 0
            while not self.stop.is_set():
                request = self.batch(k)
                while True:  # the same batch until it is acknowledged, as a client would
                    try:
                        response = stub.LogConversions(request, timeout=2)
                        break
                    except grpc.RpcError:
                        self.failed_calls += 1
                        time.sleep(0.02)
                for result in response.results:
                    if result.status in (pb.EVENT_STATUS_STORED, pb.EVENT_STATUS_DUPLICATE):
                        self.acknowledged.add(result.event_id)
                k += 1


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_every_acknowledged_event_is_stored_exactly_once_across_sigkills(
    backend, artifact_root, catalogue, tmp_path, request
):
    if backend == "sqlite":
        location = {"db": tmp_path / "conversions.sqlite3"}
        flags = ["--conversions-db", str(location["db"])]
    else:
        location = {"dsn": request.getfixturevalue("postgres_dsn")}
        flags = ["--conversions-dsn", location["dsn"]]
    gateway = Gateway(artifact_root, flags, tmp_path / "gateway.log")
    gateway.start()
    load = Load(gateway.target, catalogue.photos["photo_id"].tolist(), seed=15)
    rng = random.Random(15)
    acknowledged_at_kill = []
    try:
        load.thread.start()
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.15, 0.5))
            acknowledged_at_kill.append(len(load.acknowledged))
            gateway.kill()
            gateway.start()
        time.sleep(0.3)
    finally:
        load.stop.set()
        load.thread.join(30)
        gateway.stop()
    assert not load.thread.is_alive()
    # The load was running when each kill landed, and calls failed because of them.
    assert 0 < acknowledged_at_kill[0] < acknowledged_at_kill[-1] < len(load.acknowledged)
    assert load.failed_calls > 0

    with open_store(**location) as store:
        rows = list(store.scan())
    ids = [e.event_id for e in rows]
    assert len(ids) == len(set(ids))  # no event twice
    assert set(ids) == load.acknowledged  # every acknowledged event, nothing else
    assert all(not event_id.endswith("-bad") for event_id in ids)
    for event in rows:
        assert (event.user_id, event.photo_id, event.converted_at_us) == load.sent[event.event_id]
