from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KeywordConfidence(_message.Message):
    __slots__ = ("keyword", "confidence")
    KEYWORD_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    keyword: str
    confidence: float
    def __init__(self, keyword: _Optional[str] = ..., confidence: _Optional[float] = ...) -> None: ...

class PhotoRecord(_message.Message):
    __slots__ = ("photo_id", "image", "keywords", "description", "photographer", "width", "height", "views", "downloads")
    PHOTO_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    KEYWORDS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PHOTOGRAPHER_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    DOWNLOADS_FIELD_NUMBER: _ClassVar[int]
    photo_id: str
    image: bytes
    keywords: _containers.RepeatedCompositeFieldContainer[KeywordConfidence]
    description: str
    photographer: str
    width: int
    height: int
    views: int
    downloads: int
    def __init__(self, photo_id: _Optional[str] = ..., image: _Optional[bytes] = ..., keywords: _Optional[_Iterable[_Union[KeywordConfidence, _Mapping]]] = ..., description: _Optional[str] = ..., photographer: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., views: _Optional[int] = ..., downloads: _Optional[int] = ...) -> None: ...

class UpsertPhotosRequest(_message.Message):
    __slots__ = ("request_id", "photos")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PHOTOS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    photos: _containers.RepeatedCompositeFieldContainer[PhotoRecord]
    def __init__(self, request_id: _Optional[str] = ..., photos: _Optional[_Iterable[_Union[PhotoRecord, _Mapping]]] = ...) -> None: ...

class UpsertPhotosResponse(_message.Message):
    __slots__ = ("sequence", "duplicate")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    duplicate: bool
    def __init__(self, sequence: _Optional[int] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class DeletePhotosRequest(_message.Message):
    __slots__ = ("request_id", "photo_ids", "reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PHOTO_IDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    photo_ids: _containers.RepeatedScalarFieldContainer[str]
    reason: str
    def __init__(self, request_id: _Optional[str] = ..., photo_ids: _Optional[_Iterable[str]] = ..., reason: _Optional[str] = ...) -> None: ...

class DeletePhotosResponse(_message.Message):
    __slots__ = ("sequence", "duplicate")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    duplicate: bool
    def __init__(self, sequence: _Optional[int] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class GetPhotoRequest(_message.Message):
    __slots__ = ("photo_id",)
    PHOTO_ID_FIELD_NUMBER: _ClassVar[int]
    photo_id: str
    def __init__(self, photo_id: _Optional[str] = ...) -> None: ...

class GetPhotoResponse(_message.Message):
    __slots__ = ("photo", "sequence")
    PHOTO_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    photo: PhotoRecord
    sequence: int
    def __init__(self, photo: _Optional[_Union[PhotoRecord, _Mapping]] = ..., sequence: _Optional[int] = ...) -> None: ...
