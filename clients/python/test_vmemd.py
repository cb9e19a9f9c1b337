"""Tests of the Python client: its codecs on their own, the client against an in-process
fake peer, and the client against a real ``dist/vmemd`` on ``/dev/kvm`` in both encodings.

    python3 -m unittest discover -s clients/python -v

The wire tests need ``dist/vmemd`` (``bun run build``) and a usable ``/dev/kvm``; without
them they fail, they are never skipped.
"""

import array
import errno
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import unittest
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import vmemd  # noqa: E402
from vmemd import DecodeError, VmemdError, msgpack_decode, msgpack_encode  # noqa: E402

REPO = HERE.parents[1]
BINARY = REPO / "dist" / "vmemd"

MIB = 1 << 20
RAM = 64 * MIB
BAR_START = 0xD000_0000
BAR_SIZE = 16 * MIB


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---- MessagePack codec ---------------------------------------------------------------


class MsgpackCodecTests(unittest.TestCase):
    def roundtrip(self, v):
        e = msgpack_encode(v)
        d = msgpack_decode(e)
        self.assertEqual(d, v)
        self.assertIs(type(d), type(v) if not isinstance(v, tuple) else list)
        return e

    def test_integers_at_every_width_boundary(self):
        cases = {
            0: "00", 127: "7f", 128: "cc80", 255: "ccff", 256: "cd0100", 65535: "cdffff",
            65536: "ce00010000", 2**32 - 1: "ceffffffff", 2**32: "cf0000000100000000",
            2**53 + 1: "cf0020000000000001", 2**63: "cf8000000000000000",
            2**64 - 1: "cfffffffffffffffff",
            -1: "ff", -32: "e0", -33: "d0df", -128: "d080", -129: "d1ff7f", -(2**15): "d18000",
            -(2**15) - 1: "d2ffff7fff", -(2**31): "d280000000", -(2**31) - 1: "d3ffffffff7fffffff",
            -(2**63): "d38000000000000000",
        }
        for v, hex_ in cases.items():
            with self.subTest(v=v):
                self.assertEqual(self.roundtrip(v).hex(), hex_)

    def test_uint64_max_is_exact(self):
        self.assertEqual(msgpack_decode(bytes.fromhex("cfffffffffffffffff")), 2**64 - 1)
        self.assertEqual(msgpack_decode(bytes.fromhex("cf0020000000000001")), 2**53 + 1)
        self.assertEqual(msgpack_decode(msgpack_encode({"UnregisterMemory": 2**64 - 1})), {"UnregisterMemory": 2**64 - 1})

    def test_wider_than_needed_widths_decode_alike(self):
        for hex_ in ("01", "cc01", "cd0001", "ce00000001", "cf0000000000000001", "d001", "d10001", "d200000001", "d30000000000000001"):
            self.assertEqual(msgpack_decode(bytes.fromhex(hex_)), 1, hex_)

    def test_out_of_range_and_foreign_types_refused(self):
        for v in (2**64, -(2**63) - 1):
            with self.assertRaises(OverflowError):
                msgpack_encode(v)
        for v in (1.5, {1, 2}, object(), {"a": 1.0}):
            with self.assertRaises(TypeError):
                msgpack_encode(v)
        cyclic = []
        cyclic.append(cyclic)
        with self.assertRaises(ValueError):
            msgpack_encode(cyclic)

    def test_str_bin_array_map_at_length_boundaries(self):
        for n in (0, 1, 31, 32, 255, 256, 65535, 65536):
            with self.subTest(n=n):
                self.roundtrip("x" * n)
                self.roundtrip(b"\xab" * n)
                self.roundtrip([n] * n)
                self.roundtrip({f"k{i}": i for i in range(n)})
        self.assertEqual(msgpack_encode("").hex(), "a0")
        self.assertEqual(msgpack_encode("a" * 32)[:2].hex(), "d920")
        self.assertEqual(msgpack_encode("a" * 256)[:3].hex(), "da0100")
        self.assertEqual(msgpack_encode("a" * 65536)[:5].hex(), "db00010000")
        self.assertEqual(msgpack_encode(b"")[:2].hex(), "c400")
        self.assertEqual(msgpack_encode(b"a" * 256)[:3].hex(), "c50100")
        self.assertEqual(msgpack_encode(b"a" * 65536)[:5].hex(), "c600010000")
        self.assertEqual(msgpack_encode([0] * 15)[:1].hex(), "9f")
        self.assertEqual(msgpack_encode([0] * 16)[:3].hex(), "dc0010")
        self.assertEqual(msgpack_encode([0] * 65536)[:5].hex(), "dd00010000")
        self.assertEqual(msgpack_encode({})[:1].hex(), "80")
        self.assertEqual(msgpack_encode({str(i): 0 for i in range(16)})[:3].hex(), "de0010")
        self.assertEqual(msgpack_encode({str(i): 0 for i in range(65536)})[:5].hex(), "df00010000")

    def test_protocol_values(self):
        self.roundtrip("GetState")
        self.roundtrip({"RegisterMemory": {"source": {"SharedMemory": {"descriptor": 0, "size": 4096}},
                                           "dest": {"GuestPhysicalAddress": 2**33}, "prot": {"read": True, "write": False},
                                           "cache": "CacheCoherent"}})
        self.roundtrip({"Err": {"errno": None, "chain": ["ünïcode", "outer"]}})
        self.roundtrip({"Vulkan": {"device_uuid": bytes(range(16))}})
        self.assertEqual(msgpack_decode(msgpack_encode((1, (2, 3)))), [1, [2, 3]])
        self.assertEqual(msgpack_decode(msgpack_encode({None: 1, 2: 3, b"k": 4, True: 5})), {None: 1, 2: 3, b"k": 4, True: 5})

    def test_random_values_round_trip(self):
        rng = random.Random(7)

        def gen(depth):
            k = rng.randrange(9 if depth < 4 else 6)
            if k == 0:
                return None
            if k == 1:
                return rng.random() < 0.5
            if k == 2:
                return rng.choice([rng.randrange(-(2**63), 2**64), rng.randrange(-40, 300), 2**64 - 1, -(2**63)])
            if k == 3:
                return "".join(rng.choice("abcé€\U0001f600") for _ in range(rng.choice([0, 5, 31, 32, 300])))
            if k == 4:
                return rng.randbytes(rng.choice([0, 3, 255, 256, 70000]))
            if k == 5:
                return rng.randrange(2**64)
            if k in (6, 7):
                return [gen(depth + 1) for _ in range(rng.choice([0, 1, 15, 16, 40]))]
            return {f"k{i}": gen(depth + 1) for i in range(rng.choice([0, 1, 15, 16, 20]))}

        for _ in range(300):
            self.roundtrip(gen(0))

    def test_truncated_input_refused(self):
        body = msgpack_encode({"RegisterMemory": {"a": [2**64 - 1, -(2**63), "x" * 40, b"y" * 300, None, True, [1] * 20],
                                                  "b": {"c": 65536, "d": "s"}}})
        for i in range(len(body)):
            with self.assertRaises(DecodeError, msg=f"prefix of {i} bytes"):
                msgpack_decode(body[:i])
        self.assertIsInstance(msgpack_decode(body), dict)

    def test_trailing_bytes_refused(self):
        with self.assertRaises(DecodeError):
            msgpack_decode(b"\x01\x02")
        with self.assertRaises(DecodeError):
            msgpack_decode(msgpack_encode("GetState") + b"\xc0")

    def test_nested_array16_headers_refused_without_allocating(self):
        # 6 KB of array16 headers, each claiming 65535 elements: a decoder that allocated
        # from the counts would ask for 65535^2048 slots; this one must refuse at once.
        for body in (b"\xdc\xff\xff" * 2048, b"\xdc\x00\x01" * 2048, b"\xdc\x00\x10" * 2048, b"\xde\xff\xff" * 2048):
            with self.subTest(header=body[:3].hex()):
                tracemalloc.start()
                try:
                    started = time.monotonic()
                    with self.assertRaises(DecodeError):
                        msgpack_decode(body)
                    _, peak = tracemalloc.get_traced_memory()
                finally:
                    tracemalloc.stop()
                self.assertLess(peak, 256 * 1024, "decoder allocated from header counts")
                self.assertLess(time.monotonic() - started, 1.0)
        # Even with nesting allowed, the run is refused (truncated) in memory linear in its size.
        tracemalloc.start()
        try:
            with self.assertRaises(DecodeError):
                msgpack_decode(b"\xdc\x00\x01" * 2048, max_depth=10_000)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 2 * MIB)

    def test_huge_length_headers_refused(self):
        for hex_ in ("ddffffffff", "dfffffffff", "dbffffffff", "c6ffffffff", "daffff", "c5ffff", "d9ff", "c4ff"):
            with self.subTest(header=hex_), self.assertRaises(DecodeError):
                msgpack_decode(bytes.fromhex(hex_) + b"\x00" * 64)

    def test_outside_the_subset_refused(self):
        for hex_ in ("ca00000000", "cb0000000000000000", "c1", "d40100", "d501" + "00" * 2, "c70101" + "00",
                     "a2fffe", "819001", "82a16101a16102", "81" + "81a16101" + "01"):
            with self.subTest(body=hex_), self.assertRaises(DecodeError):
                msgpack_decode(bytes.fromhex(hex_))

    def test_mangled_input_only_ever_raises_decode_error(self):
        rng = random.Random(11)
        base = msgpack_encode({"State": {"ram": [[0, RAM]], "regions": [{"region_id": 2**33, "slot": 1, "size": 4096,
                                                                           "read_only": False, "kind": "dynamic"}] * 5,
                                         "balloon_target": None, "freed_bytes": 2**60}})
        for _ in range(3000):
            b = bytearray(base)
            for _ in range(rng.randrange(1, 6)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            if rng.random() < 0.3:
                del b[rng.randrange(len(b)):]
            try:
                msgpack_decode(bytes(b))
            except DecodeError:
                pass


# ---- JSON codec ----------------------------------------------------------------------


class JsonCodecTests(unittest.TestCase):
    def test_compact_serde_form(self):
        req = {"RegisterMemory": {"source": {"SharedMemory": {"descriptor": 0, "size": 4096}},
                                  "dest": {"GuestPhysicalAddress": 2**64 - 1},
                                  "prot": {"read": True, "write": False}, "cache": "CacheCoherent"}}
        self.assertEqual(
            vmemd.json_encode(req),
            b'{"RegisterMemory":{"source":{"SharedMemory":{"descriptor":0,"size":4096}},'
            b'"dest":{"GuestPhysicalAddress":18446744073709551615},"prot":{"read":true,"write":false},'
            b'"cache":"CacheCoherent"}}',
        )
        self.assertEqual(vmemd.json_encode("GetState"), b'"GetState"')
        self.assertEqual(vmemd.json_encode({"U64": None}), b'{"U64":null}')
        self.assertEqual(vmemd.json_encode({"device_uuid": bytes(range(3))}), b'{"device_uuid":[0,1,2]}')
        self.assertEqual(vmemd.json_encode(["é"]), '["é"]'.encode())

    def test_integers_exact(self):
        for v in (2**53 + 1, 2**64 - 1, -(2**63), 0):
            self.assertEqual(vmemd.json_decode(vmemd.json_encode({"v": v})), {"v": v})
        self.assertEqual(vmemd.json_decode(b'{"RegisterMemory":{"region_id":18446744073709551615,"slot":3}}'),
                         {"RegisterMemory": {"region_id": 18446744073709551615, "slot": 3}})
        self.assertEqual(vmemd.json_decode(b"9007199254740993"), 9007199254740993)

    def test_refused(self):
        for body in (b"1.0", b"1e3", b"[1E2]", b"NaN", b"-Infinity", b'{"a":1,"a":2}', b"\xff", b"[1,]", b"", b"[" * 100_000):
            with self.subTest(body=body[:20]), self.assertRaises(DecodeError):
                vmemd.json_decode(body)
        for v in (1.0, {1: 2}, {"a": object()}):
            with self.assertRaises(TypeError):
                vmemd.json_encode(v)


class ErrorTests(unittest.TestCase):
    def test_vmemd_error(self):
        e = VmemdError(errno.ENOENT, ["no such region", "failed to unregister"])
        self.assertEqual((e.errno, e.code, e.chain), (2, "ENOENT", ["no such region", "failed to unregister"]))
        self.assertEqual(str(e), "failed to unregister: no such region (ENOENT)")
        self.assertNotIsInstance(e, OSError)
        self.assertIsNone(VmemdError(None, ["x"]).code)


# ---- the client against a fake peer --------------------------------------------------


class FakePeer:
    """The far end of a socketpair, answering with ``handler(request, fds) -> (response, fds)``
    in the request's encoding (``response`` None: no answer). Records every packet."""

    def __init__(self, handler, encoding):
        self.client_sock, self.sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.handler = handler
        self.packets = []  # (raw body, number of descriptors)
        self.handled = 0  # packets done with, descriptors closed
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        self.client = vmemd.Client.from_socket(self.client_sock, encoding=encoding, timeout=5)

    def run(self):
        while True:
            try:
                body, anc, _, _ = self.sock.recvmsg(vmemd.MAX_PACKET, socket.CMSG_SPACE(253 * 4))
            except OSError:
                return
            fds = array.array("i")
            for _, _, data in anc:
                fds.frombytes(data)
            if not body and not fds:
                return
            self.packets.append((body, len(fds)))
            is_json = body[:1] in (b"{", b"[", b'"')
            value = vmemd.json_decode(body) if is_json else msgpack_decode(body)
            try:
                out = self.handler(value, list(fds))
            finally:
                for fd in fds:
                    os.close(fd)
            if out is not None:
                resp, send_fds = out
                data = vmemd.json_encode(resp) if is_json else msgpack_encode(resp)
                anc_out = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", send_fds))] if send_fds else []
                self.sock.sendmsg([data], anc_out)
                for fd in send_fds:
                    os.close(fd)
            with self.cond:
                self.handled += 1
                self.cond.notify_all()

    def wait_handled(self, n):
        with self.cond:
            if not self.cond.wait_for(lambda: self.handled >= n, 5):
                raise AssertionError("the fake peer is stuck")

    def close(self):
        self.client.close()
        self.sock.close()
        self.thread.join(5)


class FakePeerTests(unittest.TestCase):
    def peer(self, handler, encoding):
        p = FakePeer(handler, encoding)
        self.addCleanup(p.close)
        return p

    def test_get_regions_iterates_every_page(self):
        ids = [2**33 + i * 2**21 for i in range(7)] + [2**64 - 4096]

        def handler(req, fds):
            if req == "GetState":
                return {"State": {}}, []
            q = req["GetRegions"]
            page = [i for i in ids if i >= q["from"]][: q["max"]]
            rest = [i for i in ids if i > page[-1]] if page else []
            regions = [{"region_id": i, "slot": n, "size": 4096, "read_only": False, "kind": "dynamic"} for n, i in enumerate(page)]
            return {"Regions": {"regions": regions, "next": rest[0] if rest else None}}, []

        for enc in ("msgpack", "json"):
            with self.subTest(encoding=enc):
                p = self.peer(handler, enc)
                self.assertEqual([r["region_id"] for r in p.client.get_regions(page_size=3)], ids)
                froms = [(vmemd.json_decode(b) if enc == "json" else msgpack_decode(b))["GetRegions"]["from"] for b, _ in p.packets]
                self.assertEqual(froms, [0, ids[3], ids[6]])
                self.assertEqual(list(p.client.get_regions(start=2**64 - 1)), [])

    def test_a_page_that_does_not_advance_is_refused(self):
        p = self.peer(lambda req, fds: ({"Allocations": {"allocations": [], "next": 5}}, []), "msgpack")
        with self.assertRaises(vmemd.ProtocolError):
            list(p.client.get_allocations())

    def test_get_guest_memory_returns_received_descriptors(self):
        def handler(req, fds):
            self.assertEqual(req, "GetGuestMemory")
            ram = os.memfd_create("ram")
            os.ftruncate(ram, 8192)
            extra = os.memfd_create("unreferenced")  # not referenced: the client closes it
            return {"GuestMemory": {"ranges": [{"guest_address": 0, "size": 4096, "descriptor": 0, "offset": 0},
                                               {"guest_address": 2**32, "size": 4096, "descriptor": 0, "offset": 4096}]}}, [ram, extra]

        for enc in ("msgpack", "json"):
            with self.subTest(encoding=enc):
                p = self.peer(handler, enc)
                before = fd_count()
                ranges = p.client.get_guest_memory()
                p.wait_handled(1)
                self.assertEqual(len(ranges), 2)
                fd = ranges[0]["descriptor"]
                self.assertEqual(ranges[1]["descriptor"], fd)
                self.assertEqual(os.fstat(fd).st_size, 8192)
                self.assertEqual(fd_count(), before + 1)
                os.close(fd)
                self.assertEqual(fd_count(), before)

    def test_descriptors_attached_and_indexed(self):
        def reply_once(req, fds):
            if isinstance(req, list):
                seen.append((req, len(fds)))
                if sum(len(r) for r, _ in seen if isinstance(r, list)) == 300:
                    return {"RegisterMemory": {"region_id": 2**34, "slot": 9}}, []
                return None
            seen.append((req, len(fds)))
            return None if "MmapAndRegisterMemory" in req else ("Ok", [])

        for enc in ("msgpack", "json"):
            with self.subTest(encoding=enc):
                seen = []
                p = self.peer(reply_once, enc)
                shm = os.memfd_create("shm")
                self.addCleanup(os.close, shm)
                with open(f"/proc/self/fd/{shm}", "rb") as f:
                    r = p.client.mmap_and_register_memory(f, 300 * 4096, 2**34,
                                                          [(shm, 4096, i * 4096, 0) for i in range(300)])
                self.assertEqual(r, {"region_id": 2**34, "slot": 9})
                head, chunks = seen[0], seen[1:]
                self.assertEqual(head[0]["MmapAndRegisterMemory"]["shm"], {"descriptor": 0, "size": 300 * 4096})
                self.assertEqual(head[0]["MmapAndRegisterMemory"]["num_file_mappings"], 300)
                self.assertEqual(head[1], 1)
                self.assertEqual([(len(c), n) for c, n in chunks], [(253, 253), (47, 47)])
                self.assertEqual([m["file"] for m in chunks[0][0]], list(range(253)))
                self.assertEqual(chunks[1][0][46], {"file": 46, "length": 4096, "mem_offset": 299 * 4096, "file_offset": 0})
                first = p.packets[1][0][:1]
                self.assertEqual(first, b"[" if enc == "json" else b"\xdc")
                # IrqFd: event and resample both attached; a request without descriptors has none.
                ev = os.eventfd(0)
                self.addCleanup(os.close, ev)
                p.client.irqfd(ev, 5, resample=ev)
                self.assertEqual(seen[-1], ({"IrqFd": {"event": 0, "gsi": 5, "resample": 1, "register": True}}, 2))
                p.client.irqfd(ev, 5)
                self.assertEqual(seen[-1], ({"IrqFd": {"event": 0, "gsi": 5, "resample": None, "register": True}}, 1))
                p.client.balloon_target_reached(2**64 - 1)
                self.assertEqual(seen[-1], ({"BalloonTargetReached": {"size": 2**64 - 1}}, 0))

    def test_json_wire_form_and_errno_from_the_chain(self):
        def handler(req, fds):
            if req == "GetState":
                return {"Err": ["Invalid argument (os error 22)", "failed to get state"]}, []
            if "UnregisterMemory" in req:
                return {"Err": ["no registered memory region with id 0x5000"]}, []
            return {"RegisterMemory": {"region_id": 2**64 - 4096, "slot": 1}}, []

        p = self.peer(handler, "json")
        shm = os.memfd_create("shm")
        self.addCleanup(os.close, shm)
        r = p.client.register_memory(shm, 4096, 2**33)
        self.assertEqual(r, {"region_id": 2**64 - 4096, "slot": 1})
        self.assertEqual(p.packets[0], (b'{"RegisterMemory":{"source":{"SharedMemory":{"descriptor":0,"size":4096}},'
                                        b'"dest":{"GuestPhysicalAddress":8589934592},"prot":{"read":true,"write":true},'
                                        b'"cache":"CacheCoherent"}}', 1))
        with self.assertRaises(VmemdError) as cm:
            p.client.get_state()
        self.assertEqual((cm.exception.errno, cm.exception.code), (22, "EINVAL"))
        self.assertEqual(cm.exception.chain, ["Invalid argument (os error 22)", "failed to get state"])
        with self.assertRaises(VmemdError) as cm:
            p.client.unregister_memory(0x5000)
        self.assertIsNone(cm.exception.errno)
        self.assertIsNone(cm.exception.code)

    def test_a_response_in_the_other_encoding_is_a_protocol_error(self):
        p = self.peer(lambda req, fds: None, "json")
        p.client.send("GetState")
        p.sock.sendmsg([msgpack_encode("Ok")])
        with self.assertRaises(vmemd.ProtocolError):
            p.client.recv()

    def test_timeouts_are_oserrors_and_late_answers_keep_order(self):
        held = []

        def handler(req, fds):
            held.append(req)
            return None  # answered by hand below

        p = self.peer(handler, "msgpack")
        started = time.monotonic()
        with self.assertRaises(TimeoutError) as cm:
            p.client.call("GetState", timeout=0.1)
        self.assertIsInstance(cm.exception, OSError)
        self.assertLess(time.monotonic() - started, 2)
        # The abandoned call's answer arrives late and is dropped; the next call gets its own.
        p.sock.sendmsg([msgpack_encode({"State": {"late": True}})])
        p.client.send({"BalloonTargetReached": {"size": 1}})
        with self.assertRaises(TimeoutError):
            p.client.recv(timeout=0.05)
        self.assertEqual(p.client.pending, 1)
        p.sock.sendmsg([msgpack_encode("Ok")])
        self.assertEqual(p.client.recv(), "Ok")
        self.assertEqual(p.client.pending, 0)
        with self.assertRaises(RuntimeError):
            p.client.recv()

    def test_peer_hang_up_is_a_connection_error(self):
        p = self.peer(lambda req, fds: None, "msgpack")
        p.client.send("GetState")
        # shutdown() first: close() alone waits for the peer's serving thread to let go of the
        # socket, and until then the client sees no hang-up (a race, seen under load).
        p.sock.shutdown(socket.SHUT_RDWR)
        p.sock.close()
        with self.assertRaises(ConnectionError):
            p.client.recv()

    def test_connect_failure_is_an_oserror(self):
        with self.assertRaises(OSError):
            vmemd.Client(os.path.join(tempfile.gettempdir(), "no-such-vmemd.sock"))
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.addCleanup(b.close)
        with self.assertRaises(ValueError):
            vmemd.Client.from_socket(a, encoding="cbor")  # closes a
        self.assertEqual(a.fileno(), -1)


# ---- the client against a real vmemd -------------------------------------------------


class VmemdServer:
    """``dist/vmemd serve`` on a temporary socket; raises (never skips) if it cannot run."""

    def __init__(self):
        if not BINARY.is_file() or not os.access(BINARY, os.X_OK):
            raise RuntimeError(f"{BINARY} is missing: run `bun run build` in {REPO}")
        try:
            os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
        except OSError as e:
            raise RuntimeError(f"/dev/kvm is not usable: {e}") from None
        self.dir = tempfile.mkdtemp(prefix="vmemd-pyclient-")
        self.path = os.path.join(self.dir, "vmemd.sock")
        self.log = open(os.path.join(self.dir, "log"), "w+b")
        self.proc = subprocess.Popen(
            [str(BINARY), "serve", "--socket", self.path, "--memory", "64M", "--pci-bar", "00:05.0/2=16M", "--die-with-parent",
             "--share-guest-memory-with", str(os.getuid()), "--release-on-disconnect"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
        )
        # Ready when the socket accepts a connection.
        deadline = time.monotonic() + 30
        while True:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                probe.connect(self.path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    text = self.output()
                    self.stop()
                    raise RuntimeError(f"vmemd did not start listening (exit status {self.proc.returncode}):\n{text}") from None
                time.sleep(0.01)
            finally:
                probe.close()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class WireTests:
    """Run against a real vmemd, once per encoding (the subclasses)."""

    encoding = None

    @classmethod
    def setUpClass(cls):
        cls.server = VmemdServer()

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def tearDown(self):
        self.assertTrue(self.server.alive(), f"vmemd exited:\n{self.server.output()}")

    def client(self) -> vmemd.Client:
        c = vmemd.Client(self.server.path, encoding=self.encoding, timeout=10)
        self.addCleanup(c.close)
        return c

    def memfd(self, size, data=b""):
        fd = os.memfd_create("pyclient-test", os.MFD_CLOEXEC)
        self.addCleanup(os.close, fd)
        os.ftruncate(fd, size)
        if data:
            os.pwrite(fd, data, 0)
        return fd

    def regions(self, c):
        return {r["region_id"]: r for r in c.get_state()["regions"]}

    # -- the tests --

    def test_device_plane(self):
        c = self.client()
        ranges = c.get_guest_memory()
        self.assertEqual([(r["guest_address"], r["size"], r["offset"]) for r in ranges], [(0, 64 << 20, 0)])
        fd = ranges[0]["descriptor"]
        try:
            import mmap
            ram = mmap.mmap(fd, 64 << 20)
            ram[0x800000:0x800008] = b"pyclient"
            self.assertEqual(ram[0x800000:0x800008], b"pyclient")  # the same memory vmemd gave the guest
            ram.close()
        finally:
            os.close(fd)
        ev = os.eventfd(0, os.EFD_CLOEXEC)
        self.addCleanup(os.close, ev)
        # No guest runs here, so the VM has no interrupt controller to raise lines on.
        with self.assertRaises(vmemd.VmemdError) as e:
            c.irqfd(ev, 9)
        self.assertEqual(e.exception.code, "ENOTSUP")
        port = 0x700 + (0 if self.encoding == "msgpack" else 8)
        c.ioevent_pio(ev, port)
        c.ioevent_pio(ev, port, register=False)

    def test_register_unregister_memfd_above_ram(self):
        c = self.client()
        fd = self.memfd(2 * MIB)
        gpa = 0x2_0000_0000
        r = c.register_memory(fd, 2 * MIB, gpa)
        self.assertEqual(r["region_id"], gpa)
        self.assertIsInstance(r["slot"], int)
        self.assertEqual(self.regions(c)[gpa], {"region_id": gpa, "slot": r["slot"], "size": 2 * MIB,
                                                "read_only": False, "kind": "dynamic"})
        c.unregister_memory(gpa)
        self.assertNotIn(gpa, self.regions(c))
        # Read-only, a Descriptor range, the descriptor as an object with fileno().
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            r = c.register_memory(f, MIB, gpa, read_only=True, offset=MIB)
        self.assertEqual(r["region_id"], gpa)
        region = self.regions(c)[gpa]
        self.assertEqual((region["size"], region["read_only"]), (MIB, True))
        c.unregister_memory(gpa)
        self.assertNotIn(gpa, self.regions(c))

    def test_errors(self):
        c = self.client()
        with self.assertRaises(VmemdError) as cm:
            c.unregister_memory(0x5000)
        e = cm.exception
        self.assertEqual((e.errno, e.code), (errno.ENOENT, "ENOENT"))
        self.assertTrue(e.chain and all(isinstance(s, str) for s in e.chain), e.chain)
        self.assertNotIsInstance(e, OSError)

        fd = self.memfd(64 * 1024)
        with self.assertRaises(VmemdError) as cm:
            c.register_memory(fd, 64 * 1024, 0x10_0000)  # inside guest RAM
        self.assertEqual(cm.exception.code, "ENOSPC")
        gpa = 0x2_4000_0000
        c.register_memory(fd, 64 * 1024, gpa)
        with self.assertRaises(VmemdError) as cm:
            c.register_memory(fd, 64 * 1024, gpa + 4096)  # overlaps that region
        self.assertEqual(cm.exception.code, "ENOSPC")
        c.unregister_memory(gpa)

        # A u64 above 2^53 travels exactly: the server names the very id.
        with self.assertRaises(VmemdError) as cm:
            c.unregister_memory(2**64 - 1)
        self.assertEqual(cm.exception.code, "ENOENT")
        self.assertIn("0xffffffffffffffff", " ".join(cm.exception.chain))
        # check=False hands the error back; the connection goes on.
        err = c.call({"UnregisterMemory": 0x5000}, check=False)
        self.assertIsInstance(err, VmemdError)
        self.assertEqual(err.errno, errno.ENOENT)
        self.assertIn("ram", c.get_state())

    def test_pipelining_100_requests(self):
        c = self.client()
        fd = self.memfd(64 * 1024)
        base = 0x4_0000_0000
        expected = []
        for i in range(45):
            gpa = base + i * 0x10000
            c.send({"RegisterMemory": {"source": {"SharedMemory": {"descriptor": fd, "size": 64 * 1024}},
                                       "dest": {"GuestPhysicalAddress": gpa}, "prot": {"read": True, "write": True},
                                       "cache": "CacheCoherent"}})
            expected.append(("RegisterMemory", gpa))
            if i % 5 == 4:
                c.send({"UnregisterMemory": 0x5000 + i * 4096})
                expected.append(("ENOENT", None))
        for i in range(45):
            c.send({"UnregisterMemory": base + i * 0x10000})
            expected.append(("Ok", None))
        self.assertEqual(len(expected), 99)
        c.send("GetState")
        expected.append(("State", None))
        self.assertEqual(c.pending, 100)
        for n, (kind, gpa) in enumerate(expected):
            r = c.recv(check=False)
            if kind == "ENOENT":
                self.assertIsInstance(r, VmemdError, n)
                self.assertEqual(r.code, "ENOENT")
            elif kind == "Ok":
                self.assertEqual(r, "Ok", n)
            elif kind == "State":
                self.assertNotIn(base, {x["region_id"] for x in r["State"]["regions"]})
            else:
                self.assertEqual(r["RegisterMemory"]["region_id"], gpa, n)
        self.assertEqual(c.pending, 0)
        # call() in the middle of pipelined requests returns its own answer and keeps theirs.
        c.send({"UnregisterMemory": 0x5000})
        c.send({"BalloonTargetReached": {"size": 4096}})
        self.assertIn("State", c.call("GetState"))
        with self.assertRaises(VmemdError):
            c.recv()
        self.assertEqual(c.recv(), "Ok")

    def test_mmap_and_register_memory(self):
        c = self.client()
        shm = self.memfd(64 * 1024)
        files = [self.memfd(8192, bytes([i + 1]) * 8192) for i in range(3)]
        gpa = 0x3_0000_0000
        r = c.mmap_and_register_memory(shm, 64 * 1024, gpa, [
            (files[0], 4096, 0, 0),
            {"file": files[1], "length": 8192, "mem_offset": 16384, "file_offset": 0},
            (files[2], 4096, 49152, 4096),
        ])
        self.assertEqual(r["region_id"], gpa)
        region = self.regions(c)[gpa]
        self.assertEqual((region["size"], region["read_only"]), (64 * 1024, True))
        c.unregister_memory(gpa)
        self.assertNotIn(gpa, self.regions(c))

    def test_mmap_and_register_memory_in_chunks(self):
        c = self.client()
        n = 300  # two packets: 253 and 47
        shm = self.memfd(n * 4096)
        file = self.memfd(4096, b"z" * 4096)
        gpa = 0x3_1000_0000
        r = c.mmap_and_register_memory(shm, n * 4096, gpa, [(file, 4096, i * 4096, 0) for i in range(n)])
        self.assertEqual(r["region_id"], gpa)
        c.unregister_memory(gpa)
        # A bad chunk (a mapping past its file's end) fails the whole request with one Err.
        with self.assertRaises(VmemdError):
            c.mmap_and_register_memory(shm, n * 4096, gpa, [(file, 4096, i * 4096, 4096 if i == 260 else 0) for i in range(n)])
        self.assertNotIn(gpa, self.regions(c))

    def test_get_state(self):
        c = self.client()
        st = c.get_state()
        self.assertEqual(st["ram"], [[0, RAM]])
        self.assertIn({"alloc": vmemd.pci_bar(0, 5, 0, 2), "start": BAR_START, "size": BAR_SIZE}, st["allocations"])
        self.assertIsInstance(st["slots_used"], int)
        self.assertGreater(st["slots_max"], st["slots_used"])
        self.assertIsNone(st["vcpu"])
        c.balloon_target_reached(3 * MIB)
        self.assertEqual(c.get_state()["balloon_target"], 3 * MIB)
        c.free_memory_ranges([(2 * MIB, 2 * MIB), (8 * MIB, 4096)])
        self.assertGreaterEqual(c.get_state()["freed_bytes"], 2 * MIB + 4096)
        c.reclaim_memory_ranges([(2 * MIB, 2 * MIB)])
        with self.assertRaises(VmemdError) as cm:
            c.free_memory_ranges([(RAM, 4096)])  # outside guest RAM
        self.assertEqual(cm.exception.code, "EINVAL")

    def test_prepared_bar_and_mmio(self):
        c = self.client()
        bar = vmemd.pci_bar(0, 5, 0, 2)
        c.prepare_shared_memory_region(bar)
        fd = self.memfd(64 * 1024)
        r = c.register_memory(fd, 64 * 1024, vmemd.existing_allocation(bar, 0x10000))
        self.assertEqual(r["region_id"], BAR_START + 0x10000)
        c.unregister_memory(r["region_id"])
        with self.assertRaises(VmemdError) as cm:
            c.prepare_shared_memory_region(bar)
        self.assertEqual(cm.exception.code, "EEXIST")

        other = vmemd.pci_bar(0, 6, 0, 0)
        a = c.allocate_mmio(other, MIB)
        self.assertEqual(a["size"], MIB)
        self.assertEqual(a["start"] % MIB, 0)
        self.assertIn({"alloc": other, "start": a["start"], "size": MIB}, c.get_state()["allocations"])
        c.release_mmio(other)
        with self.assertRaises(VmemdError) as cm:
            c.release_mmio(other)
        self.assertEqual(cm.exception.code, "ENOENT")

        ev = os.eventfd(0, os.EFD_CLOEXEC)
        self.addCleanup(os.close, ev)
        c.ioevent_raw(ev, 0xD200_0000, {"U32": 7}, register=True)
        c.ioevent_raw(ev, 0xD200_0000, {"U32": 7}, register=False)
        with self.assertRaises(VmemdError) as cm:
            c.ioevent_raw(ev, 0xD200_0000, {"U32": 7}, register=False)
        self.assertEqual(cm.exception.code, "ENOENT")

    def test_descriptor_hygiene(self):
        base = fd_count()
        c = vmemd.Client(self.server.path, encoding=self.encoding, timeout=10)
        try:
            self.assertEqual(fd_count(), base + 1)  # the socket, nothing else
            fds = [os.memfd_create("hygiene") for _ in range(2)]
            for fd in fds:
                os.ftruncate(fd, 1024 * 4096)
            gpa = 0x5_0000_0000
            c.register_memory(fds[0], 64 * 1024, gpa)
            c.unregister_memory(gpa)
            with self.assertRaises(VmemdError):
                c.unregister_memory(gpa)
            c.mmap_and_register_memory(fds[0], 1024 * 4096, gpa, [(fds[1], 4096, i * 4096, 0) for i in range(600)])
            c.unregister_memory(gpa)
            for i in range(20):
                c.send({"RegisterMemory": {"source": {"SharedMemory": {"descriptor": fds[1], "size": 4096 * 1024}},
                                           "dest": {"GuestPhysicalAddress": 0x100}, "prot": {"read": True, "write": True},
                                           "cache": "CacheCoherent"}})  # unaligned: EINVAL, descriptor closed by vmemd
            for _ in range(20):
                self.assertEqual(c.recv(check=False).code, "EINVAL")
            self.assertEqual(fd_count(), base + 3)
            for fd in fds:
                os.close(fd)
            self.assertEqual(fd_count(), base + 1)
        finally:
            c.close()
        self.assertEqual(fd_count(), base)


class MsgpackWireTests(WireTests, unittest.TestCase):
    encoding = "msgpack"


class JsonWireTests(WireTests, unittest.TestCase):
    encoding = "json"


if __name__ == "__main__":
    unittest.main()
