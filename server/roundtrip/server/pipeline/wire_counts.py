"""Counting what a message will hold once parsed, on the wire, before protobuf parses it.

Parsing is where a small message becomes a large one: a packed ``int64`` of zeros takes one
byte on the wire and eight once parsed, an empty sub-message two bytes and some sixty. So a
57 MiB ``ModelInferRequest`` whose ``seed`` holds 60,000,000 packed zeros would hold half a
GiB before any limit could look at it. :func:`check_counts` walks the message's tags and
lengths (never its payloads) and refuses, before the parse, a repeated field that would hold
more elements than :class:`RepeatedLimits` allows it, naming the limit. It counts what the
parser will build, not what the bytes look like:

* occurrences of a singular sub-message are merged by the parser, so their repeated fields
  are counted together (a tensor's contents given 59,001 times is one tensor of 59 M
  elements);
* a packed field may come in parts, and a repeated scalar packed or not: all are counted;
* unknown fields of every wire type, groups included (nested ones too), are skipped, not a
  reason to stop counting; varints of up to ten bytes are valid.

The walk stops at the first field over its limit, and at ``max_fields`` fields in all (a
message of more fields than any valid request holds is refused: what the walk costs is
bounded whatever the bytes). Only messages larger than :data:`WALKED_ABOVE` are walked: a
smaller one cannot grow past a few MiB whatever it holds. Malformed bytes are left to the
parser, which refuses them with its own message.

>>> from roundtrip.v1 import roundtrip_pb2 as pb
>>> limits = RepeatedLimits({"roundtrip.v1.Array.shape": (2, "max_x_rank")})
>>> data = pb.RoundTripRequest(x=pb.Array(shape=[1, 2, 3]), features=1).SerializeToString()
>>> check_counts(data, pb.RoundTripRequest.DESCRIPTOR, limits, walked_above=0)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
roundtrip.server.errors.LimitExceeded: roundtrip.v1.Array.shape holds more than 2 elements, ...
>>> halves = pb.RoundTripRequest(x=pb.Array(shape=[1, 2])).SerializeToString() * 2  # merged
>>> check_counts(halves, pb.RoundTripRequest.DESCRIPTOR, limits, 0)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
roundtrip.server.errors.LimitExceeded: roundtrip.v1.Array.shape holds more than 2 elements, ...
>>> check_counts(data, pb.RoundTripRequest.DESCRIPTOR, limits)  # small: parsed unwalked
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
#: Field types whose packed elements take a fixed number of bytes: they do not grow.
_FIXED = {
    FieldDescriptor.TYPE_FIXED64: 8,
    FieldDescriptor.TYPE_SFIXED64: 8,
    FieldDescriptor.TYPE_DOUBLE: 8,
    FieldDescriptor.TYPE_FIXED32: 4,
    FieldDescriptor.TYPE_SFIXED32: 4,
    FieldDescriptor.TYPE_FLOAT: 4,
}
_BYTES = frozenset({FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_STRING})
#: Bytes >= 0x80 continue a varint: deleting them leaves one byte per packed element.
_CONTINUATIONS = bytes(range(0x80, 0x100))
_PIECE = 64 * 1024
#: Fields walked in all when the limits do not say (:class:`RepeatedLimits`).
DEFAULT_MAX_FIELDS = 1 << 17


@dataclass(frozen=True, slots=True)
class RepeatedLimits:
    """The most elements each named repeated field may hold, with the knob that sets it, by
    the field's full name; ``default``: any other repeated field of messages, varints or
    bytes (those that grow when parsed); ``max_fields``: the most fields (occurrences, at
    any depth, unknown ones and groups' included) a message may hold."""

    by_field: dict[str, tuple[int, str]]
    default: tuple[int, str] = (1024, "a fixed limit of this worker")
    max_fields: int = DEFAULT_MAX_FIELDS

    def most(self, field: FieldDescriptor) -> tuple[int, str]:
        """The most elements ``field`` may hold, and the knob that says so."""
        return self.by_field.get(field.full_name, self.default)


def check_counts(
    data: bytes, descriptor: Descriptor, limits: RepeatedLimits, walked_above: int = WALKED_ABOVE
) -> None:
    """Raise :class:`LimitExceeded` if ``data`` (a serialized ``descriptor`` message longer
    than ``walked_above``), once parsed, would hold a repeated field of more elements than
    ``limits`` allows, or if it holds more than ``limits.max_fields`` fields. Malformed
    bytes are left to the parser, which refuses them with its own message."""
    if len(data) > walked_above:
        walk = _Walk(memoryview(data), limits)
        try:
            walk.message(0, len(data), descriptor, _Counts())
        except (IndexError, _Malformed):
            return


def varint_field(data: bytes, number: int, max_fields: int = DEFAULT_MAX_FIELDS) -> int | None:
    """The value of top-level varint field ``number`` in ``data`` (the last one given, as the
    parser takes it), read without parsing the rest: a stream message's ``id``, so a
    message refused before its parse can still be answered by it. 0 (the default) when
    absent; None when the bytes are malformed or hold over ``max_fields`` fields.

    >>> from roundtrip.v1 import roundtrip_pb2 as pb
    >>> varint_field(pb.RoundTripStreamRequest(id=300).SerializeToString(), 1)
    300
    >>> varint_field(pb.RoundTripStreamRequest(id=0).SerializeToString(), 1)
    0
    """
    walk = _Walk(memoryview(data), RepeatedLimits({}, max_fields=max_fields))
    found = 0
    pos = 0
    try:
        while pos < len(data):
            key, pos = walk.varint(pos)
            walk.counted()
            pos, value = walk.skip(key, pos, len(data))
            if key == number << 3:  # wire type 0
                found = value
    except (IndexError, _Malformed, LimitExceeded):
        return None
    return found if pos == len(data) else None


class _Malformed(Exception):
    """The bytes are not a message: the parser will say so."""


@dataclass(slots=True)
class _Counts:
    """One message the parser will build: its repeated fields' elements so far, and its
    singular sub-messages (each occurrence of one merges into the same)."""

    repeated: dict[int, int] = field(default_factory=dict)
    singular: dict[int, _Counts] = field(default_factory=dict)


class _Walk:
    """One walk over a message's bytes, with its count of fields walked."""

    __slots__ = ("data", "fields", "limits")

    def __init__(self, data: memoryview, limits: RepeatedLimits) -> None:
        self.data = data
        self.limits = limits
        self.fields = 0

    def varint(self, pos: int) -> tuple[int, int]:
        data = self.data
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

    def counted(self) -> None:
        self.fields += 1
        if self.fields > self.limits.max_fields:
            raise LimitExceeded(
                f"the message holds more than {self.limits.max_fields} fields, more than any "
                "valid request holds: send repeated numbers packed (as protobuf does)"
            )

    def message(self, pos: int, end: int, descriptor: Descriptor, counts: _Counts) -> None:
        """Walk one occurrence of a ``descriptor`` message in ``[pos, end)``."""
        fields = descriptor.fields_by_number
        while pos < end:
            key, pos = self.varint(pos)
            self.counted()
            after, value = self.skip(key, pos, end)
            found = fields.get(key >> 3)
            if found is not None:
                if key & 7 == 2:
                    self.delimited(found, after - value, after, counts)
                elif found.is_repeated and _wire_type(found) == key & 7:
                    self.add(counts, found, 1)  # one element of a repeated scalar, unpacked
            pos = after
        if pos != end:
            raise _Malformed

    def skip(self, key: int, pos: int, end: int) -> tuple[int, int]:
        """Past the payload of a field whose ``key`` was just read: the position after it,
        and its value (a varint) or its length (length-delimited). A field of another wire
        type than its declaration's is an unknown field to the parser, and skipped alike."""
        wire_type = key & 7
        if wire_type == 0:
            value, pos = self.varint(pos)
            return pos, value
        if wire_type == 1:
            return pos + 8, 8
        if wire_type == 5:
            return pos + 4, 4
        if wire_type == 2:
            length, pos = self.varint(pos)
            if pos + length > end:
                raise _Malformed
            return pos + length, length
        if wire_type == 3:
            return self.group(pos, end, key >> 3), 0
        raise _Malformed  # an end of group with no start, or no wire type at all

    def delimited(self, found: FieldDescriptor, start: int, end: int, counts: _Counts) -> None:
        """A length-delimited field of ``counts``'s message: a sub-message, a packed run,
        or bytes."""
        if found.message_type is not None:
            if found.is_repeated:
                self.add(counts, found, 1)
                self.message(start, end, found.message_type, _Counts())
            else:
                merged = counts.singular.get(found.number)
                if merged is None:
                    merged = counts.singular[found.number] = _Counts()
                self.message(start, end, found.message_type, merged)
        elif not found.is_repeated:
            return
        elif found.type in _VARINTS:  # packed (perhaps one of several parts)
            most = self.limits.most(found)[0] - counts.repeated.get(found.number, 0)
            self.add(counts, found, _packed_count(self.data, start, end, most))
        elif found.type in _FIXED:
            self.add(counts, found, (end - start) // _FIXED[found.type])
        else:
            self.add(counts, found, 1)

    def add(self, counts: _Counts, found: FieldDescriptor, elements: int) -> None:
        """``elements`` more of ``found`` in ``counts``'s message; refused at once beyond its
        limit when they grow once parsed."""
        count = counts.repeated.get(found.number, 0) + elements
        counts.repeated[found.number] = count
        if found.type in _FIXED:
            return
        most, knob = self.limits.most(found)
        if count > most:
            raise LimitExceeded(
                f"{found.full_name} holds more than {most} elements, this worker's limit ({knob})"
            )

    def group(self, pos: int, end: int, number: int) -> int:
        """Skip a group (an unknown field: the parser keeps its bytes as they are) that
        started before ``pos``, nested groups included; the position after its end."""
        while pos < end:
            key, pos = self.varint(pos)
            self.counted()
            if key & 7 == 4:
                if key >> 3 != number:
                    raise _Malformed
                return pos
            pos, _ = self.skip(key, pos, end)
        raise _Malformed  # no end


def _wire_type(found: FieldDescriptor) -> int:
    """The wire type of one element of ``found`` sent unpacked."""
    if found.type in _FIXED:
        return 1 if _FIXED[found.type] == 8 else 5
    return 0 if found.type in _VARINTS else 2


def _packed_count(data: memoryview, start: int, end: int, most: int) -> int:
    """How many varints ``data[start:end]`` packs, counted a piece at a time (no copy of the
    whole field), or a count over ``most`` as soon as there is one."""
    count = 0
    for piece in range(start, end, _PIECE):
        count += len(
            data[piece : min(end, piece + _PIECE)].tobytes().translate(None, _CONTINUATIONS)
        )
        if count > most:
            break
    return count
