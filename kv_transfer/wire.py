"""Binary encoding of handles and control messages, the tag scheme, and control-message MACs.

Every encoded object is framed as ``magic (4) | version (1) | body length (4) | crc32 of body (4) | body``.
Control messages are received into fixed-size buffers posted ahead (see transport.py), so the frame
says where it ends. The CRC catches damage, not forgery. With a deployment key, a control message
is the frame followed by an HMAC-SHA256 of it and of the address of the agent it is for (`seal`),
checked before anything in it is read (`unseal`): a message cannot be forged without the key, nor
replayed to another agent or a restarted one (worker addresses hold a random id). Without a key,
bytes after the frame are ignored.

These messages carry UCX worker addresses, and UCX trusts an address blindly: a garbage one made
this UCX (1.19) abort the process on an assertion (address version). `check_worker_address`
rejects the malformed addresses that abort; nothing short of UCX's own parser proves one good,
which is why an address is used only once its message is authentic (sender.py).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import MalformedMessageError, UnauthenticatedMessageError
from .layout import KVLayout, SharedPool
from .liveness import ProcessIdentity

WIRE_VERSION = 1
_FRAME = struct.Struct("<4sBII")

# Tags (64 bits): kind (4) | pull id (40) | message index (20). Pull ids come from the
# receiving agent, so response and data tags are unique on the worker that receives them.
_KIND_SHIFT = 60
_PULL_SHIFT = 20
MAX_PULL_ID = (1 << 40) - 1
CONTROL_TAG = 1 << _KIND_SHIFT
_RESPONSE_KIND = 2
_DATA_KIND = 3

# A pull request carries an address (~200 bytes) and its message boundaries (4 bytes each):
# 256 KiB allows ~64,000 messages, far above any real request. A longer one fails as truncated.
MAX_CONTROL_BYTES = 256 << 10
MAX_MESSAGES = (MAX_CONTROL_BYTES - 4096) // 4
MAC_BYTES = hashlib.sha256().digest_size
MAX_RESPONSE_BYTES = 64  # a sealed PullResponse is 54
_MAC_DOMAIN = b"kv_transfer control message v1\0"  # the deployment key also signs other things

# UCX worker addresses: ~200 bytes for a few transports. The low 4 bits of the first byte are the
# address version, which UCX asserts it knows (see the module docstring).
MIN_ADDRESS_BYTES = 16
MAX_ADDRESS_BYTES = 4096
_ADDRESS_VERSION_MASK = 0x0F


def response_tag(pull_id: int) -> int:
    return (_RESPONSE_KIND << _KIND_SHIFT) | (pull_id << _PULL_SHIFT)


def data_tag(pull_id: int, index: int) -> int:
    return (_DATA_KIND << _KIND_SHIFT) | (pull_id << _PULL_SHIFT) | index


def check_worker_address(address: bytes, like: bytes) -> None:
    """MalformedMessageError unless `address` could be a UCX worker address of `like`'s version."""
    if not MIN_ADDRESS_BYTES <= len(address) <= MAX_ADDRESS_BYTES:
        raise MalformedMessageError(f"a worker address of {len(address)} bytes "
                                    f"(expected {MIN_ADDRESS_BYTES}-{MAX_ADDRESS_BYTES})")
    if address[0] & _ADDRESS_VERSION_MASK != like[0] & _ADDRESS_VERSION_MASK:
        raise MalformedMessageError(f"a worker address of UCX address version {address[0] & _ADDRESS_VERSION_MASK}, "
                                    f"this agent's is {like[0] & _ADDRESS_VERSION_MASK}")


def _mac(key: bytes, recipient: bytes, frame: bytes | memoryview) -> bytes:
    mac = hmac.new(key, _MAC_DOMAIN, hashlib.sha256)
    mac.update(struct.pack("<I", len(recipient)))
    mac.update(recipient)
    mac.update(frame)
    return mac.digest()


def seal(frame: bytes, key: bytes | None, recipient: bytes) -> bytes:
    """A control message for the agent at `recipient`: the frame, and its MAC when there is a key."""
    return frame if key is None else frame + _mac(key, recipient, frame)


def unseal(data: bytes | memoryview, key: bytes | None, recipient: bytes) -> memoryview:
    """The frame of a control message for `recipient` (this agent), once its MAC checks out.

    UnauthenticatedMessageError if it has no valid MAC; only the frame header's length is read first.
    """
    data = memoryview(data).cast("B")
    if key is None:
        return data
    if len(data) < _FRAME.size:
        raise UnauthenticatedMessageError(f"a control message of {len(data)} bytes has no MAC")
    end = _FRAME.size + _FRAME.unpack_from(data)[2]
    if end + MAC_BYTES > len(data) or not hmac.compare_digest(_mac(key, recipient, data[:end]),
                                                              data[end:end + MAC_BYTES]):
        raise UnauthenticatedMessageError("a control message without a valid MAC under the deployment key")
    return data[:end]


class Writer:
    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u8(self, v: int) -> Writer:
        self._parts.append(struct.pack("<B", v))
        return self

    def u32(self, v: int) -> Writer:
        self._parts.append(struct.pack("<I", v))
        return self

    def u64(self, v: int) -> Writer:
        self._parts.append(struct.pack("<Q", v))
        return self

    def f64(self, v: float) -> Writer:
        self._parts.append(struct.pack("<d", v))
        return self

    def blob(self, b: bytes) -> Writer:
        self.u32(len(b))
        self._parts.append(bytes(b))
        return self

    def text(self, s: str) -> Writer:
        return self.blob(s.encode())

    def u32s(self, values: Sequence[int]) -> Writer:
        self.u32(len(values))
        self._parts.append(np.asarray(values, dtype="<u4").tobytes())
        return self

    def layout(self, layout: KVLayout) -> Writer:
        for v in (layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.block_size,
                  layout.layer_start, layout.head_start, layout.total_layers, layout.total_kv_heads):
            self.u32(v)
        return self.text(layout.dtype)

    def identity(self, ident: ProcessIdentity) -> Writer:
        return self.text(ident.boot_id).u64(ident.pid_namespace).u32(ident.pid).u64(ident.start_ticks)

    def shared_pool(self, shared: SharedPool | None) -> Writer:
        if shared is None:
            return self.u8(0)
        return self.u8(1).u32(shared.fd).u64(shared.offset).u64(shared.nbytes)

    def frame(self, magic: bytes) -> bytes:
        body = b"".join(self._parts)
        return _FRAME.pack(magic, WIRE_VERSION, len(body), zlib.crc32(body)) + body


class Reader:
    """Strict decoder: any short read, bad value or trailing byte is a MalformedMessageError."""

    def __init__(self, data: bytes | memoryview, magic: bytes) -> None:
        data = memoryview(data).cast("B")
        if len(data) < _FRAME.size:
            raise MalformedMessageError(f"{magic!r} message truncated ({len(data)} bytes)")
        got_magic, version, length, crc = _FRAME.unpack_from(data)
        if got_magic != magic:
            raise MalformedMessageError(f"expected a {magic!r} message, got magic {bytes(got_magic)!r}")
        if version != WIRE_VERSION:
            raise MalformedMessageError(f"{magic!r} wire version {version}, this agent speaks {WIRE_VERSION}")
        if _FRAME.size + length > len(data):
            raise MalformedMessageError(f"{magic!r} message truncated")
        self._data = data[_FRAME.size:_FRAME.size + length]
        if zlib.crc32(self._data) != crc:
            raise MalformedMessageError(f"{magic!r} message corrupted or truncated (checksum mismatch)")
        self._pos = 0
        self._magic = magic

    def _take(self, n: int) -> memoryview:
        if n < 0 or self._pos + n > len(self._data):
            raise MalformedMessageError(f"{self._magic!r} message truncated")
        out = self._data[self._pos:self._pos + n]
        self._pos += n
        return out

    def u8(self) -> int:
        return self._take(1)[0]

    def u32(self) -> int:
        return struct.unpack("<I", self._take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self._take(8))[0]

    def f64(self) -> float:
        return struct.unpack("<d", self._take(8))[0]

    def blob(self) -> bytes:
        return bytes(self._take(self.u32()))

    def text(self) -> str:
        try:
            return self.blob().decode()
        except UnicodeDecodeError as e:
            raise MalformedMessageError(f"{self._magic!r} message has invalid text") from e

    def u32s(self) -> list[int]:
        n = self.u32()
        return np.frombuffer(self._take(4 * n), dtype="<u4").tolist()

    def layout(self) -> KVLayout:
        nums = [self.u32() for _ in range(8)]
        dtype = self.text()
        try:
            return KVLayout(num_layers=nums[0], num_kv_heads=nums[1], head_dim=nums[2], block_size=nums[3],
                            dtype=dtype, layer_start=nums[4], head_start=nums[5],
                            total_layers=nums[6], total_kv_heads=nums[7])
        except ValueError as e:
            raise MalformedMessageError(f"invalid layout in {self._magic!r} message: {e}") from e

    def identity(self) -> ProcessIdentity:
        return ProcessIdentity(self.text(), self.u64(), self.u32(), self.u64())

    def shared_pool(self) -> SharedPool | None:
        return SharedPool(self.u32(), self.u64(), self.u64()) if self.u8() else None

    def done(self) -> None:
        if self._pos != len(self._data):
            raise MalformedMessageError(f"{self._magic!r} message has {len(self._data) - self._pos} trailing bytes")


@dataclass(frozen=True)
class PullRequest:
    """Receiver to sender: "let me have this slice of that request".

    ``shared``: the receiver reads the sender's pool itself (same host) and answers with a
    `PullDone`; otherwise the sender sends it as messages of the request's blocks [b[k], b[k+1]).
    """

    pull_id: int
    reply_address: bytes
    receiver_name: str
    receiver: ProcessIdentity
    request_id: str
    secret: bytes
    layers: tuple[int, int]  # sender-local layer range
    heads: tuple[int, int]   # sender-local kv-head range
    shared: bool
    boundaries: tuple[int, ...]

    MAGIC = b"KVQ1"

    def to_bytes(self) -> bytes:
        w = Writer().u64(self.pull_id).blob(self.reply_address).text(self.receiver_name)
        w.identity(self.receiver).text(self.request_id).blob(self.secret)
        w.u32(self.layers[0]).u32(self.layers[1]).u32(self.heads[0]).u32(self.heads[1])
        return w.u8(self.shared).u32s(self.boundaries).frame(self.MAGIC)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> PullRequest:
        r = Reader(data, cls.MAGIC)
        msg = cls(pull_id=r.u64(), reply_address=r.blob(), receiver_name=r.text(), receiver=r.identity(),
                  request_id=r.text(), secret=r.blob(), layers=(r.u32(), r.u32()), heads=(r.u32(), r.u32()),
                  shared=bool(r.u8()), boundaries=tuple(r.u32s()))
        r.done()
        if not 0 < msg.pull_id <= MAX_PULL_ID:
            raise MalformedMessageError(f"pull id {msg.pull_id} out of range")
        return msg


@dataclass(frozen=True)
class PullDone:
    """Receiver to sender, after reading a shared pool: the blocks may be released."""

    pull_id: int
    reply_address: bytes
    secret: bytes

    MAGIC = b"KVD1"

    def to_bytes(self) -> bytes:
        return Writer().u64(self.pull_id).blob(self.reply_address).blob(self.secret).frame(self.MAGIC)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> PullDone:
        r = Reader(data, cls.MAGIC)
        msg = cls(r.u64(), r.blob(), r.blob())
        r.done()
        return msg


@dataclass(frozen=True)
class PullAbandoned:
    """Receiver to sender, after its pull of the request failed: it prefills instead and will not
    pull again, so the blocks may be released now rather than at the handle's expiry."""

    receiver_name: str
    request_id: str
    secret: bytes

    MAGIC = b"KVA1"

    def to_bytes(self) -> bytes:
        return Writer().text(self.receiver_name).text(self.request_id).blob(self.secret).frame(self.MAGIC)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> PullAbandoned:
        r = Reader(data, cls.MAGIC)
        msg = cls(r.text(), r.text(), r.blob())
        r.done()
        return msg


ControlMessage = PullRequest | PullDone | PullAbandoned


def decode_control(data: bytes | memoryview) -> ControlMessage:
    kind = bytes(memoryview(data)[:4])
    decode = {PullDone.MAGIC: PullDone.from_bytes, PullAbandoned.MAGIC: PullAbandoned.from_bytes}.get(
        kind, PullRequest.from_bytes)
    return decode(data)


class PullStatus(enum.IntEnum):
    ACCEPTED = 1
    REFUSED = 2


@dataclass(frozen=True)
class PullResponse:
    pull_id: int
    status: PullStatus

    MAGIC = b"KVR1"

    def to_bytes(self) -> bytes:
        return Writer().u64(self.pull_id).u8(self.status).frame(self.MAGIC)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> PullResponse:
        r = Reader(data, cls.MAGIC)
        pull_id, status = r.u64(), r.u8()
        r.done()
        try:
            return cls(pull_id, PullStatus(status))
        except ValueError as e:
            raise MalformedMessageError(f"unknown pull status {status}") from e
