"""The door's JSON: the same dicts as json_format's MessageToDict, in field-number order."""

from __future__ import annotations

import json
import math
import random
import struct

import pytest
from google.protobuf import timestamp_pb2
from google.protobuf.internal import type_checkers

from imgsearch.feedback.v1 import feedback_service_pb2 as fb_pb
from imgsearch.ranking.v1 import ranking_service_pb2 as rank_pb
from imgsearch.retrieval.v1 import retrieval_service_pb2 as retr_pb
from imgsearch.search.v1 import search_service_pb2 as pb
from imgsearch_tools.web.proto_json import json_format_dict, shortest_float, to_dict


def same_as_json_format(message) -> dict:
    expected, got = json_format_dict(message), to_dict(message)
    # Compared as text: equal values, equal types (no 1 for "1", no 1.0 for 1).
    assert json.dumps(got, sort_keys=True) == json.dumps(expected, sort_keys=True)
    return got


def full_response() -> pb.SearchResponse:
    response = pb.SearchResponse(
        retriever=retr_pb.RETRIEVER_HYBRID,
        ranker=rank_pb.RANKER_ALS,
        degraded=True,
        degraded_reason="ranking timed out",
        notes=["token match", "unknown user: popularity order"],
    )
    response.artifact_versions["gateway"] = "v1"
    response.artifact_versions["ranking"] = "v2"
    response.timings.retrieval_ms = 1.25
    response.timings.total_ms = 3.0000000001
    for i, score in enumerate([0.1, 1 / 3, -0.0, 1e-40, 3.4e38, 7.0]):
        result = response.results.add(
            photo_id=f"p{i}",
            score=score,
            retrieval_score=score * 2,
            retrieval_source="keyword+clip",
            ranker_score=-score,
        )
        result.retrieval_source_scores["keyword"] = score
        result.retrieval_source_scores["clip"] = 0.5
        if i % 2:
            result.photo.photo_id = f"p{i}"
            result.photo.url = 'https://example.org/ü?w=<b>&x="1"'
            result.photo.keywords.extend(["red", "circle"])
    return response


def test_a_search_response_converts_exactly_as_json_format_does():
    got = same_as_json_format(full_response())
    assert got["retriever"] == "RETRIEVER_HYBRID" and got["results"][0]["photo_id"] == "p0"
    # Fields left at their defaults are printed too; an unset message field is not.
    assert got["timings"]["ranking_ms"] == 0 and "photo" not in got["results"][0]
    assert got["results"][1]["photo"]["description"] == ""


def test_empty_messages_and_defaults():
    for message in (pb.SearchResponse(), pb.SearchResult(), fb_pb.LogConversionsResponse()):
        same_as_json_format(message)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_named(value):
    response = pb.SearchResponse()
    response.timings.total_ms = value
    result = response.results.add(score=value)
    result.retrieval_source_scores["keyword"] = value
    got = same_as_json_format(response)
    assert isinstance(got["timings"]["total_ms"], str)


def test_unknown_enum_numbers_and_well_known_types():
    response = pb.SearchResponse(retriever=99, ranker=-3)
    assert same_as_json_format(response)["retriever"] == 99
    event = fb_pb.ConversionEvent(event_id="e", user_id="u", photo_id="p", query="red")
    event.converted_at.CopyFrom(timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=5000))
    request = fb_pb.LogConversionsRequest(events=[event, fb_pb.ConversionEvent(event_id="f")])
    got = same_as_json_format(request)
    assert got["events"][0]["converted_at"] == "2023-11-14T22:13:20.000005Z"
    reply = fb_pb.LogConversionsResponse(
        results=[fb_pb.EventResult(event_id="e", status=fb_pb.EVENT_STATUS_STORED)],
        stored_count=1,
    )
    same_as_json_format(reply)


def test_int64_and_bytes_follow_the_mapping():
    request = retr_pb.RetrieveRequest(query="red", query_embedding=[0.5, 1e-8])
    same_as_json_format(request)
    reply = retr_pb.RetrieveResponse(photo_ids=["a"], photo_indices=[2**40, 3])
    got = same_as_json_format(reply)
    assert got["photo_indices"] == [str(2**40), "3"]


def test_keys_come_in_field_number_order():
    got = to_dict(full_response())
    assert list(got) == [f.name for f in pb.SearchResponse.DESCRIPTOR.fields]
    assert list(got["results"][1]["photo"]) == [f.name for f in pb.Photo.DESCRIPTOR.fields]


def test_float_fields_print_as_json_format_prints_them():
    rng = random.Random(7)
    as_float32 = struct.Struct("<f")
    values = [rng.uniform(-10, 10) for _ in range(5000)]
    values += [rng.lognormvariate(0, 25) for _ in range(5000)]
    values += [2.0**e for e in range(-149, 128)] + [0.1, 0.9, 1 / 3, 3.4028234663852886e38]
    for raw in values:
        try:
            value = as_float32.unpack(as_float32.pack(raw))[0]
        except OverflowError:
            continue
        assert shortest_float(value) == type_checkers.ToShortestFloat(value), value
