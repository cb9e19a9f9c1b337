// The protocol layer on its own: the hand-written fast paths (src/protocol/fast.ts)
// against the zod schema, which stays the one definition of the wire.
import { describe, expect, test } from "bun:test";
import { fastRequest, fastResponse } from "../src/protocol/fast";
import { decodeRequestGeneral, decodeValue, encodeValue, encodeValueGeneral, parseRequestBySchema, parseResponseBySchema } from "../src/protocol";
import { hotRequest } from "../src/protocol/hot";
import { decodePlain, encodePlain, NOT_PLAIN } from "../src/protocol/plain_msgpack";
import { Decoder, Encoder } from "@msgpack/msgpack";
import { rng } from "./helpers";

const uuid = new Uint8Array(16);
const REQUESTS: unknown[] = [
  { RegisterMemory: { source: { SharedMemory: { descriptor: 0, size: 4096 } }, dest: { GuestPhysicalAddress: 0x2_0000_0000 }, prot: { read: true, write: false }, cache: "CacheCoherent" } },
  { RegisterMemory: { source: { Descriptor: { descriptor: 1, offset: 8192, size: 4096 } }, dest: { ExistingAllocation: { allocation: { PciBar: { bus: 0, dev: 5, func: 0, bar: 2 } }, offset: 0x1000 } }, prot: { read: true, write: true }, cache: "CacheNonCoherent" } },
  { RegisterMemory: { source: { Vulkan: { descriptor: 0, handle_type: 1, memory_idx: 2, device_uuid: uuid, driver_uuid: uuid, size: 4096 } }, dest: { GuestPhysicalAddress: 0 }, prot: { read: true, write: true }, cache: "CacheCoherent" } },
  { RegisterMemory: { source: { ExternalMapping: { ptr: 4096, size: 4096 } }, dest: { ExistingAllocation: { allocation: { Anon: 3 }, offset: 0 } }, prot: { read: true, write: true }, cache: "CacheCoherent" } },
  { UnregisterMemory: 0x2_0000_0000 },
  { BalloonTargetReached: { size: 12345 } },
  { DynamicallyFreeMemoryRanges: { ranges: [[0, 4096], [8192, 4096]] } },
  { DynamicallyReclaimMemoryRanges: { ranges: [] } },
  { PrepareSharedMemoryRegion: { alloc: { PciBar: { bus: 1, dev: 2, func: 3, bar: 4 } }, cache: "CacheCoherent" } },
  { MmapAndRegisterMemory: { shm: { descriptor: 0, size: 8192 }, dest: { GuestPhysicalAddress: 4096 }, num_file_mappings: 2 } },
  { IoEventRaw: { event: 0, addr: 0xe000_0000, datamatch: { U32: 7 }, register: true } },
  { AllocateMmio: { alloc: { Anon: 1 }, size: 4096, align: null } },
  { ReleaseMmio: { PciBar: { bus: 0, dev: 5, func: 0, bar: 2 } } },
  "GetState",
];
const RESPONSES: unknown[] = [
  "Ok",
  { RegisterMemory: { region_id: 0x2_0000_0000, slot: 7 } },
  { Err: { errno: 22, chain: ["root", "context"] } },
  { Err: { errno: null, chain: [] } },
  { Allocated: { start: 0xd000_0000, size: 4096 } },
];
const ODD = [-1, -0, 1.5, NaN, Infinity, 2 ** 53, 2 ** 64, 0n, 5n, 2n ** 64n, -1n, "x", "", null, true, false, [], {}, [1, 2], new Uint8Array(16), 252, 253, 255, 256, 2 ** 31, 2 ** 32, "Ok", "CacheCoherent"];

/**
 * One of four at random: `bytes` cut short (`cut` says where), one random byte longer, with
 * 1..maxFlips bytes overwritten in place, or left alone. `cut` is -1 unless cut short.
 */
function mangle(bytes: Uint8Array, r: (n: number) => number, maxFlips: number): { body: Uint8Array; cut: number } {
  const how = r(4);
  if (how === 0) {
    const cut = r(bytes.length + 1);
    return { body: bytes.subarray(0, cut), cut };
  }
  if (how === 1) return { body: Uint8Array.from([...bytes, r(256)]), cut: -1 };
  if (how === 2) for (let k = 0, n = 1 + r(maxFlips); k < n; k++) bytes[r(bytes.length)] = r(256);
  return { body: bytes, cut: -1 };
}

/** A copy of `v` with one random change: a value replaced, a key dropped or added. */
function mutate(v: unknown, r: (n: number) => number): unknown {
  const copy = structuredClone(v);
  const holders: [Record<string, unknown> | unknown[], string | number][] = [];
  const walk = (x: unknown) => {
    if (x instanceof Uint8Array || typeof x !== "object" || x === null) return;
    if (Array.isArray(x)) x.forEach((e, i) => (holders.push([x, i]), walk(e)));
    else for (const k of Object.keys(x)) holders.push([x as Record<string, unknown>, k]), walk((x as Record<string, unknown>)[k]);
  };
  walk(copy);
  if (holders.length === 0) return ODD[r(ODD.length)];
  const [h, k] = holders[r(holders.length)]!;
  const what = r(4);
  if (what === 0 && !Array.isArray(h)) delete (h as Record<string, unknown>)[k as string];
  else if (what === 1 && !Array.isArray(h)) (h as Record<string, unknown>)[["extra", "size", "descriptor", "SharedMemory"][r(4)]!] = ODD[r(ODD.length)];
  else (h as Record<string, unknown>)[k as string] = ODD[r(ODD.length)];
  return copy;
}

function schemaAnswer(parse: (v: unknown) => unknown, v: unknown): { ok: true; data: unknown } | { ok: false } {
  try {
    return { ok: true, data: parse(v) };
  } catch {
    return { ok: false };
  }
}

describe("fast paths agree with the zod schema", () => {
  test("valid common requests take the fast path, and give what the schema gives", () => {
    let fastHits = 0;
    for (const v of REQUESTS) {
      const fast = fastRequest(structuredClone(v));
      const z = schemaAnswer(parseRequestBySchema, structuredClone(v));
      expect(z.ok).toBe(true);
      if (fast !== undefined) {
        fastHits++;
        expect(fast).toEqual((z as { data: unknown }).data as never);
      }
    }
    expect(fastHits).toBe(6); // both register shapes, unregister, balloon, free, reclaim
  });

  test("100,000 mutated requests and responses: the fast path never accepts what zod refuses, nor differs", () => {
    const r = rng(20261127);
    let fastAccepted = 0;
    let zodAccepted = 0;
    for (let i = 0; i < 100_000; i++) {
      const isResponse = i % 5 === 4;
      const base = isResponse ? RESPONSES[r(RESPONSES.length)] : REQUESTS[r(REQUESTS.length)];
      // A quarter unchanged (the fast path's bread and butter), the rest with one or two changes.
      const changes = r(4);
      let v: unknown = structuredClone(base);
      for (let c = 0; c < Math.min(changes, 2); c++) v = mutate(v, r);
      // Through the real codec, as the server sees it (numbers, bigints, maps as decoded).
      let decoded: unknown;
      try {
        decoded = decodeValue(encodeValue(v).slice());
      } catch {
        continue;
      }
      const fast = isResponse ? fastResponse(structuredClone(decoded)) : fastRequest(structuredClone(decoded));
      const z = schemaAnswer(isResponse ? parseResponseBySchema : parseRequestBySchema, structuredClone(decoded));
      if (z.ok) zodAccepted++;
      if (fast === undefined) continue;
      fastAccepted++;
      if (!z.ok) throw new Error(`the fast path accepted what the schema refuses: ${Bun.inspect(decoded)}`);
      expect(fast).toEqual(z.data as never);
    }
    // The generator must exercise both: plenty accepted by each, plenty refused.
    expect(fastAccepted).toBeGreaterThan(5_000);
    expect(zodAccepted).toBeGreaterThan(fastAccepted);
    expect(zodAccepted).toBeLessThan(75_000);
  }, 60_000);
});

describe("the plain MessagePack codec agrees with @msgpack/msgpack", () => {
  // The reference: the general decoder with vmemd's options, but none of its own fast paths.
  const reference = new Decoder({ useBigInt64: true, maxStrLength: 65536, maxBinLength: 65536 });
  const referenceDecode = (body: Uint8Array): { ok: true; value: unknown } | { ok: false } => {
    try {
      return { ok: true, value: reference.decode(body) };
    } catch {
      return { ok: false };
    }
  };
  const EXTRA: unknown[] = [2n ** 53n - 1n, 2n ** 53n, -(2n ** 53n) + 1n, -(2n ** 53n), 2n ** 64n - 1n, -(2n ** 63n), 5n, -5n, "é", "x".repeat(40), "y".repeat(300), JSON.parse(`{"__proto__": 1}`), JSON.parse(`{"RegisterMemory": {"__proto__": {"a": 1}}}`), 1.5, -(2 ** 40), 2 ** 63, -129, -33, 65535, 65536, new Array(20).fill(1), Object.fromEntries(Array.from({ length: 20 }, (_, i) => [`k${i}`, i]))];

  /** The reference's value as the plain decoder gives it: 64-bit integers within 2^53 as numbers. */
  const safeNumbers = (v: unknown): unknown => {
    if (typeof v === "bigint") return v >= -BigInt(Number.MAX_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
    if (Array.isArray(v)) return v.map(safeNumbers);
    if (typeof v === "object" && v !== null && !(v instanceof Uint8Array)) {
      const o = v as Record<string, unknown>;
      for (const k of Object.keys(o)) o[k] = safeNumbers(o[k]);
    }
    return v;
  };

  /** Checks one body: where the plain decoder answers, it answers what the reference does. */
  function agree(body: Uint8Array): boolean {
    const plain = decodePlain(body);
    const ref = referenceDecode(body);
    if (plain === NOT_PLAIN) return false;
    if (!ref.ok) throw new Error(`the plain decoder accepted bytes the reference refuses: ${Buffer.from(body).toString("hex")}`);
    ref.value = safeNumbers(ref.value);
    expect(Bun.deepEquals(plain, ref.value, true)).toBe(true);
    // Same own keys in the same order, and plain objects and arrays only.
    expect(JSON.stringify(plain, (_k, v) => (typeof v === "bigint" ? `${v}n` : v))).toBe(JSON.stringify(ref.value, (_k, v) => (typeof v === "bigint" ? `${v}n` : v)));
    return true;
  }

  test("every request and response shape, and odd values, decode the same", () => {
    let plain = 0;
    for (const v of [...REQUESTS, ...RESPONSES, ...ODD, ...EXTRA]) if (agree(new Encoder({ useBigInt64: true }).encode(v))) plain++;
    expect(plain).toBeGreaterThan(REQUESTS.length); // most requests are plain
  });

  test("200,000 mangled packets: truncated, extended, bytes flipped; never a different value", () => {
    const r = rng(7);
    const encoder = new Encoder({ useBigInt64: true });
    let plain = 0;
    let refused = 0;
    for (let i = 0; i < 200_000; i++) {
      const base = [...REQUESTS, ...RESPONSES, ...EXTRA][r(REQUESTS.length + RESPONSES.length + EXTRA.length)];
      let v: unknown = structuredClone(base);
      if (r(2) === 0) v = mutate(v, r);
      const bytes = encoder.encode(v).slice();
      const { body } = mangle(bytes, r, 3);
      if (agree(body)) plain++;
      else if (!referenceDecode(body).ok) refused++;
    }
    expect(plain).toBeGreaterThan(50_000);
    expect(refused).toBeGreaterThan(10_000);
  }, 60_000);
});

describe("the plain MessagePack encoder writes what the general one does", () => {
  const hex = (b: Uint8Array) => Buffer.from(b).toString("hex");
  const NUMBERS = [0, -0, 1, 127, 128, 255, 256, 65535, 65536, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 53, 2 ** 63, 2 ** 64 - 2 ** 12, 2 ** 64, -1, -32, -33, -128, -129, -32768, -32769, -(2 ** 31), -(2 ** 31) - 1, 0.5, NaN, 0n, 1n, 2n ** 63n, 2n ** 64n - 1n, 2n ** 64n, -1n, -(2n ** 63n), -(2n ** 63n) - 1n];
  const STRINGS = ["", "Ok", "x".repeat(31), "x".repeat(32), "x".repeat(255), "x".repeat(256), "x".repeat(70000), "é", "a\u0000b"];

  /** Where the plain encoder answers, its bytes are the general encoder's. */
  function agree(v: unknown): boolean {
    const plain = encodePlain(v);
    if (plain === NOT_PLAIN) return false;
    const mine = hex(plain);
    let general: string;
    try {
      general = hex(encodeValueGeneral(structuredClone(v)));
    } catch (e) {
      throw new Error(`the plain encoder wrote what the general one refuses: ${Bun.inspect(v)} (${e})`);
    }
    if (mine !== general) throw new Error(`different bytes for ${Bun.inspect(v)}: ${mine} against ${general}`);
    return true;
  }

  test("numbers, strings, and every request and response shape", () => {
    let plain = 0;
    for (const v of [...NUMBERS, ...STRINGS, ...REQUESTS, ...RESPONSES, ...ODD, null, undefined, [undefined], { a: undefined }, new Array(16).fill(7), Object.fromEntries(Array.from({ length: 16 }, (_, i) => [`k${i}`, i])), new Date(0), new Map()]) {
      if (agree(v)) plain++;
    }
    expect(plain).toBeGreaterThan(50);
  });

  test("100,000 mutated requests and responses: the same bytes, or left to the general encoder", () => {
    const r = rng(11);
    const all = [...REQUESTS, ...RESPONSES];
    let plain = 0;
    for (let i = 0; i < 100_000; i++) {
      let v: unknown = structuredClone(all[r(all.length)]);
      for (let c = 0, n = r(3); c < n; c++) v = mutate(v, r);
      if (r(4) === 0) v = { wrap: [v, NUMBERS[r(NUMBERS.length)], STRINGS[r(STRINGS.length - 1)]] };
      if (agree(v)) plain++;
    }
    expect(plain).toBeGreaterThan(40_000);
  }, 60_000);
});

describe("the plain MessagePack codec at its edges", () => {
  const reference = new Decoder({ useBigInt64: true, maxStrLength: 65536, maxBinLength: 65536 });
  const hexOf = (b: Uint8Array) => Buffer.from(b).toString("hex");

  test("a body in the middle of a larger buffer decodes as on its own", () => {
    const body = encodeValueGeneral(structuredClone(REQUESTS[0])).slice(); // uint 64 guest address
    const buf = new Uint8Array(body.length + 13).fill(0xc1); // 0xc1: never valid MessagePack
    buf.set(body, 7);
    expect(decodePlain(buf.subarray(7, 7 + body.length))).toEqual(decodePlain(body.slice()) as never);
    expect(decodePlain(buf.subarray(7, 7 + body.length))).not.toBe(NOT_PLAIN);
    expect(decodePlain(buf.subarray(6, 7 + body.length))).toBe(NOT_PLAIN); // the 0xc1 before it
  });

  test("strings sharing a cache slot never come back as each other", () => {
    // Same length and the same first, middle and last byte: the same slot.
    for (let round = 0; round < 3; round++) {
      for (const s of ["aXbYc", "aZbWc", "aXbYc", "a\u00e9c"]) {
        const body = new Encoder().encode({ [s]: s });
        const plain = decodePlain(body);
        if (s.charCodeAt(1) > 0x7f) expect(plain).toBe(NOT_PLAIN);
        else expect(plain).toEqual({ [s]: s });
      }
    }
  });

  test("nesting: 16 levels are plain, deeper is left to the general codec", () => {
    let v: unknown = 1;
    for (let i = 0; i < 16; i++) v = [v];
    expect(decodePlain(new Encoder().encode(v))).toEqual(v as never);
    expect(hexOf(encodePlain(v) as Uint8Array)).toBe(hexOf(new Encoder().encode(v)));
    const deeper = [v];
    expect(decodePlain(new Encoder().encode(deeper))).toBe(NOT_PLAIN);
    expect(encodePlain(deeper)).toBe(NOT_PLAIN);
  });

  test("counts and lengths beyond the bytes that follow are not plain (and the reference refuses them)", () => {
    for (const hex of ["deffff", "dcffff", "de0002a161", "81d9", "81d905616263", "cf0000", "d3ff", "92c3"]) {
      const body = Buffer.from(hex, "hex");
      expect({ hex, plain: decodePlain(body) }).toEqual({ hex, plain: NOT_PLAIN });
      expect(() => reference.decode(body)).toThrow();
    }
  });

  test("an encoding that outgrows the first buffer, and one beyond the limit", () => {
    const big = Array.from({ length: 1000 }, () => 2 ** 40); // 9 bytes each: 9 KiB
    expect(hexOf(encodePlain(big) as Uint8Array)).toBe(hexOf(encodeValueGeneral(structuredClone(big))));
    expect(encodePlain("x".repeat(60000).split("").map(() => "yyy"))).toBe(NOT_PLAIN); // 240 KiB
    expect(hexOf(encodePlain({ small: 1 }) as Uint8Array)).toBe("81a5736d616c6c01"); // still right after
  });
});

describe("the hot request path (src/protocol/hot.ts) agrees with the general decoder", () => {
  // The project's own encoder (as the client's): integers of 2^32 and above go out as
  // uint 64, where @msgpack/msgpack alone would write a float 64.
  const encoder = { encode: (v: unknown) => encodeValue(structuredClone(v)).slice() };
  const register = (size: unknown, guest: unknown, read: unknown, write: unknown, descriptor: unknown = 0, cache: unknown = "CacheCoherent") => ({
    RegisterMemory: { source: { SharedMemory: { descriptor, size } }, dest: { GuestPhysicalAddress: guest }, prot: { read, write }, cache },
  });
  const general = (body: Uint8Array, fds: number[]): { ok: true; req: unknown } | { ok: false } => {
    try {
      return { ok: true, req: decodeRequestGeneral(body, fds) };
    } catch {
      return { ok: false };
    }
  };
  /** Where the hot path answers, the general decoder answers the same; true if it answered. */
  function agree(body: Uint8Array, fds: number[]): boolean {
    const hot = hotRequest(body, fds);
    // The server reads a packet in place, as a range of its receive buffer: the bytes
    // around the range must change nothing.
    const framed = new Uint8Array(body.length + 6);
    framed.set([0x81, 0xa2, 0x81], 0);
    framed.set(body, 3);
    framed.set([0xc0, 0x81, 0x00], 3 + body.length);
    expect(hotRequest(framed, fds, 3, 3 + body.length)).toEqual(hot as never);
    if (hot === null) return false;
    const g = general(body, fds);
    if (!g.ok) throw new Error(`the hot path accepted what the general decoder refuses: ${Buffer.from(body).toString("hex")} fds ${fds}`);
    expect(hot).toEqual(g.req as never);
    return true;
  }
  // Every width of MessagePack unsigned integer, and the edges of 2^53.
  const UINTS = [0, 1, 127, 128, 255, 256, 65535, 65536, 2 ** 32 - 1, 2 ** 32, 0x40_0000_0000, 2 ** 53 - 1, 2n ** 53n - 1n];

  test("the plain encodings take the hot path, every integer width, and give what the general decoder gives", () => {
    let hits = 0;
    for (const n of UINTS) {
      for (const [read, write] of [[true, true], [true, false], [false, true], [false, false]]) {
        if (agree(encoder.encode(register(n, 0x1_0000_0000, read, write)), [9])) hits++;
        if (agree(encoder.encode(register(4096, n, read, write)), [9])) hits++;
      }
      if (agree(encoder.encode({ UnregisterMemory: n }), [])) hits++;
    }
    expect(hits).toBe(UINTS.length * 9);
  });

  test("what it leaves to the general decoder", () => {
    const reg = encoder.encode(register(4096, 0x1_0000_0000, true, true));
    const cases: [Uint8Array, number[]][] = [
      [reg, []], // no descriptor attached
      [reg, [9, 10]], // one too many
      [encoder.encode(register(4096, 0x1_0000_0000, true, true, 1)), [9, 10]], // index 1
      [encoder.encode(register(4096, 0x1_0000_0000, true, true, 0, "CacheNonCoherent")), [9]],
      [encoder.encode(register(2n ** 53n, 0x1_0000_0000, true, true)), [9]], // stays a bigint
      [encoder.encode(register(4096, 2n ** 64n - 1n, true, true)), [9]],
      [encoder.encode(register(-1, 0x1_0000_0000, true, true)), [9]],
      [encoder.encode(register(4096, 0x1_0000_0000, 1, true)), [9]],
      [encoder.encode({ RegisterMemory: { dest: { GuestPhysicalAddress: 0 }, source: { SharedMemory: { descriptor: 0, size: 4096 } }, prot: { read: true, write: true }, cache: "CacheCoherent" } }), [9]], // reordered
      [encoder.encode({ UnregisterMemory: 4096 }), [9]], // a stray descriptor
      [encoder.encode({ UnregisterMemory: 2n ** 53n }), []],
      [encoder.encode({ UnregisterMemory: 1.5 }), []],
      [Uint8Array.from([...encoder.encode({ UnregisterMemory: 4096 }), 0xc0]), []], // trailing byte
      [reg.subarray(0, reg.length - 1), [9]], // truncated
    ];
    for (const [body, fds] of cases) expect(agree(body, fds)).toBe(false);
    // A range that claims more than the buffer holds reads only what is there.
    const un = encoder.encode({ UnregisterMemory: 0x40_0000_0000 });
    expect(hotRequest(un.subarray(0, un.length - 2), [], 0, un.length)).toBeNull();
    // The reordered map is still a valid request: the general decoder takes it.
    expect(general(cases[8]![0], [9]).ok).toBe(true);
  });

  test("200,000 mangled packets: truncated, extended, bytes flipped; never a different request", () => {
    const r = rng(53);
    const bases = [register(4096, 0x40_0000_0000, true, true), register(2 * 1024 * 1024, 0x2000, true, false), { UnregisterMemory: 0x40_0000_0000 }, { UnregisterMemory: 7 }];
    const fdChoices = [[], [9], [9, 10]];
    let hot = 0;
    for (let i = 0; i < 200_000; i++) {
      const base = bases[r(bases.length)]!;
      const bytes = encoder.encode(base);
      const { body, cut } = mangle(bytes, r, 2);
      if (cut !== -1) {
        // In place, the rest of the real packet follows the range: still not read.
        expect(hotRequest(bytes, [9], 0, cut)).toEqual(hotRequest(body, [9]) as never);
        expect(hotRequest(bytes, [], 0, cut)).toEqual(hotRequest(body, []) as never);
      }
      // Mostly the descriptor count the request wants, so the mangled bytes meet the matcher.
      const fds = r(4) === 0 ? fdChoices[r(3)]! : "RegisterMemory" in base ? [9] : [];
      if (agree(body, fds)) hot++;
    }
    // Plenty take the hot path (the unchanged ones, and flips inside integers and booleans).
    expect(hot).toBeGreaterThan(20_000);
  }, 60_000);
});
