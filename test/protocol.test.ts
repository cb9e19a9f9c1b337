// The wire description and its codecs (src/protocol): both encodings against independent
// references (@msgpack/msgpack's encoder, JSON.stringify), exact u64s, descriptor rules,
// error paths, and hostile input that must cost no more than the packet it came in.
import { describe, expect, test } from "bun:test";
import { encode as refEncode } from "@msgpack/msgpack";
import { heapStats } from "bun:jsc";
import {
  decodeFileMappings,
  decodeRequest,
  decodeResponse,
  encodeFileMappings,
  encodeRequest,
  encodeResponse,
  isRefusal,
  JSON_ENCODING,
  MSGPACK,
  type Encoding,
  type VmMemoryRequest,
  type VmMemoryResponse,
} from "../src/protocol";
import { rng } from "./helpers";

const big = 2n ** 60n + 1n;
const REQUESTS: VmMemoryRequest[] = [
  { PrepareSharedMemoryRegion: { alloc: { PciBar: { bus: 0, dev: 5, func: 0, bar: 2 } }, cache: "CacheCoherent" } },
  { RegisterMemory: { source: { SharedMemory: { descriptor: 0, size: 4096 } }, dest: { GuestPhysicalAddress: 0x2_0000_0000 }, prot: { read: true, write: false }, cache: "CacheNonCoherent" } },
  { RegisterMemory: { source: { Descriptor: { descriptor: 0, offset: 8192, size: 5000 } }, dest: { ExistingAllocation: { allocation: "GpuRenderNode", offset: 0 } }, prot: { read: false, write: true }, cache: "CacheCoherent" } },
  { RegisterMemory: { source: { Vulkan: { descriptor: 0, handle_type: 1, memory_idx: 2, device_uuid: new Uint8Array(16).fill(7), driver_uuid: new Uint8Array(16), size: 4096 } }, dest: { GuestPhysicalAddress: big }, prot: { read: true, write: true }, cache: "CacheCoherent" } },
  { RegisterMemory: { source: { ExternalMapping: { ptr: big, size: 4096 } }, dest: { GuestPhysicalAddress: 0 }, prot: { read: true, write: true }, cache: "CacheCoherent" } },
  { MmapAndRegisterMemory: { shm: { descriptor: 0, size: 65536 }, dest: { GuestPhysicalAddress: 0x3_0000_0000 }, num_file_mappings: 300 } },
  { DynamicallyFreeMemoryRanges: { ranges: [[0, 4096], [big, 2n ** 64n - 1n]] } },
  { DynamicallyReclaimMemoryRanges: { ranges: [] } },
  { BalloonTargetReached: { size: 123 } },
  { UnregisterMemory: big },
  { IoEventRaw: { event: 0, addr: 0xd000_0000, datamatch: { U32: 7 }, register: true } },
  { IoEventRaw: { event: 0, addr: 1, datamatch: "AnyLength", register: false } },
  { IoEventRaw: { event: 0, addr: 1, datamatch: { U64: null }, register: false } },
  "GetState",
  { GetRegions: { from: 0, max: null } },
  { GetAllocations: { from: 4096, max: 5 } },
  { AllocateMmio: { alloc: { PciBridgePrefetchWindow: { bus: 1, dev: 2, func: 3 } }, size: 4096, align: null } },
  { ReleaseMmio: "Pstore" },
  { ReleaseMmio: { PciBridgeWindow: { bus: 1, dev: 0, func: 0 } } },
  { ReleaseMmio: { Anon: 3 } },
];
const RESPONSES: VmMemoryResponse[] = [
  "Ok",
  { RegisterMemory: { region_id: 2 ** 40, slot: 3 } },
  { Err: { errno: 22, chain: ["bad \"thing\"\n\u0001 é", "malformed request"] } },
  { Err: { errno: null, chain: ["no errno"] } },
  { Allocated: { start: 0xd000_0000, size: 4096 } },
  { Regions: { regions: [{ region_id: big, slot: 1, size: 4096, read_only: true, kind: "prepared" }], next: null } },
  { Allocations: { allocations: [{ alloc: { PciBar: { bus: 0, dev: 1, func: 0, bar: 0 } }, start: 1, size: 2 }], next: 7 } },
  {
    State: {
      ram: [[0, 256 * 2 ** 20]],
      regions: [],
      regions_next: null,
      allocations: [],
      allocations_next: 5,
      slots_used: 1,
      slots_max: 32764,
      freed_bytes: 0,
      balloon_target: null,
      vcpu: { state: "running", exits: big, mmio_reads: 0, mmio_writes: 1 },
    },
  },
];

const FD = 99; // a stand-in descriptor: decoding only checks indices
function fdsOf(req: VmMemoryRequest): number[] {
  return encodeRequest(req).fds.map(() => FD);
}
/** The request with its descriptor fields as `fd` (what decoding gives back). */
function withFd<T>(v: T, fd: number): T {
  return JSON.parse(JSON.stringify(v, (k, x) => (typeof x === "bigint" ? `big:${x}` : x instanceof Uint8Array ? { u8: [...x] } : (k === "descriptor" || k === "event" || k === "file") && typeof x === "number" ? fd : x)), (_k, x) =>
    typeof x === "string" && x.startsWith("big:") ? BigInt(x.slice(4)) : x !== null && typeof x === "object" && "u8" in x ? new Uint8Array(x.u8) : x,
  ) as T;
}
const bytes = (s: string) => new TextEncoder().encode(s);
function decodeReq(body: Uint8Array, enc: Encoding, fds: number[] = []) {
  return decodeRequest(body, 0, body.length, fds, enc);
}
function refusal(v: unknown): { errno: number | null; chain: string[] } {
  if (!isRefusal(v)) throw new Error(`expected a refusal, got ${JSON.stringify(v, (_k, x) => (typeof x === "bigint" ? String(x) : x))}`);
  return v;
}

describe("one description, two encodings", () => {
  for (const enc of [MSGPACK, JSON_ENCODING] as Encoding[]) {
    const name = enc === MSGPACK ? "MessagePack" : "JSON";
    test(`${name}: every request and response shape round-trips exactly (u64s above 2^53 included)`, () => {
      for (const req of REQUESTS) {
        const p = encodeRequest(req, enc);
        expect(decodeReq(p.body, enc, p.fds.map(() => FD))).toEqual(withFd(req, FD));
      }
      for (const resp of RESPONSES) {
        const body = encodeResponse(resp, enc).slice();
        expect(decodeResponse(body)).toEqual(resp);
      }
    });
  }

  test("MessagePack: strings short and long, ASCII or not, are the bytes an independent encoder writes", () => {
    // Short strings are copied in a loop, longer ones with one Buffer.write, and anything not
    // ASCII goes through the UTF-8 encoder: each path, on each side of the length limits.
    const lines = [
      "",
      "x",
      "a".repeat(24),
      "b".repeat(25),
      "c".repeat(31),
      "d".repeat(32),
      "e".repeat(255),
      "f".repeat(256),
      "g".repeat(70000 >> 2),
      "a short é",
      `${"long ".repeat(8)}é`,
      `${"long ".repeat(8)}\u{1f600} and a lone \ud800 surrogate`,
      `é${"x".repeat(40)}`,
    ];
    for (const line of lines) {
      const resp: VmMemoryResponse = { Err: { errno: 2, chain: [line, "context"] } };
      expect(Buffer.from(encodeResponse(resp, MSGPACK)).toString("hex")).toBe(Buffer.from(refEncode(resp)).toString("hex"));
    }
  });

  test("MessagePack: what an independent encoder writes decodes to the same request", () => {
    for (const req of REQUESTS) {
      const body = refEncode(encodeRequestIndices(req), { useBigInt64: true });
      expect(decodeReq(body, MSGPACK, fdsOf(req))).toEqual(withFd(req, FD));
    }
  });

  test("JSON: requests are written as serde_json writes them (compact, declaration order, exact digits)", () => {
    const reg = REQUESTS[1]!;
    expect(new TextDecoder().decode(encodeRequest(reg, JSON_ENCODING).body)).toBe(
      '{"RegisterMemory":{"source":{"SharedMemory":{"descriptor":0,"size":4096}},"dest":{"GuestPhysicalAddress":8589934592},"prot":{"read":true,"write":false},"cache":"CacheNonCoherent"}}',
    );
    expect(new TextDecoder().decode(encodeRequest({ UnregisterMemory: big }, JSON_ENCODING).body)).toBe(`{"UnregisterMemory":${big}}`);
    const err = new TextDecoder().decode(encodeResponse({ Err: { errno: 2, chain: ["no region", "failed"] } }, JSON_ENCODING));
    expect(err).toBe('{"Err":["no region (os error 2)","failed"]}');
    const vk = new TextDecoder().decode(encodeRequest(REQUESTS[3]!, JSON_ENCODING).body);
    expect(vk).toContain('"device_uuid":[7,7,7,7,7,7,7,7,7,7,7,7,7,7,7,7]');
    expect(new TextDecoder().decode(encodeFileMappings([{ file: 5, length: 100, mem_offset: 0, file_offset: 0 }], JSON_ENCODING).body)).toBe(
      '[{"file":0,"length":100,"mem_offset":0,"file_offset":0}]',
    );
  });

  test("JSON: unknown fields are ignored (serde), whitespace is allowed, a missing Option is None", () => {
    const body = bytes(' { "GetRegions" : { "future" : [1, {"a": [true, null, -1.5e3, "x\\u00e9"]}], "from" : 7 } } \n');
    expect(decodeReq(body, JSON_ENCODING)).toEqual({ GetRegions: { from: 7, max: null } });
    expect(decodeReq(bytes('{"GetState":null}'), JSON_ENCODING)).toBe("GetState");
  });

  test("MessagePack: unknown fields are EINVAL, naming the field and its path", () => {
    const body = refEncode({ BalloonTargetReached: { size: 1, extra: 2 } });
    const r = refusal(decodeReq(body, MSGPACK));
    expect(r.errno).toBe(22);
    expect(r.chain).toEqual(['BalloonTargetReached: unknown field "extra"', "malformed request"]);
  });
});

/**
 * The request with descriptor fields replaced by their wire index, for the reference encoder;
 * integers from 2^32 up as bigints, which it writes as uint 64 (a number it writes as float 64,
 * which vmemd, like rmp-serde, refuses for an integer field).
 */
function encodeRequestIndices(req: VmMemoryRequest): unknown {
  let i = 0;
  return JSON.parse(JSON.stringify(req, (k, x) => (typeof x === "bigint" ? `big:${x}` : x instanceof Uint8Array ? { u8: [...x] } : (k === "descriptor" || k === "event" || k === "file") && typeof x === "number" ? i++ : x)), (_k, x) =>
    typeof x === "string" && x.startsWith("big:") ? BigInt(x.slice(4)) : typeof x === "number" && x >= 2 ** 32 ? BigInt(x) : x !== null && typeof x === "object" && "u8" in x ? new Uint8Array(x.u8) : x,
  );
}

describe("validation from the description", () => {
  const cases: [string, string, string][] = [
    ['{"UnregisterMemory":-1}', "UnregisterMemory: must not be negative", "negative"],
    ['{"UnregisterMemory":18446744073709551616}', "UnregisterMemory: must be at most 18446744073709551615", "2^64"],
    ['{"UnregisterMemory":1.5}', "UnregisterMemory: expected an integer, found a floating point number", "float"],
    ['{"UnregisterMemory":01}', "UnregisterMemory: a number must not have leading zeros", "leading zero"],
    ['{"BalloonTargetReached":{}}', "BalloonTargetReached.size: is missing", "missing field"],
    ['{"BalloonTargetReached":{"size":1,"size":2}}', 'BalloonTargetReached: duplicate field "size"', "duplicate"],
    ['{"Nope":1}', "unknown VmMemoryRequest variant", "unknown variant"],
    ['"RegisterMemory"', "RegisterMemory needs a payload", "unit form of a payload variant"],
    ['{"ReleaseMmio":{"PciBar":{"bus":256,"dev":0,"func":0,"bar":0}}}', "ReleaseMmio.PciBar.bus: must be at most 255", "u8"],
    ['{"IoEventRaw":{"event":0,"addr":1,"datamatch":{"U8":256},"register":true}}', "IoEventRaw.datamatch.U8: must be at most 255", "datamatch too wide"],
    ['{"DynamicallyFreeMemoryRanges":{"ranges":[[1,2,3]]}}', "DynamicallyFreeMemoryRanges.ranges.0: expected an array of 2", "tuple"],
    ['{"GetState":1}', "GetState: a unit variant takes null or no payload", "unit with payload"],
    ['{"BalloonTargetReached":{"size":1}} x', "trailing bytes after the value", "trailing"],
    ['{"BalloonTargetReached":{"size":1}', "truncated", "truncated"],
  ];
  for (const [body, root, what] of cases) {
    test(`JSON ${what}: EINVAL, "${root}"`, () => {
      const r = refusal(decodeReq(bytes(body), JSON_ENCODING, body.includes('"event":0') ? [FD] : []));
      expect(r.errno).toBe(22);
      expect(r.chain[0]).toContain(root);
      expect(r.chain.at(-1)).toBe("malformed request");
    });
  }

  test("descriptors: an index past the packet's, one referenced twice, one attached and never referenced", () => {
    const two = bytes('{"IoEventRaw":{"event":1,"addr":1,"datamatch":"AnyLength","register":true}}');
    expect(refusal(decodeReq(two, JSON_ENCODING, [FD])).chain[0]).toContain("descriptor index 1 is out of range: the packet carries 1");
    const chunk = bytes('[{"file":0,"length":1,"mem_offset":0,"file_offset":0},{"file":0,"length":1,"mem_offset":4096,"file_offset":0}]');
    expect(refusal(decodeFileMappings(chunk, 0, chunk.length, [FD, FD], JSON_ENCODING)).chain[0]).toContain("referenced twice");
    const one = bytes('{"IoEventRaw":{"event":0,"addr":1,"datamatch":"AnyLength","register":true}}');
    expect(refusal(decodeReq(one, JSON_ENCODING, [FD, FD])).chain[0]).toContain("descriptor 1 of 2 attached is not referenced");
    expect(decodeReq(one, JSON_ENCODING, [FD])).toEqual({ IoEventRaw: { event: FD, addr: 1, datamatch: "AnyLength", register: true } });
  });

  test("a chunk holds 1 to 253 mappings", () => {
    const empty = bytes("[]");
    expect(refusal(decodeFileMappings(empty, 0, 2, [], JSON_ENCODING)).chain[0]).toContain("needs at least 1 element");
    const many = encodeFileMappings(Array.from({ length: 254 }, (_, i) => ({ file: i, length: 1, mem_offset: 0, file_offset: 0 })));
    expect(refusal(decodeFileMappings(many.body, 0, many.body.length, many.fds, MSGPACK)).chain[0]).toContain("takes at most 253 elements");
  });
});

describe("hostile input costs no more than its packet", () => {
  function heapAfter(f: () => void): number {
    Bun.gc(true);
    const before = heapStats().heapSize;
    f();
    return heapStats().heapSize - before;
  }
  const bombs: [string, Uint8Array, Encoding][] = [
    ["64 KiB of nested MessagePack array16 headers", new Uint8Array(65536).map((_, i) => (i % 3 === 0 ? 0xdc : 0xff)), MSGPACK],
    ["a map32 header claiming 2^32-1 entries", Uint8Array.of(0xdf, 0xff, 0xff, 0xff, 0xff, 0xa1, 0x61), MSGPACK],
    ["64 KiB of [ in JSON", bytes("[".repeat(65536)), JSON_ENCODING],
    ["64 KiB of nested objects in an ignored JSON field", bytes(`{"GetRegions":{"x":${'{"a":'.repeat(13000)}1`), JSON_ENCODING],
    ["a 60 KiB number", bytes(`{"UnregisterMemory":${"9".repeat(60000)}}`), JSON_ENCODING],
    ["invalid UTF-8 in a key", Uint8Array.of(0x7b, 0x22, 0xff, 0xfe, 0x22, 0x3a, 0x31, 0x7d), JSON_ENCODING],
  ];
  for (const [what, body, enc] of bombs) {
    test(`${what}: EINVAL, and the heap barely moves`, () => {
      let r: unknown;
      const grown = heapAfter(() => {
        for (let i = 0; i < 20; i++) r = decodeReq(body, enc);
      });
      expect(refusal(r).errno).toBe(22);
      expect(grown).toBeLessThan(4 * 2 ** 20);
    });
  }

  test("200,000 mangled packets of both encodings: a request or a refusal, never an exception", () => {
    const next = rng(12);
    const r = { int: next };
    const seeds = REQUESTS.flatMap((q) => [encodeRequest(q, MSGPACK), encodeRequest(q, JSON_ENCODING)]);
    for (let i = 0; i < 200_000; i++) {
      const seed = seeds[r.int(seeds.length)]!;
      const b = seed.body.slice(0, r.int(4) === 0 ? r.int(seed.body.length + 1) : seed.body.length);
      for (let k = r.int(4); k > 0 && b.length > 0; k--) b[r.int(b.length)] = r.int(256);
      const out = decodeReq(b, b.length > 0 && "{[\" \t\r\n".includes(String.fromCharCode(b[0]!)) ? JSON_ENCODING : MSGPACK, seed.fds.map(() => FD));
      expect(typeof out === "string" || typeof out === "object").toBe(true);
    }
  });
});
