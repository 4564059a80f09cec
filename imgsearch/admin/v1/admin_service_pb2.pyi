from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReloadRequest(_message.Message):
    __slots__ = ("artifacts", "version")
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    artifacts: str
    version: str
    def __init__(self, artifacts: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class ReloadResponse(_message.Message):
    __slots__ = ("previous_version", "version", "load_ms")
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LOAD_MS_FIELD_NUMBER: _ClassVar[int]
    previous_version: str
    version: str
    load_ms: float
    def __init__(self, previous_version: _Optional[str] = ..., version: _Optional[str] = ..., load_ms: _Optional[float] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("service", "version", "artifacts", "models", "defaults", "not_serving_reason")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    NOT_SERVING_REASON_FIELD_NUMBER: _ClassVar[int]
    service: str
    version: str
    artifacts: str
    models: _containers.RepeatedScalarFieldContainer[str]
    defaults: _containers.RepeatedCompositeFieldContainer[DefaultChoice]
    not_serving_reason: str
    def __init__(self, service: _Optional[str] = ..., version: _Optional[str] = ..., artifacts: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., defaults: _Optional[_Iterable[_Union[DefaultChoice, _Mapping]]] = ..., not_serving_reason: _Optional[str] = ...) -> None: ...

class DefaultChoice(_message.Message):
    __slots__ = ("kind", "name", "reason")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    reason: str
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...
