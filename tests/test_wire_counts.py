"""The pre-parse check against protobuf's own parser: whatever valid encoding carries a
message (fields in any order, singular sub-messages split into occurrences the parser merges,
packed fields in parts or unpacked, over-long varints, unknown fields of every wire type,
groups included), ``check_counts`` refuses it exactly when the parsed message would hold a
repeated field over its limit; and on mutated bytes that protobuf still parses, it never
lets such a message through.
"""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from roundtrip.server.errors import LimitExceeded
from roundtrip.server.pipeline.wire_counts import RepeatedLimits, check_counts
from roundtrip.server.v2proto import grpc_predict_v2_pb2 as v2pb
from roundtrip.v1 import roundtrip_pb2 as pb

#: Small limits, so that generated messages fall on both sides of them.
LIMITS = RepeatedLimits(
    {
        "roundtrip.v1.RoundTripBatchRequest.requests": (8, "max_batch_items"),
        "roundtrip.v1.Array.shape": (3, "max_x_rank"),
        "inference.ModelInferRequest.InferInputTensor.shape": (4, "rank"),
        "inference.InferTensorContents.int64_contents": (6, "max_batch_items"),
    },
    default=(5, "a fixed limit"),
    max_fields=1 << 20,
)
CHECKS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_FIXED = {
    FieldDescriptor.TYPE_DOUBLE: ("<d", 1),
    FieldDescriptor.TYPE_FLOAT: ("<f", 5),
    FieldDescriptor.TYPE_FIXED64: ("<Q", 1),
    FieldDescriptor.TYPE_FIXED32: ("<I", 5),
    FieldDescriptor.TYPE_SFIXED64: ("<q", 1),
    FieldDescriptor.TYPE_SFIXED32: ("<i", 5),
}


def over_limit(message: Message) -> bool:
    """Whether a parsed message holds a repeated field over ``LIMITS`` (fixed-size numbers,
    which do not grow when parsed, have none), at any depth."""
    for field, value in message.ListFields():
        if field.is_repeated:
            if field.type not in _FIXED and len(value) > LIMITS.most(field)[0]:
                return True
            if _is_map(field):
                entries = [entry for entry in value.values() if isinstance(entry, Message)]
            else:
                entries = list(value) if field.message_type is not None else []
            if any(over_limit(entry) for entry in entries):
                return True
        elif field.message_type is not None and over_limit(value):
            return True
    return False


def _is_map(field: FieldDescriptor) -> bool:
    return bool(field.message_type and field.message_type.GetOptions().map_entry)


def varint(value: int, rng: random.Random, longest: int = 10) -> bytes:
    """``value`` as a varint, sometimes over-long (padded with continuation bytes to at most
    ``longest`` bytes: ten for a value, five for a length, as protobuf's parser accepts)."""
    value &= (1 << 64) - 1
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    if rng.random() < 0.2 and len(out) < longest:
        out[-1] |= 0x80
        out += b"\x80" * rng.randrange(0, longest - len(out))
        out.append(0)
    return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type, random.Random(0))


def delimited(number: int, payload: bytes, rng: random.Random) -> bytes:
    return tag(number, 2) + varint(len(payload), rng, longest=5) + payload


def unknown_field(rng: random.Random, depth: int = 0) -> bytes:
    """A field no message here declares, of any wire type: a group holds more of them."""
    number = rng.randrange(1000, 1 << 20)
    kind = rng.choice([0, 1, 2, 5] + ([3] if depth < 3 else []))
    if kind == 0:
        return tag(number, 0) + varint(rng.getrandbits(64), rng)
    if kind == 1:
        return tag(number, 1) + rng.randbytes(8)
    if kind == 5:
        return tag(number, 5) + rng.randbytes(4)
    if kind == 2:
        return delimited(number, rng.randbytes(rng.randrange(0, 8)), rng)
    inside = b"".join(unknown_field(rng, depth + 1) for _ in range(rng.randrange(0, 3)))
    return tag(number, 3) + inside + tag(number, 4)


def scalar(field: FieldDescriptor, value: Any, rng: random.Random) -> tuple[int, bytes]:
    """One element of a scalar field: its wire type and its bytes."""
    if field.type in _FIXED:
        fmt, wire_type = _FIXED[field.type]
        return wire_type, struct.pack(fmt, value)
    if field.type in (FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64):
        value = (value << 1) ^ (value >> 63)
    return 0, varint(int(value), rng)


def split(message: Message, parts: int, rng: random.Random) -> list[Message]:
    """``parts`` messages that the parser, merging them in order, makes ``message`` again."""
    pieces = [type(message)() for _ in range(parts)]
    for field, value in message.ListFields():
        if field.is_repeated:
            items = list(value.items()) if _is_map(field) else list(value)
            cuts = sorted(rng.randrange(0, len(items) + 1) for _ in range(parts - 1))
            for piece, start, end in zip(pieces, [0, *cuts], [*cuts, len(items)], strict=True):
                target = getattr(piece, field.name)
                for item in items[start:end]:
                    if _is_map(field):
                        key, entry = item
                        if isinstance(entry, Message):
                            target[key].CopyFrom(entry)
                        else:
                            target[key] = entry
                    elif field.message_type is not None:
                        target.add().CopyFrom(item)
                    else:
                        target.append(item)
        elif field.message_type is not None:
            shares = split(value, rng.randrange(1, 3), rng)
            places = sorted(rng.randrange(parts) for _ in shares)  # merged in order
            for share, place in zip(shares, places, strict=True):
                getattr(pieces[place], field.name).MergeFrom(share)
            if not any(piece.HasField(field.name) for piece in pieces):
                getattr(pieces[-1], field.name).SetInParent()
        else:
            setattr(rng.choice(pieces), field.name, value)
    return pieces


def encode(message: Message, rng: random.Random, unknowns: bool = True) -> bytes:
    """``message`` in one of the many valid encodings protobuf's parser accepts for it.
    (Not with unknown fields inside a map entry: protobuf then keeps the entry as unknown
    bytes, not an entry, and the check's count of entries is an upper bound.)"""
    runs: list[list[bytes]] = []  # each field's pieces, in order; fields interleave freely
    for field, value in message.ListFields():
        pieces: list[bytes] = []
        number = field.number
        if _is_map(field):
            assert field.message_type is not None  # a map field's entries are messages
            entry_type = message_factory.GetMessageClass(field.message_type)
            for key, item in value.items():
                entry: Any = entry_type(key=key)  # a generated map entry: key and value
                if isinstance(item, Message):
                    entry.value.CopyFrom(item)
                else:
                    entry.value = item
                pieces.append(delimited(number, encode(entry, rng, unknowns=False), rng))
        elif field.message_type is not None:
            elements = value if field.is_repeated else split(value, rng.randrange(1, 4), rng)
            pieces += [
                delimited(number, encode(element, rng, unknowns), rng) for element in elements
            ]
        elif field.type in (FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_STRING):
            items = value if field.is_repeated else [value]
            for item in items:
                data = item.encode() if isinstance(item, str) else item
                pieces.append(delimited(number, data, rng))
        elif field.is_repeated:
            items = list(value)
            while items:
                run = items[: rng.randrange(1, len(items) + 1)]
                items = items[len(run) :]
                if rng.random() < 0.5:  # packed, perhaps one part of several
                    payload = b"".join(scalar(field, item, rng)[1] for item in run)
                    pieces.append(delimited(number, payload, rng))
                else:
                    for item in run:
                        wire_type, data = scalar(field, item, rng)
                        pieces.append(tag(number, wire_type) + data)
        else:
            wire_type, data = scalar(field, value, rng)
            pieces.append(tag(number, wire_type) + data)
        runs.append(pieces)
    out = []
    while any(runs):
        if unknowns and rng.random() < 0.1:
            out.append(unknown_field(rng))
        run = rng.choice([run for run in runs if run])
        out.append(run.pop(0))
    if unknowns and rng.random() < 0.2:
        out.append(unknown_field(rng))
    return b"".join(out)


def counted(data: bytes, message_type: type[Message]) -> bool:
    """Whether ``check_counts`` refuses ``data`` (every message walked)."""
    try:
        # upb's descriptor is the same object at run time; the stubs name two classes
        check_counts(data, message_type.DESCRIPTOR, LIMITS, walked_above=0)  # type: ignore[arg-type]
    except LimitExceeded:
        return True
    return False


SMALL_INTS = st.integers(-(2**63), 2**63 - 1)


@st.composite
def batches(draw: st.DrawFn) -> pb.RoundTripBatchRequest:
    batch = pb.RoundTripBatchRequest()
    for _ in range(draw(st.integers(0, 10))):
        request = batch.requests.add(seed=draw(SMALL_INTS), features=draw(st.integers(0, 99)))
        if draw(st.booleans()):
            request.x.shape[:] = draw(st.lists(st.integers(0, 2**40), max_size=5))
            request.x.values[:] = draw(st.lists(st.floats(allow_nan=False), max_size=4))
            request.x.raw = draw(st.binary(max_size=8))
        request.return_outputs = draw(st.booleans())
    return batch


@st.composite
def infers(draw: st.DrawFn) -> v2pb.ModelInferRequest:
    call = v2pb.ModelInferRequest(model_name=draw(st.text(max_size=3)))
    for _ in range(draw(st.integers(0, 6))):
        tensor = call.inputs.add(name=draw(st.text(max_size=3)), datatype="INT64")
        tensor.shape[:] = draw(st.lists(st.integers(0, 2**40), max_size=6))
        tensor.contents.int64_contents[:] = draw(st.lists(SMALL_INTS, max_size=8))
        tensor.contents.fp32_contents[:] = draw(
            st.lists(st.floats(width=32, allow_nan=False), max_size=9)
        )
        for key in draw(st.lists(st.text(max_size=2), max_size=3, unique=True)):
            tensor.parameters[key].int64_param = draw(SMALL_INTS)
    call.raw_input_contents[:] = draw(st.lists(st.binary(max_size=4), max_size=6))
    return call


@pytest.mark.parametrize("messages", [batches(), infers()], ids=["RoundTripBatch", "ModelInfer"])
def test_every_valid_encoding_is_counted_as_protobuf_parses_it(messages: Any) -> None:
    @CHECKS
    @given(messages, st.integers(0, 2**32))
    def check(message: Message, seed: int) -> None:
        data = encode(message, random.Random(seed))
        parsed = type(message).FromString(data)
        parsed.DiscardUnknownFields()
        assert parsed == message  # the encoding is valid, and means that message
        assert counted(data, type(message)) == over_limit(message)

    check()


@pytest.mark.parametrize("messages", [batches(), infers()], ids=["RoundTripBatch", "ModelInfer"])
def test_mutated_bytes_protobuf_parses_never_slip_past_a_limit(messages: Any) -> None:
    @CHECKS
    @given(
        messages,
        st.integers(0, 2**32),
        st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=4),
    )
    def check(message: Message, seed: int, edits: list[tuple[float, int]]) -> None:
        data = bytearray(encode(message, random.Random(seed)))
        for where, byte in edits:
            if data:
                data[int(where * (len(data) - 1))] = byte
        try:
            parsed = type(message).FromString(bytes(data))
        except DecodeError:
            return
        if over_limit(parsed):
            assert counted(bytes(data), type(message))

    check()


def test_the_walk_is_bounded_by_the_fields_it_may_visit() -> None:
    """Eight million requests, or a million unknown fields: refused after at most
    ``max_fields`` fields, not walked to the end."""
    limits = RepeatedLimits({}, max_fields=1000)
    many = pb.RoundTripBatchRequest(requests=[pb.RoundTripRequest()] * 5000).SerializeToString()
    unknown = b"".join(tag(2000, 0) + b"\x00" for _ in range(100_000))
    for data in (many, unknown + many):
        with pytest.raises(LimitExceeded, match=r"more than 1000 fields|more than 1024 elements"):
            check_counts(data, pb.RoundTripBatchRequest.DESCRIPTOR, limits, walked_above=0)
