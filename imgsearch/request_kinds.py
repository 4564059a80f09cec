"""What kind of work a request asks for, named by the retriever and ranker it carries.

Admission keeps a service time per (method, kind): a hybrid search and a keyword one take
different times, and a deadline is judged against the kind's own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from imgsearch.names import ranker_name, retriever_name

# (retriever, ranker) field values -> kind; bounded, as clients may send any enum number.
_KINDS: dict[tuple[Any, Any], str] = {}
_MAX_KINDS = 1024


def request_kind(request) -> str:
    """What kind of work a request asks for, by the retriever and ranker it names.

    "hybrid+als" for a search, "hybrid" for a retrieval, "als" for a ranking ("default"
    where the field is unspecified); "" for requests with neither field.
    """
    retriever = getattr(request, "retriever", None)
    ranker = getattr(request, "ranker", None)
    # A field of another type names nothing, as an absent one (and may not be hashable).
    retriever = retriever if isinstance(retriever, int) else None
    ranker = ranker if isinstance(ranker, int) else None
    key = (retriever, ranker)
    kind = _KINDS.get(key)
    if kind is None:
        parts = []
        if retriever is not None:
            parts.append(retriever_name(retriever) or "unknown")
        if ranker is not None:
            parts.append(ranker_name(ranker) or "unknown")
        kind = "+".join(parts)
        if len(_KINDS) < _MAX_KINDS:
            _KINDS[key] = kind
    return kind


def kind_reader(request) -> Callable[[Any], str]:
    """:func:`request_kind` for requests of ``request``'s type, its fields looked up once.

    A method's requests are all of one type: which of ``retriever`` and ``ranker`` it has is
    read from its descriptor here, instead of trying both attributes on every request.
    """
    fields = getattr(getattr(request, "DESCRIPTOR", None), "fields_by_name", None)
    if fields is None:
        return request_kind
    enum_field = FieldDescriptor.TYPE_ENUM
    retriever = (fields.get("retriever") or _NO_FIELD).type == enum_field
    ranker = (fields.get("ranker") or _NO_FIELD).type == enum_field
    if not (retriever or ranker):
        return lambda request: ""

    def read(request) -> str:
        key = (request.retriever if retriever else None, request.ranker if ranker else None)
        kind = _KINDS.get(key)
        return request_kind(request) if kind is None else kind

    return read


class _NoField:
    type = None


_NO_FIELD = _NoField()
