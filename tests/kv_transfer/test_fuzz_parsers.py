"""Fuzz the decoders that read bytes from outside: context_phase_params, the KV handle, kv_transfer's
control messages. Whatever the bytes, a decoder returns a value that round-trips or raises its own
malformed-input exception: never another exception, never a hang, never a large allocation.

Three kinds of input per decoder: arbitrary bytes; valid encodings mutated (bytes flipped, cut,
inserted); and arbitrary bodies behind a *valid* frame (a correct CRC, or a correct HMAC), so the
field checks behind the integrity check are reached too. Derandomized: the same examples every run.
"""

from __future__ import annotations

import dataclasses
import struct
import tracemalloc
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kv_transfer import KVHandle, KVLayout, MalformedMessageError
from kv_transfer.layout import SharedPool
from kv_transfer.liveness import ProcessIdentity
from kv_transfer.wire import (
    WIRE_VERSION,
    PullAbandoned,
    PullDone,
    PullRequest,
    PullResponse,
    PullStatus,
    decode_control,
)
from python_backend_utils.serving.context_params import (
    ContextPhaseParams,
    ForgedContextParamsError,
    MalformedContextParamsError,
    _tag,
)

FUZZ = settings(max_examples=100, deadline=2000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
KEY = b"k" * 32
PROMPT = list(range(100, 117))

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
identities = st.builds(ProcessIdentity, st.text(max_size=40), u64, u32, u64)


def frame(magic: bytes, body: bytes) -> bytes:
    return struct.pack("<4sBII", magic, WIRE_VERSION, len(body), zlib.crc32(body)) + body


# Values that break naive field checks: NaN, infinities, all-ones lengths and counts, zero.
SPECIAL = [struct.pack("<d", float("nan")), struct.pack("<d", float("inf")), struct.pack("<d", -float("inf")),
           b"\xff" * 8, b"\xff" * 4, bytes(8), bytes(4), struct.pack("<I", 1), b"\x80"]


@st.composite
def mutated(draw, valid: bytes) -> bytes:
    """`valid` with a few random edits: flip, overwrite with a special value, delete, insert, truncate, extend."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        edit = draw(st.sampled_from(["flip", "overwrite", "delete", "insert", "truncate", "extend"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if edit == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif edit == "overwrite":
            value = draw(st.sampled_from(SPECIAL))
            data[at:at + len(value)] = value
        elif edit == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif edit == "truncate":
            del data[at:]
        else:
            data += draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


# ------------------------------------------------------------------ context_phase_params

params_values = st.builds(ContextPhaseParams, st.text(max_size=30), u32, st.just(len(PROMPT)), st.binary(max_size=200))


def parse_params(data: bytes) -> ContextPhaseParams | None:
    """The decoded value (checked to round-trip), or None when refused with the module's error."""
    try:
        parsed = ContextPhaseParams.from_bytes(data, KEY, PROMPT)
    except MalformedContextParamsError:
        return None
    assert parsed.to_bytes(KEY, PROMPT) == data
    return parsed


@FUZZ
@given(st.binary(max_size=400))
def test_params_from_arbitrary_bytes(data):
    assert parse_params(data) is None  # nothing unsigned gets through


@FUZZ
@given(st.data(), params_values)
def test_params_mutated_are_refused(data, value):
    valid = value.to_bytes(KEY, PROMPT)
    damaged = data.draw(mutated(valid))
    assert parse_params(damaged) == (value if damaged == valid else None)


@FUZZ
@given(st.binary(min_size=4, max_size=300), st.sampled_from([b"CPP2", b"CPP1", b"XXXX"]))
def test_params_signed_arbitrary_bodies_parse_or_are_malformed_not_forged(body, magic):
    """Correctly signed garbage reaches the field checks behind the HMAC: malformed, never forged."""
    signed = magic + body
    data = signed + _tag(KEY, signed, PROMPT)
    try:
        parse_params(data)
    except ForgedContextParamsError:  # pragma: no cover - the failure this test exists to catch
        pytest.fail("a correctly signed message was called forged")


@FUZZ
@given(params_values, st.lists(st.integers(0, 2**31 - 1), min_size=len(PROMPT), max_size=len(PROMPT)))
def test_params_only_verify_with_their_key_and_prompt(value, other_prompt):
    valid = value.to_bytes(KEY, PROMPT)
    with pytest.raises(ForgedContextParamsError):
        ContextPhaseParams.from_bytes(valid, b"x" * 32, PROMPT)
    if other_prompt != PROMPT:
        with pytest.raises(ForgedContextParamsError):
            ContextPhaseParams.from_bytes(valid, KEY, other_prompt)


# ------------------------------------------------------------------ KV handle

@st.composite
def handles(draw) -> KVHandle:
    layout = KVLayout(num_layers=draw(st.integers(1, 40)), num_kv_heads=draw(st.integers(1, 16)),
                      head_dim=draw(st.integers(1, 256)), block_size=draw(st.integers(1, 64)),
                      dtype=draw(st.sampled_from(["float32", "bfloat16", "float16"])))
    num_blocks = draw(st.integers(1, 12))
    num_tokens = draw(st.integers((num_blocks - 1) * layout.block_size + 1, num_blocks * layout.block_size))
    shared = draw(st.none() | st.builds(SharedPool, u32, u64, u64))
    return KVHandle(agent_name=draw(st.text(max_size=30)), agent_address=draw(st.binary(min_size=1, max_size=64)),
                    agent_process=draw(identities), request_id=draw(st.text(max_size=40)),
                    block_ids=tuple(draw(st.lists(u32, min_size=num_blocks, max_size=num_blocks))),
                    num_tokens=num_tokens, layout=layout, secret=draw(st.binary(min_size=16, max_size=16)),
                    expires_at=draw(st.floats(allow_nan=False, allow_infinity=False)),
                    max_message_bytes=draw(st.integers(1, 2**64 - 1)), shared_pool=shared)


def parse_handle(data: bytes) -> KVHandle | None:
    try:
        parsed = KVHandle.from_bytes(data)
    except MalformedMessageError:
        return None
    assert KVHandle.from_bytes(parsed.to_bytes()) == parsed
    return parsed


@FUZZ
@given(st.binary(max_size=400))
def test_handle_from_arbitrary_bytes(data):
    parse_handle(data)


@FUZZ
@given(st.binary(max_size=400))
def test_handle_from_arbitrary_framed_bodies(body):
    parse_handle(frame(KVHandle.MAGIC, body))


def unchecked_layout(layout: KVLayout, **changes) -> KVLayout:
    """A layout with `changes` applied past KVLayout's own validation (what a forger could encode)."""
    raw = object.__new__(KVLayout)
    for name, value in {**dataclasses.asdict(layout), **changes}.items():
        object.__setattr__(raw, name, value)
    return raw


HOSTILE_FIELDS = {
    "expires_at": st.sampled_from([float("nan"), float("inf"), -float("inf")]) | st.floats(),
    "num_tokens": st.sampled_from([0, 1, 2**63, 2**64 - 1]) | u64,
    "block_ids": st.lists(u32, max_size=3).map(tuple),
    "secret": st.binary(max_size=20),
    "agent_address": st.just(b""),
    "max_message_bytes": st.sampled_from([0, 1, 2**64 - 1]),
    "shared_pool": st.builds(SharedPool, u32, u64, u64),
}
LAYOUT_FIELDS = ["num_layers", "num_kv_heads", "head_dim", "block_size", "layer_start", "head_start",
                 "total_layers", "total_kv_heads"]


@st.composite
def hostile_handle_frames(draw) -> bytes:
    """A valid handle with one field replaced by a hostile value (any float, count, length, layout)."""
    handle = draw(handles())
    field = draw(st.sampled_from([*HOSTILE_FIELDS, "layout"]))
    if field == "layout":
        name = draw(st.sampled_from(LAYOUT_FIELDS + ["dtype"]))
        value = draw(st.sampled_from(["int8", "", "float32"]) if name == "dtype" else st.sampled_from([0, 1]) | u32)
        return dataclasses.replace(handle, layout=unchecked_layout(handle.layout, **{name: value})).to_bytes()
    return dataclasses.replace(handle, **{field: draw(HOSTILE_FIELDS[field])}).to_bytes()


@FUZZ
@given(hostile_handle_frames())
def test_handle_with_hostile_field_values(data):
    parse_handle(data)


@FUZZ
@given(st.data(), handles())
def test_handle_mutated_before_and_after_framing(data, handle):
    valid = handle.to_bytes()
    assert parse_handle(valid) == handle
    parse_handle(data.draw(mutated(valid)))  # the CRC catches most; trailing bytes are ignored
    parse_handle(frame(KVHandle.MAGIC, data.draw(mutated(valid[13:]))))  # valid CRC: the field checks


# ------------------------------------------------------------------ control messages

pull_requests = st.builds(
    PullRequest, st.integers(1, 2**40 - 1), st.binary(max_size=64), st.text(max_size=20), identities,
    st.text(max_size=30), st.binary(max_size=32), st.tuples(u32, u32), st.tuples(u32, u32), st.booleans(),
    st.lists(u32, max_size=20).map(tuple))
pull_dones = st.builds(PullDone, u64, st.binary(max_size=64), st.binary(max_size=32))
pull_abandoneds = st.builds(PullAbandoned, st.text(max_size=20), st.text(max_size=30), st.binary(max_size=32))
pull_responses = st.builds(PullResponse, u64, st.sampled_from(list(PullStatus)))
MESSAGE_TYPES = [PullRequest, PullDone, PullAbandoned, PullResponse]


def parse_message(kind, data: bytes):
    decode = decode_control if kind is None else kind.from_bytes
    try:
        parsed = decode(data)
    except MalformedMessageError:
        return None
    assert decode(parsed.to_bytes()) == parsed
    return parsed


@FUZZ
@given(st.binary(max_size=300), st.sampled_from([None, *MESSAGE_TYPES]))
def test_control_from_arbitrary_bytes(data, kind):
    parse_message(kind, data)


@FUZZ
@given(st.binary(max_size=300), st.sampled_from(MESSAGE_TYPES), st.booleans())
def test_control_from_arbitrary_framed_bodies(body, kind, through_decode_control):
    parse_message(None if through_decode_control and kind is not PullResponse else kind, frame(kind.MAGIC, body))


@FUZZ
@given(st.data(), st.one_of(pull_requests, pull_dones, pull_abandoneds, pull_responses))
def test_control_mutated_before_and_after_framing(data, message):
    valid = message.to_bytes()
    kind = type(message)
    assert parse_message(kind, valid) == message
    parse_message(kind, data.draw(mutated(valid)))
    parse_message(kind, frame(kind.MAGIC, data.draw(mutated(valid[13:]))))


# ------------------------------------------------------------------ declared sizes are not trusted

def peak_bytes(parse, data: bytes) -> int:
    tracemalloc.start()
    try:
        parse(data)
    except (MalformedMessageError, MalformedContextParamsError):
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("parse,data", [
    (KVHandle.from_bytes, frame(KVHandle.MAGIC, struct.pack("<I", 2**32 - 1))),  # a 4 GiB name
    (KVHandle.from_bytes, struct.pack("<4sBII", KVHandle.MAGIC, WIRE_VERSION, 2**32 - 1, 0)),  # a 4 GiB body
    (PullRequest.from_bytes, frame(PullRequest.MAGIC, bytes(8) + struct.pack("<I", 2**32 - 1))),
    (PullRequest.from_bytes, frame(PullRequest.MAGIC, bytes(8 + 4 + 4 + 4 + 8 + 4 + 8 + 4 + 4 + 16 + 1)
                                   + struct.pack("<I", 2**32 - 1))),  # 4 billion boundaries
    (lambda d: ContextPhaseParams.from_bytes(d, KEY, PROMPT), struct.pack("<4sIIHI", b"CPP2", 0, 1, 0, 2**32 - 1)),
], ids=["handle-name", "handle-body", "request-address", "request-boundaries", "params-handle"])
def test_declared_lengths_allocate_nothing(parse, data):
    assert peak_bytes(parse, data) < 64 << 10
