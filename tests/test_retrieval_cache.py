"""Keyword answers kept by query: the same bytes as building them, bounded, never filtered."""

from __future__ import annotations

import asyncio

import pytest

from imgsearch.retrieval.v1 import retrieval_service_pb2 as pb
from imgsearch.serving import Reloadable
from imgsearch_tools.bench.queries import sample_queries
from retrieval_service.response_cache import ResponseCache
from retrieval_service.server import RetrievalServicer, load_retrieval_state, to_response


def test_the_cache_keeps_the_most_recently_used_within_its_budget():
    cache = ResponseCache(budget_bytes=10)
    cache.put(("a",), b"aaaa")
    cache.put(("b",), b"bbbb")
    assert cache.get(("a",)) == b"aaaa"  # now the most recently used
    cache.put(("c",), b"cccc")  # over budget: "b", the least recently used, goes
    assert cache.get(("b",)) is None
    assert cache.get(("a",)) == b"aaaa" and cache.get(("c",)) == b"cccc"
    assert cache.used_bytes == 8 and len(cache) == 2
    cache.put(("a",), b"a")  # replaced, counted once
    assert cache.used_bytes == 5
    cache.put(("big",), b"x" * 11)  # larger than the whole budget: not kept, nothing evicted
    assert cache.get(("big",)) is None and len(cache) == 2


@pytest.fixture(scope="module")
def servicer(artifact_root):
    holder = Reloadable(load_retrieval_state, str(artifact_root))
    asyncio.run(holder.load())
    servicer = RetrievalServicer(holder)
    yield servicer
    servicer.executor.shutdown()


def retrieve(servicer, request) -> pb.RetrieveResponse:
    response = asyncio.run(servicer.Retrieve(request, None))
    response.retrieval_ms = 0.0  # the one field that differs from call to call
    return response


def keyword_request(artifact_root, **fields) -> pb.RetrieveRequest:
    query = sample_queries(artifact_root, 1, seed=3)[0].query
    return pb.RetrieveRequest(query=query, retriever=pb.RETRIEVER_KEYWORD, **fields)


def test_a_repeated_keyword_query_answers_the_bytes_it_built(servicer, artifact_root):
    state = servicer.holder.state
    request = keyword_request(artifact_root, candidates_k=40, source_lists=True)
    first = retrieve(servicer, request)
    stored = len(state.responses)
    second = retrieve(servicer, request)
    assert len(state.responses) == stored  # answered from the cache, nothing added
    assert second.SerializeToString() == first.SerializeToString()
    # What the cache answers is what building the response gives.
    keyword = state.retrievers["keyword"]
    built = to_response(keyword.retrieve(request.query, 40), state.ids(), indices=True)
    assert list(second.photo_ids) == list(built.photo_ids) and len(second.photo_ids) == 40
    assert list(second.photo_indices) == list(built.photo_indices)
    assert list(second.scores) == list(built.scores)
    # Another candidates_k, or source lists off, is another answer.
    fewer = retrieve(servicer, keyword_request(artifact_root, candidates_k=5, source_lists=True))
    assert list(fewer.photo_ids) == list(first.photo_ids)[:5]
    plain = retrieve(servicer, keyword_request(artifact_root, candidates_k=40))
    assert not plain.photo_indices and list(plain.photo_ids) == list(first.photo_ids)
    assert len(state.responses) == stored + 2


def test_filtered_queries_are_not_stored_and_a_reload_starts_empty(servicer, artifact_root):
    state = servicer.holder.state
    request = keyword_request(artifact_root, candidates_k=30)
    request.filter.CopyFrom(pb.PhotoFilter(orientation=pb.ORIENTATION_LANDSCAPE))
    before = len(state.responses)
    filtered = retrieve(servicer, request)
    assert len(state.responses) == before
    unfiltered = retrieve(servicer, keyword_request(artifact_root, candidates_k=30))
    built = to_response(
        state.retrievers["keyword"].retrieve(request.query, 30), state.ids()
    ).photo_ids
    assert list(unfiltered.photo_ids) == list(built)  # not the filtered answer
    assert list(filtered.photo_ids) != list(built)
    assert len(state.responses) == before + 1
    asyncio.run(servicer.holder.load())
    assert servicer.holder.state is not state and len(servicer.holder.state.responses) == 0


def test_packed_indices_are_their_own_answer_aligned_with_the_ids(servicer, artifact_root):
    import numpy as np

    state = servicer.holder.state
    request = keyword_request(artifact_root, candidates_k=30, source_lists=True)
    plain = retrieve(servicer, request)
    assert not plain.packed_photo_indices
    request.return_packed_photo_indices = True
    stored = len(state.responses)
    packed = retrieve(servicer, request)
    again = retrieve(servicer, request)  # from the cache: the same bytes
    assert len(state.responses) == stored + 1
    assert again.SerializeToString() == packed.SerializeToString()
    assert list(packed.photo_ids) == list(plain.photo_ids)
    indices = np.frombuffer(packed.packed_photo_indices, "<i4").tolist()
    assert indices == list(plain.photo_indices) and len(indices) == 30
