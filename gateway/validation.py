"""What a SearchRequest may ask: each field checked, INVALID_ARGUMENT naming the first bad one."""

from __future__ import annotations

from imgsearch.config import (
    DEFAULT_CANDIDATES_K,
    DEFAULT_K,
    MAX_CANDIDATES_K,
    MAX_K,
    MAX_QUERY_CHARS,
    MAX_RECENT_PHOTOS,
    MAX_USER_ID_CHARS,
)
from imgsearch.ranking.v1 import ranking_service_pb2 as rank_pb
from imgsearch.retrieval.v1 import retrieval_service_pb2 as retr_pb
from imgsearch.search.v1 import search_service_pb2 as pb
from imgsearch.serving.errors import InvalidArgument

# The enums' values, looked up on every search (``Enum.values()`` builds a new list per call).
RETRIEVER_VALUES = frozenset(retr_pb.Retriever.values())
RANKER_VALUES = frozenset(rank_pb.Ranker.values())


def validate(request: pb.SearchRequest) -> tuple[int, int]:
    """Check a SearchRequest; returns (k, candidates_k) or raises InvalidArgument."""
    query = " ".join(request.query.split())
    if not query:
        raise InvalidArgument("query", "must not be empty")
    if len(query) > MAX_QUERY_CHARS:
        raise InvalidArgument(
            "query", f"must be at most {MAX_QUERY_CHARS} characters, got {len(query)}"
        )
    k = request.k or DEFAULT_K
    if not 1 <= k <= MAX_K:
        raise InvalidArgument("k", f"must be between 1 and {MAX_K}, got {request.k}")
    candidates_k = request.candidates_k or max(DEFAULT_CANDIDATES_K, k)
    if not k <= candidates_k <= MAX_CANDIDATES_K:
        raise InvalidArgument(
            "candidates_k",
            f"must be between k ({k}) and {MAX_CANDIDATES_K}, got {request.candidates_k}",
        )
    if request.retriever not in RETRIEVER_VALUES:
        raise InvalidArgument("retriever", f"unknown value {request.retriever}")
    if request.ranker not in RANKER_VALUES:
        raise InvalidArgument("ranker", f"unknown value {request.ranker}")
    if len(request.user_id) > MAX_USER_ID_CHARS:
        raise InvalidArgument("user_id", f"must be at most {MAX_USER_ID_CHARS} characters")
    if len(request.recent_photo_ids) > MAX_RECENT_PHOTOS:
        raise InvalidArgument(
            "recent_photo_ids",
            f"at most {MAX_RECENT_PHOTOS} ids, got {len(request.recent_photo_ids)}",
        )
    return k, candidates_k
