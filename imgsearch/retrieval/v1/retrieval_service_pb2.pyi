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
RETRIEVER_UNSPECIFIED: Retriever
RETRIEVER_KEYWORD: Retriever
RETRIEVER_CLIP: Retriever
RETRIEVER_HYBRID: Retriever

class RetrieveRequest(_message.Message):
    __slots__ = ("query", "candidates_k", "retriever")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_K_FIELD_NUMBER: _ClassVar[int]
    RETRIEVER_FIELD_NUMBER: _ClassVar[int]
    query: str
    candidates_k: int
    retriever: Retriever
    def __init__(self, query: _Optional[str] = ..., candidates_k: _Optional[int] = ..., retriever: _Optional[_Union[Retriever, str]] = ...) -> None: ...

class SourceScores(_message.Message):
    __slots__ = ("source", "scores")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    source: str
    scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, source: _Optional[str] = ..., scores: _Optional[_Iterable[float]] = ...) -> None: ...

class RetrieveResponse(_message.Message):
    __slots__ = ("photo_ids", "scores", "source_scores", "retriever", "keyword", "note", "retrieval_ms", "artifact_version")
    PHOTO_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SCORES_FIELD_NUMBER: _ClassVar[int]
    RETRIEVER_FIELD_NUMBER: _ClassVar[int]
    KEYWORD_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_MS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_VERSION_FIELD_NUMBER: _ClassVar[int]
    photo_ids: _containers.RepeatedScalarFieldContainer[str]
    scores: _containers.RepeatedScalarFieldContainer[float]
    source_scores: _containers.RepeatedCompositeFieldContainer[SourceScores]
    retriever: Retriever
    keyword: str
    note: str
    retrieval_ms: float
    artifact_version: str
    def __init__(self, photo_ids: _Optional[_Iterable[str]] = ..., scores: _Optional[_Iterable[float]] = ..., source_scores: _Optional[_Iterable[_Union[SourceScores, _Mapping]]] = ..., retriever: _Optional[_Union[Retriever, str]] = ..., keyword: _Optional[str] = ..., note: _Optional[str] = ..., retrieval_ms: _Optional[float] = ..., artifact_version: _Optional[str] = ...) -> None: ...
