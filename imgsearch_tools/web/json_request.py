"""JSON bodies as request messages the quick way: one plan per message type, built once.

``json_format.ParseDict`` walks descriptors in Python for every field of every body. A plan
maps each key a body may use (the proto name and the JSON name) to a setter for the field's
type, and takes a body only when every value is of the plain kind the mapping reads as itself
(a string for a string field, an int in range for an int32, an enum's name, a list of those,
a nested object of the same kind); anything else (numbers as strings, enum numbers, nulls,
well-known types, duplicates, unknown keys) returns None, and the caller parses the body with
json_format, which gives the same message or the error that names the field.
"""

from __future__ import annotations

from collections.abc import Callable

from google.protobuf import descriptor

F = descriptor.FieldDescriptor
_INT32 = (-(2**31), 2**31 - 1)
_UINT32 = (0, 2**32 - 1)
_plans: dict[str, dict | None] = {}


class _Other(Exception):
    """A body this module leaves to json_format."""


def quick_parse(value, message_class):
    """``value`` (a parsed JSON body) as a ``message_class`` message, or None when it is not
    the plain kind this module takes (then json_format must parse it)."""
    try:
        message = message_class()
        _fill(message, value)
        return message
    except (_Other, ValueError, TypeError):
        return None


def _fill(message, value) -> None:
    if type(value) is not dict:
        raise _Other
    plan = _plan(message.DESCRIPTOR)
    seen = set()
    for key, item in value.items():
        step = plan.get(key)
        if step is None:
            raise _Other
        name, setter = step
        if name in seen:
            raise _Other
        seen.add(name)
        setter(message, name, item)


def _plan(message_type: descriptor.Descriptor) -> dict:
    full_name = message_type.full_name
    if full_name not in _plans:
        _plans[full_name] = _build(message_type)
    plan = _plans[full_name]
    if plan is None:
        raise _Other
    return plan


def _build(message_type: descriptor.Descriptor) -> dict | None:
    if message_type.full_name.startswith("google.protobuf.") or message_type.extension_ranges:
        return None
    plan = {}
    for field in message_type.fields:
        setter = _setter(field)
        if setter is None or field.containing_oneof is not None:
            continue  # bodies that set it go to json_format
        plan[field.name] = plan[field.json_name] = (field.name, setter)
    return plan


def _setter(field: descriptor.FieldDescriptor) -> Callable | None:
    """``setter(message, name, value)`` for a plain value of ``field``, or None."""
    if field.cpp_type == F.CPPTYPE_MESSAGE:
        # Nested objects follow their own type's plan (built when first met, so that a
        # message that holds itself is no loop); maps go to json_format.
        return None if field.message_type.GetOptions().map_entry else _message_setter(field)
    check = _check(field)
    if check is None:
        return None
    if field.is_repeated:

        def extend(message, name, items):
            if type(items) is not list:
                raise _Other
            getattr(message, name).extend([check(item) for item in items])

        return extend

    def assign(message, name, item):
        setattr(message, name, check(item))

    return assign


def _check(field: descriptor.FieldDescriptor) -> Callable | None:
    """The value to store for a plain JSON value of one element of ``field`` (raising
    :class:`_Other` for anything else), or None when the field is not taken here."""
    cpp_type = field.cpp_type
    if cpp_type == F.CPPTYPE_STRING and field.type == F.TYPE_STRING:
        return _kind(str)
    if cpp_type == F.CPPTYPE_BOOL:
        return _kind(bool)
    if cpp_type in (F.CPPTYPE_INT32, F.CPPTYPE_UINT32):
        low, high = _INT32 if cpp_type == F.CPPTYPE_INT32 else _UINT32

        def int32(value):
            if type(value) is not int or not low <= value <= high:
                raise _Other
            return value

        return int32
    if cpp_type == F.CPPTYPE_ENUM:
        numbers = {v.name: v.number for v in field.enum_type.values}

        def enum(value):
            if type(value) is not str or value not in numbers:
                raise _Other
            return numbers[value]

        return enum
    return None  # bytes, 64-bit integers, floats: json_format reads their string forms


def _message_setter(field: descriptor.FieldDescriptor) -> Callable:
    if field.is_repeated:

        def add_messages(message, name, items):
            if type(items) is not list:
                raise _Other
            container = getattr(message, name)
            for item in items:
                _fill(container.add(), item)

        return add_messages

    def fill(message, name, item):
        nested = getattr(message, name)
        nested.SetInParent()  # ``{}`` sets the field, as json_format does
        _fill(nested, item)

    return fill


def _kind(kind: type) -> Callable:
    def same(value):
        if type(value) is not kind:
            raise _Other
        return value

    return same
