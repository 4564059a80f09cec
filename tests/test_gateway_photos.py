"""The gateway's photo metadata: read as columns, each message built when first shown."""

from __future__ import annotations

import pandas as pd
import pytest

from gateway.photos import KEYWORDS_PER_PHOTO, PhotoMetadata
from imgsearch.search.v1 import search_service_pb2 as pb


@pytest.fixture
def tables():
    # photo_idx not in row order, a photo without keywords, one with more than are shown.
    photos = pd.DataFrame(
        {
            "photo_idx": [2, 0, 1],
            "photo_id": ["c", "a", "b"],
            "photo_image_url": ["u2", "u0", "u1"],
            "photo_description": ["d2", "d0", ""],
            "ai_description": ["x2", "x0", "x1"],
            "photographer_username": ["p2", "p0", "p1"],
        }
    )
    many = [(0, f"k{i}", i / 100) for i in range(KEYWORDS_PER_PHOTO + 3)]
    keywords = pd.DataFrame(
        [(2, "red", 0.5), (2, "blue", 0.9), *many], columns=["photo_idx", "keyword", "confidence"]
    )
    return photos, keywords


def test_each_photo_is_the_message_the_gateway_prebuilt_before(tables):
    photos, keywords = tables
    metadata = PhotoMetadata(photos, keywords)
    assert list(metadata) == ["c", "a", "b"] and len(metadata) == 3
    assert metadata["c"] == pb.Photo(
        photo_id="c",
        url="u2",
        description="d2",
        ai_description="x2",
        photographer_username="p2",
        keywords=["blue", "red"],  # best confidence first
    )
    best = [f"k{i}" for i in range(KEYWORDS_PER_PHOTO + 2, 2, -1)]
    assert list(metadata["a"].keywords) == best  # the first KEYWORDS_PER_PHOTO of them
    assert list(metadata["b"].keywords) == [] and metadata.get("zz") is None
    assert "b" in metadata and "zz" not in metadata


def test_live_changes_win_and_only_the_last_shown_stay_built(tables):
    photos, keywords = tables
    metadata = PhotoMetadata(photos, keywords, built=2)
    first = metadata["a"]
    assert metadata["a"] is first  # kept built
    metadata["b"], metadata["c"]  # noqa: B018 - shown: "a" is now the least recent
    assert metadata["a"] is not first and metadata["a"] == first  # built again, the same
    written = pb.Photo(photo_id="new", url="live")
    metadata["new"] = written
    metadata["a"] = pb.Photo(photo_id="a", url="replaced")
    assert metadata["new"] is written and metadata["a"].url == "replaced"
    assert metadata.pop("c", None) is not None and metadata.pop("c", None) is None
    assert "c" not in metadata and metadata.get("c") is None
    with pytest.raises(KeyError):
        del metadata["c"]
    assert list(metadata) == ["a", "b", "new"] and len(metadata) == 3
    metadata["c"] = pb.Photo(photo_id="c", url="back")
    assert metadata["c"].url == "back" and len(metadata) == 4
