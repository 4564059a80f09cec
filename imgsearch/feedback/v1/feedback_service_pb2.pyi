import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ConversionType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONVERSION_TYPE_UNSPECIFIED: _ClassVar[ConversionType]
    CONVERSION_TYPE_DOWNLOAD: _ClassVar[ConversionType]

class EventStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_STATUS_UNSPECIFIED: _ClassVar[EventStatus]
    EVENT_STATUS_STORED: _ClassVar[EventStatus]
    EVENT_STATUS_DUPLICATE: _ClassVar[EventStatus]
    EVENT_STATUS_REJECTED: _ClassVar[EventStatus]

class RejectionReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REJECTION_REASON_UNSPECIFIED: _ClassVar[RejectionReason]
    REJECTION_REASON_MISSING_EVENT_ID: _ClassVar[RejectionReason]
    REJECTION_REASON_EMPTY_USER: _ClassVar[RejectionReason]
    REJECTION_REASON_UNKNOWN_PHOTO: _ClassVar[RejectionReason]
    REJECTION_REASON_MISSING_TIME: _ClassVar[RejectionReason]
    REJECTION_REASON_FUTURE_TIME: _ClassVar[RejectionReason]
    REJECTION_REASON_INVALID_TIME: _ClassVar[RejectionReason]
    REJECTION_REASON_UNKNOWN_CONVERSION_TYPE: _ClassVar[RejectionReason]
    REJECTION_REASON_CONFLICTING_DUPLICATE: _ClassVar[RejectionReason]
    REJECTION_REASON_INVALID_TEXT: _ClassVar[RejectionReason]
CONVERSION_TYPE_UNSPECIFIED: ConversionType
CONVERSION_TYPE_DOWNLOAD: ConversionType
EVENT_STATUS_UNSPECIFIED: EventStatus
EVENT_STATUS_STORED: EventStatus
EVENT_STATUS_DUPLICATE: EventStatus
EVENT_STATUS_REJECTED: EventStatus
REJECTION_REASON_UNSPECIFIED: RejectionReason
REJECTION_REASON_MISSING_EVENT_ID: RejectionReason
REJECTION_REASON_EMPTY_USER: RejectionReason
REJECTION_REASON_UNKNOWN_PHOTO: RejectionReason
REJECTION_REASON_MISSING_TIME: RejectionReason
REJECTION_REASON_FUTURE_TIME: RejectionReason
REJECTION_REASON_INVALID_TIME: RejectionReason
REJECTION_REASON_UNKNOWN_CONVERSION_TYPE: RejectionReason
REJECTION_REASON_CONFLICTING_DUPLICATE: RejectionReason
REJECTION_REASON_INVALID_TEXT: RejectionReason

class ConversionEvent(_message.Message):
    __slots__ = ("event_id", "user_id", "photo_id", "query", "converted_at", "country", "conversion_type")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    PHOTO_ID_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    CONVERTED_AT_FIELD_NUMBER: _ClassVar[int]
    COUNTRY_FIELD_NUMBER: _ClassVar[int]
    CONVERSION_TYPE_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    user_id: str
    photo_id: str
    query: str
    converted_at: _timestamp_pb2.Timestamp
    country: str
    conversion_type: ConversionType
    def __init__(self, event_id: _Optional[str] = ..., user_id: _Optional[str] = ..., photo_id: _Optional[str] = ..., query: _Optional[str] = ..., converted_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., country: _Optional[str] = ..., conversion_type: _Optional[_Union[ConversionType, str]] = ...) -> None: ...

class LogConversionsRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[ConversionEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[ConversionEvent, _Mapping]]] = ...) -> None: ...

class EventResult(_message.Message):
    __slots__ = ("event_id", "status", "rejection_reason", "detail")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REJECTION_REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    status: EventStatus
    rejection_reason: RejectionReason
    detail: str
    def __init__(self, event_id: _Optional[str] = ..., status: _Optional[_Union[EventStatus, str]] = ..., rejection_reason: _Optional[_Union[RejectionReason, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class LogConversionsResponse(_message.Message):
    __slots__ = ("results", "stored_count", "duplicate_count", "rejected_count")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    STORED_COUNT_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_COUNT_FIELD_NUMBER: _ClassVar[int]
    REJECTED_COUNT_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[EventResult]
    stored_count: int
    duplicate_count: int
    rejected_count: int
    def __init__(self, results: _Optional[_Iterable[_Union[EventResult, _Mapping]]] = ..., stored_count: _Optional[int] = ..., duplicate_count: _Optional[int] = ..., rejected_count: _Optional[int] = ...) -> None: ...

class DeleteUserEventsRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class DeleteUserEventsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
