from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Ranker(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RANKER_UNSPECIFIED: _ClassVar[Ranker]
    RANKER_NONE: _ClassVar[Ranker]
    RANKER_POPULARITY: _ClassVar[Ranker]
    RANKER_ALS: _ClassVar[Ranker]
    RANKER_FM: _ClassVar[Ranker]
    RANKER_DEEPFM: _ClassVar[Ranker]
    RANKER_TWO_STEP: _ClassVar[Ranker]
    RANKER_EASE: _ClassVar[Ranker]
    RANKER_ITEM_KNN: _ClassVar[Ranker]
    RANKER_CLIP_PROFILE: _ClassVar[Ranker]
    RANKER_STACKED: _ClassVar[Ranker]
RANKER_UNSPECIFIED: Ranker
RANKER_NONE: Ranker
RANKER_POPULARITY: Ranker
RANKER_ALS: Ranker
RANKER_FM: Ranker
RANKER_DEEPFM: Ranker
RANKER_TWO_STEP: Ranker
RANKER_EASE: Ranker
RANKER_ITEM_KNN: Ranker
RANKER_CLIP_PROFILE: Ranker
RANKER_STACKED: Ranker

class RankRequest(_message.Message):
    __slots__ = ("user_id", "query", "keyword", "candidate_photo_ids", "retrieval_scores", "k", "ranker", "recent_photo_ids", "packed_candidate_indices", "candidate_indices_version")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    KEYWORD_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_PHOTO_IDS_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_SCORES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    RANKER_FIELD_NUMBER: _ClassVar[int]
    RECENT_PHOTO_IDS_FIELD_NUMBER: _ClassVar[int]
    PACKED_CANDIDATE_INDICES_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_INDICES_VERSION_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    query: str
    keyword: str
    candidate_photo_ids: _containers.RepeatedScalarFieldContainer[str]
    retrieval_scores: _containers.RepeatedScalarFieldContainer[float]
    k: int
    ranker: Ranker
    recent_photo_ids: _containers.RepeatedScalarFieldContainer[str]
    packed_candidate_indices: bytes
    candidate_indices_version: str
    def __init__(self, user_id: _Optional[str] = ..., query: _Optional[str] = ..., keyword: _Optional[str] = ..., candidate_photo_ids: _Optional[_Iterable[str]] = ..., retrieval_scores: _Optional[_Iterable[float]] = ..., k: _Optional[int] = ..., ranker: _Optional[_Union[Ranker, str]] = ..., recent_photo_ids: _Optional[_Iterable[str]] = ..., packed_candidate_indices: _Optional[bytes] = ..., candidate_indices_version: _Optional[str] = ...) -> None: ...

class RankedPhoto(_message.Message):
    __slots__ = ("photo_id", "score")
    PHOTO_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    photo_id: str
    score: float
    def __init__(self, photo_id: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("results", "ranker", "fallback_reason", "ranking_ms", "artifact_version", "default_reason")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    RANKER_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_REASON_FIELD_NUMBER: _ClassVar[int]
    RANKING_MS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_REASON_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[RankedPhoto]
    ranker: Ranker
    fallback_reason: str
    ranking_ms: float
    artifact_version: str
    default_reason: str
    def __init__(self, results: _Optional[_Iterable[_Union[RankedPhoto, _Mapping]]] = ..., ranker: _Optional[_Union[Ranker, str]] = ..., fallback_reason: _Optional[str] = ..., ranking_ms: _Optional[float] = ..., artifact_version: _Optional[str] = ..., default_reason: _Optional[str] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("user_id", "k", "recent_photo_ids")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    RECENT_PHOTO_IDS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    k: int
    recent_photo_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, user_id: _Optional[str] = ..., k: _Optional[int] = ..., recent_photo_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("results", "fallback_reason", "artifact_version")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_REASON_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_VERSION_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[RankedPhoto]
    fallback_reason: str
    artifact_version: str
    def __init__(self, results: _Optional[_Iterable[_Union[RankedPhoto, _Mapping]]] = ..., fallback_reason: _Optional[str] = ..., artifact_version: _Optional[str] = ...) -> None: ...
