"""A client for vmemd's memory-plane socket, in Python with the standard library only.

vmemd serves crosvm's ``VmMemoryRequest`` (plus a few extensions) over an ``AF_UNIX``
``SOCK_SEQPACKET`` socket: one packet per message, descriptors in ``SCM_RIGHTS``. Two
encodings share the socket, MessagePack and crosvm's compact JSON; a :class:`Client`
speaks one of them, chosen when it connects::

    import os, vmemd

    fd = os.memfd_create("shm")
    os.ftruncate(fd, 2 << 20)
    with vmemd.Client("/run/vmemd.sock", encoding="msgpack") as c:
        r = c.register_memory(fd, 2 << 20, 0x2_0000_0000)   # {"region_id": ..., "slot": ...}
        c.unregister_memory(r["region_id"])

Requests are plain values in serde's shape (``"GetState"``,
``{"UnregisterMemory": 4294967296}``, ...). Descriptor fields hold real descriptors (ints or
objects with ``fileno()``); the client attaches them and writes their indices. ``send()`` and
``recv()`` pipeline; ``call()`` is both. An ``Err`` answer is a :class:`VmemdError`; a broken
or timed-out connection is an ``OSError``.
"""

from __future__ import annotations

import array
import collections
import errno as _errno
import json
import math
import os
import re
import select
import socket
import struct
import time

__all__ = [
    "Client",
    "VmemdError",
    "ProtocolError",
    "DecodeError",
    "msgpack_encode",
    "msgpack_decode",
    "json_encode",
    "json_decode",
    "pci_bar",
    "existing_allocation",
    "MAX_PACKET",
    "SCM_MAX_FD",
]

#: The largest packet body, either way.
MAX_PACKET = 65536
#: The most descriptors one packet may carry (the kernel's SCM_MAX_FD).
SCM_MAX_FD = 253

_U64_MAX = (1 << 64) - 1
# Flags as plain ints (socket's are enums, whose operators cost microseconds per call).
_SEND_FLAGS = int(socket.MSG_DONTWAIT) | int(socket.MSG_NOSIGNAL)
_RECV_WAIT = int(socket.MSG_CMSG_CLOEXEC)
_RECV_NOWAIT = int(socket.MSG_CMSG_CLOEXEC) | int(socket.MSG_DONTWAIT)
_MSG_TRUNC = int(socket.MSG_TRUNC)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)
_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT
_I64_MIN = -(1 << 63)


# ---- errors --------------------------------------------------------------------------


class VmemdError(Exception):
    """vmemd answered ``Err``: ``errno`` (an int or None), ``code`` (its name, e.g.
    ``"ENOENT"``, or None) and ``chain`` (the context chain, root cause first)."""

    def __init__(self, errno, chain):
        self.errno = errno
        self.code = None if errno is None else _errno.errorcode.get(errno)
        self.chain = list(chain)
        text = ": ".join(reversed(self.chain)) or "vmemd answered Err"
        if self.code is not None:
            text += f" ({self.code})"
        elif errno is not None:
            text += f" (errno {errno})"
        super().__init__(text)

    def __reduce__(self):
        return (type(self), (self.errno, self.chain))


class DecodeError(ValueError):
    """A body that is not valid MessagePack or JSON of the protocol's subset."""


class ProtocolError(Exception):
    """vmemd sent something the protocol does not allow (an undecodable body, a response
    in the other encoding, a response of the wrong shape, a packet no request asked for)."""


# ---- MessagePack ---------------------------------------------------------------------
#
# The subset the protocol uses: nil, bool, integers (every width; uint 64 up to 2^64-1),
# str, bin, arrays and maps. No floats, no ext. The decoder is iterative (no recursion),
# limits nesting, and never allocates from a header's count: a container grows element by
# element, and a count larger than the bytes left (each element takes at least one) is
# refused at once.

_pack_u16 = struct.Struct(">BH").pack
_pack_u32 = struct.Struct(">BI").pack
_pack_u64 = struct.Struct(">BQ").pack
_pack_i8 = struct.Struct(">Bb").pack
_pack_i16 = struct.Struct(">Bh").pack
_pack_i32 = struct.Struct(">Bi").pack
_pack_i64 = struct.Struct(">Bq").pack

_ENCODE_MAX_DEPTH = 256


def msgpack_encode(value) -> bytes:
    """MessagePack for ``value``: None, bool, int (-2^63 .. 2^64-1, in the smallest width),
    str, bytes/bytearray/memoryview (bin), list/tuple (array), dict (map)."""
    out = bytearray()
    _pack(value, out, 0)
    return bytes(out)


def _pack(v, out: bytearray, depth: int) -> None:
    if depth > _ENCODE_MAX_DEPTH:
        raise ValueError("msgpack_encode: nested too deeply (a cycle?)")
    if v is None:
        out.append(0xC0)
    elif v is True:
        out.append(0xC3)
    elif v is False:
        out.append(0xC2)
    elif isinstance(v, int):
        v = int(v)
        if v >= 0:
            if v <= 0x7F:
                out.append(v)
            elif v <= 0xFF:
                out += bytes((0xCC, v))
            elif v <= 0xFFFF:
                out += _pack_u16(0xCD, v)
            elif v <= 0xFFFF_FFFF:
                out += _pack_u32(0xCE, v)
            elif v <= _U64_MAX:
                out += _pack_u64(0xCF, v)
            else:
                raise OverflowError(f"msgpack_encode: {v} does not fit in uint 64")
        else:
            if v >= -32:
                out.append(v & 0xFF)
            elif v >= -0x80:
                out += _pack_i8(0xD0, v)
            elif v >= -0x8000:
                out += _pack_i16(0xD1, v)
            elif v >= -0x8000_0000:
                out += _pack_i32(0xD2, v)
            elif v >= _I64_MIN:
                out += _pack_i64(0xD3, v)
            else:
                raise OverflowError(f"msgpack_encode: {v} does not fit in int 64")
    elif isinstance(v, str):
        b = v.encode("utf-8")
        n = len(b)
        if n <= 31:
            out.append(0xA0 | n)
        elif n <= 0xFF:
            out += bytes((0xD9, n))
        elif n <= 0xFFFF:
            out += _pack_u16(0xDA, n)
        elif n <= 0xFFFF_FFFF:
            out += _pack_u32(0xDB, n)
        else:
            raise ValueError("msgpack_encode: string too long")
        out += b
    elif isinstance(v, (bytes, bytearray, memoryview)):
        b = bytes(v)
        n = len(b)
        if n <= 0xFF:
            out += bytes((0xC4, n))
        elif n <= 0xFFFF:
            out += _pack_u16(0xC5, n)
        elif n <= 0xFFFF_FFFF:
            out += _pack_u32(0xC6, n)
        else:
            raise ValueError("msgpack_encode: bin too long")
        out += b
    elif isinstance(v, (list, tuple)):
        n = len(v)
        if n <= 15:
            out.append(0x90 | n)
        elif n <= 0xFFFF:
            out += _pack_u16(0xDC, n)
        elif n <= 0xFFFF_FFFF:
            out += _pack_u32(0xDD, n)
        else:
            raise ValueError("msgpack_encode: array too long")
        for item in v:
            _pack(item, out, depth + 1)
    elif isinstance(v, dict):
        n = len(v)
        if n <= 15:
            out.append(0x80 | n)
        elif n <= 0xFFFF:
            out += _pack_u16(0xDE, n)
        elif n <= 0xFFFF_FFFF:
            out += _pack_u32(0xDF, n)
        else:
            raise ValueError("msgpack_encode: map too long")
        for key, item in v.items():
            _pack(key, out, depth + 1)
            _pack(item, out, depth + 1)
    else:
        raise TypeError(f"msgpack_encode: cannot encode {type(v).__name__} {v!r} (the protocol has no such value)")


_MAP = 1
_ARRAY = 0
_NO_KEY = object()
_KEY_TYPES = (str, int, bytes, type(None))  # bool is an int


def msgpack_decode(data, *, max_depth: int = 32):
    """The one value ``data`` holds. Raises :class:`DecodeError` on truncation, trailing
    bytes, unsupported types (float, ext, the reserved byte), invalid UTF-8, duplicate or
    unhashable map keys, nesting beyond ``max_depth``, or a header counting more elements
    than there are bytes left."""
    if not isinstance(data, bytes):
        data = bytes(data)
    n = len(data)
    pos = 0
    # Open containers: [container, elements still to come, kind, pending map key].
    stack: list = []
    while True:
        if pos >= n:
            raise DecodeError(f"MessagePack truncated at byte {pos}")
        b = data[pos]
        pos += 1
        count = -1  # a container header sets it
        kind = _ARRAY
        if b <= 0x7F:
            value = b
        elif b >= 0xE0:
            value = b - 0x100
        elif b <= 0x8F:
            count, kind = b & 0x0F, _MAP
        elif b <= 0x9F:
            count = b & 0x0F
        elif b <= 0xBF:
            size = b & 0x1F
            if size > n - pos:
                raise DecodeError(f"MessagePack str of {size} bytes truncated at byte {pos}")
            value = _utf8(data, pos, size)
            pos += size
        elif b == 0xC0:
            value = None
        elif b == 0xC2:
            value = False
        elif b == 0xC3:
            value = True
        elif 0xC4 <= b <= 0xC6 or 0xD9 <= b <= 0xDB:
            width = 1 << (b - 0xC4 if b <= 0xC6 else b - 0xD9)
            if width > n - pos:
                raise DecodeError(f"MessagePack length truncated at byte {pos}")
            size = int.from_bytes(data[pos : pos + width], "big")
            pos += width
            if size > n - pos:
                raise DecodeError(f"MessagePack {'bin' if b <= 0xC6 else 'str'} of {size} bytes: only {n - pos} left")
            value = data[pos : pos + size] if b <= 0xC6 else _utf8(data, pos, size)
            pos += size
        elif 0xCC <= b <= 0xD3:
            width = 1 << ((b - 0xCC) & 3)
            if width > n - pos:
                raise DecodeError(f"MessagePack integer truncated at byte {pos}")
            value = int.from_bytes(data[pos : pos + width], "big", signed=b >= 0xD0)
            pos += width
        elif 0xDC <= b <= 0xDF:
            width = 2 if b in (0xDC, 0xDE) else 4
            if width > n - pos:
                raise DecodeError(f"MessagePack count truncated at byte {pos}")
            count = int.from_bytes(data[pos : pos + width], "big")
            pos += width
            kind = _MAP if b >= 0xDE else _ARRAY
        else:
            what = {0xC1: "the reserved byte 0xc1", 0xCA: "float 32", 0xCB: "float 64"}.get(b, "ext")
            raise DecodeError(f"MessagePack {what} at byte {pos - 1}: not part of the protocol")

        if count >= 0:
            # Every element takes at least one byte (a map entry two): a larger count is a lie.
            need = 2 * count if kind == _MAP else count
            if need > n - pos:
                raise DecodeError(
                    f"MessagePack {'map' if kind == _MAP else 'array'} of {count} entries at byte {pos}: only {n - pos} bytes left"
                )
            if count == 0:
                value = {} if kind == _MAP else []
            else:
                if len(stack) >= max_depth:
                    raise DecodeError(f"MessagePack nested deeper than {max_depth}")
                stack.append([{} if kind == _MAP else [], count, kind, _NO_KEY])
                continue

        # Hand the finished value to its container; finished containers go up in turn.
        while stack:
            frame = stack[-1]
            if frame[2] == _MAP:
                if frame[3] is _NO_KEY:
                    if not isinstance(value, _KEY_TYPES):
                        raise DecodeError(f"MessagePack map key of type {type(value).__name__}")
                    frame[3] = value
                    break
                key = frame[3]
                if key in frame[0]:
                    raise DecodeError(f"MessagePack map has the key {key!r} twice")
                frame[0][key] = value
                frame[3] = _NO_KEY
            else:
                frame[0].append(value)
            frame[1] -= 1
            if frame[1]:
                break
            stack.pop()
            value = frame[0]
        else:
            if pos != n:
                raise DecodeError(f"{n - pos} bytes after the MessagePack value")
            return value


def _utf8(data: bytes, pos: int, size: int) -> str:
    try:
        return data[pos : pos + size].decode("utf-8")
    except UnicodeDecodeError as e:
        raise DecodeError(f"MessagePack str at byte {pos} is not UTF-8: {e.reason}") from None


# ---- JSON ----------------------------------------------------------------------------
#
# crosvm's serde_json form: compact, UTF-8, integers exact. Python's json module reads
# integers from their digits into ints, so only floats need refusing.

_JSON_START = frozenset(b'{["\t\n\r ')


def json_encode(value) -> bytes:
    """Compact JSON (no spaces), as serde_json writes it. bytes become arrays of u8 (serde's
    ``[u8; 16]``); floats are refused; map keys must be strings."""
    return json.dumps(_jsonable(value, 0), separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def _jsonable(v, depth: int):
    if depth > _ENCODE_MAX_DEPTH:
        raise ValueError("json_encode: nested too deeply (a cycle?)")
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return list(bytes(v))
    if isinstance(v, (list, tuple)):
        return [_jsonable(x, depth + 1) for x in v]
    if isinstance(v, dict):
        out = {}
        for key, item in v.items():
            if not isinstance(key, str):
                raise TypeError(f"json_encode: map key {key!r} is not a string")
            out[key] = _jsonable(item, depth + 1)
        return out
    raise TypeError(f"json_encode: cannot encode {type(v).__name__} {v!r} (the protocol has no such value)")


def _refuse_float(text):
    raise DecodeError(f"JSON number {text} is not an integer")


def _refuse_constant(text):
    raise DecodeError(f"JSON has no {text}")


def _object_pairs(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise DecodeError(f"JSON object has the key {key!r} twice")
        out[key] = value
    return out


def json_decode(data):
    """The value a JSON body holds; integers exact, floats refused (:class:`DecodeError`)."""
    try:
        text = bytes(data).decode("utf-8")
        return json.loads(text, parse_float=_refuse_float, parse_constant=_refuse_constant, object_pairs_hook=_object_pairs)
    except DecodeError:
        raise
    except UnicodeDecodeError as e:
        raise DecodeError(f"JSON body is not UTF-8: {e.reason}") from None
    except RecursionError:
        raise DecodeError("JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, or an integer of too many digits
        raise DecodeError(f"invalid JSON: {e}") from None


def _is_json(body) -> bool:
    return len(body) > 0 and body[0] in _JSON_START


# ---- request shapes ------------------------------------------------------------------


def pci_bar(bus: int, dev: int, func: int, bar: int) -> dict:
    """The ``Alloc`` of a PCI BAR: ``{"PciBar": {"bus", "dev", "func", "bar"}}``."""
    return {"PciBar": {"bus": bus, "dev": dev, "func": func, "bar": bar}}


def existing_allocation(alloc, offset: int = 0) -> dict:
    """A ``VmMemoryDestination`` inside an allocation (a PCI BAR), ``offset`` bytes in."""
    return {"ExistingAllocation": {"allocation": alloc, "offset": offset}}


def _destination(dest) -> dict:
    if isinstance(dest, bool):
        raise TypeError("a destination is a guest address (int) or a VmMemoryDestination dict")
    if isinstance(dest, int):
        return {"GuestPhysicalAddress": dest}
    if isinstance(dest, dict):
        return dest
    raise TypeError("a destination is a guest address (int) or a VmMemoryDestination dict")


def _mapping(m) -> dict:
    if isinstance(m, dict):
        return m
    file, length, mem_offset, file_offset = m
    return {"file": file, "length": length, "mem_offset": mem_offset, "file_offset": file_offset}


def _copy(v):
    """Copies the dicts and lists of a request (leaves, descriptors included, are shared)."""
    if isinstance(v, dict):
        return {k: _copy(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_copy(x) for x in v]
    return v


def _fd_of(x) -> int:
    if isinstance(x, bool):
        raise TypeError(f"a descriptor field holds {x!r}, not a descriptor")
    if isinstance(x, int):
        fd = x
    elif hasattr(x, "fileno"):
        fd = x.fileno()
    else:
        raise TypeError(f"a descriptor field holds {type(x).__name__} {x!r}: want an int or an object with fileno()")
    if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
        raise ValueError(f"{fd!r} is not an open descriptor number")
    return fd


def _variant(v):
    """(name, payload) of a serde enum value in map form, or (None, None)."""
    if isinstance(v, dict) and len(v) == 1:
        return next(iter(v.items()))
    return None, None


def _descriptor_slots(req) -> list:
    """The (holder, key) places of a request (a copy) that hold descriptors, in index order."""
    name, body = _variant(req)
    if not isinstance(body, dict):
        return []
    slots = []

    def at(holder, key):
        if isinstance(holder, dict) and key in holder:
            slots.append((holder, key))

    if name == "RegisterMemory":
        kind, source = _variant(body.get("source"))
        if kind in ("SharedMemory", "Descriptor", "Vulkan"):
            at(source, "descriptor")
    elif name == "MmapAndRegisterMemory":
        at(body.get("shm"), "descriptor")
    elif name in ("IoEventRaw", "IoEventPio"):
        at(body, "event")
    elif name == "IrqFd":
        at(body, "event")
        if body.get("resample") is not None:
            at(body, "resample")
    return slots


def _with_indices(req, slots_of):
    """A copy of ``req`` whose descriptor fields hold SCM_RIGHTS indices, and the
    descriptors in index order (one entry per field: a descriptor used twice is attached
    twice, so each is referenced exactly once)."""
    wire = _copy(req)
    fds = []
    for holder, key in slots_of(wire):
        fds.append(_fd_of(holder[key]))
        holder[key] = len(fds) - 1
    return wire, fds


def _chunk_slots(chunk) -> list:
    return [(m, "file") for m in chunk if isinstance(m, dict) and "file" in m]


_OS_ERROR = re.compile(r" \(os error (-?\d+)\)\Z")


def _close_all(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# ---- the client ----------------------------------------------------------------------

_DEFAULT = object()


class Client:
    """One connection to vmemd, in one encoding (``"msgpack"`` or ``"json"``).

    ``timeout`` (seconds, or None for no limit) bounds connecting and each ``send``,
    ``recv`` and ``call``; those take their own ``timeout=`` too. A timeout raises
    ``TimeoutError``; the connection stays usable (a late response is still delivered in
    order, or dropped if its ``call`` gave up on it).

    Not thread-safe: use one client per thread.
    """

    def __init__(self, path, encoding: str = "msgpack", timeout: float | None = 30.0):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.settimeout(timeout)
            sock.connect(os.fspath(path))
        except BaseException:
            sock.close()
            raise
        self._setup(sock, encoding, timeout)

    @classmethod
    def from_socket(cls, sock: socket.socket, encoding: str = "msgpack", timeout: float | None = 30.0) -> "Client":
        """A client on an already connected ``SOCK_SEQPACKET`` socket (which it then owns)."""
        if sock.type != socket.SOCK_SEQPACKET:
            raise ValueError("vmemd speaks SOCK_SEQPACKET")
        self = cls.__new__(cls)
        self._setup(sock, encoding, timeout)
        return self

    def _setup(self, sock, encoding, timeout):
        if encoding not in ("msgpack", "json"):
            sock.close()
            raise ValueError(f"encoding must be 'msgpack' or 'json', not {encoding!r}")
        self.encoding = encoding
        self.timeout = timeout
        self._encode = msgpack_encode if encoding == "msgpack" else json_encode
        self._sock = sock
        # Blocking, so that a wait for a response sleeps in recvmsg itself (SO_RCVTIMEO
        # bounds it); sends pass MSG_DONTWAIT and never block.
        sock.settimeout(None)
        self._rcvtimeo = None  # the SO_RCVTIMEO in force (seconds; 0: none), None: unknown
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)
        self._rbuf = bytearray(MAX_PACKET)
        self._ancsize = socket.CMSG_SPACE(SCM_MAX_FD * 4)
        self._sent = 0  # requests sent (each gets one response)
        self._received = 0  # responses received
        self._ready = collections.deque()  # (seq, result, fds) received, not yet returned
        self._abandoned = set()  # seqs whose call() timed out: drop their responses
        self._owed_mappings = 0  # file mappings the last MmapAndRegisterMemory still expects
        self._closed = False

    # -- lifecycle --

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def pending(self) -> int:
        """Requests sent whose responses ``recv()`` has not returned yet."""
        return self._sent - self._received - len(self._abandoned) + len(self._ready)

    def close(self) -> None:
        """Closes the socket, and any descriptors in responses never returned."""
        if self._closed:
            return
        self._closed = True
        while self._ready:
            _close_all(self._ready.popleft()[2])
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- sending --

    def send(self, req, *, file_mappings=None, timeout=_DEFAULT) -> int:
        """Sends one request without waiting for its response; returns its sequence number.

        With ``file_mappings`` (a list of ``VmMemoryFileMapping`` dicts or
        ``(file, length, mem_offset, file_offset)`` tuples), ``req`` is an
        ``MmapAndRegisterMemory`` whose mappings follow in chunks of at most 253 (its
        ``num_file_mappings`` is filled in if absent). Without, a request that announces
        mappings must be followed by ``send_file_mappings()``.

        While the socket is full, responses that have arrived are read and kept for
        ``recv()``, so any number of requests can be sent before reading one."""
        if self._owed_mappings:
            raise RuntimeError(f"MmapAndRegisterMemory still expects {self._owed_mappings} file mappings: send_file_mappings() first")
        deadline = self._deadline(timeout)
        mappings = None
        if file_mappings is not None:
            name, body = _variant(req)
            if name != "MmapAndRegisterMemory" or not isinstance(body, dict):
                raise ValueError("file_mappings go with an MmapAndRegisterMemory request")
            mappings = [_mapping(m) for m in file_mappings]
            if body.get("num_file_mappings") is None:
                req = {name: {**body, "num_file_mappings": len(mappings)}}
            elif body["num_file_mappings"] != len(mappings):
                raise ValueError(f"num_file_mappings is {body['num_file_mappings']} but {len(mappings)} mappings were given")
        wire, fds = _with_indices(req, _descriptor_slots)
        body = self._encode(wire)
        owed = 0
        name, payload = _variant(wire)
        if name == "MmapAndRegisterMemory" and isinstance(payload, dict):
            n = payload.get("num_file_mappings")
            if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                owed = n
        self._send_packet(body, fds, deadline)
        seq = self._sent
        self._sent += 1
        self._owed_mappings = owed
        if mappings:
            self._send_mappings(mappings, deadline)
        return seq

    def send_file_mappings(self, mappings, *, timeout=_DEFAULT) -> None:
        """Sends ``VmMemoryFileMapping`` values that the last ``MmapAndRegisterMemory``
        announced, in packets of at most 253 (each ``file`` attached in its packet)."""
        self._send_mappings([_mapping(m) for m in mappings], self._deadline(timeout))

    def _send_mappings(self, mappings, deadline) -> None:
        if len(mappings) > self._owed_mappings:
            raise ValueError(f"{len(mappings)} file mappings given, {self._owed_mappings} expected")
        for i in range(0, len(mappings), SCM_MAX_FD):
            chunk = mappings[i : i + SCM_MAX_FD]
            wire, fds = _with_indices(chunk, _chunk_slots)
            self._send_packet(self._encode(wire), fds, deadline)
            self._owed_mappings -= len(chunk)

    def _send_packet(self, body: bytes, fds, deadline) -> None:
        if self._closed:
            raise OSError(_errno.EBADF, "vmemd client is closed")
        if len(body) > MAX_PACKET:
            raise ValueError(f"request of {len(body)} bytes: a packet holds at most {MAX_PACKET}")
        if len(fds) > SCM_MAX_FD:
            raise ValueError(f"{len(fds)} descriptors: a packet holds at most {SCM_MAX_FD}")
        anc = [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds))] if fds else []
        while True:
            try:
                self._sock.sendmsg([body], anc, _SEND_FLAGS)
                return
            except BlockingIOError:
                pass
            # Full: make room by reading what the server has answered (it stops reading
            # requests while its answers to us are not read).
            want = _POLLOUT | (_POLLIN if self._sent > self._received else 0)
            rev = self._wait(want, deadline, "room to send")
            if rev & _POLLIN and self._sent > self._received:
                self._receive_one()

    # -- receiving --

    def recv(self, *, timeout=_DEFAULT, check: bool = True):
        """The next response, in request order: ``"Ok"`` or a one-key dict such as
        ``{"RegisterMemory": {...}}``. An ``Err`` raises :class:`VmemdError`, or with
        ``check=False`` is returned as one. Descriptors a response carries
        (``GetGuestMemory``) replace their indices and belong to the caller."""
        if not self._ready:
            if self._sent == self._received:
                raise RuntimeError("recv: no request is waiting for a response")
            if self._owed_mappings:
                raise RuntimeError("recv: MmapAndRegisterMemory is answered after its file mappings: send_file_mappings() first")
            deadline = self._deadline(timeout)
            while not self._ready:
                self._receive_wait(deadline)
        _, result, _ = self._ready.popleft()
        return self._result(result, check)

    def call(self, req, *, file_mappings=None, timeout=_DEFAULT, check: bool = True):
        """Sends ``req`` and returns its response (see ``recv``). Responses to requests sent
        earlier are kept, in order, for ``recv()``."""
        name, payload = _variant(req)
        if file_mappings is None and name == "MmapAndRegisterMemory" and isinstance(payload, dict) and payload.get("num_file_mappings"):
            raise ValueError("call: this MmapAndRegisterMemory announces file mappings: pass file_mappings=")
        deadline = self._deadline(timeout)
        seq = self.send(req, file_mappings=file_mappings, timeout=timeout)
        try:
            while self._received <= seq:
                self._receive_wait(deadline)
        except BaseException:
            if self._received <= seq:
                self._abandoned.add(seq)
            raise
        got, result, _ = self._ready.pop()  # the newest: nothing after it was received
        assert got == seq
        return self._result(result, check)

    @staticmethod
    def _result(result, check):
        if isinstance(result, ProtocolError):
            raise result
        if check and isinstance(result, VmemdError):
            raise result
        return result

    def _deadline(self, timeout):
        t = self.timeout if timeout is _DEFAULT else timeout
        return None if t is None else time.monotonic() + t

    def _wait(self, events, deadline, what) -> int:
        if self._closed:
            raise OSError(_errno.EBADF, "vmemd client is closed")
        self._poll.modify(self._sock.fileno(), events)
        while True:
            if deadline is None:
                ms = None
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(_errno.ETIMEDOUT, f"vmemd: no {what} in time")
                ms = max(1, math.ceil(left * 1000))
            r = self._poll.poll(ms)
            if r:
                return r[0][1]

    def _receive_wait(self, deadline) -> None:
        """Receives one packet, waiting in recvmsg until the deadline."""
        while True:
            if deadline is None:
                wait = 0.0
            else:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    raise TimeoutError(_errno.ETIMEDOUT, "vmemd: no response in time")
                wait = max(wait, 1e-6)
            # SO_RCVTIMEO is set again only when it is off by more than 10 ms (or 5% of a
            # short wait): a wait may end that much late, and repeated calls cost no syscall.
            cur = self._rcvtimeo
            if cur is None or abs(cur - wait) > min(0.01, 0.05 * wait) or (wait == 0.0) != (cur == 0.0):
                sec = int(wait)
                usec = int((wait - sec) * 1e6)
                if wait and not sec and not usec:
                    usec = 1  # a zero timeval would mean no timeout at all
                self._sock.setsockopt(_SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("@ll", sec, usec))
                self._rcvtimeo = wait
            if self._receive_one(block=True):
                return

    def _receive_one(self, block: bool = False) -> bool:
        """Reads one packet (False if none is ready, or none came within SO_RCVTIMEO) and
        queues its result."""
        if self._closed:
            raise OSError(_errno.EBADF, "vmemd client is closed")
        try:
            nbytes, anc, flags, _ = self._sock.recvmsg_into([self._rbuf], self._ancsize, _RECV_WAIT if block else _RECV_NOWAIT)
        except BlockingIOError:
            return False
        fds = []
        for level, kind, data in anc:
            if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(data[: len(data) - len(data) % a.itemsize])
                fds.extend(a)
        if nbytes == 0 and not fds and not flags & _MSG_TRUNC:
            raise ConnectionResetError(_errno.ECONNRESET, "vmemd closed the connection")
        if self._sent == self._received:
            _close_all(fds)
            raise ProtocolError("vmemd sent a packet no request asked for")
        seq = self._received
        self._received += 1
        try:
            if flags & _MSG_CTRUNC:
                raise ProtocolError("a response's descriptors did not fit (MSG_CTRUNC)")
            if flags & _MSG_TRUNC:
                raise ProtocolError(f"a response larger than {MAX_PACKET} bytes")
            result, kept = self._decode_response(bytes(self._rbuf[:nbytes]), fds)
        except ProtocolError as e:
            result, kept = e, []
        _close_all(fd for fd in fds if fd not in kept)
        if seq in self._abandoned:
            self._abandoned.discard(seq)
            _close_all(kept)
        else:
            self._ready.append((seq, result, kept))
        return True

    def _decode_response(self, body: bytes, fds):
        """(result, descriptors it holds): a value, or a VmemdError for Err."""
        is_json = _is_json(body)
        try:
            value = json_decode(body) if is_json else msgpack_decode(body)
        except DecodeError as e:
            raise ProtocolError(f"undecodable response: {e}") from None
        if is_json != (self.encoding == "json"):
            raise ProtocolError(
                f"vmemd answered a {self.encoding} request in {'JSON' if is_json else 'MessagePack'}: {value!r}"
            )
        name, payload = _variant(value)
        if name == "Err":
            return self._error(payload), []
        if name == "GuestMemory" and fds:
            return self._attach_fds(value, fds)
        return value, []

    def _error(self, payload) -> VmemdError:
        if self.encoding == "json":
            chain = payload
            errno = None
        else:
            if not isinstance(payload, dict) or set(payload) != {"errno", "chain"}:
                raise ProtocolError(f"malformed Err: {payload!r}")
            chain = payload["chain"]
            errno = payload["errno"]
            if errno is not None and (isinstance(errno, bool) or not isinstance(errno, int)):
                raise ProtocolError(f"malformed Err errno: {errno!r}")
        if not isinstance(chain, list) or not all(isinstance(s, str) for s in chain):
            raise ProtocolError(f"malformed Err chain: {chain!r}")
        if self.encoding == "json" and chain:
            m = _OS_ERROR.search(chain[0])
            if m:
                errno = int(m.group(1))
        return VmemdError(errno, chain)

    @staticmethod
    def _attach_fds(value, fds):
        ranges = value["GuestMemory"].get("ranges") if isinstance(value["GuestMemory"], dict) else None
        if not isinstance(ranges, list):
            raise ProtocolError(f"malformed GuestMemory: {value!r}")
        value = _copy(value)
        kept = []
        for r in value["GuestMemory"]["ranges"]:
            i = r.get("descriptor") if isinstance(r, dict) else None
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(fds):
                raise ProtocolError(f"GuestMemory range with descriptor index {i!r} of {len(fds)} received")
            r["descriptor"] = fds[i]
            if fds[i] not in kept:
                kept.append(fds[i])
        return value, kept

    # -- typed helpers: each is one call(); Err raises VmemdError ----------------------

    @staticmethod
    def _payload(resp, name):
        got, payload = _variant(resp)
        if got != name:
            raise ProtocolError(f"expected a {name} response, got {resp!r}")
        return payload

    @staticmethod
    def _ok(resp):
        if resp != "Ok":
            raise ProtocolError(f"expected Ok, got {resp!r}")

    def register_memory(self, fd, size: int, gpa, read_only: bool = False, *, offset: int | None = None,
                        cache: str = "CacheCoherent", timeout=_DEFAULT) -> dict:
        """RegisterMemory of ``size`` bytes of ``fd`` (the whole object as ``SharedMemory``,
        or, with ``offset``, a ``Descriptor`` range) at ``gpa`` (a guest address, or a
        destination such as ``existing_allocation(pci_bar(0, 5, 0, 2), 0x10000)``).
        Returns ``{"region_id": ..., "slot": ...}``."""
        if offset is None:
            source = {"SharedMemory": {"descriptor": fd, "size": size}}
        else:
            source = {"Descriptor": {"descriptor": fd, "offset": offset, "size": size}}
        req = {"RegisterMemory": {"source": source, "dest": _destination(gpa),
                                  "prot": {"read": True, "write": not read_only}, "cache": cache}}
        return self._payload(self.call(req, timeout=timeout), "RegisterMemory")

    def unregister_memory(self, region_id: int, *, timeout=_DEFAULT) -> None:
        self._ok(self.call({"UnregisterMemory": region_id}, timeout=timeout))

    def prepare_shared_memory_region(self, alloc, cache: str = "CacheCoherent", *, timeout=_DEFAULT) -> None:
        """Reserves a PCI BAR allocation (e.g. ``pci_bar(0, 5, 0, 2)``) as one arena."""
        self._ok(self.call({"PrepareSharedMemoryRegion": {"alloc": alloc, "cache": cache}}, timeout=timeout))

    def mmap_and_register_memory(self, shm_fd, shm_size: int, gpa, mappings, *, timeout=_DEFAULT) -> dict:
        """MmapAndRegisterMemory: ``shm_size`` bytes of ``shm_fd`` at ``gpa`` with each file
        mapping (``{"file", "length", "mem_offset", "file_offset"}`` dicts or tuples in that
        order) mapped read-only inside; the mappings follow in packets of at most 253.
        Returns ``{"region_id": ..., "slot": ...}``."""
        mappings = [_mapping(m) for m in mappings]
        req = {"MmapAndRegisterMemory": {"shm": {"descriptor": shm_fd, "size": shm_size},
                                         "dest": _destination(gpa), "num_file_mappings": len(mappings)}}
        return self._payload(self.call(req, file_mappings=mappings, timeout=timeout), "RegisterMemory")

    def free_memory_ranges(self, ranges, *, timeout=_DEFAULT) -> None:
        """DynamicallyFreeMemoryRanges: ``ranges`` of guest RAM as ``(gpa, size)`` pairs."""
        req = {"DynamicallyFreeMemoryRanges": {"ranges": [[a, s] for a, s in ranges]}}
        self._ok(self.call(req, timeout=timeout))

    def reclaim_memory_ranges(self, ranges, *, timeout=_DEFAULT) -> None:
        """DynamicallyReclaimMemoryRanges: ``(gpa, size)`` pairs."""
        req = {"DynamicallyReclaimMemoryRanges": {"ranges": [[a, s] for a, s in ranges]}}
        self._ok(self.call(req, timeout=timeout))

    def balloon_target_reached(self, size: int, *, timeout=_DEFAULT) -> None:
        self._ok(self.call({"BalloonTargetReached": {"size": size}}, timeout=timeout))

    def ioevent_raw(self, event, addr: int, datamatch="AnyLength", register: bool = True, *, timeout=_DEFAULT) -> None:
        """IoEventRaw: an ioeventfd (``event``, e.g. ``os.eventfd(0)``) on an MMIO address;
        ``datamatch`` in serde form: ``"AnyLength"``, ``{"U32": 7}``, ``{"U16": None}``..."""
        req = {"IoEventRaw": {"event": event, "addr": addr, "datamatch": datamatch, "register": register}}
        self._ok(self.call(req, timeout=timeout))

    def ioevent_pio(self, event, port: int, datamatch="AnyLength", register: bool = True, *, timeout=_DEFAULT) -> None:
        """IoEventPio: an ioeventfd on an I/O port."""
        req = {"IoEventPio": {"event": event, "port": port, "datamatch": datamatch, "register": register}}
        self._ok(self.call(req, timeout=timeout))

    def irqfd(self, event, gsi: int, resample=None, register: bool = True, *, timeout=_DEFAULT) -> None:
        """IrqFd: ``event`` raises ``gsi``; with a ``resample`` descriptor, level-triggered."""
        req = {"IrqFd": {"event": event, "gsi": gsi, "resample": resample, "register": register}}
        self._ok(self.call(req, timeout=timeout))

    def get_guest_memory(self, *, timeout=_DEFAULT) -> list:
        """GetGuestMemory: the ranges of guest RAM, each ``{"guest_address", "size",
        "descriptor", "offset"}`` with ``descriptor`` a received descriptor. Ranges may
        share one; the caller closes each distinct descriptor."""
        return self._payload(self.call("GetGuestMemory", timeout=timeout), "GuestMemory")["ranges"]

    def get_state(self, *, timeout=_DEFAULT) -> dict:
        """GetState's ``State``: ram, the first pages of regions and allocations, slots,
        freed bytes, balloon target, vCPU."""
        return self._payload(self.call("GetState", timeout=timeout), "State")

    def get_regions_page(self, start: int = 0, max: int | None = None, *, timeout=_DEFAULT) -> dict:
        """One page of GetRegions: ``{"regions": [...], "next": key or None}``."""
        return self._payload(self.call({"GetRegions": {"from": start, "max": max}}, timeout=timeout), "Regions")

    def get_regions(self, start: int = 0, page_size: int | None = None):
        """Every region from ``start`` on, in ascending ``region_id``, fetching page after page."""
        return self._pages(self.get_regions_page, "regions", start, page_size)

    def get_allocations_page(self, start: int = 0, max: int | None = None, *, timeout=_DEFAULT) -> dict:
        """One page of GetAllocations: ``{"allocations": [...], "next": key or None}``."""
        return self._payload(self.call({"GetAllocations": {"from": start, "max": max}}, timeout=timeout), "Allocations")

    def get_allocations(self, start: int = 0, page_size: int | None = None):
        """Every MMIO allocation from ``start`` on, in ascending ``start``, page after page."""
        return self._pages(self.get_allocations_page, "allocations", start, page_size)

    @staticmethod
    def _pages(fetch, key, start, page_size):
        at = start
        while at is not None:
            page = fetch(at, page_size)
            entries, nxt = page.get(key), page.get("next")
            if not isinstance(entries, list) or (nxt is not None and (not entries or not isinstance(nxt, int) or nxt <= at)):
                raise ProtocolError(f"a {key} page that does not advance: from {at}, next {nxt!r}")
            yield from entries
            at = nxt

    def allocate_mmio(self, alloc, size: int, align: int | None = None, *, timeout=_DEFAULT) -> dict:
        """AllocateMmio: returns ``{"start": ..., "size": ...}``."""
        req = {"AllocateMmio": {"alloc": alloc, "size": size, "align": align}}
        return self._payload(self.call(req, timeout=timeout), "Allocated")

    def release_mmio(self, alloc, *, timeout=_DEFAULT) -> None:
        self._ok(self.call({"ReleaseMmio": alloc}, timeout=timeout))
