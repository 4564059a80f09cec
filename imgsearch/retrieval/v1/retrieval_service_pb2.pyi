import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Retriever(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RETRIEVER_UNSPECIFIED: _ClassVar[Retriever]
    RETRIEVER_KEYWORD: _ClassVar[Retriever]
    RETRIEVER_CLIP: _ClassVar[Retriever]
    RETRIEVER_HYBRID: _ClassVar[Retriever]

class Orientation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ORIENTATION_UNSPECIFIED: _ClassVar[Orientation]
    ORIENTATION_LANDSCAPE: _ClassVar[Orientation]
    ORIENTATION_PORTRAIT: _ClassVar[Orientation]
    ORIENTATION_SQUARE: _ClassVar[Orientation]
RETRIEVER_UNSPECIFIED: Retriever
RETRIEVER_KEYWORD: Retriever
RETRIEVER_CLIP: Retriever
RETRIEVER_HYBRID: Retriever
ORIENTATION_UNSPECIFIED: Orientation
ORIENTATION_LANDSCAPE: Orientation
ORIENTATION_PORTRAIT: Orientation
ORIENTATION_SQUARE: Orientation

class PhotoFilter(_message.Message):
    __slots__ = ("orientation", "colors", "photographer_usernames", "featured", "submitted_after", "submitted_before", "min_downloads", "min_views")
    ORIENTATION_FIELD_NUMBER: _ClassVar[int]
    COLORS_FIELD_NUMBER: _ClassVar[int]
    PHOTOGRAPHER_USERNAMES_FIELD_NUMBER: _ClassVar[int]
    FEATURED_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_AFTER_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_BEFORE_FIELD_NUMBER: _ClassVar[int]
    MIN_DOWNLOADS_FIELD_NUMBER: _ClassVar[int]
    MIN_VIEWS_FIELD_NUMBER: _ClassVar[int]
    orientation: Orientation
    colors: _containers.RepeatedScalarFieldContainer[str]
    photographer_usernames: _containers.RepeatedScalarFieldContainer[str]
    featured: bool
    submitted_after: _timestamp_pb2.Timestamp
    submitted_before: _timestamp_pb2.Timestamp
    min_downloads: int
    min_views: int
    def __init__(self, orientation: _Optional[_Union[Orientation, str]] = ..., colors: _Optional[_Iterable[str]] = ..., photographer_usernames: _Optional[_Iterable[str]] = ..., featured: _Optional[bool] = ..., submitted_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., submitted_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., min_downloads: _Optional[int] = ..., min_views: _Optional[int] = ...) -> None: ...

class EmbedImagesRequest(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, images: _Optional[_Iterable[bytes]] = ...) -> None: ...

class EmbedImagesResponse(_message.Message):
    __slots__ = ("values", "dim", "artifact_version", "clip_fingerprint")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIP_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    dim: int
    artifact_version: str
    clip_fingerprint: str
    def __init__(self, values: _Optional[_Iterable[float]] = ..., dim: _Optional[int] = ..., artifact_version: _Optional[str] = ..., clip_fingerprint: _Optional[str] = ...) -> None: ...

class RetrieveRequest(_message.Message):
    __slots__ = ("query", "candidates_k", "retriever", "source_lists", "query_embedding", "query_embedding_version", "return_query_embedding", "filter", "return_packed_photo_indices")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_K_FIELD_NUMBER: _ClassVar[int]
    RETRIEVER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_LISTS_FIELD_NUMBER: _ClassVar[int]
    QUERY_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    QUERY_EMBEDDING_VERSION_FIELD_NUMBER: _ClassVar[int]
    RETURN_QUERY_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    RETURN_PACKED_PHOTO_INDICES_FIELD_NUMBER: _ClassVar[int]
    query: str
    candidates_k: int
    retriever: Retriever
    source_lists: bool
    query_embedding: _containers.RepeatedScalarFieldContainer[float]
    query_embedding_version: str
    return_query_embedding: bool
    filter: PhotoFilter
    return_packed_photo_indices: bool
    def __init__(self, query: _Optional[str] = ..., candidates_k: _Optional[int] = ..., retriever: _Optional[_Union[Retriever, str]] = ..., source_lists: _Optional[bool] = ..., query_embedding: _Optional[_Iterable[float]] = ..., query_embedding_version: _Optional[str] = ..., return_query_embedding: _Optional[bool] = ..., filter: _Optional[_Union[PhotoFilter, _Mapping]] = ..., return_packed_photo_indices: _Optional[bool] = ...) -> None: ...

class Fusion(_message.Message):
    __slots__ = ("method", "sources", "weights", "rrf_k", "depth")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    RRF_K_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    method: str
    sources: _containers.RepeatedScalarFieldContainer[str]
    weights: _containers.RepeatedScalarFieldContainer[float]
    rrf_k: int
    depth: float
    def __init__(self, method: _Optional[str] = ..., sources: _Optional[_Iterable[str]] = ..., weights: _Optional[_Iterable[float]] = ..., rrf_k: _Optional[int] = ..., depth: _Optional[float] = ...) -> None: ...

class SourceScores(_message.Message):
    __slots__ = ("source", "scores")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    source: str
    scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, source: _Optional[str] = ..., scores: _Optional[_Iterable[float]] = ...) -> None: ...

class RetrieveResponse(_message.Message):
    __slots__ = ("photo_ids", "scores", "source_scores", "retriever", "keyword", "note", "retrieval_ms", "artifact_version", "photo_indices", "query_embedding", "fusion", "shard", "shard_count", "packed_photo_indices")
    PHOTO_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SCORES_FIELD_NUMBER: _ClassVar[int]
    RETRIEVER_FIELD_NUMBER: _ClassVar[int]
    KEYWORD_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_MS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PHOTO_INDICES_FIELD_NUMBER: _ClassVar[int]
    QUERY_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    FUSION_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    PACKED_PHOTO_INDICES_FIELD_NUMBER: _ClassVar[int]
    photo_ids: _containers.RepeatedScalarFieldContainer[str]
    scores: _containers.RepeatedScalarFieldContainer[float]
    source_scores: _containers.RepeatedCompositeFieldContainer[SourceScores]
    retriever: Retriever
    keyword: str
    note: str
    retrieval_ms: float
    artifact_version: str
    photo_indices: _containers.RepeatedScalarFieldContainer[int]
    query_embedding: _containers.RepeatedScalarFieldContainer[float]
    fusion: Fusion
    shard: int
    shard_count: int
    packed_photo_indices: bytes
    def __init__(self, photo_ids: _Optional[_Iterable[str]] = ..., scores: _Optional[_Iterable[float]] = ..., source_scores: _Optional[_Iterable[_Union[SourceScores, _Mapping]]] = ..., retriever: _Optional[_Union[Retriever, str]] = ..., keyword: _Optional[str] = ..., note: _Optional[str] = ..., retrieval_ms: _Optional[float] = ..., artifact_version: _Optional[str] = ..., photo_indices: _Optional[_Iterable[int]] = ..., query_embedding: _Optional[_Iterable[float]] = ..., fusion: _Optional[_Union[Fusion, _Mapping]] = ..., shard: _Optional[int] = ..., shard_count: _Optional[int] = ..., packed_photo_indices: _Optional[bytes] = ...) -> None: ...
