"""The proto JSON mapping of a message as json_format writes it, from converters built once.

``json_format.MessageToDict`` walks every field's descriptor on every call, in Python: about
half a millisecond for a ten-result ``SearchResponse``, the door's largest cost per search.
:func:`to_dict` gives the same dict (equal values of equal JSON types; keys in field-number
order, as protoc's other JSON printers write them), with preserved proto field names and every
field without presence printed, from a plan compiled once per message type: one attribute read
per field, each value through a function chosen for its type. Well-known types (Timestamp,
Struct, ...) and messages that take extensions go to json_format itself.
``tests/web/test_proto_json.py`` holds it to json_format's output.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Callable

from google.protobuf import descriptor, json_format

F = descriptor.FieldDescriptor
_INT64 = (F.CPPTYPE_INT64, F.CPPTYPE_UINT64)
_NON_FINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}
_FLOAT32 = struct.Struct("<f")
_converters: dict[str, Callable] = {}


def json_format_dict(message) -> dict:
    """json_format's own answer, with :func:`to_dict`'s options."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def to_dict(message) -> dict:
    """``message`` in the proto JSON mapping, equal to what :func:`json_format_dict` gives."""
    descriptor_ = message.DESCRIPTOR
    convert = _converters.get(descriptor_.full_name)
    if convert is None:
        convert = _converters[descriptor_.full_name] = _compile(descriptor_)
    return convert(message)


def _compile(message_type: descriptor.Descriptor) -> Callable:
    if message_type.full_name.startswith("google.protobuf.") or message_type.extension_ranges:
        return json_format_dict  # well-known types have mappings of their own
    # (name, whether it is printed only when set, value converter or None) per field.
    plan = tuple(
        (
            field.name,
            field.has_presence and not field.is_repeated,
            _field(field),
        )
        for field in message_type.fields
    )

    def convert(message) -> dict:
        js = {}
        for name, presence, write in plan:
            if presence and not message.HasField(name):
                continue
            value = getattr(message, name)
            js[name] = value if write is None else write(value)
        return js

    return convert


def _is_map(field: descriptor.FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _field(field: descriptor.FieldDescriptor) -> Callable | None:
    """The converter of the field's value (None: the value as it is)."""
    if _is_map(field):
        value_of = _scalar(field.message_type.fields_by_name["value"]) or _same
        if field.message_type.fields_by_name["key"].cpp_type == F.CPPTYPE_BOOL:
            return lambda m: {("true" if k else "false"): value_of(v) for k, v in m.items()}
        return lambda m: {str(k): value_of(v) for k, v in m.items()}
    one = _scalar(field)
    if field.is_repeated:
        return list if one is None else (lambda values: [one(v) for v in values])
    return one


def _same(value):
    return value


def _scalar(field: descriptor.FieldDescriptor) -> Callable | None:
    """The converter of one value of ``field`` (a message counts as one value)."""
    cpp_type = field.cpp_type
    if cpp_type == F.CPPTYPE_MESSAGE:
        return to_dict
    if cpp_type == F.CPPTYPE_ENUM:
        return _enum(field)
    if cpp_type == F.CPPTYPE_STRING:
        if field.type == F.TYPE_BYTES:
            return lambda v: base64.b64encode(v).decode("utf-8")
        return None
    if cpp_type in _INT64:
        return str
    if cpp_type == F.CPPTYPE_DOUBLE:
        return _double
    if cpp_type == F.CPPTYPE_FLOAT:
        return shortest_float
    return None  # bool, 32-bit integers


def _double(value: float):
    if value != value:
        return "NaN"
    return _NON_FINITE.get(value, value)


def shortest_float(value: float, _pack=_FLOAT32.pack, _unpack=_FLOAT32.unpack):
    """A float field's value as json_format prints it: the fewest significant digits, from 6,
    that read back as the same 32-bit float (``type_checkers.ToShortestFloat``, in one loop)."""
    if value != value:
        return "NaN"
    if value in _NON_FINITE:
        return _NON_FINITE[value]
    for precision in (6, 7, 8):
        rounded = float("%.*g" % (precision, value))
        if _unpack(_pack(rounded))[0] == value:
            return rounded
    return float("%.9g" % value)  # nine digits always read back as the same float


def _enum(field: descriptor.FieldDescriptor) -> Callable:
    # json_format's own answer for each known number (names, or a json_name option).
    printer = json_format._Printer(preserving_proto_field_name=True)
    known = {n: printer._FieldToJsonObject(field, n) for n in field.enum_type.values_by_number}
    if field.enum_type.is_closed:

        def closed(value):
            return known[value] if value in known else printer._FieldToJsonObject(field, value)

        return closed
    return lambda value: known.get(value, value)
