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

class Candidate(_message.Message):
    __slots__ = ("photo_id", "score", "source", "source_scores")
    class SourceScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PHOTO_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SCORES_FIELD_NUMBER: _ClassVar[int]
    photo_id: str
    score: float
    source: str
    source_scores: _containers.ScalarMap[str, float]
    def __init__(self, photo_id: _Optional[str] = ..., score: _Optional[float] = ..., source: _Optional[str] = ..., source_scores: _Optional[_Mapping[str, float]] = ...) -> None: ...

class RetrieveResponse(_message.Message):
    __slots__ = ("candidates", "retriever", "keyword", "note", "retrieval_ms", "artifact_version")
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    RETRIEVER_FIELD_NUMBER: _ClassVar[int]
    KEYWORD_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_MS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_VERSION_FIELD_NUMBER: _ClassVar[int]
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    retriever: Retriever
    keyword: str
    note: str
    retrieval_ms: float
    artifact_version: str
    def __init__(self, candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., retriever: _Optional[_Union[Retriever, str]] = ..., keyword: _Optional[str] = ..., note: _Optional[str] = ..., retrieval_ms: _Optional[float] = ..., artifact_version: _Optional[str] = ...) -> None: ...
