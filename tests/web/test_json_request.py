"""Bodies the door parses the quick way: the same message as json_format, or left to it."""

from __future__ import annotations

import json

import pytest
from google.protobuf import json_format

from imgsearch.feedback.v1 import feedback_service_pb2 as fb_pb
from imgsearch.search.v1 import search_service_pb2 as pb
from imgsearch_tools.web.errors import DoorError, parse_body
from imgsearch_tools.web.json_request import quick_parse

PLAIN = [
    {},
    {"query": "red"},
    {"user_id": "u1", "query": "red sea", "k": 10, "candidates_k": 100},
    {"userId": "u1", "query": "red", "candidatesK": 50, "recentPhotoIds": ["a", "b"]},
    {"query": "red", "retriever": "RETRIEVER_HYBRID", "ranker": "RANKER_ALS"},
    {"query": "red", "k": -5, "recent_photo_ids": []},
    {"query": "ü \u2603", "filter": {}},
]
# Valid in the mapping, but not the plain kind: json_format parses them.
OTHER = [
    {"query": "red", "k": "10"},
    {"query": "red", "k": 10.0},
    {"query": "red", "ranker": 2},
    {"query": "red", "user_id": None},
    {"query": "red", "recent_photo_ids": None},
]
BAD = [
    ({"query": "red", "k": True}, "k"),
    ({"query": "red", "k": 2**31}, "k"),
    ({"query": "red", "ranker": "RANKER_NOPE"}, "ranker"),
    ({"query": "red", "colour": "blue"}, "colour"),
    ({"query": ["red"]}, "query"),
    ({"query": "red", "recent_photo_ids": ["a", 3]}, "recent_photo_ids"),
    ({"query": "red", "filter": []}, "filter"),
    ([1, 2], "body"),
]


def reference(body, message_class):
    return json_format.ParseDict(body, message_class())


@pytest.mark.parametrize("body", PLAIN)
def test_plain_bodies_parse_as_json_format_parses_them(body):
    quick = quick_parse(body, pb.SearchRequest)
    assert quick is not None
    assert quick == reference(body, pb.SearchRequest)
    assert quick.HasField("filter") == ("filter" in body)
    assert parse_body(json.dumps(body).encode(), pb.SearchRequest) == quick


@pytest.mark.parametrize("body", OTHER)
def test_other_valid_bodies_go_to_json_format(body):
    assert quick_parse(body, pb.SearchRequest) is None
    assert parse_body(json.dumps(body).encode(), pb.SearchRequest) == reference(
        body, pb.SearchRequest
    )


@pytest.mark.parametrize("body, field", BAD)
def test_bad_bodies_are_refused_naming_the_field(body, field):
    assert quick_parse(body, pb.SearchRequest) is None
    with pytest.raises(DoorError) as caught:
        parse_body(json.dumps(body).encode(), pb.SearchRequest)
    assert caught.value.field == field


def test_a_key_given_by_both_its_names_goes_to_json_format():
    body = {"user_id": "a", "userId": "b"}
    assert quick_parse(body, pb.SearchRequest) is None
    assert parse_body(json.dumps(body).encode(), pb.SearchRequest) == reference(
        body, pb.SearchRequest
    )


def test_nested_messages_and_well_known_types():
    events = {"events": [{"event_id": "e1", "user_id": "u", "photo_id": "p", "query": "red"}]}
    assert quick_parse(events, fb_pb.LogConversionsRequest) == reference(
        events, fb_pb.LogConversionsRequest
    )
    events["events"][0]["converted_at"] = "2026-01-02T03:04:05Z"  # a Timestamp: json_format's
    assert quick_parse(events, fb_pb.LogConversionsRequest) is None
    parsed = parse_body(json.dumps(events).encode(), fb_pb.LogConversionsRequest)
    assert parsed == reference(events, fb_pb.LogConversionsRequest)
