"""The proto JSON mapping of a message as json_format writes it, from converters built once.

``json_format.MessageToDict`` walks every field's descriptor on every call, in Python: about
half a millisecond for a ten-result ``SearchResponse``, the door's largest cost per search.
:func:`to_dict` gives the same dict, keys in the same order (so ``json.dumps`` writes the same
text), with preserved proto field names and every field without presence printed, from a
converter compiled once per message type: the set fields come from upb's ``ListFields`` (C),
each through a function chosen for its type; well-known types (Timestamp, Struct, ...) and
extensions go to json_format itself. ``tests/web/test_proto_json.py`` holds it to
json_format's output.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable

from google.protobuf import descriptor, json_format
from google.protobuf.internal import type_checkers

F = descriptor.FieldDescriptor
_INT64 = (F.CPPTYPE_INT64, F.CPPTYPE_UINT64)
_NON_FINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}
_converters: dict[str, Callable] = {}


def json_format_dict(message) -> dict:
    """json_format's own answer, with :func:`to_dict`'s options."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def to_dict(message) -> dict:
    """``message`` in the proto JSON mapping, exactly as :func:`json_format_dict` gives it."""
    descriptor_ = message.DESCRIPTOR
    convert = _converters.get(descriptor_.full_name)
    if convert is None:
        convert = _converters[descriptor_.full_name] = _compile(descriptor_)
    return convert(message)


def _compile(message_type: descriptor.Descriptor) -> Callable:
    if message_type.full_name.startswith("google.protobuf."):
        return json_format_dict  # well-known types have mappings of their own
    writers = {field: (field.name, _field(field)) for field in message_type.fields}
    defaults = [(field.name, _default(field)) for field in message_type.fields]
    defaults = [(name, make) for name, make in defaults if make is not None]

    def convert(message) -> dict:
        js = {}
        for field, value in message.ListFields():
            writer = writers.get(field)
            if writer is None:  # an extension
                return json_format_dict(message)
            name, write = writer
            js[name] = write(value)
        for name, make in defaults:
            if name not in js:
                js[name] = make()
        return js

    return convert


def _default(field: descriptor.FieldDescriptor) -> Callable | None:
    """What json_format prints for the field when it is not set (None: nothing)."""
    if field.has_presence:
        return None
    if _is_map(field):
        return dict
    if field.is_repeated:
        return list
    value = _scalar(field)(field.default_value)
    return lambda: value


def _is_map(field: descriptor.FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _field(field: descriptor.FieldDescriptor) -> Callable:
    if _is_map(field):
        value_of = _scalar(field.message_type.fields_by_name["value"])
        if field.message_type.fields_by_name["key"].cpp_type == F.CPPTYPE_BOOL:
            return lambda m: {("true" if k else "false"): value_of(v) for k, v in m.items()}
        return lambda m: {str(k): value_of(v) for k, v in m.items()}
    one = _scalar(field)
    if field.is_repeated:
        return lambda values: [one(v) for v in values]
    return one


def _scalar(field: descriptor.FieldDescriptor) -> Callable:
    """The converter of one value of ``field`` (a message counts as one value)."""
    cpp_type = field.cpp_type
    if cpp_type == F.CPPTYPE_MESSAGE:
        return to_dict
    if cpp_type == F.CPPTYPE_ENUM:
        return _enum(field)
    if cpp_type == F.CPPTYPE_STRING:
        if field.type == F.TYPE_BYTES:
            return lambda v: base64.b64encode(v).decode("utf-8")
        return str
    if cpp_type == F.CPPTYPE_BOOL:
        return bool
    if cpp_type in _INT64:
        return str
    if cpp_type == F.CPPTYPE_DOUBLE:
        return _finite_or_name
    if cpp_type == F.CPPTYPE_FLOAT:
        return lambda v: _finite_or_name(v, type_checkers.ToShortestFloat)
    return lambda v: v  # 32-bit integers


def _finite_or_name(value: float, shortest=None):
    if value != value:
        return "NaN"
    if value in _NON_FINITE:
        return _NON_FINITE[value]
    return shortest(value) if shortest is not None else value


def _enum(field: descriptor.FieldDescriptor) -> Callable:
    # json_format's own answer for each known number (names, or a json_name option).
    printer = json_format._Printer(preserving_proto_field_name=True)
    known = {n: printer._FieldToJsonObject(field, n) for n in field.enum_type.values_by_number}
    if field.enum_type.is_closed:

        def closed(value):
            return known[value] if value in known else printer._FieldToJsonObject(field, value)

        return closed
    return lambda value: known.get(value, value)
