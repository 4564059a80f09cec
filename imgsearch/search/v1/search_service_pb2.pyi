from imgsearch.ranking.v1 import ranking_service_pb2 as _ranking_service_pb2
from imgsearch.retrieval.v1 import retrieval_service_pb2 as _retrieval_service_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SearchRequest(_message.Message):
    __slots__ = ("user_id", "query", "k", "candidates_k", "retriever", "ranker", "recent_photo_ids", "filter")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_K_FIELD_NUMBER: _ClassVar[int]
    RETRIEVER_FIELD_NUMBER: _ClassVar[int]
    RANKER_FIELD_NUMBER: _ClassVar[int]
    RECENT_PHOTO_IDS_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    query: str
    k: int
    candidates_k: int
    retriever: _retrieval_service_pb2.Retriever
    ranker: _ranking_service_pb2.Ranker
    recent_photo_ids: _containers.RepeatedScalarFieldContainer[str]
    filter: _retrieval_service_pb2.PhotoFilter
    def __init__(self, user_id: _Optional[str] = ..., query: _Optional[str] = ..., k: _Optional[int] = ..., candidates_k: _Optional[int] = ..., retriever: _Optional[_Union[_retrieval_service_pb2.Retriever, str]] = ..., ranker: _Optional[_Union[_ranking_service_pb2.Ranker, str]] = ..., recent_photo_ids: _Optional[_Iterable[str]] = ..., filter: _Optional[_Union[_retrieval_service_pb2.PhotoFilter, _Mapping]] = ...) -> None: ...

class Photo(_message.Message):
    __slots__ = ("photo_id", "url", "description", "ai_description", "photographer_username", "keywords")
    PHOTO_ID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    AI_DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PHOTOGRAPHER_USERNAME_FIELD_NUMBER: _ClassVar[int]
    KEYWORDS_FIELD_NUMBER: _ClassVar[int]
    photo_id: str
    url: str
    description: str
    ai_description: str
    photographer_username: str
    keywords: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, photo_id: _Optional[str] = ..., url: _Optional[str] = ..., description: _Optional[str] = ..., ai_description: _Optional[str] = ..., photographer_username: _Optional[str] = ..., keywords: _Optional[_Iterable[str]] = ...) -> None: ...

class SearchResult(_message.Message):
    __slots__ = ("photo_id", "score", "retrieval_score", "retrieval_source", "retrieval_source_scores", "ranker_score", "photo")
    class RetrievalSourceScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PHOTO_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_SCORE_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_SOURCE_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_SOURCE_SCORES_FIELD_NUMBER: _ClassVar[int]
    RANKER_SCORE_FIELD_NUMBER: _ClassVar[int]
    PHOTO_FIELD_NUMBER: _ClassVar[int]
    photo_id: str
    score: float
    retrieval_score: float
    retrieval_source: str
    retrieval_source_scores: _containers.ScalarMap[str, float]
    ranker_score: float
    photo: Photo
    def __init__(self, photo_id: _Optional[str] = ..., score: _Optional[float] = ..., retrieval_score: _Optional[float] = ..., retrieval_source: _Optional[str] = ..., retrieval_source_scores: _Optional[_Mapping[str, float]] = ..., ranker_score: _Optional[float] = ..., photo: _Optional[_Union[Photo, _Mapping]] = ...) -> None: ...

class StageTimings(_message.Message):
    __slots__ = ("retrieval_ms", "ranking_ms", "total_ms")
    RETRIEVAL_MS_FIELD_NUMBER: _ClassVar[int]
    RANKING_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    retrieval_ms: float
    ranking_ms: float
    total_ms: float
    def __init__(self, retrieval_ms: _Optional[float] = ..., ranking_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("results", "timings", "degraded", "degraded_reason", "retriever", "ranker", "notes", "artifact_versions")
    class ArtifactVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_REASON_FIELD_NUMBER: _ClassVar[int]
    RETRIEVER_FIELD_NUMBER: _ClassVar[int]
    RANKER_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SearchResult]
    timings: StageTimings
    degraded: bool
    degraded_reason: str
    retriever: _retrieval_service_pb2.Retriever
    ranker: _ranking_service_pb2.Ranker
    notes: _containers.RepeatedScalarFieldContainer[str]
    artifact_versions: _containers.ScalarMap[str, str]
    def __init__(self, results: _Optional[_Iterable[_Union[SearchResult, _Mapping]]] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ..., degraded: _Optional[bool] = ..., degraded_reason: _Optional[str] = ..., retriever: _Optional[_Union[_retrieval_service_pb2.Retriever, str]] = ..., ranker: _Optional[_Union[_ranking_service_pb2.Ranker, str]] = ..., notes: _Optional[_Iterable[str]] = ..., artifact_versions: _Optional[_Mapping[str, str]] = ...) -> None: ...
