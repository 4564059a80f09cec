"""Retrieval as the gateway reaches it: one target, or one per shard, scattered and merged."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable

import grpc
import numpy as np

from imgsearch.balancing import channel_options, channel_target, shard_targets
from imgsearch.fusion import FusionSpec, RetrievalResult, merge_shards
from imgsearch.retrieval.v1 import retrieval_service_pb2 as retr_pb
from imgsearch.retrieval.v1 import retrieval_service_pb2_grpc as retr_grpc
from imgsearch.security import ClientSecurity

RETRIEVAL_SERVICE = retr_pb.DESCRIPTOR.services_by_name["RetrievalService"].full_name
# A shard's refusal of the request itself, or its load shedding (shards split the photos
# evenly, so one overloaded shard means all are): the search fails with it (the gateway passes
# it through, with the pushback) instead of degrading, so that overload is refused at the door.
REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def unavailable(details: str) -> grpc.aio.AioRpcError:
    """An UNAVAILABLE error like the ones gRPC raises, for a failure found by the gateway."""
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details
    )


def shard_result(reply: retr_pb.RetrieveResponse) -> RetrievalResult:
    """A shard's source lists as :func:`imgsearch.fusion.merge_shards` takes them."""
    return RetrievalResult(
        np.asarray(reply.photo_indices, np.int64),
        np.zeros(0, np.float32),
        {s.source: np.asarray(s.scores, np.float32) for s in reply.source_scores},
    )


def fusion_spec(reply: retr_pb.RetrieveResponse) -> FusionSpec | None:
    """How the shard's hybrid fuses, None when it ran one source."""
    if not reply.HasField("fusion"):
        return None
    fusion = reply.fusion
    return FusionSpec(
        fusion.method, tuple(fusion.sources), tuple(fusion.weights), fusion.rrf_k, fusion.depth
    )


class RetrievalTier:
    """The retrieval servers the gateway calls: one target, or one per shard.

    Each target gets its own channel, balanced round-robin over its replicas with gRPC's
    retries (:mod:`imgsearch.balancing`). With several shards, :meth:`retrieve` asks one
    replica of every shard and merges their answers exactly (see
    :func:`imgsearch.fusion.merge_shards`): first one shard, which encodes the query and hands
    back its embedding, then the others at once with that embedding, so the query is encoded
    once per search; the shard that encodes rotates from search to search. A shard that fails
    leaves its photos out: the answer comes from the others and says which shard is missing.

    Parameters
    ----------
    retrieval_addr:
        ``T`` or ``T0;T1;...`` (a target per shard, in shard order).
    security:
        The channels' TLS settings.
    options:
        Channel options besides balancing's.
    """

    def __init__(self, retrieval_addr: str, security: ClientSecurity, options=()):
        self.targets = shard_targets(retrieval_addr)
        balanced = channel_options(RETRIEVAL_SERVICE, options)
        self.channels = [security.aio_channel(channel_target(t), balanced) for t in self.targets]
        self.stubs = [retr_grpc.RetrievalServiceStub(c) for c in self.channels]
        self._encoder = itertools.count()

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()

    def retrieve(
        self, request: retr_pb.RetrieveRequest, timeout: float, metadata
    ) -> Awaitable[tuple[retr_pb.RetrieveResponse, list[str]]]:
        """Start retrieving; the awaitable gives (the candidates, what is missing from them).

        The second item lists a reason per shard whose photos the answer lacks (empty when
        complete). Raises the call's ``grpc.aio.AioRpcError`` when retrieval failed as a whole
        (every shard failed, or one refused the request).
        """
        if len(self.stubs) == 1:
            # Started now, so that it runs while the caller starts other calls.
            return self._one(self.stubs[0].Retrieve(request, timeout=timeout, metadata=metadata))
        return self._scatter(request, timeout, metadata)

    async def _one(self, call) -> tuple[retr_pb.RetrieveResponse, list[str]]:
        reply = await call
        if reply.shard_count > 1:
            return reply, [
                f"retrieval at {self.targets[0]} serves shard {reply.shard} of "
                f"{reply.shard_count} only (give the gateway one target per shard)"
            ]
        return reply, []

    async def _scatter(
        self, request: retr_pb.RetrieveRequest, timeout: float, metadata
    ) -> tuple[retr_pb.RetrieveResponse, list[str]]:
        count = len(self.stubs)
        deadline = time.monotonic() + timeout
        first = next(self._encoder) % count
        order = [(first + i) % count for i in range(count)]
        asked = retr_pb.RetrieveRequest(
            query=request.query,
            candidates_k=request.candidates_k,
            retriever=request.retriever,
            source_lists=True,
            filter=request.filter,
        )
        answers: dict[int, retr_pb.RetrieveResponse] = {}
        failures: dict[int, grpc.aio.AioRpcError] = {}
        encoder = None
        if request.retriever != retr_pb.RETRIEVER_KEYWORD:
            # CLIP may run: one shard encodes the query, the others reuse its embedding.
            encoding = retr_pb.RetrieveRequest()
            encoding.CopyFrom(asked)
            encoding.return_query_embedding = True
            for shard in order:
                left = max(0.001, deadline - time.monotonic())
                try:
                    reply = await self.stubs[shard].Retrieve(
                        encoding, timeout=left, metadata=metadata
                    )
                except grpc.aio.AioRpcError as exc:
                    if exc.code() in REFUSALS or exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                        raise
                    failures[shard] = exc
                    continue
                answers[shard] = encoder = reply
                break
            if encoder is None:
                raise failures[order[0]]
            asked.retriever = encoder.retriever
            asked.query_embedding.extend(encoder.query_embedding)
            asked.query_embedding_version = encoder.artifact_version
        rest = [s for s in order if s not in answers and s not in failures]
        left = max(0.001, deadline - time.monotonic())
        replies = await asyncio.gather(
            *(self.stubs[s].Retrieve(asked, timeout=left, metadata=metadata) for s in rest),
            return_exceptions=True,
        )
        for shard, reply in zip(rest, replies):
            if isinstance(reply, grpc.aio.AioRpcError):
                if reply.code() in REFUSALS:
                    raise reply
                failures[shard] = reply
            elif isinstance(reply, BaseException):
                raise reply
            else:
                answers[shard] = reply
        return self._merge(request, order, answers, failures, encoder)

    def _merge(self, request, order, answers, failures, encoder):
        """The merged answer and a reason per missing shard (see :meth:`retrieve`)."""
        count = len(self.stubs)
        missing = []
        for shard in order:
            reply = answers.get(shard)
            if reply is not None and (reply.shard, reply.shard_count) != (shard, count):
                del answers[shard]
                missing.append(
                    f"retrieval target {self.targets[shard]} serves shard {reply.shard} of "
                    f"{reply.shard_count}, not shard {shard} of {count}"
                )
            elif shard in failures:
                exc = failures[shard]
                missing.append(
                    f"retrieval shard {shard} of {count} unavailable "
                    f"({exc.code().name}: {exc.details()})"
                )
        if not answers:
            if failures:
                raise failures[order[0]] if order[0] in failures else next(iter(failures.values()))
            raise unavailable("; ".join(missing))
        started = time.perf_counter()
        replies = [answers[s] for s in order if s in answers]
        fusion = next((f for f in map(fusion_spec, replies) if f is not None), None)
        merged = merge_shards([shard_result(r) for r in replies], request.candidates_k, fusion)
        photo_ids = {}
        for reply in replies:
            photo_ids.update(zip(reply.photo_indices, reply.photo_ids))
        notes = list(dict.fromkeys(r.note for r in replies if r.note))
        versions = sorted({r.artifact_version for r in replies})
        if len(versions) > 1:
            notes.append(f"retrieval shards serve different artifact sets: {', '.join(versions)}")
        others = [r.retrieval_ms for r in replies if r is not encoder]
        merge_ms = (time.perf_counter() - started) * 1000
        response = retr_pb.RetrieveResponse(
            photo_ids=[photo_ids[i] for i in merged.photo_idx.tolist()],
            scores=merged.scores.tolist(),
            source_scores=[
                retr_pb.SourceScores(source=name, scores=values.tolist())
                for name, values in merged.source_scores.items()
            ],
            retriever=replies[0].retriever,
            keyword=next((r.keyword for r in replies if r.keyword), ""),
            note="; ".join(notes),
            # The shards' time on the search's critical path, and the merge.
            retrieval_ms=(encoder.retrieval_ms if encoder else 0.0)
            + max(others, default=0.0)
            + merge_ms,
            artifact_version="+".join(versions),
        )
        return response, missing
