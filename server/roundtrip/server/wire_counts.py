"""Counting a message's repeated fields on the wire, before protobuf parses it.

Parsing is where a small message becomes a large one: a packed ``int64`` of zeros takes one
byte on the wire and eight once parsed, an empty sub-message two bytes and some sixty. So a
57 MiB ``ModelInferRequest`` whose ``seed`` holds 60,000,000 packed zeros would hold half a
GiB before any limit could look at it. :func:`check_counts` walks the message's tags and
lengths (never its payloads: O(fields), not O(bytes)) and refuses, before the parse, a
repeated field holding more elements than :class:`RepeatedLimits` allows it, naming the
limit. Only messages larger than :data:`WALKED_ABOVE` are walked: a smaller one cannot grow
past a few MiB whatever it holds.

>>> from roundtrip.v1 import roundtrip_pb2 as pb
>>> limits = RepeatedLimits({"roundtrip.v1.Array.shape": (2, "max_x_rank")})
>>> data = pb.RoundTripRequest(x=pb.Array(shape=[1, 2, 3]), features=1).SerializeToString()
>>> check_counts(data, pb.RoundTripRequest.DESCRIPTOR, limits, walked_above=0)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
roundtrip.server.errors.LimitExceeded: roundtrip.v1.Array.shape holds more than 2 elements, ...
>>> check_counts(data, pb.RoundTripRequest.DESCRIPTOR, limits)  # small: parsed unwalked
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from roundtrip.server.errors import LimitExceeded

#: Messages up to this size are parsed without a walk.
WALKED_ABOVE = 64 * 1024

#: Field types whose packed elements are varints (one wire byte may parse to eight).
_VARINTS = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_BOOL,
        FieldDescriptor.TYPE_ENUM,
    }
)
#: Bytes >= 0x80 continue a varint: deleting them leaves one byte per packed element.
_CONTINUATIONS = bytes(range(0x80, 0x100))
_PIECE = 64 * 1024


@dataclass(frozen=True, slots=True)
class RepeatedLimits:
    """The most elements each named repeated field may hold, with the knob that sets it, by
    the field's full name; ``default``: any other repeated field of messages, varints or
    bytes (those that grow when parsed)."""

    by_field: dict[str, tuple[int, str]]
    default: tuple[int, str] = (1024, "a fixed limit of this worker")

    def most(self, field: FieldDescriptor) -> tuple[int, str]:
        """The most elements ``field`` may hold, and the knob that says so."""
        return self.by_field.get(field.full_name, self.default)


def check_counts(
    data: bytes, descriptor: Descriptor, limits: RepeatedLimits, walked_above: int = WALKED_ABOVE
) -> None:
    """Raise :class:`LimitExceeded` if a repeated field in ``data`` (a serialized
    ``descriptor`` message longer than ``walked_above``) holds more elements than ``limits``
    allows. Malformed bytes are left to the parser, which refuses them with its own
    message."""
    if len(data) > walked_above:
        try:
            _walk(memoryview(data), 0, len(data), descriptor, limits)
        except (IndexError, _Malformed):
            return


class _Malformed(Exception):
    """The bytes are not a message: the parser will say so."""


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise _Malformed


def _walk(
    data: memoryview, pos: int, end: int, descriptor: Descriptor, limits: RepeatedLimits
) -> None:
    counts: dict[int, int] = {}
    fields = descriptor.fields_by_number
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        field = fields.get(number)
        elements = 1
        if wire_type == 0:
            _, pos = _varint(data, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length, pos = _varint(data, pos)
            if pos + length > end:
                raise _Malformed
            if field is not None and field.message_type is not None:
                _walk(data, pos, pos + length, field.message_type, limits)
            elif field is not None and field.type in _VARINTS:  # packed
                most = limits.most(field)[0] - counts.get(number, 0)
                elements = _packed_count(data, pos, pos + length, most)
            pos += length
        else:
            raise _Malformed  # groups: the parser refuses or skips them
        if field is not None and field.is_repeated:
            counts[number] = counts.get(number, 0) + elements
    for number, count in counts.items():
        field = fields[number]
        grows = (
            field.message_type is not None
            or field.type in _VARINTS
            or (field.type in (FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_STRING))
        )
        most, knob = limits.most(field) if grows else (count, "")
        if count > most:
            raise LimitExceeded(
                f"{field.full_name} holds more than {most} elements, this worker's limit ({knob})"
            )


def _packed_count(data: memoryview, start: int, end: int, most: int) -> int:
    """How many varints ``data[start:end]`` packs, counted a piece at a time (no copy of the
    whole field), or a count over ``most`` as soon as there is one."""
    if end - start <= most:  # each element takes at least one byte
        return end - start
    count = 0
    for piece in range(start, end, _PIECE):
        count += len(
            data[piece : min(end, piece + _PIECE)].tobytes().translate(None, _CONTINUATIONS)
        )
        if count > most:
            break
    return count
