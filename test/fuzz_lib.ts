// The fuzz engine, shared by scripts/fuzz.ts (the long run) and
// test/fuzz.test.ts (a short run under `bun test`), for wire protocol version 2
// (docs/protocol.md).
//
// It spawns the compiled server, opens several pipelined connections and sends
// packets in both encodings of version 2 (MessagePack, and JSON as crosvm's Tube writes
// it): valid requests of every variant, the same with fields swapped, dropped,
// oversized, negative, mistyped or renamed, byte-mutated packets, mangled JSON text
// (bad numbers, escapes, commas, nesting, UTF-8), random bytes and MessagePack garbage,
// MmapAndRegisterMemory sequences (complete, abandoned, broken by a bad chunk, chunks in
// either encoding), with descriptors of every kind attached at random indices.
//
// Accounting is exact: a small model of the server written from docs/protocol.md and
// docs/protocol.md, independent of src/protocol, says which packets get a response and in
// which encoding (a body whose first byte is `{`, `[`, `"` or JSON whitespace is JSON and
// answered in JSON; an MmapAndRegisterMemory is answered in its own encoding after its
// last chunk, whatever the chunks' encoding). The model has its own MessagePack and JSON
// readers and its own transcription of every message shape (unknown fields: EINVAL in
// MessagePack, ignored in JSON; a missing nullable field reads as nil; a unit variant is
// its name, or {name: nil} as serde reads it; descriptor indices reference every attached
// descriptor once), so it knows which packets are well-formed requests. Every response
// is matched to its packet in order and checked: well formed (a JSON answer compact,
// fields in docs/protocol.md's order, an Err's errno read from the ` (os error N)` that ends
// its root cause), in the right encoding, never larger than a packet, of a kind its
// request may get, EINVAL for anything that is not a well-formed request and never
// "malformed" for one that is. Pages of GetRegions / GetAllocations are checked against
// the paging rules. The regions, allocations and ioevents the server reports are tracked
// from the responses, so at checkpoints (where the model pages through GetRegions and
// GetAllocations, and checks that GetState's lists are their first pages) and at the end
// the server's descriptors, mappings and slots can be compared with exactly what its
// live state needs. Each checkpoint also probes freed_bytes (a page counts once, a
// reclaimed page not at all), and the end probes MSG_CTRUNC (see below).
//
// Deterministic from the seed: every connection slot draws from its own PRNG, never from
// server feedback, so each slot's packet sequence is a function of (seed, slot); the
// summary prints a digest of each slot's stream to show it.
//
// The model assumes the server's defaults for the limits it could hit: 65536-byte bodies,
// 253 descriptors, --max-file-mappings 65536. Valid destinations come from small address
// windows, so live regions stay at a few hundred: far below --max-regions-per-connection
// (16384) and the KVM slot limit, yet more than one GetState page holds.
//
// MSG_CTRUNC: a sender can attach at most SCM_MAX_FD (253) descriptors to a packet and the
// server's control buffer holds that many, so the stream cannot make the kernel cut a
// packet's descriptors short; only a full descriptor table at the server does. The end of
// the run does that on purpose when prlimit(1) is at hand (the server's RLIMIT_NOFILE
// lowered to its lowest free descriptor for a moment) and checks that an
// MmapAndRegisterMemory whose descriptors were cut short gets exactly one Err after its
// chunks, and any other such packet Err EINVAL.
import { Encoder, ExtData } from "@msgpack/msgpack";
import { existsSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Subprocess } from "bun";
import * as sys from "../src/sys";

// ---- constants ---------------------------------------------------------------

export const MAX_PACKET = 65536; // docs/protocol.md: body size at most 65536 bytes
const SCM_MAX_FD = 253;
const PAGE = 4096;
const MiB = 1 << 20;
const GiB = 1024 * MiB;
const RAM_SIZE = 64 * MiB;
/** docs/protocol.md: the default --max-file-mappings. */
const MAX_FILE_MAPPINGS = 65536n;
const U64_MAX = 2n ** 64n - 1n;
const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);
const EINVAL = 22;
const ENOENT = 2;
const CHUNK_ABORT = "failed to mmap and register memory";
const MALFORMED_REQUEST = "malformed request";

/** An Alloc as the fuzzer builds it: a map variant, or a unit variant's name. */
type Alloc = Record<string, unknown> | string;
const pciBar = (bus: number, dev: number, func: number, bar: number): Alloc => ({ PciBar: { bus, dev, func, bar } });
const BAR_A = pciBar(0, 5, 0, 2);
const BAR_B = pciBar(0, 6, 0, 0);
export const FUZZ_SERVER_ARGS = ["--memory", "64M", "--pci-bar", "00:05.0/2=16M", "--pci-bar", "00:06.0/0=1M"];
const INITIAL_ALLOCS = new Map<string, number>([
  [allocKey(BAR_A), 16 * MiB],
  [allocKey(BAR_B), 1 * MiB],
]);
/** Allocations the fuzzer allocates, releases and prepares (a small set, so state repeats): every Alloc variant. */
const ALLOC_SET: Alloc[] = [
  BAR_A,
  BAR_B,
  pciBar(1, 0, 0, 0),
  pciBar(1, 0, 0, 1),
  pciBar(1, 1, 0, 0),
  pciBar(2, 31, 7, 5),
  { Anon: 1 },
  { Anon: 2 },
  { PmemDevice: 0 },
  { FileBacked: 7 },
  "GpuRenderNode",
  "Pstore",
  { PciBridgeWindow: { bus: 1, dev: 0, func: 0 } },
  { PciBridgeWindow: { bus: 3, dev: 2, func: 1 } },
  { PciBridgePrefetchWindow: { bus: 1, dev: 0, func: 0 } },
];

function deepFreeze<T>(v: T): T {
  if (typeof v === "object" && v !== null) {
    for (const x of Object.values(v)) deepFreeze(x);
    Object.freeze(v);
  }
  return v;
}
// Shared by every request built; the mutator works on deep copies (frozen, so a slip throws).
deepFreeze(ALLOC_SET);

/**
 * More mappings than any sequence the generator means to complete (it declares at most 600):
 * such a count comes from a mutation, and a client that sent it could only hang up.
 */
const DOOMED_PENDING = 600;

export const VARIANTS = [
  "PrepareSharedMemoryRegion",
  "RegisterMemory",
  "MmapAndRegisterMemory",
  "DynamicallyFreeMemoryRanges",
  "DynamicallyReclaimMemoryRanges",
  "BalloonTargetReached",
  "UnregisterMemory",
  "IoEventRaw",
  "GetState",
  "GetRegions",
  "GetAllocations",
  "AllocateMmio",
  "ReleaseMmio",
] as const;
/** Names the mutator draws keys and strings from: every name of docs/protocol.md, and a few hostile ones. */
const NAMES = [
  ...VARIANTS,
  "alloc", "cache", "source", "dest", "prot", "shm", "num_file_mappings", "ranges", "size", "event", "addr",
  "datamatch", "register", "descriptor", "offset", "handle_type", "memory_idx", "device_uuid", "driver_uuid",
  "ptr", "allocation", "read", "write", "file", "length", "mem_offset", "file_offset", "bus", "dev", "func",
  "bar", "align", "from", "max", "next", "Anon", "PciBar", "PmemDevice", "FileBacked", "GpuRenderNode", "Pstore",
  "PciBridgeWindow", "PciBridgePrefetchWindow", "SharedMemory", "Descriptor", "Vulkan",
  "ExternalMapping", "ExistingAllocation", "GuestPhysicalAddress", "CacheCoherent", "CacheNonCoherent",
  "AnyLength", "U8", "U16", "U32", "U64", "Ok", "Err", "State", "Regions", "Allocations", "Allocated", "errno",
  "chain", "regions", "allocations", "regions_next", "allocations_next", "file_mappings",
  "registermemory", "GETSTATE", "GetState ", "", "constructor", "toString", "hasOwnProperty", "valueOf",
  "__proto__", "prototype", "length", "then",
];
/** Field names no message has: a JSON struct ignores them (as crosvm's serde), MessagePack refuses them. */
const UNKNOWN_FIELDS = ["zz_future_field", "flags", "version", "padding", "__proto__", "constructor", "toString", "Ok", "GetState"];
/** Keys every JS object inherits: a server that looks variants up in a plain object must still say EINVAL. */
const INHERITED = ["constructor", "toString", "hasOwnProperty", "valueOf", "isPrototypeOf", "toLocaleString", "__defineGetter__", "propertyIsEnumerable"];
const INTERESTING: (number | bigint)[] = [
  0, 1, 2, 7, 255, 256, 4095, 4096, 4097, 8192, 65535, 65536, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, 2 ** 32,
  2 ** 32 + 4096, 2 ** 52, 2 ** 53 - 1, 2n ** 53n, 2n ** 53n + 1n, 2n ** 63n - 1n, 2n ** 63n, U64_MAX, -1, -4096,
  -(2 ** 31), -(2n ** 63n), 1.5, -0.5, Number.NaN, Number.POSITIVE_INFINITY, Number.NEGATIVE_INFINITY, 1e300, -0,
  2 ** 53, 2n ** 64n, 4096.5,
];
const DESCRIPTOR_FIELDS = new Set(["descriptor", "event", "file"]);

// ---- a small deterministic PRNG (sfc32, seeded through splitmix32) -----------

export class Rng {
  private a = 0;
  private b = 0;
  private c = 0;
  private d = 0;
  constructor(...seeds: number[]) {
    let h = 0x9e3779b9;
    const mix = (x: number) => {
      h = (h + 0x9e3779b9 + (x | 0)) | 0;
      let z = h;
      z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
      z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
      return (z ^ (z >>> 16)) >>> 0;
    };
    for (const s of seeds) mix(s);
    this.a = mix(1);
    this.b = mix(2);
    this.c = mix(3);
    this.d = mix(4);
    for (let i = 0; i < 16; i++) this.u32();
  }
  u32(): number {
    const t = (((this.a + this.b) | 0) + this.d) | 0;
    this.d = (this.d + 1) | 0;
    this.a = this.b ^ (this.b >>> 9);
    this.b = (this.c + (this.c << 3)) | 0;
    this.c = (this.c << 21) | (this.c >>> 11);
    this.c = (this.c + t) | 0;
    return t >>> 0;
  }
  float(): number {
    return this.u32() / 4294967296;
  }
  /** An integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.float() * n);
  }
  /** An integer in [lo, hi]. */
  range(lo: number, hi: number): number {
    return lo + this.int(hi - lo + 1);
  }
  chance(p: number): boolean {
    return this.float() < p;
  }
  pick<T>(arr: readonly T[]): T {
    return arr[this.int(arr.length)]!;
  }
  u64(): bigint {
    return (BigInt(this.u32()) << 32n) | BigInt(this.u32());
  }
  bytes(n: number): Uint8Array {
    const b = new Uint8Array(n);
    for (let i = 0; i < n; i += 4) {
      const v = this.u32();
      b[i] = v;
      if (i + 1 < n) b[i + 1] = v >>> 8;
      if (i + 2 < n) b[i + 2] = v >>> 16;
      if (i + 3 < n) b[i + 3] = v >>> 24;
    }
    return b;
  }
  /** One of the values, by weight. */
  weighted<T>(table: readonly (readonly [number, T])[]): T {
    let total = 0;
    for (const [w] of table) total += w;
    let x = this.float() * total;
    for (const [w, v] of table) {
      if ((x -= w) < 0) return v;
    }
    return table[table.length - 1]![1];
  }
}


// ---- helpers -------------------------------------------------------------------

/** A key for an Alloc: the same for every spelling of the same value (number or bigint, "Pstore" or {"Pstore": nil}). */
function allocKey(alloc: unknown): string {
  if (typeof alloc === "string") return alloc;
  const [k, v] = Object.entries(alloc as Record<string, unknown>)[0] ?? ["?", null];
  if ((k === "GpuRenderNode" || k === "Pstore") && v === null) return k;
  if (isPlainMap(v)) {
    const f = (x: unknown) => (typeof x === "bigint" || typeof x === "number" ? BigInt(x) : String(x));
    return k === "PciBar" ? `PciBar:${f(v.bus)}:${f(v.dev)}:${f(v.func)}:${f(v.bar)}` : `${k}:${f(v.bus)}:${f(v.dev)}:${f(v.func)}`;
  }
  return `${k}:${typeof v === "bigint" || typeof v === "number" ? BigInt(v) : String(v)}`;
}

function hex(n: number | bigint): string {
  return "0x" + n.toString(16);
}

function isPlainMap(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && Object.getPrototypeOf(v) === Object.prototype;
}
function hasKeys(v: unknown, keys: readonly string[]): v is Record<string, unknown> {
  if (!isPlainMap(v)) return false;
  const own = Object.keys(v);
  return own.length === keys.length && keys.every((k) => Object.hasOwn(v, k));
}
/** hasKeys, and in this order (docs/protocol.md: JSON answers have their fields in the order shown). */
function hasKeysInOrder(v: unknown, keys: readonly string[]): v is Record<string, unknown> {
  if (!isPlainMap(v)) return false;
  const own = Object.keys(v);
  return own.length === keys.length && keys.every((k, i) => own[i] === k);
}
/**
 * An unsigned integer of any width up to `max`, as the model's readers decode one: a safe
 * number or a bigint (never a float, nor JSON's "-0").
 */
function isUint(v: unknown, max: bigint): boolean {
  if (typeof v === "number") return Number.isSafeInteger(v) && v >= 0 && !Object.is(v, -0) && BigInt(v) <= max;
  return typeof v === "bigint" && v >= 0n && v <= max;
}
const isU64 = (v: unknown) => isUint(v, U64_MAX);
const isU32 = (v: unknown) => isUint(v, 0xffff_ffffn);
const big = (v: unknown) => BigInt(v as number | bigint);
const pagesOf = (size: number) => Math.ceil(size / PAGE);

/** Sets an own key, "__proto__" included (plain assignment would replace the prototype). */
function setKey(o: Record<string, unknown>, k: string, v: unknown): void {
  Object.defineProperty(o, k, { value: v, enumerable: true, writable: true, configurable: true });
}

function deepClone<T>(v: T): T {
  if (Array.isArray(v)) return v.map(deepClone) as T;
  if (v instanceof Uint8Array) return v.slice() as T;
  if (isPlainMap(v)) {
    const o: Record<string, unknown> = {};
    for (const k of Object.keys(v)) setKey(o, k, deepClone(v[k]));
    return o as T;
  }
  return v;
}

function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

const bigintJson = (_k: string, v: unknown) =>
  typeof v === "bigint" ? `${v}n` : v instanceof Uint8Array ? `bin(${v.length})` : v instanceof WFloat ? `float(${v.v})` : v;
function show(v: unknown, max = 300): string {
  let s: string;
  try {
    s = JSON.stringify(v, bigintJson) ?? String(v);
  } catch {
    s = String(v);
  }
  return s.length > max ? s.slice(0, max) + "…" : s;
}
/** A packet's first bytes: JSON as text, MessagePack as hex. */
function hexHead(b: Uint8Array, n = 48): string {
  if (encodingOf(b) === "json") {
    const t = JSON.stringify(Buffer.from(b.subarray(0, 2 * n)).toString("latin1"));
    return `json ${t}${b.length > 2 * n ? "…" : ""}`;
  }
  return Buffer.from(b.subarray(0, n)).toString("hex") + (b.length > n ? "…" : "");
}

// ---- the two encodings, read and written without src/protocol -------------------

type Enc = "msgpack" | "json";

/** docs/protocol.md, "Encoding per packet": `{`, `[`, `"` or JSON whitespace first is JSON; anything else (an empty body too) MessagePack. */
function encodingOf(body: Uint8Array): Enc {
  const c = body[0];
  return c === 0x7b || c === 0x5b || c === 0x22 || c === 0x20 || c === 0x09 || c === 0x0a || c === 0x0d ? "json" : "msgpack";
}

/** A float on the wire (MessagePack float 32/64, a JSON number with a fraction or exponent): no integer field takes one. */
class WFloat {
  constructor(readonly v: number) {}
}
/** A MessagePack ext value (a timestamp included): no field takes one. */
class WExt {
  constructor(
    readonly type: number,
    readonly length: number,
  ) {}
}
/** A JSON object's keys that came more than once (the value kept is the first). */
const DUPLICATES = Symbol("duplicate keys");
function duplicatesOf(o: Record<string, unknown>): Set<string> | undefined {
  return (o as { [DUPLICATES]?: Set<string> })[DUPLICATES];
}
class Invalid extends Error {}

/** The server refuses containers nested deeper than this: MessagePack (no request nests past 6), JSON (as serde_json's limit). */
const MSGPACK_MAX_DEPTH = 32;
const JSON_MAX_DEPTH = 128;
const utf8Lenient = new TextDecoder("utf-8");
const utf8Strict = new TextDecoder("utf-8", { fatal: true });
const utf8Encoder = new TextEncoder();

/**
 * A MessagePack body as the server's reader sees it; throws Invalid for what no request
 * can be: truncation, trailing bytes, the never-used type 0xc1, a map key that is not a
 * string or comes twice (every MessagePack map of a request is a struct or an enum, and both
 * refuse those), nesting past the server's depth.
 */
function readMsgpack(b: Uint8Array): unknown {
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  let pos = 0;
  const bad = (why: string): never => {
    throw new Invalid(why);
  };
  const take = (n: number) => {
    if (n > b.length - pos) bad("truncated");
    const at = pos;
    pos += n;
    return at;
  };
  const u = (n: 1 | 2 | 4) => {
    const at = take(n);
    return n === 1 ? b[at]! : n === 2 ? dv.getUint16(at) : dv.getUint32(at);
  };
  const u64 = (signed: boolean): number | bigint => {
    const at = take(8);
    if (signed && b[at]! >= 0x80) {
      const v = dv.getBigInt64(at);
      return v >= -MAX_SAFE ? Number(v) : v;
    }
    const hi = dv.getUint32(at);
    return hi < 0x20_0000 ? hi * 2 ** 32 + dv.getUint32(at + 4) : dv.getBigUint64(at);
  };
  const str = (n: number) => {
    const at = take(n);
    return utf8Lenient.decode(b.subarray(at, at + n));
  };
  const ext = (n: number) => {
    const type = dv.getInt8(take(1));
    take(n);
    return new WExt(type, n);
  };
  const isStr = (t: number | undefined) => t !== undefined && ((t >= 0xa0 && t <= 0xbf) || t === 0xd9 || t === 0xda || t === 0xdb);
  const array = (n: number, depth: number): unknown[] => {
    if (depth >= MSGPACK_MAX_DEPTH) bad("nested too deeply");
    if (n > b.length - pos) bad("count larger than the packet");
    const out: unknown[] = [];
    for (let i = 0; i < n; i++) out.push(value(depth + 1));
    return out;
  };
  const map = (n: number, depth: number): Record<string, unknown> => {
    if (depth >= MSGPACK_MAX_DEPTH) bad("nested too deeply");
    if (2 * n > b.length - pos) bad("count larger than the packet");
    const o: Record<string, unknown> = {};
    for (let i = 0; i < n; i++) {
      if (!isStr(b[pos])) bad("a map key that is not a string");
      const k = value(depth + 1) as string;
      if (Object.hasOwn(o, k)) bad("a key twice");
      setKey(o, k, value(depth + 1));
    }
    return o;
  };
  const value = (depth: number): unknown => {
    const t = b[take(1)]!;
    if (t <= 0x7f) return t;
    if (t >= 0xe0) return t - 0x100;
    if (t <= 0x8f) return map(t - 0x80, depth);
    if (t <= 0x9f) return array(t - 0x90, depth);
    if (t <= 0xbf) return str(t - 0xa0);
    switch (t) {
      case 0xc0:
        return null;
      case 0xc2:
        return false;
      case 0xc3:
        return true;
      case 0xc4:
      case 0xc5:
      case 0xc6: {
        const n = u(t === 0xc4 ? 1 : t === 0xc5 ? 2 : 4);
        const at = take(n);
        return b.slice(at, at + n);
      }
      case 0xc7:
      case 0xc8:
      case 0xc9:
        return ext(u(t === 0xc7 ? 1 : t === 0xc8 ? 2 : 4));
      case 0xca:
        return new WFloat(dv.getFloat32(take(4)));
      case 0xcb:
        return new WFloat(dv.getFloat64(take(8)));
      case 0xcc:
        return u(1);
      case 0xcd:
        return u(2);
      case 0xce:
        return u(4);
      case 0xcf:
        return u64(false);
      case 0xd0:
        return dv.getInt8(take(1));
      case 0xd1:
        return dv.getInt16(take(2));
      case 0xd2:
        return dv.getInt32(take(4));
      case 0xd3:
        return u64(true);
      case 0xd4:
      case 0xd5:
      case 0xd6:
      case 0xd7:
      case 0xd8:
        return ext(2 ** (t - 0xd4));
      case 0xd9:
        return str(u(1));
      case 0xda:
        return str(u(2));
      case 0xdb:
        return str(u(4));
      case 0xdc:
        return array(u(2), depth);
      case 0xdd:
        return array(u(4), depth);
      case 0xde:
        return map(u(2), depth);
      case 0xdf:
        return map(u(4), depth);
    }
    return bad("type 0xc1");
  };
  const v = value(0);
  if (pos !== b.length) bad("trailing bytes");
  return v;
}

const isDigit = (c: number | undefined) => c !== undefined && c >= 0x30 && c <= 0x39;

/** JSON string escapes (RFC 8259); null when one is malformed. */
function unescapeJson(s: string): string | null {
  let out = "";
  for (let i = 0; i < s.length; i++) {
    const c = s[i]!;
    if (c !== "\\") {
      out += c;
      continue;
    }
    const e = s[++i];
    const simple: Record<string, string> = { '"': '"', "\\": "\\", "/": "/", b: "\b", f: "\f", n: "\n", r: "\r", t: "\t" };
    if (e !== undefined && Object.hasOwn(simple, e)) out += simple[e];
    else if (e === "u" && /^[0-9a-fA-F]{4}$/.test(s.slice(i + 1, i + 5))) {
      out += String.fromCharCode(parseInt(s.slice(i + 1, i + 5), 16));
      i += 4;
    } else return null;
  }
  return out;
}

/**
 * A JSON body (RFC 8259, as serde_json reads it): integers exact (a number up to 2^53 - 1,
 * else a bigint; "-0" is -0), fractions and exponents as WFloat, strings checked (UTF-8,
 * escapes, no control characters), nesting up to the server's depth. Throws Invalid for
 * anything that is not one JSON value with optional whitespace around it. An object keeps
 * the first value of a repeated key and lists the key under DUPLICATES: a struct refuses a
 * known field twice but skips unknown ones, and an enum refuses any second key.
 */
function readJson(b: Uint8Array): unknown {
  let pos = 0;
  const n = b.length;
  const bad = (why: string): never => {
    throw new Invalid(why);
  };
  const ws = () => {
    for (let c = b[pos]; c === 0x20 || c === 0x09 || c === 0x0a || c === 0x0d; c = b[++pos]);
  };
  const literal = (text: string, v: unknown) => {
    for (let i = 0; i < text.length; i++) if (b[pos + i] !== text.charCodeAt(i)) bad("bad literal");
    pos += text.length;
    return v;
  };
  const string = (): string => {
    pos++;
    const start = pos;
    let escaped = false;
    for (;;) {
      if (pos >= n) bad("the packet ends inside a string");
      const c = b[pos]!;
      if (c === 0x22) break;
      if (c === 0x5c) {
        escaped = true;
        pos += 2;
        continue;
      }
      if (c < 0x20) bad("a control character inside a string");
      pos++;
    }
    let text: string;
    try {
      text = utf8Strict.decode(b.subarray(start, pos));
    } catch {
      return bad("not UTF-8");
    }
    pos++;
    if (!escaped) return text;
    return unescapeJson(text) ?? bad("a bad escape");
  };
  const number = (): unknown => {
    const start = pos;
    if (b[pos] === 0x2d) pos++;
    if (!isDigit(b[pos])) bad("a minus without digits");
    if (b[pos] === 0x30) pos++;
    else while (isDigit(b[pos])) pos++;
    let float = false;
    if (b[pos] === 0x2e) {
      pos++;
      if (!isDigit(b[pos])) bad("a fraction without digits");
      while (isDigit(b[pos])) pos++;
      float = true;
    }
    if (b[pos] === 0x65 || b[pos] === 0x45) {
      pos++;
      if (b[pos] === 0x2b || b[pos] === 0x2d) pos++;
      if (!isDigit(b[pos])) bad("an exponent without digits");
      while (isDigit(b[pos])) pos++;
      float = true;
    }
    const text = Buffer.from(b.subarray(start, pos)).toString("latin1");
    if (float) return new WFloat(Number(text));
    if (text === "-0") return -0;
    const v = BigInt(text);
    return v >= -MAX_SAFE && v <= MAX_SAFE ? Number(v) : v;
  };
  const value = (depth: number): unknown => {
    ws();
    const c = b[pos];
    if (c === 0x7b || c === 0x5b) {
      if (depth >= JSON_MAX_DEPTH) bad("nested too deeply");
      pos++;
      ws();
      const close = c === 0x7b ? 0x7d : 0x5d;
      const o: Record<string, unknown> = {};
      const a: unknown[] = [];
      if (b[pos] === close) {
        pos++;
        return c === 0x7b ? o : a;
      }
      for (;;) {
        if (c === 0x7b) {
          ws();
          if (b[pos] !== 0x22) bad("a key that is not a string");
          const k = string();
          ws();
          if (b[pos] !== 0x3a) bad("no colon after a key");
          pos++;
          const v = value(depth + 1);
          if (!Object.hasOwn(o, k)) setKey(o, k, v);
          else {
            const d = duplicatesOf(o) ?? new Set<string>();
            d.add(k);
            Object.defineProperty(o, DUPLICATES, { value: d, enumerable: false, configurable: true });
          }
        } else a.push(value(depth + 1));
        ws();
        if (b[pos] === 0x2c) {
          pos++;
          continue;
        }
        if (b[pos] === close) {
          pos++;
          return c === 0x7b ? o : a;
        }
        bad("no comma between entries");
      }
    }
    if (c === 0x22) return string();
    if (c === 0x2d || isDigit(c)) return number();
    if (c === 0x74) return literal("true", true);
    if (c === 0x66) return literal("false", false);
    if (c === 0x6e) return literal("null", null);
    return bad(pos >= n ? "the packet ends before a value" : "not a value");
  };
  const v = value(0);
  ws();
  if (pos !== n) bad("trailing bytes");
  return v;
}

/** A body in its encoding (by its first byte); undefined when it is not one value. */
function decodeBody(body: Uint8Array): { value: unknown } | undefined {
  try {
    return { value: encodingOf(body) === "json" ? readJson(body) : readMsgpack(body) };
  } catch (e) {
    if (e instanceof Invalid || e instanceof RangeError) return undefined;
    throw e;
  }
}

interface JsonStyle {
  /** Whitespace between tokens (RFC 8259 allows it anywhere between them). */
  ws?: () => string;
  /** Whether to write this ASCII character of a string as a \u escape (the same string to a reader). */
  escape?: (c: number) => boolean;
}

/**
 * JSON text as serde_json writes it (compact, `"`, `\` and control characters escaped,
 * everything else as is), or spaced and escaped per `style`. Bigints are exact; a number
 * that is not a safe integer is written as JavaScript prints it (1.5, 1e+300, NaN: the
 * last two are a mangling); bytes as an array of numbers (serde's [u8; 16]).
 */
function jsonText(v: unknown, style: JsonStyle = {}): string {
  const ws = style.ws ?? (() => "");
  const esc = style.escape;
  const str = (s: string) => {
    let out = '"';
    for (let i = 0; i < s.length; i++) {
      const c = s.charCodeAt(i);
      if (c === 0x22) out += '\\"';
      else if (c === 0x5c) out += "\\\\";
      else if (c < 0x20) {
        const short: Record<number, string> = { 8: "\\b", 9: "\\t", 10: "\\n", 12: "\\f", 13: "\\r" };
        out += short[c] ?? `\\u00${c.toString(16).padStart(2, "0")}`;
      } else if (esc !== undefined && c < 0x80 && esc(c)) out += `\\u${c.toString(16).padStart(4, "0")}`;
      else out += s[i];
    }
    return out + '"';
  };
  const value = (x: unknown): string => {
    if (x === null || x === undefined) return "null";
    if (typeof x === "boolean") return String(x);
    if (typeof x === "bigint") return x.toString();
    if (typeof x === "number") return Object.is(x, -0) ? "-0" : String(x);
    if (typeof x === "string") return str(x);
    if (x instanceof WFloat) return Number.isInteger(x.v) ? `${x.v}.0` : String(x.v);
    if (x instanceof Uint8Array) return value(Array.from(x));
    if (Array.isArray(x)) return `[${ws()}${x.map((e) => value(e)).join(`${ws()},${ws()}`)}${ws()}]`;
    if (isPlainMap(x)) return `{${ws()}${Object.keys(x).map((k) => `${str(k)}${ws()}:${ws()}${value(x[k])}`).join(`${ws()},${ws()}`)}${ws()}}`;
    if (x instanceof Date) return String(x.getTime());
    return '"ext"';
  };
  return value(v);
}

const jsonBytes = (v: unknown, style?: JsonStyle) => utf8Encoder.encode(jsonText(v, style));

// ---- descriptors ------------------------------------------------------------------

type FdKind =
  | "memfd"
  | "memfd-unsealable"
  | "memfd-rdonly"
  | "memfd-write-sealed"
  | "file"
  | "opath"
  | "eventfd"
  | "pipe-r"
  | "pipe-w"
  | "socket"
  | "dir"
  | "devnull"
  | "devzero"
  | "epoll";
interface PoolFd {
  fd: number;
  kind: FdKind;
  /** The object's size (for /dev/zero, which has none, the size the fuzzer maps of it). */
  size: number;
}
const MEMFD_NAME = "vmemd-fuzz";
const VALID_SIZES = [PAGE, 2 * PAGE, 4 * PAGE, 64 * 1024, MiB, 2 * MiB];
const O_PATH = 0o10000000;
const F_SEAL_WRITE = 0x0008;
/** Descriptors mmap refuses (docs/protocol.md: the kernel's errno, ENODEV, EACCES, EBADF), whatever the request says. */
const UNMAPPABLE = new Set<FdKind>(["opath", "eventfd", "pipe-r", "pipe-w", "socket", "dir", "devnull", "epoll"]);

function memfd(size: number, flags = sys.MFD_CLOEXEC | sys.MFD_ALLOW_SEALING, name = MEMFD_NAME): PoolFd {
  const fd = sys.memfdCreate(name, flags);
  sys.ftruncate(fd, size);
  return { fd, kind: flags & sys.MFD_ALLOW_SEALING ? "memfd" : "memfd-unsealable", size };
}

/**
 * Descriptors every slot may attach: memory sources of useful sizes (memfds, one of a size
 * that is not a page multiple, one whose writes are sealed, a regular file, /dev/zero: all
 * sources in version 2), and one or more of every other kind.
 */
class SharedPool {
  readonly dir: string;
  readonly memory: PoolFd[] = [];
  readonly hostile: PoolFd[] = [];
  private epoll: sys.Epoll;

  constructor() {
    this.dir = mkdtempSync(join(tmpdir(), "vmemd-fuzz-"));
    for (const size of VALID_SIZES) for (let i = 0; i < 2; i++) this.memory.push(memfd(size));
    const path = join(this.dir, "regular-file");
    writeFileSync(path, new Uint8Array(64 * 1024));
    const sealedSource = memfd(64 * 1024);
    sys.fcntl(sealedSource.fd, sys.F_ADD_SEALS, F_SEAL_WRITE);
    this.memory.push(memfd(3 * PAGE + 100), { ...sealedSource, kind: "memfd-write-sealed" });
    this.memory.push({ fd: sys.open(path, sys.O_RDWR), kind: "file", size: 64 * 1024 });
    this.memory.push({ fd: sys.open("/dev/zero", sys.O_RDWR), kind: "devzero", size: 64 * 1024 });
    const m = memfd(64 * 1024);
    this.hostile.push(m, memfd(0), memfd(1), memfd(PAGE - 1), memfd(64 * 1024, sys.MFD_CLOEXEC, MEMFD_NAME + "-unsealable"));
    this.hostile.push({ fd: sys.open(`/proc/self/fd/${m.fd}`, sys.O_RDONLY), kind: "memfd-rdonly", size: 64 * 1024 });
    const sealed = memfd(64 * 1024);
    sys.fcntl(sealed.fd, sys.F_ADD_SEALS, F_SEAL_WRITE);
    this.hostile.push({ ...sealed, kind: "memfd-write-sealed" });
    this.hostile.push({ fd: sys.open(path, sys.O_RDWR), kind: "file", size: 64 * 1024 });
    this.hostile.push({ fd: sys.open(path, O_PATH), kind: "opath", size: 64 * 1024 });
    this.hostile.push({ fd: sys.eventfd(), kind: "eventfd", size: 0 });
    const [r, w] = sys.pipe();
    this.hostile.push({ fd: r, kind: "pipe-r", size: 0 }, { fd: w, kind: "pipe-w", size: 0 });
    const [s1, s2] = sys.socketpairSeqpacket();
    this.hostile.push({ fd: s1, kind: "socket", size: 0 }, { fd: s2, kind: "socket", size: 0 });
    this.hostile.push({ fd: sys.open(this.dir, sys.O_RDONLY | sys.O_DIRECTORY), kind: "dir", size: 0 });
    this.hostile.push({ fd: sys.open("/dev/null", sys.O_RDWR), kind: "devnull", size: 0 });
    this.hostile.push({ fd: sys.open("/dev/zero", sys.O_RDWR), kind: "devzero", size: 0 });
    this.epoll = new sys.Epoll(1);
    this.hostile.push({ fd: this.epoll.fd, kind: "epoll", size: 0 });
  }

  /** Descriptors no mapping can be made of: mmap refuses them, or (an empty memfd) nothing lies inside. */
  get unmappable(): PoolFd[] {
    return this.hostile.filter((p) => UNMAPPABLE.has(p.kind) || (p.kind === "memfd" && p.size === 0));
  }

  close(): void {
    for (const p of [...this.memory, ...this.hostile]) {
      try {
        sys.close(p.fd);
      } catch {}
    }
    rmSync(this.dir, { recursive: true, force: true });
  }
}

// ---- the generator: one per connection slot ---------------------------------------

/** What the generator expects of a packet's response when the model says it gets one. */
const enum Check {
  Any,
  Einval,
  Chunk,
  Ok,
  State,
  Errno,
  Marker,
  /** An Err of any errno: the request cannot succeed (a source mmap refuses, a file mapping that cannot be made). */
  Refused,
  /** A Regions or Allocations page, by the paging rules of its request. */
  Page,
}
interface Packet {
  body: Uint8Array;
  fds: number[];
  label: string;
  check?: Check;
  errno?: number;
  marker?: number;
  onResponse?: (resp: unknown) => void;
  /** The server gets this packet's descriptors cut short (MSG_CTRUNC): only the CTRUNC probe sets it. */
  ctrunc?: boolean;
}
type Action = { packet: Packet } | { disconnect: "abrupt" | "graceful" };

interface Built {
  value: unknown;
  fds: number[];
  check?: Check;
  errno?: number;
  variant: string;
}

export interface Windows {
  /** Dynamic regions: REG_SLOTS destinations 4 MiB apart. */
  regBase: number;
  /** MmapAndRegisterMemory destinations. */
  mmapBase: number;
}
const REG_SLOTS = 256;
const MMAP_SLOTS = 16;
const IOEVENT_BASE = 0xe000_0000;

const encoder = new Encoder({ useBigInt64: true, initialBufferSize: 4096 });
/**
 * MessagePack of a value. With useBigInt64, @msgpack/msgpack writes a number from 2^32 up
 * (and below -2^31) as a float 64, which no integer field takes: such integers go as
 * bigints (uint 64 / int 64). A number that is not a safe integer stays a float on purpose.
 */
function encode(v: unknown): Uint8Array {
  return encoder.encode(integersExact(v)).slice();
}
function integersExact(v: unknown): unknown {
  if (typeof v === "number") return Number.isSafeInteger(v) && (v >= 2 ** 32 || v < -(2 ** 31)) ? BigInt(v) : v;
  if (Array.isArray(v)) return v.map(integersExact);
  if (isPlainMap(v)) {
    const o: Record<string, unknown> = {};
    for (const k of Object.keys(v)) setKey(o, k, integersExact(v[k]));
    return o;
  }
  return v;
}
/** Whether a map is a struct payload (its keys are snake_case fields) rather than an enum (one CamelCase variant). */
function isStructMap(v: unknown): v is Record<string, unknown> {
  return isPlainMap(v) && Object.keys(v).length > 0 && Object.keys(v).every((k) => /^[a-z]/.test(k));
}

class SlotGen {
  readonly rng: Rng;
  private readonly seq: Action[] = [];
  private readonly ownRegions: number[] = [];
  private readonly ownIoevents: { addr: number; datamatch: unknown; event: number }[] = [];
  /** This slot's memfds of random sizes (0 and unaligned included), replaced now and then. */
  private readonly randomMemfds: PoolFd[] = [];
  readonly eventfds: number[] = [];
  private generated = 0;

  constructor(
    seed: number,
    readonly slot: number,
    private readonly pool: SharedPool,
    private readonly win: Windows,
  ) {
    this.rng = new Rng(seed, slot, 0x5eed);
    for (let i = 0; i < 4; i++) this.randomMemfds.push(memfd(this.randomSize()));
    for (let i = 0; i < 2; i++) this.eventfds.push(sys.eventfd());
  }

  get inSequence(): boolean {
    return this.seq.length > 0;
  }

  close(): void {
    for (const p of this.randomMemfds) sys.close(p.fd);
    for (const fd of this.eventfds) sys.close(fd);
  }

  private randomSize(): number {
    const r = this.rng;
    return r.weighted<() => number>([
      [1, () => 0],
      [2, () => r.range(1, 3 * PAGE)],
      [2, () => PAGE * r.range(1, 64) + r.range(1, PAGE - 1)],
      [7, () => PAGE * r.range(1, 512)],
    ])();
  }

  // -- descriptors

  /** A memory source of at least `minSize` bytes; `sized`: one whose size the kernel reports (not /dev/zero). */
  private validMemfd(minSize = PAGE, sized = false): PoolFd {
    const ok = this.pool.memory.filter((p) => p.size >= minSize && (!sized || p.kind !== "devzero"));
    return this.rng.pick(ok.length > 0 ? ok : this.pool.memory);
  }
  private anyFd(): PoolFd {
    const r = this.rng;
    return r.weighted<() => PoolFd>([
      [3, () => r.pick(this.pool.memory)],
      [2, () => r.pick(this.randomMemfds)],
      [5, () => r.pick(this.pool.hostile)],
      [1, () => ({ fd: r.pick(this.eventfds), kind: "eventfd", size: 0 })],
    ])();
  }

  // -- encodings

  /** A style for a valid JSON request: mostly serde's compact text, else spaced, escaped or led by whitespace (all the same value). */
  private jsonStyle(): JsonStyle {
    const r = this.rng;
    const spaces = [" ", "\n", "\t", "\r\n", "  "];
    return r.weighted<() => JsonStyle>([
      [6, () => ({})],
      [2, () => ({ ws: () => (r.chance(0.3) ? r.pick(spaces) : "") })],
      [1, () => ({ escape: () => r.chance(0.1) })],
      [1, () => ({ ws: () => (r.chance(0.05) ? "\n" : "") })],
    ])();
  }

  /** The value as a packet body: MessagePack, or JSON (a valid request stays valid: JSON ignores unknown fields). */
  private body(value: unknown, json: boolean, valid = false): Uint8Array {
    if (!json) return encode(valid && this.rng.chance(0.1) ? this.shuffled(value) : value);
    const r = this.rng;
    let v = value;
    if (valid && r.chance(0.15)) v = this.withUnknownFields(v);
    if (valid && r.chance(0.15)) v = this.shuffled(v);
    const text = jsonText(v, this.jsonStyle());
    const lead = r.chance(0.1) ? r.pick([" ", "\n", "\t", "\r", "\r\n  "]) : "";
    return utf8Encoder.encode(lead + text + (r.chance(0.05) ? r.pick([" ", "\n"]) : ""));
  }

  /** The same value with every struct's fields in a random order (docs/protocol.md: in any order). */
  private shuffled(v: unknown): unknown {
    if (Array.isArray(v)) return v.map((x) => this.shuffled(x));
    if (!isPlainMap(v)) return v;
    const keys = Object.keys(v);
    if (isStructMap(v)) {
      for (let i = keys.length - 1; i > 0; i--) {
        const j = this.rng.int(i + 1);
        [keys[i], keys[j]] = [keys[j]!, keys[i]!];
      }
    }
    const o: Record<string, unknown> = {};
    for (const k of keys) setKey(o, k, this.shuffled(v[k]));
    return o;
  }

  /** The same value with fields no message has in some structs: JSON skips them (crosvm's serde does). */
  private withUnknownFields(v: unknown): unknown {
    if (Array.isArray(v)) return v.map((x) => this.withUnknownFields(x));
    if (!isPlainMap(v)) return v;
    const o: Record<string, unknown> = {};
    for (const k of Object.keys(v)) setKey(o, k, this.withUnknownFields(v[k]));
    if (isStructMap(v) && this.rng.chance(0.5)) {
      for (let i = this.rng.range(1, 2); i > 0; i--) {
        const name = this.rng.pick(UNKNOWN_FIELDS);
        if (!Object.hasOwn(o, name)) setKey(o, name, this.jsonSafeJunk(0));
      }
    }
    return o;
  }

  /** Any JSON value (an unknown field's): nested, floats, huge integers, escapes, descriptor-like names. */
  private jsonSafeJunk(depth: number): unknown {
    const r = this.rng;
    switch (r.int(depth >= 3 ? 5 : 7)) {
      case 0:
        return null;
      case 1:
        return r.chance(0.5);
      case 2:
        return r.weighted<() => unknown>([
          [2, () => r.u32()],
          [1, () => -r.u32()],
          [1, () => new WFloat(r.float() * 1e6)],
          [1, () => 10n ** BigInt(r.range(20, 40))],
        ])();
      case 3:
        return r.pick(NAMES);
      case 4:
        return Buffer.from(r.bytes(r.int(12))).toString("latin1");
      case 5:
        return Array.from({ length: r.int(4) }, () => this.jsonSafeJunk(depth + 1));
      default: {
        const o: Record<string, unknown> = {};
        for (let i = r.int(4); i > 0; i--) setKey(o, r.pick(["descriptor", "file", "size", "x", "GetState"]), this.jsonSafeJunk(depth + 1));
        return o;
      }
    }
  }

  // -- values

  /** A valid u64 (any width on the wire), often a boundary. */
  private u64ish(): number | bigint {
    const r = this.rng;
    return r.weighted<() => number | bigint>([
      [4, () => r.int(1 << 20)],
      [2, () => PAGE * r.int(1 << 16)],
      [2, () => r.pick(INTERESTING.filter(isU64))],
      [1, () => r.u64()],
    ])();
  }
  /** A string long enough, and full enough of what JSON escapes, that echoing it in an Err could outgrow a packet. */
  private escapeHeavy(): string {
    const r = this.rng;
    const unit = r.pick(['"', "\\", "\u0001", '"\\', "\u001f\"", "\u0000"]);
    return unit.repeat(Math.ceil(r.range(4000, 30000) / unit.length));
  }
  private junk(depth = 0): unknown {
    const r = this.rng;
    switch (r.int(depth >= 4 ? 7 : 11)) {
      case 0:
        return null;
      case 1:
        return r.chance(0.5);
      case 2:
        return r.pick(INTERESTING);
      case 3:
        return r.weighted<() => unknown>([
          [2, () => r.u32()],
          [1, () => -r.u32()],
          [1, () => r.u64()],
          [1, () => -BigInt(r.u32()) * 65536n],
        ])();
      case 4:
        return r.chance(0.5) ? r.float() * 1e6 : r.pick([0.0, 4096.0, 1e-300, -1e300]);
      case 5:
        return r.weighted<() => string>([
          [4, () => r.pick(NAMES)],
          [2, () => Buffer.from(r.bytes(r.int(24))).toString("latin1")],
          [1, () => "x".repeat(r.range(100, 3000))],
          [0.1, () => this.escapeHeavy()],
        ])();
      case 6:
        return r.bytes(r.pick([0, 1, 15, 16, 17, 64]));
      case 7:
        return Array.from({ length: r.int(5) }, () => this.junk(depth + 1));
      case 8: {
        const o: Record<string, unknown> = {};
        for (let i = r.int(5); i > 0; i--) setKey(o, r.chance(0.8) ? r.pick(NAMES) : `k${r.u32()}`, this.junk(depth + 1));
        return o;
      }
      case 9:
        return r.chance(0.5) ? deepClone(r.pick(ALLOC_SET)) : { GuestPhysicalAddress: this.u64ish() };
      default:
        return r.chance(0.5) ? new ExtData(r.int(128) - 1, r.bytes(r.int(9))) : new Date(r.int(2 ** 31) * 1000);
    }
  }

  // -- valid requests of every variant

  private datamatch(): unknown {
    const r = this.rng;
    const kind = r.pick(["AnyLength", "U8", "U16", "U32", "U64"]);
    if (kind === "AnyLength") return "AnyLength";
    const bits = { U8: 8, U16: 16, U32: 32, U64: 64 }[kind]!;
    const value = r.chance(0.3) ? null : bits === 64 ? r.u64() : r.u32() % 2 ** bits;
    return { [kind]: value };
  }

  private regionDest(): { dest: unknown; gpa: number | null } {
    const r = this.rng;
    return r.weighted<() => { dest: unknown; gpa: number | null }>([
      [6, () => {
        const gpa = this.win.regBase + 4 * MiB * r.int(REG_SLOTS);
        return { dest: { GuestPhysicalAddress: gpa }, gpa };
      }],
      // 64 and 16 places in the BARs: fixed mappings collide there, and stay few.
      [3, () => ({ dest: { ExistingAllocation: { allocation: BAR_A, offset: 256 * 1024 * r.int(64) } }, gpa: null })],
      [1, () => ({ dest: { ExistingAllocation: { allocation: BAR_B, offset: 64 * 1024 * r.int(16) } }, gpa: null })],
      [0.5, () => {
        const gpa = RAM_SIZE + 8 * MiB * r.int(256); // below the PCI hole, above RAM
        return { dest: { GuestPhysicalAddress: gpa }, gpa };
      }],
      [0.2, () => ({ dest: { ExistingAllocation: { allocation: r.pick(ALLOC_SET), offset: PAGE * r.int(4) } }, gpa: null })],
    ])();
  }

  /**
   * RegisterMemory of a memory source: a whole object or a range of it, of any size inside
   * it (sizes need not be page multiples), read-only, read-write or write-only (mapped
   * read-write); `randomSource` takes one of this slot's memfds of random sizes.
   */
  private registerMemory(randomSource: boolean): Built {
    const r = this.rng;
    const m = randomSource ? r.pick(this.randomMemfds) : this.validMemfd();
    let source: unknown;
    let size: number;
    if (randomSource) {
      size = r.weighted<() => number>([
        [4, () => m.size],
        [3, () => PAGE * r.range(0, 4)],
        [2, () => r.range(1, 5 * PAGE)],
      ])();
      source = { SharedMemory: { descriptor: 0, size } };
    } else if (r.chance(0.6)) {
      size = m.size;
      source = { SharedMemory: { descriptor: 0, size } };
    } else {
      const offset = PAGE * r.int(pagesOf(m.size));
      const room = m.size - offset;
      size = r.chance(0.6) ? PAGE * r.range(1, Math.max(1, Math.floor(room / PAGE))) : r.range(1, room);
      size = Math.min(size, room);
      source = { Descriptor: { descriptor: 0, offset, size } };
    }
    const { dest, gpa } = this.regionDest();
    if (gpa !== null) this.remember(gpa);
    const prot = r.weighted<() => unknown>([
      [8, () => ({ read: true, write: false })],
      [8, () => ({ read: true, write: true })],
      [2, () => ({ read: false, write: true })],
    ])();
    const value = { RegisterMemory: { source, dest, prot, cache: r.pick(["CacheCoherent", "CacheNonCoherent"]) } };
    return { value, fds: [m.fd], variant: "RegisterMemory" };
  }

  private remember(gpa: number): void {
    this.ownRegions.push(gpa);
    if (this.ownRegions.length > 64) this.ownRegions.splice(0, 1);
  }

  private ranges(): [number, number][] {
    const r = this.rng;
    return Array.from({ length: r.range(1, 4) }, () => {
      const pages = r.range(1, 16);
      return [PAGE * r.int(RAM_SIZE / PAGE - pages + 1), PAGE * pages] as [number, number];
    });
  }

  /** A page request's `from` and `max` (max nil, left out, 0, small or large). */
  private pageRequest(name: "GetRegions" | "GetAllocations"): unknown {
    const r = this.rng;
    const from = r.weighted<() => number | bigint>([
      [4, () => 0],
      [3, () => (this.ownRegions.length > 0 ? r.pick(this.ownRegions) + r.pick([0, 0, 1, -1]) : 0)],
      [2, () => (name === "GetRegions" ? this.win.regBase + 4 * MiB * r.int(REG_SLOTS) : 0xd000_0000 + PAGE * r.int(1 << 16))],
      [1, () => this.u64ish()],
    ])();
    const payload: Record<string, unknown> = { from };
    r.weighted<() => void>([
      [3, () => (payload.max = null)],
      [2, () => {}],
      [4, () => (payload.max = r.range(1, 8))],
      [1, () => (payload.max = 0)],
      [1, () => (payload.max = r.range(9, 2000))],
      [0.5, () => (payload.max = 0xffff_ffff)],
    ])();
    return { [name]: payload };
  }

  private valid(): Built {
    const r = this.rng;
    const kind = r.weighted<string>([
      [25, "RegisterMemory"],
      [6, "RegisterRandomSource"],
      [3, "UnmappableSource"],
      [1, "NoAccess"],
      [20, "UnregisterMemory"],
      [6, "GetState"],
      [3, "GetRegions"],
      [2, "GetAllocations"],
      [5, "BalloonTargetReached"],
      [5, "DynamicallyFreeMemoryRanges"],
      [5, "DynamicallyReclaimMemoryRanges"],
      [8, "IoEventRaw"],
      [4, "PrepareSharedMemoryRegion"],
      [4, "AllocateMmio"],
      [3, "ReleaseMmio"],
      [3, "MmapNoFiles"],
      [1, "MmapUnmappableShm"],
      [2, "ExternalMapping"],
      [2, "Vulkan"],
    ]);
    switch (kind) {
      case "RegisterMemory":
        return this.registerMemory(false);
      case "RegisterRandomSource":
        return this.registerMemory(true);
      case "UnmappableSource": {
        // Any descriptor mmap refuses: the request can only fail, with the kernel's errno (or an earlier check's).
        const b = this.registerMemory(false);
        b.fds = [r.pick(this.pool.unmappable).fd];
        return { ...b, check: Check.Refused };
      }
      case "NoAccess": {
        const b = this.registerMemory(false);
        (b.value as { RegisterMemory: Record<string, unknown> }).RegisterMemory.prot = { read: false, write: false };
        return { ...b, check: Check.Errno, errno: EINVAL };
      }
      case "UnregisterMemory": {
        const own = this.ownRegions.length > 0 && r.chance(0.85);
        const id = own ? this.ownRegions.splice(r.int(this.ownRegions.length), 1)[0]! : this.u64ish();
        return { value: { UnregisterMemory: id }, fds: [], variant: kind };
      }
      case "GetState":
        return { value: r.chance(0.95) ? "GetState" : { GetState: null }, fds: [], check: Check.State, variant: kind };
      case "GetRegions":
      case "GetAllocations":
        return { value: this.pageRequest(kind), fds: [], check: Check.Page, variant: kind };
      case "BalloonTargetReached":
        return { value: { BalloonTargetReached: { size: this.u64ish() } }, fds: [], check: Check.Ok, variant: kind };
      case "DynamicallyFreeMemoryRanges":
      case "DynamicallyReclaimMemoryRanges":
        return { value: { [kind]: { ranges: this.ranges() } }, fds: [], check: Check.Ok, variant: kind };
      case "IoEventRaw": {
        let e: { addr: number; datamatch: unknown; event: number };
        let register = true;
        if (this.ownIoevents.length > 0 && r.chance(0.45)) {
          e = this.ownIoevents.splice(r.int(this.ownIoevents.length), 1)[0]!;
          register = false;
        } else {
          e = { addr: IOEVENT_BASE + 8 * r.int(256), datamatch: this.datamatch(), event: r.int(this.eventfds.length) };
          if (r.chance(0.9)) {
            this.ownIoevents.push(e);
            if (this.ownIoevents.length > 24) this.ownIoevents.splice(0, 1);
          } else register = r.chance(0.5);
        }
        const value = { IoEventRaw: { event: 0, addr: e.addr, datamatch: e.datamatch, register } };
        return { value, fds: [this.eventfds[e.event]!], variant: kind };
      }
      case "PrepareSharedMemoryRegion": {
        const alloc = r.chance(0.6) ? r.pick([BAR_A, BAR_B]) : r.pick(ALLOC_SET);
        return { value: { [kind]: { alloc, cache: r.pick(["CacheCoherent", "CacheNonCoherent"]) } }, fds: [], variant: kind };
      }
      case "AllocateMmio": {
        const alloc = r.pick(ALLOC_SET);
        const isBar = typeof alloc === "object" && "PciBar" in alloc;
        const size = isBar ? PAGE * 2 ** r.weighted([[10, r.int(15)], [1, r.range(16, 18)]]) : PAGE * r.range(1, 4096);
        const payload: Record<string, unknown> = { alloc, size };
        // align: nil, left out (reads as nil), or a power of two.
        r.weighted<() => void>([
          [2, () => (payload.align = null)],
          [1, () => {}],
          [2, () => (payload.align = PAGE * 2 ** r.int(9))],
        ])();
        return { value: { AllocateMmio: payload }, fds: [], variant: kind };
      }
      case "ReleaseMmio":
        return { value: { ReleaseMmio: r.chance(0.8) ? r.pick(ALLOC_SET.slice(2)) : r.pick(ALLOC_SET) }, fds: [], variant: kind };
      case "MmapNoFiles": {
        const m = this.validMemfd();
        const gpa = this.win.mmapBase + 4 * MiB * r.int(MMAP_SLOTS);
        this.remember(gpa);
        const value = { MmapAndRegisterMemory: { shm: { descriptor: 0, size: m.size }, dest: { GuestPhysicalAddress: gpa }, num_file_mappings: 0 } };
        return { value, fds: [m.fd], variant: "MmapAndRegisterMemory" };
      }
      case "MmapUnmappableShm": {
        // An shm mmap refuses: an Err (the kernel's errno), and the connection stays up.
        const value = { MmapAndRegisterMemory: { shm: { descriptor: 0, size: PAGE * r.range(1, 16) }, dest: { GuestPhysicalAddress: this.win.mmapBase + 4 * MiB * r.int(MMAP_SLOTS) }, num_file_mappings: 0 } };
        return { value, fds: [r.pick(this.pool.unmappable).fd], check: Check.Refused, variant: "MmapAndRegisterMemory" };
      }
      case "ExternalMapping": {
        const value = { RegisterMemory: { source: { ExternalMapping: { ptr: this.u64ish(), size: PAGE } }, dest: this.regionDest().dest, prot: { read: true, write: true }, cache: "CacheCoherent" } };
        return { value, fds: [], check: Check.Errno, errno: sys.Errno.EPERM, variant: "RegisterMemory" };
      }
      default: {
        // uuid: MessagePack bin 16, or (always in JSON) an array of 16 u8 as serde writes [u8; 16].
        const uuid = () => (r.chance(0.7) ? r.bytes(16) : Array.from(r.bytes(16)));
        const vk = { descriptor: 0, handle_type: r.u32(), memory_idx: r.int(16), device_uuid: uuid(), driver_uuid: uuid(), size: PAGE };
        const value = { RegisterMemory: { source: { Vulkan: vk }, dest: this.regionDest().dest, prot: { read: true, write: true }, cache: "CacheCoherent" } };
        return { value, fds: [this.anyFd().fd], check: Check.Errno, errno: sys.Errno.ENOTSUP, variant: "RegisterMemory" };
      }
    }
  }

  // -- mutation

  /** Every (holder, key) in the value, the root included (boxed). */
  private entries(box: Record<string, unknown>): { holder: Record<string, unknown> | unknown[]; key: string | number }[] {
    const out: { holder: Record<string, unknown> | unknown[]; key: string | number }[] = [];
    const walk = (holder: Record<string, unknown> | unknown[], key: string | number) => {
      out.push({ holder, key });
      const v = (holder as Record<string | number, unknown>)[key];
      if (Array.isArray(v)) v.forEach((_, i) => walk(v, i));
      else if (isPlainMap(v)) for (const k of Object.keys(v)) walk(v, k);
    };
    walk(box, "root");
    return out;
  }

  private mutate(value: unknown): unknown {
    const r = this.rng;
    const box: Record<string, unknown> = { root: deepClone(value) };
    for (let n = r.weighted([[6, 1], [3, 2], [1, 3]]); n > 0; n--) {
      const all = this.entries(box);
      const e = r.pick(all);
      const get = () => (e.holder as Record<string | number, unknown>)[e.key];
      const set = (v: unknown) => ((e.holder as Record<string | number, unknown>)[e.key] = v);
      const op = r.weighted<string>([
        [4, "drop"], [4, "add"], [4, "swap"], [6, "replace"], [3, "rename"], [1, "wrap"], [1, "unwrap"],
        [5, "number"], [3, "fdindex"], [1, "grow"], [3, "variant"], [1, "inherited"], [1, "unit"],
      ]);
      switch (op) {
        case "drop":
          if (e.holder === box) set(null);
          else if (Array.isArray(e.holder)) e.holder.splice(e.key as number, 1);
          else delete (e.holder as Record<string, unknown>)[e.key as string];
          break;
        case "add": {
          const maps = all.map((x) => (x.holder as Record<string | number, unknown>)[x.key]).filter(isPlainMap);
          const target = maps.length > 0 ? r.pick(maps) : null;
          if (target) setKey(target, r.chance(0.7) ? r.pick(NAMES) : `extra${r.int(100)}`, this.junk(2));
          else set([get(), this.junk(2)]);
          break;
        }
        case "swap": {
          const o = r.pick(all);
          const a = deepClone(get());
          const b = deepClone((o.holder as Record<string | number, unknown>)[o.key]);
          set(b);
          (o.holder as Record<string | number, unknown>)[o.key] = a;
          break;
        }
        case "replace":
          set(this.junk(r.int(4)));
          break;
        case "rename":
          if (isPlainMap(e.holder) && e.holder !== box) {
            const v = get();
            delete e.holder[e.key as string];
            setKey(e.holder, r.pick(NAMES), v);
          }
          break;
        case "wrap":
          if (r.chance(0.5)) set([get()]);
          else {
            const o: Record<string, unknown> = {};
            setKey(o, r.pick(NAMES), get());
            set(o);
          }
          break;
        case "unwrap": {
          const v = get();
          if (isPlainMap(v) && Object.keys(v).length > 0) set(v[Object.keys(v)[0]!]);
          else if (Array.isArray(v) && v.length > 0) set(v[0]);
          break;
        }
        case "number": {
          const nums = all.filter((x) => {
            const v = (x.holder as Record<string | number, unknown>)[x.key];
            return typeof v === "number" || typeof v === "bigint";
          });
          const t = nums.length > 0 ? r.pick(nums) : e;
          (t.holder as Record<string | number, unknown>)[t.key] = r.pick(INTERESTING);
          break;
        }
        case "fdindex": {
          const fds = all.filter((x) => typeof x.key === "string" && DESCRIPTOR_FIELDS.has(x.key));
          const t = fds.length > 0 ? r.pick(fds) : e;
          (t.holder as Record<string | number, unknown>)[t.key] = r.pick([0, 1, 2, 3, 252, 253, 255, 2 ** 31, -1, U64_MAX, 0.5, "0", null]);
          break;
        }
        case "grow": {
          const arrays = all.map((x) => (x.holder as Record<string | number, unknown>)[x.key]).filter((v): v is unknown[] => Array.isArray(v) && v.length > 0);
          if (arrays.length > 0) {
            const a = r.pick(arrays);
            const n = r.range(a.length, r.chance(0.2) ? 6000 : 300);
            for (let i = a.length; i < n; i++) a.push(deepClone(a[i % a.length]));
          }
          break;
        }
        case "variant": {
          const root = box.root;
          if (isPlainMap(root) && Object.keys(root).length === 1) {
            const payload = root[Object.keys(root)[0]!];
            box.root = { [r.pick(VARIANTS)]: payload };
          } else box.root = { [r.pick(VARIANTS)]: root };
          break;
        }
        case "inherited": {
          const root = box.root;
          const payload = isPlainMap(root) ? root[Object.keys(root)[0]!] : root;
          box.root = r.chance(0.8) ? { [r.pick(INHERITED)]: payload ?? null } : r.pick(INHERITED);
          break;
        }
        case "unit": {
          // A unit variant as {name: nil} (serde reads it as the name) or {name: something else} (refused).
          const v = get();
          if (typeof v === "string") set({ [v]: r.chance(0.6) ? null : this.junk(3) });
          else set({ [r.pick(["GetState", "Pstore", "GpuRenderNode", "AnyLength", "CacheCoherent"])]: r.chance(0.6) ? null : this.junk(3) });
          break;
        }
      }
    }
    return box.root;
  }

  /** Descriptors for a built request: usually exactly those referenced, else wrong in one of many ways. */
  private attach(fds: number[]): number[] {
    const r = this.rng;
    const out = fds.slice();
    r.weighted<() => void>([
      [70, () => {}],
      [8, () => { for (let i = r.range(1, 3); i > 0; i--) out.push(this.anyFd().fd); }],
      [6, () => { out.pop(); }],
      [6, () => { if (out.length > 0) out[r.int(out.length)] = this.anyFd().fd; else out.push(this.anyFd().fd); }],
      [3, () => { if (out.length > 0) out.push(out[0]!); }],
      [3, () => { out.length = 0; }],
      [2, () => { for (let i = r.range(1, SCM_MAX_FD - out.length); i > 0; i--) out.push(this.anyFd().fd); }],
      [2, () => { out.reverse(); }],
    ])();
    return out;
  }

  private byteMutate(body: Uint8Array): Uint8Array {
    const r = this.rng;
    let b = body;
    for (let n = r.range(1, 3); n > 0; n--) {
      b = r.weighted<() => Uint8Array>([
        [4, () => b.subarray(0, r.int(b.length + 1)).slice()],
        [3, () => concat(b, r.bytes(r.range(1, 16)))],
        [4, () => {
          const c = b.slice();
          for (let i = r.range(1, 4); i > 0 && c.length > 0; i--) c[r.int(c.length)] ^= r.range(1, 255);
          return c;
        }],
        [2, () => {
          const at = r.int(b.length + 1);
          return concat(b.subarray(0, at), r.bytes(r.range(1, 8)), b.subarray(at));
        }],
        [2, () => {
          const at = r.int(b.length + 1);
          return concat(b.subarray(0, at), b.subarray(Math.min(b.length, at + r.range(1, 8))));
        }],
        [2, () => concat(b, encode(r.chance(0.5) ? "GetState" : this.junk(3)))],
        [1, () => {
          const c = b.slice();
          if (c.length > 0) c[0] = r.chance(0.3) ? r.pick([0x7b, 0x5b, 0x22, 0x20, 0x0a]) : r.u32() & 0xff;
          return c;
        }],
      ])();
    }
    return b;
  }

  /**
   * JSON text of a request, mangled the ways a JSON reader must refuse or must take: bad
   * numbers (leading zeros, "-0", floats, exponents, "+1", hex, above u64), trailing or missing commas,
   * comments, single quotes, control characters, bad UTF-8 and bad escapes inside strings,
   * a lone surrogate, a duplicate key, a BOM (then it is MessagePack), whitespace, nesting.
   */
  private jsonMangle(text: string): Uint8Array {
    const r = this.rng;
    let t = text;
    const at = (re: RegExp): number[] => {
      const out: number[] = [];
      for (const m of t.matchAll(re)) out.push(m.index!);
      return out;
    };
    const splice = (i: number, del: number, ins: string) => (t = t.slice(0, i) + ins + t.slice(i + del));
    for (let n = r.weighted([[6, 1], [3, 2], [1, 3]]); n > 0; n--) {
      r.weighted<() => void>([
        [5, () => {
          const nums = [...t.matchAll(/-?\d+(\.\d+)?([eE][+-]?\d+)?/g)];
          if (nums.length === 0) return;
          const m = r.pick(nums);
          const rep = r.pick(["01", "-0", "1.0", "4096.0", "1e3", "4.096e3", "+1", "0x10", "NaN", "Infinity", "1.5", "-1", "00",
            "18446744073709551616", "18446744073709551615", "9007199254740993", "4096 ", " 0", "1_000", ".5", "5."]);
          splice(m.index!, m[0].length, rep);
        }],
        [3, () => {
          const ends = at(/[}\]]/g);
          if (ends.length > 0) splice(r.pick(ends), 0, r.pick([",", " ,", ",\n"]));
        }],
        [2, () => {
          const commas = at(/,/g);
          if (commas.length > 0) splice(r.pick(commas), 1, r.pick(["", " ", ";", ",,"]));
        }],
        [2, () => {
          const gaps = at(/[{[,:]/g);
          if (gaps.length > 0) splice(r.pick(gaps) + 1, 0, r.pick(["/*c*/", "//c\n", "#", "\u00a0", "\f", "\v"]));
        }],
        [2, () => {
          const qs = at(/"/g);
          if (qs.length > 0) splice(r.pick(qs), 1, "'");
        }],
        [3, () => {
          const qs = at(/"/g);
          if (qs.length === 0) return;
          const ins = r.pick(["\u0001", "\n", "\t", "\\x41", "\\u12", "\\ud800", "\\u0041", "\\/", "\\", "é", "\u2028", "\\U0041"]);
          splice(r.pick(qs) + 1, 0, ins);
        }],
        [2, () => {
          // A key again in the same object: a known field twice is refused, an unknown one skipped.
          const opens = at(/\{"[a-z_]+":/g);
          if (opens.length === 0) return;
          const i = r.pick(opens);
          const key = /^\{("[a-z_]+"):/.exec(t.slice(i))![1]!;
          splice(i + 1, 0, `${r.chance(0.7) ? key : '"zz_unknown"'}:${r.pick(["0", "1", "null", "[]", '"x"'])},`);
        }],
        [2, () => {
          const gaps = at(/[{[,:]/g);
          if (gaps.length > 0) splice(r.pick(gaps) + 1, 0, r.pick([" ", "\n\n", "\r", "\t \t"]));
        }],
        [1, () => (t = r.pick(["[", "[[", '{"x":']) + t + r.pick(["]", "]]", "}"]))],
        [1, () => (t = t + r.pick(["x", "\u0000", " ", "\n", "{}", '"', "null"]))],
        [2, () => (t = t.slice(0, r.int(t.length + 1)))],
        [1, () => {
          const i = r.int(t.length + 1);
          splice(i, r.int(3), r.pick(['"', "{", "}", "[", "]", ":", ",", "\\", "0", "-", "e", "true", "nul"]));
        }],
      ])();
    }
    let b: Uint8Array = utf8Encoder.encode(t);
    // Bytes no JSON text can hold where they land: bad UTF-8 in a string, a BOM ahead of the text (MessagePack then).
    if (r.chance(0.15)) {
      const qs = [...b.keys()].filter((i) => b[i] === 0x22);
      if (qs.length > 0) {
        const i = r.pick(qs) + 1;
        b = concat(b.subarray(0, i), Uint8Array.from(r.pick([[0xff], [0xc0, 0x80], [0xed, 0xa0, 0x80], [0xe2, 0x82], [0xf4, 0x90, 0x80, 0x80]])), b.subarray(i));
      }
    }
    if (r.chance(0.05)) b = concat(Uint8Array.from([0xef, 0xbb, 0xbf]), b);
    return b;
  }

  // -- MmapAndRegisterMemory sequences

  /**
   * One valid file mapping into an shm of `shmSize` bytes: page-aligned offsets, a length
   * that need not be a page multiple, the file's range inside the file, the mapping
   * (length rounded up) inside the shm (rounded up).
   */
  private mapping(shmSize: number, files: number[], sized = false): Record<string, unknown> {
    const r = this.rng;
    const f = this.validMemfd(PAGE, sized);
    const shmPages = pagesOf(shmSize);
    const fileOffset = PAGE * r.int(pagesOf(f.size));
    const room = f.size - fileOffset;
    const span = r.range(1, Math.min(4, shmPages, pagesOf(room)));
    const length = Math.min(room, r.chance(0.7) ? span * PAGE : (span - 1) * PAGE + r.range(1, PAGE));
    files.push(f.fd);
    return {
      file: files.length - 1,
      length,
      mem_offset: PAGE * r.int(shmPages - pagesOf(length) + 1),
      file_offset: fileOffset,
    };
  }

  /** A file mapping the server cannot make (it fails the request at its chunk) or cannot even decode. */
  private badMapping(shmSize: number, files: number[]): Record<string, unknown> {
    const r = this.rng;
    // A file whose size the server knows, so a range past its end is one.
    const m = this.mapping(shmSize, files, true);
    const shmSpan = pagesOf(shmSize) * PAGE;
    r.weighted<() => void>([
      [2, () => { m.mem_offset = (m.mem_offset as number) + r.range(1, PAGE - 1); }],
      [2, () => { m.length = shmSpan + 1; }],
      [1, () => { m.length = 0; }],
      [2, () => { m.file_offset = 64 * MiB; }],
      [1, () => { m.file_offset = (m.file_offset as number) + r.range(1, PAGE - 1); }],
      [3, () => { files[files.length - 1] = r.pick(this.pool.unmappable).fd; }],
      // Past the shm, unaligned, beyond 2^53, negative, a float (each a failure in both encodings).
      [1, () => { m.mem_offset = r.pick<number | bigint>([shmSpan, shmSpan + PAGE, 1, 4095, 4097, U64_MAX, 2n ** 63n, 2 ** 53, -PAGE, 1.5]); }],
    ])();
    return m;
  }

  /** A chunk's body: MessagePack, or JSON (a newer crosvm's unknown fields in its mappings, skipped, now and then). */
  private chunkBody(mappings: unknown, json: boolean): Uint8Array {
    if (!json) return encode(mappings);
    const v = this.rng.chance(0.1) ? this.withUnknownFields(mappings) : mappings;
    return utf8Encoder.encode((this.rng.chance(0.1) ? "\n" : "") + jsonText(v, this.rng.chance(0.2) ? this.jsonStyle() : {}));
  }

  private chunkPacket(mappings: Record<string, unknown>[], files: number[], label: string, json: boolean): Action {
    return { packet: { body: this.chunkBody(mappings, json), fds: files, label } };
  }

  private badChunk(remaining: number, shmSize: number, json: boolean): Action {
    const r = this.rng;
    const label = "mmap-seq:bad-chunk";
    const files: number[] = [];
    const ms = (n: number) => Array.from({ length: n }, () => this.mapping(shmSize, files));
    const body = (v: unknown) => this.chunkBody(v, json);
    return r.weighted<() => Action>([
      [2, () => ({ packet: { body: body(ms(1)[0]), fds: files, label } })],
      [1, () => ({ packet: { body: body([]), fds: [], label } })],
      [1, () => {
        const list = ms(Math.min(SCM_MAX_FD, 254));
        list.push({ ...list[0]!, file: 253 });
        return { packet: { body: body(list), fds: files, label } };
      }],
      [2, () => (remaining + 1 <= SCM_MAX_FD ? this.chunkPacket(ms(remaining + 1), files, label, json) : { packet: { body: body(ms(1)), fds: [], label } })],
      [2, () => {
        const list = ms(Math.min(remaining, r.range(1, 4)));
        const m = list[r.int(list.length)]!;
        r.weighted<() => void>([
          [1, () => delete m.file_offset],
          [1, () => (m.extra = 1)],
          [1, () => (m.length = "4096")],
          [1, () => (m.mem_offset = -PAGE)],
          [1, () => (m.length = 2n ** 64n - 1n)],
          [1, () => (m.length = new WFloat(4096))],
        ])();
        return this.chunkPacket(list, files, label, json);
      }],
      [3, () => {
        const list = ms(Math.min(remaining, r.range(1, 4)));
        r.weighted<() => void>([
          [1, () => (list[0]!.file = files.length)],
          [1, () => files.push(this.anyFd().fd)],
          [1, () => files.pop()],
          [1, () => { if (list.length > 1) list[1]!.file = list[0]!.file; else files.push(files[0]!); }],
        ])();
        return this.chunkPacket(list, files, label, json);
      }],
      [1, () => {
        const list = ms(Math.min(remaining, r.range(1, 4)));
        return { packet: { body: this.jsonMangle(jsonText(list)), fds: files, label: "mmap-seq:mangled-json-chunk" } };
      }],
      [1, () => ({ packet: { body: r.bytes(MAX_PACKET + r.range(1, 20000)), fds: [], label: "mmap-seq:oversized-chunk" } })],
      [1, () => ({ packet: { body: new Uint8Array(0), fds: [], label: "mmap-seq:empty-chunk" } })],
      [1, () => ({ packet: { body: r.bytes(r.range(1, 64)), fds: r.chance(0.5) ? [this.anyFd().fd] : [], label } })],
    ])();
  }

  /**
   * Queues an MmapAndRegisterMemory and its chunks: complete, broken, interrupted, abandoned
   * or absurd. The request is JSON a quarter of the time; its chunks are in either
   * encoding (each packet's own first byte says which), mostly the request's.
   */
  private mmapSequence(): Action {
    const r = this.rng;
    const fate = r.weighted<string>([
      [60, "complete"],
      [15, "bad-chunk"],
      [5, "interrupted"],
      [8, "abandoned"],
      [12, "exec-fail"],
      [4, "bad-shm"],
    ]);
    // bad-shm: a descriptor mmap refuses as the shm (its declared size as a good one's).
    const shm = fate === "bad-shm" ? { ...this.validMemfd(16 * PAGE), fd: r.pick(this.pool.unmappable).fd } : this.validMemfd(16 * PAGE);
    const shmSize = shm.size;
    const pages = pagesOf(shmSize);
    const gpa = this.win.mmapBase + 4 * MiB * r.int(MMAP_SLOTS);
    const dest = r.chance(0.93) ? { GuestPhysicalAddress: gpa } : { ExistingAllocation: { allocation: BAR_A, offset: PAGE * r.int(16) } };
    const json = r.chance(0.25);
    const chunkJson = () => (r.chance(0.8) ? json : !json);
    const start = (count: number | bigint, label: string, check?: Check) => {
      const value = { MmapAndRegisterMemory: { shm: { descriptor: 0, size: shmSize }, dest, num_file_mappings: count } };
      return { packet: { body: this.body(value, json, true), fds: [shm.fd], label: (json ? "json:" : "") + label, check } } as Action;
    };
    if (r.chance(0.08)) {
      // Refused at once (docs/protocol.md), but the server still reads the chunks and answers
      // once after the last. A client that can send them does (more mappings than pages);
      // one that declared an absurd count can only hang up.
      const count = r.pick<number | bigint>([pages + 1, 65537, 100_000, 2n ** 60n, U64_MAX]);
      if (count !== pages + 1) {
        this.seq.push({ disconnect: "abrupt" });
        return start(count, "mmap-seq:absurd-count");
      }
      for (let left = count as number; left > 0; left -= SCM_MAX_FD) {
        const files: number[] = [];
        const list = Array.from({ length: Math.min(left, SCM_MAX_FD) }, () => this.mapping(shmSize, files));
        this.seq.push(this.chunkPacket(list, files, "mmap-seq:refused-chunk", chunkJson()));
      }
      return start(count, "mmap-seq:too-many-mappings");
    }
    const count = r.chance(0.85) ? r.range(1, Math.min(pages, 24)) : r.range(1, Math.min(pages, 600));
    const sizes: number[] = [];
    for (let left = count; left > 0; ) {
      const n = Math.min(left, r.chance(0.5) ? SCM_MAX_FD : r.range(1, SCM_MAX_FD));
      sizes.push(n);
      left -= n;
    }
    const at = r.int(sizes.length);
    // An shm or a file mapping the server cannot map fails the request: its one answer must be an Err.
    const actions: Action[] = [start(count, `mmap-seq:${fate}`, fate === "exec-fail" || fate === "bad-shm" ? Check.Refused : undefined)];
    let remaining = count;
    for (let i = 0; i < sizes.length; i++) {
      if (i === at && fate === "bad-chunk") {
        // A client does not know the server failed the request: it sends the rest too.
        actions.push(this.badChunk(remaining, shmSize, chunkJson()));
        remaining -= sizes[i]!;
        continue;
      }
      if (i === at && fate === "interrupted") {
        const v = this.valid();
        actions.push({ packet: { body: this.body(v.value, r.chance(0.3), true), fds: v.fds, label: "mmap-seq:interrupting-request" } });
        break;
      }
      if (i === at && fate === "abandoned") {
        actions.push({ disconnect: "abrupt" });
        break;
      }
      const files: number[] = [];
      const list = Array.from({ length: sizes[i]! }, (_, j) =>
        fate === "exec-fail" && i === at && j === 0 ? this.badMapping(shmSize, files) : this.mapping(shmSize, files),
      );
      actions.push(this.chunkPacket(list, files, `mmap-seq:chunk`, chunkJson()));
      remaining -= sizes[i]!;
    }
    if (fate === "complete" && "GuestPhysicalAddress" in dest) this.remember(gpa);
    this.seq.push(...actions.slice(1));
    return actions[0]!;
  }

  /** Cuts a grown packet to at most 150 KB: the kernel refuses a packet larger than the socket buffer. */
  private fit(body: Uint8Array): Uint8Array {
    return body.length <= 150_000 ? body : body.subarray(0, 100_000 + this.rng.int(50_000));
  }

  // -- the stream

  next(): Action {
    if (this.seq.length > 0) return this.seq.shift()!;
    const r = this.rng;
    if (++this.generated % 1500 === 0) {
      const i = r.int(this.randomMemfds.length);
      sys.close(this.randomMemfds[i]!.fd);
      this.randomMemfds[i] = memfd(this.randomSize());
    }
    const kind = r.weighted<string>([
      [30, "valid"],
      [30, "mutated"],
      [10, "bytes"],
      [6, "random-bytes"],
      [7, "junk"],
      [6, "mmap-seq"],
      [3, "weird"],
      [2, "inherited"],
      [0.08, "abrupt"],
      [0.08, "graceful"],
    ]);
    // A quarter of the requests are JSON, as a crosvm process sends them.
    const json = r.chance(0.25);
    const j = json ? "json:" : "";
    switch (kind) {
      case "valid": {
        const v = this.valid();
        return { packet: { body: this.body(v.value, json, true), fds: v.fds, label: `${j}valid:${v.variant}`, check: v.check, errno: v.errno } };
      }
      case "mutated": {
        const v = this.valid();
        return { packet: { body: this.fit(this.body(this.mutate(v.value), json)), fds: this.attach(v.fds), label: `${j}mutated:${v.variant}` } };
      }
      case "bytes": {
        const v = this.valid();
        if (json) {
          const mangled = this.jsonMangle(jsonText(v.value, r.chance(0.3) ? this.jsonStyle() : {}));
          return { packet: { body: this.fit(r.chance(0.2) ? this.byteMutate(mangled) : mangled), fds: this.attach(v.fds), label: `json:mangled:${v.variant}` } };
        }
        return { packet: { body: this.fit(this.byteMutate(encode(v.value))), fds: this.attach(v.fds), label: `bytes:${v.variant}` } };
      }
      case "random-bytes": {
        const n = r.weighted<() => number>([
          [30, () => r.range(1, 16)],
          [50, () => r.range(17, 256)],
          [15, () => r.range(257, 4096)],
          [4, () => r.range(4097, MAX_PACKET)],
          [1, () => r.range(MAX_PACKET + 1, 100_000)],
        ])();
        const body = r.bytes(n);
        if (r.chance(0.3)) body[0] = r.pick([0x81, 0x91, 0xdf, 0xdd, 0xc7, 0xd9]);
        // Random bytes behind a JSON first byte: the server reads them as JSON and answers in JSON.
        else if (r.chance(0.2)) body[0] = r.pick([0x7b, 0x5b, 0x22, 0x20, 0x09, 0x0a, 0x0d]);
        return { packet: { body, fds: r.chance(0.2) ? this.attach([]) : [], label: "random-bytes" } };
      }
      case "junk": {
        const v = this.junk();
        return { packet: { body: this.fit(json ? jsonBytes(v) : encode(v)), fds: r.chance(0.2) ? [this.anyFd().fd] : [], label: `${j}junk` } };
      }
      case "mmap-seq":
        return this.mmapSequence();
      case "inherited": {
        const v = r.pick(INHERITED);
        const value = r.chance(0.8) ? { [v]: this.junk(2) } : v;
        return { packet: { body: json ? jsonBytes(value) : encode(value), fds: [], label: `${j}inherited-name`, check: Check.Einval } };
      }
      case "abrupt":
        return { disconnect: "abrupt" };
      case "graceful":
        return { disconnect: "graceful" };
      default:
        return { packet: this.weird() };
    }
  }

  /**
   * Boundaries: 65535/65536/65537-byte packets in both encodings, empty, descriptors only,
   * deep nesting (MessagePack; JSON as a whole, or inside a field JSON skips: within the
   * server's depth the request stands, past it EINVAL), 253 descriptors.
   */
  private weird(): Packet {
    const r = this.rng;
    return r.weighted<() => Packet>([
      [3, () => {
        const size = r.pick([MAX_PACKET - 1, MAX_PACKET, MAX_PACKET + 1]);
        return { body: reclaimOfExactly(size), fds: [], label: `boundary-${size}`, check: size > MAX_PACKET ? Check.Einval : Check.Ok };
      }],
      [2, () => {
        const size = r.pick([MAX_PACKET - 1, MAX_PACKET, MAX_PACKET + 1]);
        return { body: jsonReclaimOfExactly(size), fds: [], label: `json:boundary-${size}`, check: size > MAX_PACKET ? Check.Einval : Check.Ok };
      }],
      [2, () => ({ body: r.bytes(r.range(MAX_PACKET + 1, 120_000)), fds: [], label: "oversized", check: Check.Einval })],
      [2, () => ({ body: new Uint8Array(0), fds: [], label: "empty", check: Check.Einval })],
      [2, () => ({ body: new Uint8Array(0), fds: this.attach([this.anyFd().fd]), label: "empty-with-fds", check: Check.Einval })],
      [2, () => {
        const depth = r.range(100, MAX_PACKET - 1);
        const body = new Uint8Array(depth + 1).fill(r.chance(0.5) ? 0x91 : 0x81);
        body[depth] = 0xc0;
        return { body, fds: [], label: "deep-nesting", check: Check.Einval };
      }],
      [1, () => {
        const depth = r.range(140, MAX_PACKET / 2 - 1);
        const open = r.chance(0.5) ? "[" : '{"a":';
        const body = utf8Encoder.encode(open.repeat(depth) + "0" + (open === "[" ? "]" : "}").repeat(depth));
        return { body: this.fit(body), fds: [], label: "json:deep-nesting", check: Check.Einval };
      }],
      [2, () => {
        // An unknown field nested `depth` deep in a BalloonTargetReached (2 levels): up to 120 in all is read, 140 and more refused.
        const depth = r.chance(0.5) ? r.range(1, 118) : r.range(138, 3000);
        const inner = r.chance(0.5) ? "[".repeat(depth) + "]".repeat(depth) : '{"x":'.repeat(depth - 1) + "{}" + "}".repeat(depth - 1);
        const body = utf8Encoder.encode(`{"BalloonTargetReached":{"size":${r.int(1 << 20)},"zz_nested":${inner}}}`);
        return { body, fds: [], label: "json:nested-unknown-field", check: depth + 2 <= JSON_MAX_DEPTH ? Check.Ok : Check.Einval };
      }],
      [1, () => ({ body: encode("GetState"), fds: Array.from({ length: SCM_MAX_FD }, () => this.anyFd().fd), label: "253-unreferenced-fds", check: Check.Einval })],
      [1, () => ({ body: utf8Encoder.encode('"GetState"'), fds: [this.anyFd().fd], label: "json:unreferenced-fd", check: Check.Einval })],
    ])();
  }
}

/**
 * A valid DynamicallyReclaimMemoryRanges of exactly `size` bytes, hand-encoded (docs/protocol.md: a body
 * of 65536 bytes is allowed, one more is not). Each range is fixarray(2), the address as uint 64 and
 * 4096 as uint 16, 32 or 64 (13, 15 or 19 bytes); the variant name as fixstr or str 8 fixes the parity.
 */
export function reclaimOfExactly(size: number): Uint8Array {
  const name = Buffer.from("DynamicallyReclaimMemoryRanges");
  const tail = [0x81, 0xa6, ...Buffer.from("ranges"), 0xdd, 0, 0, 0, 0];
  let head = [0x81, 0xa0 | name.length, ...name, ...tail];
  if ((size - head.length) % 2 !== 0) head = [0x81, 0xd9, name.length, ...name, ...tail];
  const rest = size - head.length;
  let n = Math.floor(rest / 13);
  if (n % 2 !== 0) n--;
  let extra = rest - 13 * n; // even, below 26
  const out = new Uint8Array(size);
  const v = new DataView(out.buffer);
  out.set(head, 0);
  v.setUint32(head.length - 4, n);
  let o = head.length;
  for (let i = 0; i < n; i++) {
    out[o++] = 0x92;
    out[o++] = 0xcf;
    v.setBigUint64(o, BigInt((i * PAGE) % (RAM_SIZE - PAGE)));
    o += 8;
    if (extra >= 6) {
      out[o++] = 0xcf;
      v.setBigUint64(o, BigInt(PAGE));
      o += 8;
      extra -= 6;
    } else if (extra >= 2) {
      out[o++] = 0xce;
      v.setUint32(o, PAGE);
      o += 4;
      extra -= 2;
    } else {
      out[o++] = 0xcd;
      v.setUint16(o, PAGE);
      o += 2;
    }
  }
  if (o !== size) throw new Error(`reclaimOfExactly(${size}) built ${o} bytes`);
  return out;
}

/** The same request as JSON of exactly `size` bytes: compact ranges, then trailing whitespace (allowed after the value). */
export function jsonReclaimOfExactly(size: number): Uint8Array {
  const head = '{"DynamicallyReclaimMemoryRanges":{"ranges":[';
  const tail = "]}}";
  const parts: string[] = [];
  let len = head.length + tail.length;
  for (let i = 0; ; i++) {
    const range = `${parts.length > 0 ? "," : ""}[${(i * PAGE) % (RAM_SIZE - PAGE)},4096]`;
    if (len + range.length > size) break;
    parts.push(range);
    len += range.length;
  }
  const text = head + parts.join("") + tail;
  return utf8Encoder.encode(text + " ".repeat(size - text.length));
}

// ---- the server model: which packets get a response, and what it may be ----------

/**
 * The model's own transcription of docs/protocol.md's shapes, as checks on a decoded value.
 * A descriptor field is an index into the packet's descriptors, each referenced once (with
 * `lost`, the packet's descriptors were cut short: any index in range of the format reads).
 */
interface ShapeCtx {
  json: boolean;
  nfds: number;
  used: Uint8Array;
  lost: boolean;
}
type Shape = ((v: unknown, c: ShapeCtx) => boolean) & { nullable?: true };

const uintS = (max: bigint): Shape => (v) => isUint(v, max);
const u8S = uintS(0xffn);
const u16S = uintS(0xffffn);
const u32S = uintS(0xffff_ffffn);
const u64S = uintS(U64_MAX);
const boolS: Shape = (v) => typeof v === "boolean";
const fdS: Shape = (v, c) => {
  if (!isUint(v, 255n)) return false;
  if (c.lost) return true;
  const i = Number(v);
  if (i >= c.nfds || c.used[i] !== 0) return false;
  c.used[i] = 1;
  return true;
};
function nullableS(of: Shape): Shape {
  const s: Shape = (v, c) => v === null || of(v, c);
  s.nullable = true;
  return s;
}
/** A struct: its fields, in any order, once each; unknown ones refused in MessagePack, skipped in JSON; a nullable one may be left out. */
function structS(fields: Record<string, Shape>): Shape {
  const names = Object.keys(fields);
  return (v, c) => {
    if (!isPlainMap(v)) return false;
    const dups = duplicatesOf(v);
    if (dups !== undefined && names.some((n) => dups.has(n))) return false;
    if (!c.json && Object.keys(v).some((k) => !Object.hasOwn(fields, k))) return false;
    for (const n of names) {
      if (!Object.hasOwn(v, n)) {
        if (fields[n]!.nullable) continue;
        return false;
      }
      if (!fields[n]!(v[n], c)) return false;
    }
    return true;
  };
}
/** A serde externally tagged enum: a unit variant is its name (or {name: nil}), any other {name: payload}, one key. */
function enumS(variants: Record<string, Shape | null>): Shape {
  return (v, c) => {
    if (typeof v === "string") return Object.hasOwn(variants, v) && variants[v] === null;
    if (!isPlainMap(v) || duplicatesOf(v) !== undefined) return false;
    const keys = Object.keys(v);
    if (keys.length !== 1 || !Object.hasOwn(variants, keys[0]!)) return false;
    const payload = variants[keys[0]!]!;
    return payload === null ? v[keys[0]!] === null : payload(v[keys[0]!], c);
  };
}
const tupleS = (...items: Shape[]): Shape => (v, c) => Array.isArray(v) && v.length === items.length && items.every((s, i) => s(v[i], c));
const arrayS = (of: Shape, min = 0, max = Infinity): Shape => (v, c) => Array.isArray(v) && v.length >= min && v.length <= max && v.every((x) => of(x, c));
/** 16 bytes: MessagePack bin 16, or an array of 16 u8. */
const uuidS: Shape = (v, c) => (v instanceof Uint8Array ? v.length === 16 : arrayS(u8S, 16, 16)(v, c));

const pciFunctionS = { bus: u8S, dev: u8S, func: u8S };
const AllocS = enumS({
  Anon: u64S,
  PciBar: structS({ ...pciFunctionS, bar: u8S }),
  PmemDevice: u64S,
  FileBacked: u64S,
  GpuRenderNode: null,
  Pstore: null,
  PciBridgeWindow: structS(pciFunctionS),
  PciBridgePrefetchWindow: structS(pciFunctionS),
});
const CacheS = enumS({ CacheCoherent: null, CacheNonCoherent: null });
const SharedMemoryS = structS({ descriptor: fdS, size: u64S });
const SourceS = enumS({
  SharedMemory: SharedMemoryS,
  Descriptor: structS({ descriptor: fdS, offset: u64S, size: u64S }),
  Vulkan: structS({ descriptor: fdS, handle_type: u32S, memory_idx: u32S, device_uuid: uuidS, driver_uuid: uuidS, size: u64S }),
  ExternalMapping: structS({ ptr: u64S, size: u64S }),
});
const DestinationS = enumS({ ExistingAllocation: structS({ allocation: AllocS, offset: u64S }), GuestPhysicalAddress: u64S });
const DatamatchS = enumS({ AnyLength: null, U8: nullableS(u8S), U16: nullableS(u16S), U32: nullableS(u32S), U64: nullableS(u64S) });
const RangesS = structS({ ranges: arrayS(tupleS(u64S, u64S)) });
const PageS = structS({ from: u64S, max: nullableS(u32S) });
const RequestS = enumS({
  PrepareSharedMemoryRegion: structS({ alloc: AllocS, cache: CacheS }),
  RegisterMemory: structS({ source: SourceS, dest: DestinationS, prot: structS({ read: boolS, write: boolS }), cache: CacheS }),
  MmapAndRegisterMemory: structS({ shm: SharedMemoryS, dest: DestinationS, num_file_mappings: u64S }),
  DynamicallyFreeMemoryRanges: RangesS,
  DynamicallyReclaimMemoryRanges: RangesS,
  BalloonTargetReached: structS({ size: u64S }),
  UnregisterMemory: u64S,
  IoEventRaw: structS({ event: fdS, addr: u64S, datamatch: DatamatchS, register: boolS }),
  GetState: null,
  GetRegions: PageS,
  GetAllocations: PageS,
  AllocateMmio: structS({ alloc: AllocS, size: u64S, align: nullableS(u64S) }),
  ReleaseMmio: AllocS,
});
/** An MmapAndRegisterMemory follow-up packet: 1 to 253 file mappings. */
const ChunkS = arrayS(structS({ file: fdS, length: u64S, mem_offset: u64S, file_offset: u64S }), 1, SCM_MAX_FD);

/** Whether `v` is of `shape` and references each of the packet's `nfds` descriptors exactly once. */
function wellFormed(shape: Shape, v: unknown, nfds: number, enc: Enc, lost = false): boolean {
  const c: ShapeCtx = { json: enc === "json", nfds, used: new Uint8Array(Math.max(1, nfds)), lost };
  if (!shape(v, c)) return false;
  if (!lost) for (let i = 0; i < nfds; i++) if (c.used[i] !== 1) return false;
  return true;
}

/** The variant of a well-formed request. */
function variantOf(v: unknown): string {
  return typeof v === "string" ? v : Object.keys(v as Record<string, unknown>)[0]!;
}
/** A request's payload, {"GetState": nil} and a missing nullable field included (nil). */
function payloadOf(req: unknown): Record<string, unknown> {
  const p = typeof req === "string" ? null : (req as Record<string, unknown>)[variantOf(req)];
  return (isPlainMap(p) ? p : { value: p }) as Record<string, unknown>;
}

type RespKind = "Ok" | "RegisterMemory" | "Err" | "State" | "Allocated" | "Regions" | "Allocations";

/** An Alloc in a response: strict shape, and in JSON its struct fields in docs/protocol.md's order. */
function isAllocOut(v: unknown, enc: Enc): boolean {
  if (!wellFormed(AllocS, v, 0, "msgpack")) return false;
  if (enc !== "json" || typeof v === "string") return true;
  const [k, p] = Object.entries(v as Record<string, unknown>)[0]!;
  if (k === "PciBar") return hasKeysInOrder(p, ["bus", "dev", "func", "bar"]);
  if (k === "PciBridgeWindow" || k === "PciBridgePrefetchWindow") return hasKeysInOrder(p, ["bus", "dev", "func"]);
  return true;
}
const REGION_KEYS = ["region_id", "slot", "size", "read_only", "kind"];
const ALLOCATION_KEYS = ["alloc", "start", "size"];
const STATE_KEYS = ["ram", "regions", "regions_next", "allocations", "allocations_next", "slots_used", "slots_max", "freed_bytes", "balloon_target", "vcpu"];

/**
 * The response's kind, or why it is not a well-formed response (docs/protocol.md, "Responses" and
 * "vmemd extensions"). A JSON answer has its fields in the order shown; its Err is the bare
 * chain, normalized here to MessagePack's {errno, chain} (the errno from the root cause's
 * trailing " (os error N)", which is cut off).
 */
function responseKind(v: unknown, enc: Enc): RespKind | { bad: string } {
  if (v === "Ok") return "Ok";
  if (!isPlainMap(v) || Object.keys(v).length !== 1) return { bad: "not \"Ok\" or a map with one key" };
  const [k] = Object.keys(v) as [string];
  const p = v[k];
  const fields = (x: unknown, keys: readonly string[]): x is Record<string, unknown> => (enc === "json" ? hasKeysInOrder(x, keys) : hasKeys(x, keys));
  const u64OrNil = (x: unknown) => x === null || isU64(x);
  const regionOk = (r: unknown) =>
    fields(r, REGION_KEYS) && isU64(r.region_id) && isU32(r.slot) && isU64(r.size) && typeof r.read_only === "boolean" &&
    ["dynamic", "fixed", "prepared"].includes(r.kind as string);
  const allocationOk = (a: unknown) => fields(a, ALLOCATION_KEYS) && isAllocOut(a.alloc, enc) && isU64(a.start) && isU64(a.size);
  switch (k) {
    case "RegisterMemory":
      return fields(p, ["region_id", "slot"]) && isU64(p.region_id) && isU32(p.slot) ? k : { bad: "RegisterMemory payload" };
    case "Allocated":
      return fields(p, ["start", "size"]) && isU64(p.start) && isU64(p.size) ? k : { bad: "Allocated payload" };
    case "Err": {
      if (enc === "json") {
        if (!Array.isArray(p) || p.length === 0 || !p.every((s) => typeof s === "string")) return { bad: "JSON Err not a non-empty array of strings" };
        const m = / \(os error (-?\d+)\)$/.exec(p[0] as string);
        const chain = p.slice() as string[];
        if (m !== null) chain[0] = chain[0]!.slice(0, m.index);
        const errno = m === null ? null : Number(m[1]);
        if (errno !== null && !(errno >= -(2 ** 31) && errno < 2 ** 31)) return { bad: "errno not i32" };
        v.Err = { errno, chain };
        return k;
      }
      if (!hasKeys(p, ["errno", "chain"])) return { bad: "Err keys" };
      const errno = p.errno;
      if (errno !== null && !(typeof errno === "number" && Number.isInteger(errno) && errno >= -(2 ** 31) && errno < 2 ** 31)) return { bad: "errno not i32|nil" };
      if (!Array.isArray(p.chain) || p.chain.length === 0) return { bad: "chain empty or not an array" };
      if (!p.chain.every((s) => typeof s === "string")) return { bad: "chain entry not a string" };
      return k;
    }
    case "State": {
      if (!fields(p, STATE_KEYS)) return { bad: `State keys${enc === "json" ? " (or their order)" : ""}` };
      if (!Array.isArray(p.ram) || !p.ram.every((r) => Array.isArray(r) && r.length === 2 && isU64(r[0]) && isU64(r[1]))) return { bad: "State.ram" };
      if (!Array.isArray(p.regions) || !p.regions.every(regionOk)) return { bad: "State.regions" };
      if (!Array.isArray(p.allocations) || !p.allocations.every(allocationOk)) return { bad: "State.allocations" };
      if (!u64OrNil(p.regions_next) || !u64OrNil(p.allocations_next)) return { bad: "State.regions_next / allocations_next" };
      if (!isU32(p.slots_used) || !isU32(p.slots_max) || !isU64(p.freed_bytes)) return { bad: "State counters" };
      if (p.balloon_target !== null && !isU64(p.balloon_target)) return { bad: "State.balloon_target" };
      const vcpu = p.vcpu;
      if (vcpu !== null && !(fields(vcpu, ["state", "exits", "mmio_reads", "mmio_writes"]) && ["running", "halted", "stopped"].includes(vcpu.state as string))) return { bad: "State.vcpu" };
      return k;
    }
    case "Regions":
      return fields(p, ["regions", "next"]) && Array.isArray(p.regions) && p.regions.every(regionOk) && u64OrNil(p.next) ? k : { bad: "Regions payload" };
    case "Allocations":
      return fields(p, ["allocations", "next"]) && Array.isArray(p.allocations) && p.allocations.every(allocationOk) && u64OrNil(p.next) ? k : { bad: "Allocations payload" };
  }
  return { bad: `unknown response variant ${JSON.stringify(k)}` };
}

/** Response kinds a request variant may get. */
function allowedKinds(variant: string | null): readonly RespKind[] {
  switch (variant) {
    case null:
      return ["Err"];
    case "GetState":
      return ["State", "Err"];
    case "GetRegions":
      return ["Regions", "Err"];
    case "GetAllocations":
      return ["Allocations", "Err"];
    case "RegisterMemory":
    case "MmapAndRegisterMemory":
      return ["RegisterMemory", "Err"];
    case "AllocateMmio":
      return ["Allocated", "Err"];
    default:
      return ["Ok", "Err"];
  }
}

/**
 * What is wrong with a listing page, by docs/protocol.md's paging rules, or null: entries from
 * `from` on in ascending key order (regions: a prepared arena and a fixed mapping at its
 * first byte share a region_id), at most `max` (nil: no cap; 0 still lists one), `next`
 * past every entry listed, and at least one entry when `next` says more remain. Two
 * entries of one region_id may go over `max` together: a page never splits them.
 */
function pageProblem(kind: "Regions" | "Allocations", payload: Record<string, unknown>, req: unknown): string | null {
  const p = payloadOf(req);
  const from = big(p.from);
  const max = p.max === undefined || p.max === null ? null : Math.max(1, Number(p.max));
  const entries = (kind === "Regions" ? payload.regions : payload.allocations) as Record<string, unknown>[];
  const keys = entries.map((e) => big(kind === "Regions" ? e.region_id : e.start));
  for (let i = 0; i < keys.length; i++) {
    if (keys[i]! < from) return `entry ${i} (${hex(keys[i]!)}) is below from ${hex(from)}`;
    if (i > 0 && (keys[i]! < keys[i - 1]! || (kind === "Allocations" && keys[i] === keys[i - 1]))) return `entries out of order at ${i}`;
  }
  if (max !== null && keys.length > max) {
    const pairAtEnd = kind === "Regions" && keys.length === max + 1 && keys[max] === keys[max - 1];
    if (!pairAtEnd) return `${keys.length} entries, more than max ${max}`;
  }
  const next = payload.next;
  if (next !== null) {
    if (keys.length === 0) return "next set on an empty page";
    if (big(next) <= keys[keys.length - 1]!) return `next ${hex(big(next))} is not past the last entry listed`;
  }
  return null;
}

interface RegionOut {
  region_id: number | bigint;
  slot: number;
  size: number | bigint;
  read_only: boolean;
  kind: string;
}
interface AllocationOut {
  alloc: Alloc;
  start: number | bigint;
  size: number | bigint;
}
/** A State with its listings complete (paged through GetRegions and GetAllocations). */
interface State {
  ram: [number | bigint, number | bigint][];
  regions: RegionOut[];
  allocations: AllocationOut[];
  slots_used: number;
  slots_max: number;
  freed_bytes: number | bigint;
}

interface Expect {
  check: Check;
  errno?: number;
  marker?: number;
  /** The request variant when the model finds the packet a well-formed request that is answered; null otherwise. */
  variant: string | null;
  /** The decoded request (for bookkeeping), when variant is not null. */
  req: unknown;
  /** The encoding the answer must be in. */
  enc: Enc;
  fds: number[];
  label: string;
  body: Uint8Array;
  pktNo: number;
  onResponse?: (resp: unknown) => void;
}

// ---- the server process ---------------------------------------------------------

export class FuzzServer {
  readonly dir: string;
  readonly socket: string;
  proc!: Subprocess<"ignore", "pipe", "pipe">;
  readonly tail: string[] = [];
  readonly warnings: string[] = [];
  warningCount = 0;
  ready: string | null = null;

  private constructor(
    readonly binary: string,
    readonly args: string[],
  ) {
    this.dir = mkdtempSync(join(tmpdir(), "vmemd-fuzz-srv-"));
    this.socket = join(this.dir, "vmemd.sock");
  }

  static async start(binary: string, args: string[]): Promise<FuzzServer> {
    const s = new FuzzServer(binary, args);
    // --die-with-parent: a fuzzer that dies (or throws past stop()) leaves no server behind.
    s.proc = Bun.spawn([binary, "serve", "--socket", s.socket, "--die-with-parent", ...args], { stdin: "ignore", stdout: "pipe", stderr: "pipe" });
    s.collect(s.proc.stdout);
    s.collect(s.proc.stderr);
    const deadline = Date.now() + 15_000;
    while (s.ready === null) {
      if (s.proc.exitCode !== null || Date.now() > deadline) {
        throw new Error(`vmemd did not come up (exit ${s.proc.exitCode}): ${s.tail.join("\n")}`);
      }
      await Bun.sleep(10);
    }
    return s;
  }

  private collect(stream: ReadableStream<Uint8Array>): void {
    void (async () => {
      const dec = new TextDecoder();
      let buf = "";
      for await (const chunk of stream) {
        buf += dec.decode(chunk, { stream: true });
        let nl: number;
        while ((nl = buf.indexOf("\n")) !== -1) {
          this.line(buf.slice(0, nl));
          buf = buf.slice(nl + 1);
        }
      }
      if (buf) this.line(buf);
    })();
  }

  private line(l: string): void {
    this.tail.push(l);
    if (this.tail.length > 60) this.tail.shift();
    if (l.includes("vmemd ready")) this.ready = l;
    if (/\b(WARN|ERROR)\b/.test(l)) {
      this.warningCount++;
      if (this.warnings.length < 20) this.warnings.push(l);
    }
  }

  get pid(): number {
    return this.proc.pid;
  }
  get alive(): boolean {
    return this.proc.exitCode === null && this.proc.signalCode === null;
  }
  /** Guest physical address bits, from the "vmemd ready" line (36 when absent). */
  get physBits(): number {
    const m = /phys_bits=(\d+)/.exec(this.ready ?? "");
    return m ? Number(m[1]) : 36;
  }
  fdCount(): number {
    return sys.countOpenFds(this.pid);
  }
  maps(fuzzDir: string): MapsCount {
    return countMaps(readFileSync(`/proc/${this.pid}/maps`, "utf8"), fuzzDir);
  }

  async stop(): Promise<number | string> {
    if (this.alive) this.proc.kill("SIGTERM");
    const timer = setTimeout(() => this.proc.kill("SIGKILL"), 10_000);
    const code = await this.proc.exited;
    clearTimeout(timer);
    rmSync(this.dir, { recursive: true, force: true });
    return this.proc.signalCode ?? code;
  }
}

export interface MapsCount {
  lines: number;
  /** Mappings of the fuzzer's memfds and files: zero once every region is gone. */
  fuzzMemfd: number;
  fuzzFile: number;
  /** Anonymous read-only mappings: the prepared arenas (permanent), and nothing else of vmemd's. */
  anonReadOnly: number;
  anonReadOnlyBytes: number;
  guestRam: number;
}

function countMaps(text: string, fuzzDir: string): MapsCount {
  const c: MapsCount = { lines: 0, fuzzMemfd: 0, fuzzFile: 0, anonReadOnly: 0, anonReadOnlyBytes: 0, guestRam: 0 };
  for (const line of text.split("\n")) {
    const m = /^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$/.exec(line);
    if (!m) continue;
    c.lines++;
    const path = m[4]!;
    if (path.startsWith("/memfd:" + MEMFD_NAME)) c.fuzzMemfd++;
    else if (path.startsWith(fuzzDir)) c.fuzzFile++;
    else if (path.startsWith("/memfd:vmemd-guest-ram")) c.guestRam++;
    else if (path === "" && m[3]!.startsWith("r--")) {
      c.anonReadOnly++;
      c.anonReadOnlyBytes += Number(BigInt("0x" + m[2]) - BigInt("0x" + m[1]));
    }
  }
  return c;
}

// ---- connections --------------------------------------------------------------------

const HISTORY = 16;

class Conn {
  fd = -1;
  private readonly io = new sys.PacketIo(MAX_PACKET);
  readonly fifo: Expect[] = [];
  /** The model: chunks the server still expects for an MmapAndRegisterMemory (0: none). */
  pending = 0;
  private pendingReq: unknown = null;
  private pendingFailed = false;
  /** The pending request was refused at once (its count): the answer is EINVAL. */
  private pendingRefused = false;
  /** The pending request's encoding (its answer's) and what its generator expects of the answer. */
  private pendingEnc: Enc = "msgpack";
  private pendingCheck: Check | undefined = undefined;
  readonly explicit: Packet[] = [];
  private next: Packet | null = null;
  /** Fuzz packets sent by this slot, and how many it may send before the next checkpoint. */
  sent = 0;
  target = 0;
  closeAfterSync = false;
  needsReset = false;
  lastProgress = performance.now();
  private mask = 0;
  readonly window: number;
  digest = 0;
  readonly history: { no: number; label: string; body: Uint8Array; fds: number[] }[] = [];

  constructor(
    private readonly engine: Engine,
    readonly slot: number,
    readonly gen: SlotGen,
    maxWindow: number,
  ) {
    // Slot 0 always pipelines as deep as allowed; the others draw their depth.
    this.window = slot === 0 ? maxWindow : gen.rng.range(1, maxWindow);
  }

  open(): void {
    this.fd = sys.connectSeqpacket(this.engine.server.socket, true);
    this.mask = sys.EPOLLIN;
    this.engine.epoll.add(this.fd, this.mask);
    this.engine.stats.connectionsOpened++;
    this.lastProgress = performance.now();
  }

  /** Closes the socket with whatever is in flight; what was not answered is lost. */
  close(): void {
    if (this.fd === -1) return;
    this.engine.loseExpectations(this.fifo);
    const lost = this.fifo.splice(0);
    this.resetPending();
    // A packet not sent yet goes out on the next connection, unless it was a sync or control one.
    if (this.next !== null && (this.next.marker !== undefined || this.next.onResponse !== undefined)) this.next = null;
    for (const ex of lost) ex.onResponse?.(undefined);
    for (const p of this.explicit) p.onResponse?.(undefined);
    try {
      this.engine.epoll.remove(this.fd);
    } catch {}
    sys.close(this.fd);
    this.fd = -1;
  }

  reconnect(): void {
    this.close();
    this.explicit.length = 0;
    this.open();
  }

  /** At the end: closes the socket and drops a packet that never went out. */
  shutdown(): void {
    this.close();
    this.next = null;
    this.explicit.length = 0;
  }

  get synced(): boolean {
    return this.explicit.length === 0 && this.next === null && this.fifo.length === 0 && this.pending === 0;
  }
  get wantsOut(): boolean {
    return this.next !== null;
  }

  updateMask(): void {
    const want = sys.EPOLLIN | (this.next !== null ? sys.EPOLLOUT : 0);
    if (want !== this.mask && this.fd !== -1) {
      this.engine.epoll.modify(this.fd, want);
      this.mask = want;
    }
  }

  private produce(): Packet | null {
    if (this.explicit.length > 0) return this.explicit.shift()!;
    if (!this.engine.fuzzing || this.closeAfterSync) return null;
    if (this.sent >= this.target && !this.gen.inSequence) return null;
    if (this.fifo.length >= this.window) return null;
    const a = this.gen.next();
    if ("disconnect" in a) {
      if (a.disconnect === "abrupt") {
        this.engine.stats.abruptDisconnects++;
        this.reconnect();
      } else {
        this.engine.stats.gracefulDisconnects++;
        this.closeAfterSync = true;
        this.explicit.push(this.engine.marker());
      }
      return this.produce();
    }
    this.sent++;
    return a.packet;
  }

  /** Sends and receives what it can without blocking; true when anything moved. */
  pump(): boolean {
    let progress = false;
    if (this.needsReset || (this.closeAfterSync && this.synced)) {
      this.closeAfterSync = false;
      this.needsReset = false;
      this.reconnect();
      progress = true;
    }
    for (;;) {
      let n: number;
      try {
        n = this.io.recv(this.fd);
      } catch (e) {
        this.engine.violate("connection", `recvmsg failed: ${e}`, this);
        this.reconnect();
        return true;
      }
      if (n === -1) break;
      if (this.io.fds.length > 0) {
        for (const fd of this.io.fds) sys.close(fd);
        this.engine.violate("response", `the server sent ${this.io.fds.length} descriptors`, this);
      }
      if (n === 0 && this.io.fds.length === 0) {
        this.engine.violate("connection", `the server closed the connection (${this.fifo.length} responses owed)`, this);
        this.reconnect();
        return true;
      }
      if (this.io.flags & sys.MSG_TRUNC || n > MAX_PACKET) {
        // docs/protocol.md: every response fits in one packet.
        this.engine.violate("response", `a response larger than a packet (${n} bytes received, MSG_TRUNC): ${hexHead(this.io.body.subarray(0, n))}`, this, this.fifo[0]);
      }
      this.onResponse(this.io.body.subarray(0, Math.min(n, MAX_PACKET)));
      progress = true;
      if (this.needsReset) {
        // Out of step with the server: anything more on this socket would only repeat it.
        this.needsReset = false;
        this.reconnect();
        return true;
      }
    }
    for (;;) {
      // An MmapAndRegisterMemory that declared more mappings than any client could send
      // (mutations make such counts) keeps the server reading chunks until the peer goes
      // (docs/protocol.md): once its answers are in, a real client could only hang up.
      if (this.pending > DOOMED_PENDING && this.fifo.length === 0) {
        this.engine.stats.abandonedByCount++;
        this.reconnect();
        return true;
      }
      const p = this.next ?? this.produce();
      if (p === null) break;
      let ok: boolean;
      try {
        ok = this.io.send(this.fd, p.body, p.fds);
      } catch (e) {
        const errno = e instanceof sys.SysError ? e.errno : 0;
        if (errno === sys.Errno.EPIPE || errno === sys.Errno.ECONNRESET) {
          this.engine.violate("connection", `the server closed the connection: sendmsg ${e}`, this);
          this.reconnect();
          return true;
        }
        // The kernel refused the packet itself (never reached the server): not the server's doing.
        this.engine.stats.sendRefused.set(String(e), (this.engine.stats.sendRefused.get(String(e)) ?? 0) + 1);
        this.next = null;
        continue;
      }
      if (!ok) {
        this.next = p;
        break;
      }
      this.next = null;
      this.onSent(p);
      progress = true;
    }
    if (progress) this.lastProgress = performance.now();
    return progress;
  }

  private onSent(p: Packet): void {
    const st = this.engine.stats;
    const no = ++st.packetNo;
    this.history.push({ no, label: p.label, body: p.body, fds: p.fds });
    if (this.history.length > HISTORY) this.history.shift();
    st.sentByLabel.set(p.label, (st.sentByLabel.get(p.label) ?? 0) + 1);
    if (p.marker !== undefined || p.onResponse !== undefined) st.syncPackets++;
    else {
      st.fuzzPackets++;
      // What this slot sent, in order: the same for the same seed, however the run was timed.
      this.digest = Bun.hash.crc32(p.body, Bun.hash.crc32(p.label, this.digest ^ p.fds.length));
    }
    const wasPending = this.pending > 0;
    const ex = this.classify(p, no);
    if (ex === null) {
      st.absorbed++;
      return;
    }
    this.fifo.push(ex);
    if (p.marker !== undefined && wasPending) this.explicit.unshift(this.engine.marker());
  }

  private resetPending(): void {
    this.pending = 0;
    this.pendingReq = null;
    this.pendingFailed = false;
    this.pendingRefused = false;
    this.pendingCheck = undefined;
  }

  /**
   * What the server does with the packet: an expected response, or null when it absorbs it
   * as a chunk. The answer is in the packet's encoding (its first byte), an
   * MmapAndRegisterMemory's in the request's, whatever its chunks'.
   */
  private classify(p: Packet, no: number): Expect | null {
    const enc = encodingOf(p.body);
    const ex: Expect = { check: Check.Any, variant: null, req: null, enc, fds: p.fds, label: p.label, body: p.body, pktNo: no, onResponse: p.onResponse };
    const decoded = p.body.length > MAX_PACKET || p.body.length === 0 ? undefined : decodeBody(p.body);
    const lost = p.ctrunc === true;
    if (enc === "json") this.engine.stats.jsonPackets++;
    if (this.pending > 0) {
      // A follow-up chunk (docs/protocol.md): a well-formed one counts its mappings; anything
      // else (oversized, empty, undecodable, descriptors cut short) fails the request and counts
      // as min(remaining, 253). One answer after the last: Err if anything failed.
      const ok = decoded !== undefined && !lost && wellFormed(ChunkS, decoded.value, p.fds.length, enc);
      const n = ok ? (decoded!.value as unknown[]).length : null;
      if (n !== null && n <= this.pending) this.pending -= n;
      else {
        this.pending -= Math.min(this.pending, SCM_MAX_FD);
        this.pendingFailed = true;
      }
      if (this.pending > 0) return null;
      ex.enc = this.pendingEnc;
      if (this.pendingFailed) {
        ex.check = Check.Chunk;
        if (this.pendingRefused) ex.errno = EINVAL;
      } else {
        ex.variant = "MmapAndRegisterMemory";
        ex.req = this.pendingReq;
        if (this.pendingCheck !== undefined) ex.check = this.pendingCheck;
      }
      this.resetPending();
      return ex;
    }
    if (decoded === undefined) {
      ex.check = Check.Einval;
      return ex;
    }
    const v = decoded.value;
    if (!wellFormed(RequestS, v, p.fds.length, enc, lost)) {
      ex.check = Check.Einval;
      return ex;
    }
    const variant = variantOf(v);
    if (lost && variant !== "MmapAndRegisterMemory") {
      // Its descriptors are gone: refused as a malformed packet.
      ex.check = Check.Einval;
      return ex;
    }
    ex.variant = variant;
    ex.req = v;
    this.engine.stats.wellFormed++;
    if (enc === "json") this.engine.stats.jsonWellFormed++;
    if (variant === "MmapAndRegisterMemory") {
      const m = payloadOf(v);
      const count = big(m.num_file_mappings);
      const size = big((m.shm as Record<string, unknown>).size);
      // Refused at once when absurd (or its descriptors were cut short), yet still answered after its chunks (docs/protocol.md).
      const refused = lost || count > MAX_FILE_MAPPINGS || (size <= MAX_SAFE && count > (size + BigInt(PAGE) - 1n) / BigInt(PAGE));
      if (count > 0n) {
        this.pendingFailed = this.pendingRefused = refused;
        this.pending = Number(count);
        this.pendingReq = v;
        this.pendingEnc = enc;
        this.pendingCheck = p.check;
        return null;
      }
      if (lost) {
        ex.variant = null;
        ex.check = Check.Chunk;
        ex.errno = EINVAL;
        return ex;
      }
    }
    if (p.marker !== undefined) {
      ex.check = Check.Marker;
      ex.marker = p.marker;
    } else if (p.check !== undefined) {
      ex.check = p.check;
      ex.errno = p.errno;
    }
    return ex;
  }

  private onResponse(body: Uint8Array): void {
    const enc = encodingOf(body);
    let v: unknown;
    try {
      v = enc === "json" ? readJson(body) : readMsgpack(body);
    } catch (e) {
      this.engine.violate("response", `not a ${enc === "json" ? "JSON" : "MessagePack"} value (${e}): ${hexHead(body)}`, this, this.fifo[0]);
      this.fifo.shift();
      return;
    }
    const ex = this.fifo.shift();
    if (ex === undefined) {
      this.engine.violate("accounting", `a response with no request outstanding: ${show(v)}`, this);
      this.needsReset = true;
      return;
    }
    if (enc !== ex.enc) {
      this.engine.violate("encoding", `a ${enc === "json" ? "JSON" : "MessagePack"} answer to a ${ex.enc === "json" ? "JSON" : "MessagePack"} ${ex.variant === null ? "packet" : "request"}: ${hexHead(body)}`, this, ex);
      this.needsReset = true;
    }
    if (enc === "json") {
      this.engine.stats.jsonResponses++;
      // docs/protocol.md: JSON answers are compact, as serde_json writes them.
      const canonical = jsonText(v);
      const text = utf8Lenient.decode(body);
      if (canonical !== text) this.engine.violate("response", `a JSON answer not written as serde_json writes it (compact): ${JSON.stringify(text.slice(0, 200))}`, this, ex);
    }
    const kind = responseKind(v, enc);
    if (typeof kind !== "string") {
      this.engine.violate("response", `malformed response (${kind.bad}): ${show(v)}`, this, ex);
      return;
    }
    this.engine.account(this, ex, kind, v);
  }

  describe(ex?: Expect): string {
    const pk = (h: { no: number; label: string; body: Uint8Array; fds: number[] }) =>
      `#${h.no} ${h.label} len=${h.body.length} fds=[${h.fds.map(fdKind).join(",")}] ${hexHead(h.body, 64)}`;
    const lines = [`slot ${this.slot}, model pending=${this.pending}, ${this.fifo.length} responses outstanding`];
    if (ex) lines.push(`  packet: ${pk({ no: ex.pktNo, label: ex.label, body: ex.body, fds: ex.fds })}`);
    lines.push("  last packets on this connection:", ...this.history.slice(-6).map((h) => "    " + pk(h)));
    return lines.join("\n");
  }
}

function fdKind(fd: number): string {
  try {
    const l = readlinkSync(`/proc/self/fd/${fd}`);
    if (l.startsWith("/memfd:")) return "memfd";
    if (l.startsWith("anon_inode:")) return l.slice(11).replace(/[[\]]/g, "");
    if (l.startsWith("socket:")) return "socket";
    if (l.startsWith("pipe:")) return "pipe";
    return l.startsWith("/dev/") ? l : l.includes("vmemd-fuzz-") ? "file/dir" : l;
  } catch {
    return `fd${fd}`;
  }
}

// ---- the engine ---------------------------------------------------------------------

export interface FuzzOptions {
  packets: number;
  connections: number;
  seed: number;
  binary: string;
  /** Largest number of responses outstanding per connection (each slot draws its own, 1..max). */
  window?: number;
  /** Intermediate checkpoints (all connections synced, counts checked), besides the final one. */
  checkpoints?: number;
  stallMs?: number;
  serverArgs?: string[];
  /** Progress lines (every few seconds). */
  progress?: (line: string) => void;
}

export interface Violation {
  kind: string;
  detail: string;
  context?: string;
}

export interface FuzzReport {
  ok: boolean;
  violations: Violation[];
  violationCount: number;
  violationsByKind: Record<string, number>;
  /** Each distinct violation (kind and text with numbers elided) and how often it happened. */
  distinct: [string, number][];
  text: string;
  stats: Stats;
}

class Stats {
  fuzzPackets = 0;
  syncPackets = 0;
  packetNo = 0;
  absorbed = 0;
  connectionsOpened = 0;
  abruptDisconnects = 0;
  gracefulDisconnects = 0;
  lostResponses = 0;
  responses = new Map<string, number>();
  errnos = new Map<string, number>();
  sentByLabel = new Map<string, number>();
  sendRefused = new Map<string, number>();
  /** Connections dropped because a request declared an absurd num_file_mappings. */
  abandonedByCount = 0;
  checkpoints = 0;
  peakRegions = 0;
  /** Packets sent and answers received in JSON. */
  jsonPackets = 0;
  jsonResponses = 0;
  /** Packets the model read as well-formed requests (all, and JSON ones). */
  wellFormed = 0;
  jsonWellFormed = 0;
  /** GetRegions / GetAllocations pages read at checkpoints, and the most regions GetState's first page held. */
  pagesRead = 0;
  peakStatePage = 0;
  /** Checkpoints whose GetState listed only a first page of regions (regions_next set). */
  statePaged = 0;
  freedProbes = 0;
  /** What the MSG_CTRUNC probe did. */
  ctrunc = "not run";
  peakSlots = 0;
  slotsMax = 0;
  registered = 0;
  unregistered = 0;
  durationMs = 0;
  /** One CRC per slot over every fuzz packet it sent (body, label, descriptor count). */
  digest = "";
  final: Record<string, unknown> = {};
}

const STATE_CHANGING = new Set(["RegisterMemory", "MmapAndRegisterMemory", "UnregisterMemory", "AllocateMmio", "ReleaseMmio", "IoEventRaw", "PrepareSharedMemoryRegion"]);

class Counter<K> {
  readonly m = new Map<K, number>();
  add(k: K, d: number): void {
    const n = (this.m.get(k) ?? 0) + d;
    if (n === 0) this.m.delete(k);
    else this.m.set(k, n);
  }
  positive(): K[] {
    return [...this.m].filter(([, n]) => n > 0).map(([k]) => k);
  }
}

class FuzzAbort extends Error {}

class Engine {
  readonly epoll = new sys.Epoll(64);
  readonly stats = new Stats();
  readonly violations: Violation[] = [];
  readonly violationsByKind = new Map<string, number>();
  fuzzing = false;
  conns: Conn[] = [];
  private markerNo = 0;
  private aborted: string | null = null;
  // What the server holds, as its responses told us.
  readonly regions = new Counter<number>();
  readonly allocs = new Counter<string>();
  readonly prepared = new Counter<string>();
  readonly ioevents = new Counter<string>();
  private readonly ioeventArgs = new Map<string, { fd: number; addr: number; datamatch: unknown }>();
  /** State-changing requests whose responses were lost in disconnects since the last reconciliation. */
  lostStateChanging = 0;
  lostIoevents = 0;

  constructor(
    readonly server: FuzzServer,
    readonly opts: Required<Omit<FuzzOptions, "progress" | "serverArgs">> & Pick<FuzzOptions, "progress">,
  ) {
    for (const k of INITIAL_ALLOCS.keys()) this.allocs.add(k, 1);
  }

  /** Records a violation; up to 3 examples are kept of each distinct one (same kind, same text but numbers). */
  violate(kind: string, detail: string, conn?: Conn, ex?: Expect): void {
    this.violationsByKind.set(kind, (this.violationsByKind.get(kind) ?? 0) + 1);
    const sig = `${kind}: ${detail.replace(/0x[0-9a-f]+|\d+/gi, "N").slice(0, 160)}`;
    const seen = this.signatures.get(sig);
    if (seen !== undefined) {
      seen.count++;
      if (seen.examples < 3 && this.violations.length < 60) {
        seen.examples++;
        this.violations.push({ kind, detail, context: conn?.describe(ex) });
      }
      return;
    }
    if (this.signatures.size >= 200) {
      const other = this.signatures.get("(other distinct violations)") ?? { count: 0, examples: 3 };
      other.count++;
      this.signatures.set("(other distinct violations)", other);
      return;
    }
    this.signatures.set(sig, { count: 1, examples: 1 });
    if (this.violations.length < 60) this.violations.push({ kind, detail, context: conn?.describe(ex) });
  }
  readonly signatures = new Map<string, { count: number; examples: number }>();

  marker(): Packet {
    const id = 0x7777_0000_0001 + 2 * this.markerNo++;
    return { body: encode({ UnregisterMemory: id }), fds: [], label: "sync-marker", marker: id };
  }

  loseExpectations(list: Expect[]): void {
    this.stats.lostResponses += list.length;
    for (const ex of list) {
      if (ex.variant !== null && STATE_CHANGING.has(ex.variant)) this.lostStateChanging++;
      if (ex.variant === "IoEventRaw") this.lostIoevents++;
    }
  }

  /** Checks one response against its packet and updates the model of the server's state. */
  account(conn: Conn, ex: Expect, kind: RespKind, v: unknown): void {
    const st = this.stats;
    st.responses.set(kind, (st.responses.get(kind) ?? 0) + 1);
    const payload = (v as Record<string, Record<string, unknown>>)[kind] ?? {};
    let errno: number | null = null;
    let chain: string[] = [];
    if (kind === "Err") {
      errno = payload.errno as number | null;
      chain = payload.chain as string[];
      const name = errno === null ? "nil" : sys.errnoName(errno);
      st.errnos.set(name, (st.errnos.get(name) ?? 0) + 1);
      if (errno === null) this.violate("errno", `Err without errno (docs/protocol.md: EINVAL for malformed input): ${show(chain)}`, conn, ex);
      else if (chain.some((s) => s.startsWith("malformed")) && errno !== EINVAL) this.violate("errno", `malformed-input Err with errno ${errno}: ${show(chain)}`, conn, ex);
      if (ex.variant !== null && chain.at(-1) === MALFORMED_REQUEST) {
        // The model reads the packet as a well-formed request: the server must not call it malformed.
        this.violate("model", `the server refused as malformed a packet the model reads as a well-formed ${ex.variant}: ${show(chain)}`, conn, ex);
        // An MmapAndRegisterMemory refused at once leaves its chunks to be read as requests: out of step from here.
        conn.needsReset = true;
      }
    }
    const expected = allowedKinds(ex.variant);
    if (!expected.includes(kind)) {
      this.violate("accounting", `a ${kind} response to ${ex.variant ?? "a packet that is not a request"} (expected ${expected.join("|")}): ${show(v)}`, conn, ex);
      conn.needsReset = true;
    }
    const mismatch = (why: string, reset = false) => {
      this.violate("response", `${why}; got ${show(v)}`, conn, ex);
      if (reset) conn.needsReset = true;
    };
    switch (ex.check) {
      case Check.Einval:
        if (errno !== EINVAL && !(kind === "Err" && errno === null)) mismatch("expected Err EINVAL"); // nil: reported above
        break;
      case Check.Chunk:
        // The request failed at a chunk (EINVAL, "malformed …" in the chain) or was refused at
        // once (its count: EINVAL); a request whose start already failed (its shm, its
        // destination) answers that failure, whatever its chunks were.
        if (kind !== "Err" || chain.at(-1) !== CHUNK_ABORT || (ex.errno !== undefined && errno !== ex.errno)) {
          mismatch(`a failed MmapAndRegisterMemory must end with one Err${ex.errno !== undefined ? ` ${sys.errnoName(ex.errno)}` : ""} whose chain ends "${CHUNK_ABORT}"`, true);
        }
        break;
      case Check.Ok:
        if (v !== "Ok") mismatch("expected Ok");
        break;
      case Check.State:
        // docs/protocol.md: GetState's lists are pages, so it always fits (no EMSGSIZE any more).
        if (kind !== "State") mismatch("expected State");
        break;
      case Check.Errno:
        if (errno !== ex.errno) mismatch(`expected Err ${sys.errnoName(ex.errno!)}`);
        break;
      case Check.Refused:
        if (kind !== "Err") mismatch("expected an Err (the source or a file mapping cannot be mapped)");
        break;
      case Check.Page: {
        const want = ex.variant === "GetRegions" ? "Regions" : "Allocations";
        if (kind !== want) mismatch(`expected ${want}`);
        else {
          const why = pageProblem(want, payload, ex.req);
          if (why !== null) mismatch(`a ${want} page against ${show(payloadOf(ex.req))}: ${why}`);
        }
        break;
      }
      case Check.Marker:
        if (errno !== ENOENT || !chain[0]?.includes(hex(ex.marker!))) mismatch(`expected the sync marker's ENOENT for ${hex(ex.marker!)} (responses out of step)`, true);
        break;
    }
    if (kind === "State") {
      const s = payload as unknown as { ram: [number | bigint, number | bigint][]; freed_bytes: number | bigint };
      const ram = s.ram.reduce((n, [, size]) => n + big(size), 0n);
      const freed = big(s.freed_bytes);
      if (freed > ram || freed % BigInt(PAGE) !== 0n) mismatch(`freed_bytes ${freed} is not a whole number of pages of guest RAM (${ram} bytes)`);
    }
    this.bookkeep(conn, ex, kind, payload, v);
    ex.onResponse?.(v);
  }

  private bookkeep(conn: Conn, ex: Expect, kind: RespKind, payload: Record<string, unknown>, v: unknown): void {
    const req = ex.req as Record<string, unknown> | null;
    if (kind === "RegisterMemory" && (ex.variant === "RegisterMemory" || ex.variant === "MmapAndRegisterMemory")) {
      const id = Number(payload.region_id);
      this.regions.add(id, 1);
      this.stats.registered++;
      const dest = (req?.[ex.variant] as Record<string, unknown> | undefined)?.dest as Record<string, unknown> | undefined;
      if (dest && "GuestPhysicalAddress" in dest && Number(dest.GuestPhysicalAddress) !== id) {
        this.violate("response", `region_id ${hex(id)} is not the requested guest address ${show(dest)}`, conn, ex);
      }
      if (id % PAGE !== 0) this.violate("response", `region_id ${hex(id)} is not page aligned`, conn, ex);
    } else if (kind === "Allocated" && ex.variant === "AllocateMmio") {
      this.allocs.add(allocKey(payloadOf(req).alloc), 1);
    } else if (v === "Ok" && req !== null) {
      switch (ex.variant) {
        case "UnregisterMemory":
          this.regions.add(Number(req.UnregisterMemory), -1);
          this.stats.unregistered++;
          break;
        case "ReleaseMmio":
          this.allocs.add(allocKey(req.ReleaseMmio), -1);
          break;
        case "PrepareSharedMemoryRegion":
          this.prepared.add(allocKey(payloadOf(req).alloc), 1);
          break;
        case "IoEventRaw": {
          const e = req.IoEventRaw as Record<string, unknown>;
          const fd = ex.fds[Number(e.event)]!;
          const dm = e.datamatch;
          const [dk, dv] = typeof dm === "string" ? [dm, null] : Object.entries(dm as Record<string, unknown>)[0]!;
          const key = `${fd}|${Number(e.addr)}|${dk}|${dv === null ? "wild" : BigInt(dv as number | bigint)}`;
          this.ioevents.add(key, e.register ? 1 : -1);
          this.ioeventArgs.set(key, { fd, addr: Number(e.addr), datamatch: dm });
          break;
        }
      }
    }
  }

  // -- the loop

  private lastYield = performance.now();
  private lastReport = performance.now();
  private started = performance.now();

  async pumpUntil(done: () => boolean, what: string): Promise<void> {
    for (;;) {
      if (this.aborted !== null) throw new FuzzAbort(this.aborted);
      let progress = false;
      for (const c of this.conns) if (c.pump()) progress = true;
      if (done()) return;
      const now = performance.now();
      if (!progress) {
        for (const c of this.conns) c.updateMask();
        this.epoll.wait(10);
      }
      if (now - this.lastYield > 20) {
        await new Promise((r) => setImmediate(r));
        this.lastYield = performance.now();
        if (!this.server.alive) {
          this.aborted = `the server died (exit ${this.server.proc.exitCode}, signal ${this.server.proc.signalCode}) while ${what}`;
          this.violate("server died", `${this.aborted}\nserver log tail:\n${this.server.tail.slice(-15).join("\n")}`);
          throw new FuzzAbort(this.aborted);
        }
        for (const c of this.conns) {
          if (!c.synced && now - c.lastProgress > this.opts.stallMs) {
            this.violate("stall", `no progress for ${this.opts.stallMs} ms while ${what}`, c);
            c.reconnect();
          }
        }
        if (this.opts.progress && now - this.lastReport > 5000) {
          this.lastReport = now;
          const secs = (now - this.started) / 1000;
          this.opts.progress(
            `${this.stats.fuzzPackets} packets, ${Math.round(this.stats.fuzzPackets / secs)}/s, ${this.stats.connectionsOpened} connections, ${this.violationCount} violations`,
          );
        }
      }
    }
  }

  get violationCount(): number {
    let n = 0;
    for (const v of this.violationsByKind.values()) n += v;
    return n;
  }

  /** A request on a synced connection, answered before returning. */
  async control(conn: Conn, value: unknown, fds: number[] = []): Promise<unknown> {
    let resp: unknown;
    let answered = false;
    conn.explicit.push({ body: encode(value), fds, label: "control", onResponse: (r) => ((resp = r), (answered = true)) });
    await this.pumpUntil(() => answered, `waiting for a control request (${show(value, 80)})`);
    if (resp === undefined) throw new FuzzAbort(`control request ${show(value, 80)} lost when its connection was reset`);
    return resp;
  }

  async syncAll(what: string): Promise<void> {
    for (const c of this.conns) c.explicit.push(this.marker());
    await this.pumpUntil(() => this.conns.every((c) => c.synced && !c.closeAfterSync && !c.needsReset), what);
  }

  /**
   * Every entry of a listing, paged from 0 with `max` entries a page (null: as many as fit),
   * each page checked by the paging rules, each `from` the previous page's `next`.
   */
  private async listing(kind: "GetRegions" | "GetAllocations", max: number | null): Promise<Record<string, unknown>[]> {
    const want = kind === "GetRegions" ? "Regions" : "Allocations";
    const out: Record<string, unknown>[] = [];
    let from: number | bigint = 0;
    for (let pages = 1; ; pages++) {
      const req = { [kind]: { from, max } };
      const r = await this.control(this.conns[0]!, req);
      this.stats.pagesRead++;
      if (!isPlainMap(r) || !isPlainMap(r[want])) throw new FuzzAbort(`${show(req)} answered ${show(r)}`);
      const page = r[want] as Record<string, unknown>;
      const why = pageProblem(want, page, req);
      if (why !== null) {
        this.violate("paging", `${show(req)}: ${why}`);
        throw new FuzzAbort(`paging through ${kind} failed: ${why}`);
      }
      out.push(...((want === "Regions" ? page.regions : page.allocations) as Record<string, unknown>[]));
      if (page.next === null) return out;
      if (pages > 200_000) throw new FuzzAbort(`${kind} did not end after ${pages} pages`);
      from = page.next as number | bigint;
    }
  }

  /** GetState's list is the listing's first page (docs/protocol.md), `next` the key of the first entry it leaves out. */
  private checkFirstPage(what: string, page: Record<string, unknown>[], next: unknown, all: Record<string, unknown>[], key: string): void {
    const same = (a: unknown, b: unknown) => JSON.stringify(a, bigintJson) === JSON.stringify(b, bigintJson);
    if (page.length === 0 && all.length > 0) this.violate("paging", `GetState lists no ${what}, and ${all.length} exist`);
    if (!same(page, all.slice(0, page.length))) this.violate("paging", `GetState's ${what} are not the first page of the listing: ${show(page, 200)} vs ${show(all, 200)}`);
    const want = page.length < all.length ? big(all[page.length]![key]) : null;
    const got = next === null ? null : big(next);
    if (got !== want) this.violate("paging", `GetState's ${what}_next is ${got}, the first ${what.slice(0, -1)} it leaves out is ${want}`);
  }

  /**
   * The server's whole state, at a synced point: GetState, its listings paged through (in
   * pages as large as fit and again in small ones: the same entries), GetState's lists
   * their first pages.
   */
  async state(): Promise<State> {
    const r = await this.control(this.conns[0]!, "GetState");
    if (!isPlainMap(r) || !isPlainMap(r.State)) throw new FuzzAbort(`GetState answered ${show(r)}`);
    const st = r.State as Record<string, unknown>;
    const regions = await this.listing("GetRegions", null);
    const allocations = await this.listing("GetAllocations", null);
    this.checkFirstPage("regions", st.regions as Record<string, unknown>[], st.regions_next, regions, "region_id");
    this.checkFirstPage("allocations", st.allocations as Record<string, unknown>[], st.allocations_next, allocations, "start");
    this.stats.peakStatePage = Math.max(this.stats.peakStatePage, (st.regions as unknown[]).length);
    if (st.regions_next !== null) this.stats.statePaged++;
    const n = this.stats.pagesRead;
    const same = (a: unknown, b: unknown) => JSON.stringify(a, bigintJson) === JSON.stringify(b, bigintJson);
    const small = await this.listing("GetRegions", 1 + (n % 37));
    if (!same(small, regions)) this.violate("paging", `GetRegions in pages of ${1 + (n % 37)} lists other regions than in full pages`);
    const smallAllocs = await this.listing("GetAllocations", 1 + (n % 3));
    if (!same(smallAllocs, allocations)) this.violate("paging", `GetAllocations in pages of ${1 + (n % 3)} lists other allocations than in full pages`);
    return {
      ram: st.ram as State["ram"],
      regions: regions as unknown as RegionOut[],
      allocations: allocations as unknown as AllocationOut[],
      slots_used: st.slots_used as number,
      slots_max: st.slots_max as number,
      freed_bytes: st.freed_bytes as number | bigint,
    };
  }

  /**
   * freed_bytes (docs/protocol.md): guest RAM currently given back, a page freed twice counted
   * once, a reclaimed page not at all. Probed on a synced server with ranges it knows.
   */
  private async freedProbe(name: string, st: State): Promise<void> {
    const c = this.conns[0]!;
    const all = st.ram.map(([g, s]) => [g, s]);
    const ok = async (req: unknown) => {
      const r = await this.control(c, req);
      if (r !== "Ok") this.violate("freed_bytes", `${name}: ${show(req)} answered ${show(r)}`);
    };
    const expect = async (want: number, after: string) => {
      const r = (await this.control(c, "GetState")) as { State?: { freed_bytes: number | bigint } };
      const got = r.State === undefined ? null : big(r.State.freed_bytes);
      if (got !== BigInt(want)) this.violate("freed_bytes", `${name}: after ${after}, freed_bytes is ${got}, expected ${want}`);
    };
    const a = PAGE * (64 + ((this.stats.checkpoints * 97) % 1024));
    await ok({ DynamicallyReclaimMemoryRanges: { ranges: all } });
    await expect(0, "reclaiming all of guest RAM");
    await ok({ DynamicallyFreeMemoryRanges: { ranges: [[a, 4 * PAGE], [a + 2 * PAGE, 4 * PAGE]] } });
    await expect(6 * PAGE, "freeing two 4-page ranges that share 2 pages");
    await ok({ DynamicallyFreeMemoryRanges: { ranges: [[a, 2 * PAGE]] } });
    await expect(6 * PAGE, "freeing 2 of those pages again");
    await ok({ DynamicallyReclaimMemoryRanges: { ranges: [[a + PAGE, PAGE], [a + 5 * PAGE, 3 * PAGE]] } });
    await expect(4 * PAGE, "reclaiming 2 of the 6 pages (and 2 never freed)");
    await ok({ DynamicallyReclaimMemoryRanges: { ranges: all } });
    await expect(0, "reclaiming all of guest RAM again");
    this.stats.freedProbes++;
  }

  /**
   * MSG_CTRUNC on purpose (see the header): with the server's RLIMIT_NOFILE at its lowest
   * free descriptor, the kernel can hand it none, so every packet with descriptors arrives
   * with them cut short. An MmapAndRegisterMemory among them is refused but still answered
   * once, after its chunks (which arrive cut short too); any other such packet is EINVAL.
   * The model knows (Packet.ctrunc); a marker after them shows the answers stayed in step.
   */
  async ctruncProbe(pool: SharedPool, win: Windows): Promise<void> {
    const prlimit = ["/usr/bin/prlimit", "/bin/prlimit"].find((p) => existsSync(p));
    if (prlimit === undefined) {
      this.stats.ctrunc = "skipped: no prlimit(1)";
      return;
    }
    const pid = this.server.pid;
    const m = /^Max open files\s+(\S+)\s+(\S+)/m.exec(readFileSync(`/proc/${pid}/limits`, "utf8"));
    const shm = pool.memory.find((p) => p.kind === "memfd" && p.size >= 2 * MiB);
    const file = pool.memory.find((p) => p.kind === "memfd" && p.size === PAGE);
    if (m === null || shm === undefined || file === undefined) {
      this.stats.ctrunc = "skipped: no RLIMIT_NOFILE in /proc/PID/limits";
      return;
    }
    const [, soft, hard] = m as unknown as [string, string, string];
    const setLimit = (v: string) => Bun.spawnSync([prlimit, `--pid=${pid}`, `--nofile=${v}:${hard}`], { stderr: "pipe" }).exitCode === 0;
    const used = new Set(readdirSync(`/proc/${pid}/fd`).map(Number));
    let lowest = 0;
    while (used.has(lowest)) lowest++;
    const answers: string[] = [];
    const record = (what: string) => (r: unknown) => {
      const e = isPlainMap(r) && isPlainMap(r.Err) ? (r.Err as { errno: number | null; chain: string[] }) : null;
      answers.push(`${what}: ${e === null ? show(r, 80) : `Err ${e.errno === null ? "nil" : sys.errnoName(e.errno)} "${e.chain.at(-1)}"`}`);
    };
    const chunk = (n: number, json: boolean): Packet => {
      const list = Array.from({ length: n }, (_, i) => ({ file: i, length: PAGE, mem_offset: PAGE * i, file_offset: 0 }));
      return { body: json ? jsonBytes(list) : encode(list), fds: Array(n).fill(file.fd), label: "ctrunc:chunk", ctrunc: true };
    };
    const packets: Packet[] = [
      {
        body: encode({ MmapAndRegisterMemory: { shm: { descriptor: 0, size: shm.size }, dest: { GuestPhysicalAddress: win.mmapBase }, num_file_mappings: 300 } }),
        fds: [shm.fd],
        label: "ctrunc:mmap",
        ctrunc: true,
      },
      chunk(SCM_MAX_FD, false),
      { ...chunk(300 - SCM_MAX_FD, true), onResponse: record("MmapAndRegisterMemory (300 mappings) after its last chunk") },
      {
        body: jsonBytes({ MmapAndRegisterMemory: { shm: { descriptor: 0, size: shm.size }, dest: { GuestPhysicalAddress: win.mmapBase }, num_file_mappings: 1 } }),
        fds: [shm.fd],
        label: "ctrunc:json-mmap",
        ctrunc: true,
      },
      { ...chunk(1, false), onResponse: record("JSON MmapAndRegisterMemory (1 mapping) after its chunk") },
      { body: encode("GetState"), fds: [file.fd], label: "ctrunc:get-state", ctrunc: true, onResponse: record("GetState with a descriptor") },
      { body: jsonBytes({ UnregisterMemory: 1 }), fds: [file.fd, file.fd], label: "ctrunc:json", ctrunc: true, onResponse: record("JSON UnregisterMemory with descriptors") },
    ];
    const c = this.conns[0]!;
    if (!setLimit(String(lowest))) {
      this.stats.ctrunc = "skipped: prlimit failed";
      return;
    }
    try {
      c.explicit.push(...packets, this.marker());
      await this.pumpUntil(() => c.synced, "the MSG_CTRUNC probe");
    } finally {
      if (!setLimit(soft)) this.violate("aborted", `could not restore the server's RLIMIT_NOFILE to ${soft}`);
    }
    if (answers.length !== 4) this.violate("ctrunc", `${answers.length} of the 4 answers came: ${answers.join("; ")}`);
    this.stats.ctrunc = `ran (RLIMIT_NOFILE ${lowest} for a moment): ${answers.join("; ")}`;
  }

  async waitFds(want: number, timeoutMs = 5000): Promise<number> {
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      const n = this.server.fdCount();
      if (n === want || performance.now() > deadline) return n;
      await Bun.sleep(10);
    }
  }

  /** All connections synced: slots, descriptors and the region, allocation and arena sets agree with the model. */
  async checkpoint(name: string, baselineFds: number): Promise<State> {
    await this.syncAll(`syncing for checkpoint ${name}`);
    this.stats.checkpoints++;
    const st = await this.state();
    const kinds = (k: string) => st.regions.filter((r) => r.kind === k);
    this.stats.peakRegions = Math.max(this.stats.peakRegions, st.regions.length);
    this.stats.slotsMax = st.slots_max;
    this.stats.peakSlots = Math.max(this.stats.peakSlots, st.slots_used);
    const dynamic = kinds("dynamic");
    const prepared = kinds("prepared");
    if (st.slots_used !== st.ram.length + dynamic.length + prepared.length) {
      this.violate("slots", `${name}: slots_used ${st.slots_used} != ${st.ram.length} RAM + ${dynamic.length} dynamic + ${prepared.length} prepared`);
    }
    for (const f of kinds("fixed")) {
      const arena = prepared.find((p) => Number(p.region_id) <= Number(f.region_id) && Number(f.region_id) + Number(f.size) <= Number(p.region_id) + Number(p.size));
      if (!arena || arena.slot !== f.slot) this.violate("slots", `${name}: fixed region ${hex(Number(f.region_id))} is not inside a prepared arena with its slot`);
    }
    const fds = await this.waitFds(baselineFds + this.conns.length);
    if (fds !== baselineFds + this.conns.length) {
      this.violate("descriptors", `${name}: the server holds ${fds} descriptors, expected ${baselineFds} + ${this.conns.length} connections`);
    }
    this.reconcile(name, st);
    await this.freedProbe(name, st);
    return st;
  }

  /** Compares the server's regions, allocations and arenas with the model, then adopts the server's. */
  private reconcile(name: string, st: State): void {
    const diff = (what: string, server: string[], model: string[]) => {
      const s = new Set(server);
      const m = new Set(model);
      const extra = server.filter((x) => !m.has(x));
      const missing = model.filter((x) => !s.has(x));
      const n = extra.length + missing.length;
      if (n > this.lostStateChanging) {
        this.violate("state", `${name}: ${what} differ from what the responses said (server only: ${show(extra, 200)}; responses only: ${show(missing, 200)}; ${this.lostStateChanging} state-changing responses lost)`);
      }
      return n;
    };
    const regionIds = st.regions.filter((r) => r.kind !== "prepared").map((r) => String(Number(r.region_id)));
    diff("regions", regionIds, this.regions.positive().map(String));
    diff("allocations", st.allocations.map((a) => allocKey(a.alloc)), this.allocs.positive());
    const arenaKeys = st.regions
      .filter((r) => r.kind === "prepared")
      .map((r) => st.allocations.find((a) => Number(a.start) === Number(r.region_id)))
      .map((a) => (a ? allocKey(a.alloc) : "?"));
    diff("prepared arenas", arenaKeys, this.prepared.positive());
    // Adopt the server's view so the next interval is checked on its own.
    this.regions.m.clear();
    for (const id of regionIds) this.regions.add(Number(id), 1);
    this.allocs.m.clear();
    for (const a of st.allocations) this.allocs.add(allocKey(a.alloc), 1);
    this.prepared.m.clear();
    for (const k of arenaKeys) this.prepared.add(k, 1);
    this.lostStateChanging = 0;
  }

  /** Unregisters every region, ioevent and allocation the fuzz left (arenas are permanent). */
  async cleanup(st: State): Promise<void> {
    const c = this.conns[0]!;
    for (const r of st.regions) {
      if (r.kind === "prepared") continue;
      const resp = await this.control(c, { UnregisterMemory: r.region_id });
      if (resp !== "Ok") this.violate("cleanup", `UnregisterMemory ${hex(Number(r.region_id))} of a region GetState listed: ${show(resp)}`);
    }
    for (const key of this.ioevents.positive()) {
      const a = this.ioeventArgs.get(key)!;
      const resp = await this.control(c, { IoEventRaw: { event: 0, addr: a.addr, datamatch: a.datamatch, register: false } }, [a.fd]);
      if (resp !== "Ok" && this.lostIoevents === 0) this.violate("cleanup", `deregistering ioevent ${key}, registered by an Ok: ${show(resp)}`);
    }
    const arenaStarts = new Set(st.regions.filter((r) => r.kind === "prepared").map((r) => Number(r.region_id)));
    for (const a of st.allocations) {
      const key = allocKey(a.alloc);
      if (arenaStarts.has(Number(a.start)) || INITIAL_ALLOCS.get(key) === Number(a.size)) continue;
      const resp = await this.control(c, { ReleaseMmio: a.alloc });
      if (resp !== "Ok") this.violate("cleanup", `ReleaseMmio ${key} (no region uses it): ${show(resp)}`);
    }
  }
}

// ---- running it ---------------------------------------------------------------------

export async function runFuzz(options: FuzzOptions): Promise<FuzzReport> {
  const opts = {
    ...options,
    window: options.window ?? 64,
    checkpoints: options.checkpoints ?? Math.max(1, Math.floor(options.packets / 100_000)),
    stallMs: options.stallMs ?? 30_000,
  };
  const t0 = performance.now();
  const server = await FuzzServer.start(opts.binary, opts.serverArgs ?? FUZZ_SERVER_ARGS);
  // The start-up probe connection's disconnect: let it be processed before counting.
  await Bun.sleep(100);
  const base = { fds: server.fdCount(), maps: null as MapsCount | null };
  const pool = new SharedPool();
  base.maps = server.maps(pool.dir);
  const bits = server.physBits;
  const regBase = 2 ** Math.min(38, bits - 2);
  const win: Windows = { regBase, mmapBase: regBase + GiB };
  const engine = new Engine(server, { ...opts, window: opts.window, checkpoints: opts.checkpoints, stallMs: opts.stallMs });
  const gens: SlotGen[] = [];
  let final: State | null = null;
  let serverExit: number | string | null = null;
  let finalFds = -1;
  let finalMaps: MapsCount | null = null;
  try {
    for (let slot = 0; slot < opts.connections; slot++) {
      const gen = new SlotGen(opts.seed, slot, pool, win);
      gens.push(gen);
      const conn = new Conn(engine, slot, gen, opts.window);
      engine.conns.push(conn);
      conn.open();
    }
    const quota = (slot: number) => Math.floor(opts.packets / opts.connections) + (slot < opts.packets % opts.connections ? 1 : 0);
    const phases = opts.checkpoints + 1;
    for (let phase = 1; phase <= phases; phase++) {
      for (const c of engine.conns) c.target = Math.floor((quota(c.slot) * phase) / phases);
      engine.fuzzing = true;
      await engine.pumpUntil(() => engine.conns.every((c) => c.sent >= c.target && !c.gen.inSequence), `fuzzing (phase ${phase} of ${phases})`);
      engine.fuzzing = false;
      if (phase < phases) await engine.checkpoint(`checkpoint ${phase}`, base.fds);
    }
    const before = await engine.checkpoint("end of fuzzing", base.fds);
    engine.stats.final.regionsBeforeCleanup = before.regions.filter((r) => r.kind !== "prepared").length;
    await engine.cleanup(before);
    await engine.ctruncProbe(pool, win);
    final = await engine.state();
    const left = final.regions.filter((r) => r.kind !== "prepared");
    const prepared = final.regions.filter((r) => r.kind === "prepared");
    if (left.length > 0) engine.violate("cleanup", `regions left after unregistering everything: ${show(left)}`);
    if (final.slots_used !== final.ram.length + prepared.length) {
      engine.violate("slots", `after cleanup slots_used ${final.slots_used} != ${final.ram.length} RAM + ${prepared.length} prepared arenas`);
    }
    for (const c of engine.conns) c.shutdown();
    finalFds = await engine.waitFds(base.fds);
    if (finalFds !== base.fds) engine.violate("descriptors", `after closing every connection the server holds ${finalFds} descriptors, ${base.fds} right after start`);
    finalMaps = server.maps(pool.dir);
    const arenaBytes = prepared.reduce((s, r) => s + Number(r.size), 0);
    const b = base.maps!;
    if (finalMaps.fuzzMemfd !== 0 || finalMaps.fuzzFile !== 0) {
      engine.violate("mappings", `${finalMaps.fuzzMemfd} mappings of the fuzzer's memfds and ${finalMaps.fuzzFile} of its files remain with no region registered`);
    }
    if (finalMaps.anonReadOnlyBytes !== b.anonReadOnlyBytes + arenaBytes || finalMaps.anonReadOnly > b.anonReadOnly + prepared.length) {
      engine.violate("mappings", `anonymous read-only mappings: ${finalMaps.anonReadOnly} (${finalMaps.anonReadOnlyBytes} bytes), expected ${b.anonReadOnly} (${b.anonReadOnlyBytes} bytes) at start + ${prepared.length} prepared arenas (${arenaBytes} bytes)`);
    }
    if (finalMaps.guestRam !== b.guestRam) engine.violate("mappings", `guest RAM mappings ${b.guestRam} -> ${finalMaps.guestRam}`);
    // The runtime's own heap grows a little; vmemd's mappings were all counted exactly above.
    if (finalMaps.lines > b.lines + prepared.length + RUNTIME_MAPS_SLACK) {
      engine.violate("mappings", `${finalMaps.lines} mappings, ${b.lines} at start + ${prepared.length} arenas (+${RUNTIME_MAPS_SLACK} allowed for the JS heap)`);
    }
  } catch (e) {
    if (!(e instanceof FuzzAbort)) throw e;
    if (!engine.violationsByKind.has("server died")) engine.violate("aborted", e.message);
  } finally {
    engine.stats.durationMs = performance.now() - t0;
    for (const c of engine.conns) c.shutdown();
    engine.epoll.close();
    const wasAlive = server.alive;
    serverExit = await server.stop();
    if (wasAlive && serverExit !== 0) engine.violate("exit", `SIGTERM: the server exited with ${serverExit}, not 0\n${server.tail.slice(-10).join("\n")}`);
    for (const g of gens) g.close();
    pool.close();
  }
  const s = engine.stats;
  s.digest = engine.conns.map((c) => c.digest.toString(16).padStart(8, "0")).join("-");
  s.final = {
    ...s.final,
    baselineFds: base.fds,
    finalFds,
    baselineMaps: base.maps,
    finalMaps,
    slotsUsed: final?.slots_used,
    ramSlots: final?.ram.length,
    preparedArenas: final?.regions.filter((r) => r.kind === "prepared").length,
    allocations: final?.allocations.map((a) => `${allocKey(a.alloc)}@${hex(Number(a.start))}+${hex(Number(a.size))}`),
    serverExit,
    serverWarnings: server.warningCount,
  };
  const report: FuzzReport = {
    ok: engine.violationCount === 0,
    violations: engine.violations,
    violationCount: engine.violationCount,
    violationsByKind: Object.fromEntries(engine.violationsByKind),
    distinct: [...engine.signatures].map(([sig, v]) => [sig, v.count] as [string, number]),
    stats: s,
    text: "",
  };
  report.text = formatReport(opts, report, server);
  return report;
}

/** Mappings the Bun runtime may add over a run (JS heap growth); vmemd's own are counted exactly. */
const RUNTIME_MAPS_SLACK = 32;

function formatReport(opts: FuzzOptions, r: FuzzReport, server: FuzzServer): string {
  const s = r.stats;
  const f = s.final as Record<string, unknown> & { baselineMaps: MapsCount | null; finalMaps: MapsCount | null };
  const secs = s.durationMs / 1000;
  const sortDesc = (m: Map<string, number>) => [...m].sort((a, b) => b[1] - a[1]).map(([k, v]) => `${k} ${v}`).join(", ");
  const total = [...s.responses.values()].reduce((a, b) => a + b, 0);
  const mapsLine = (m: MapsCount | null) =>
    m ? `${m.lines} lines (fuzz memfd ${m.fuzzMemfd}, fuzz file ${m.fuzzFile}, anon read-only ${m.anonReadOnly} = ${m.anonReadOnlyBytes / MiB} MiB, guest RAM ${m.guestRam})` : "n/a";
  const lines = [
    `vmemd fuzz: seed ${opts.seed}, ${s.fuzzPackets} fuzz packets (+${s.syncPackets} sync/control) over ${opts.connections} connection slots, ${s.connectionsOpened} connections opened (${s.abruptDisconnects} abrupt and ${s.gracefulDisconnects} orderly reconnects)`,
    `packet stream digest (per slot; equal for equal seeds): ${s.digest}`,
    `duration ${secs.toFixed(1)} s: ${Math.round(s.fuzzPackets / secs)} packets/s, ${Math.round(total / secs)} responses/s`,
    `responses ${total}: ${sortDesc(s.responses)}`,
    `  Err by errno: ${sortDesc(s.errnos)}`,
    `  absorbed as MmapAndRegisterMemory chunks: ${s.absorbed}; lost in abrupt disconnects: ${s.lostResponses}`,
    `  regions registered ${s.registered}, unregistered by the fuzz ${s.unregistered}, left at the end ${f.regionsBeforeCleanup ?? "?"} (unregistered by cleanup)`,
    `checkpoints: ${s.checkpoints} (at most ${s.peakRegions} regions and ${s.peakSlots} of ${s.slotsMax} slots live at one)`,
    `well-formed requests (by the model): ${s.wellFormed}; JSON: ${s.jsonPackets} packets (${s.jsonWellFormed} well-formed requests), ${s.jsonResponses} answers in JSON`,
    `paging: ${s.pagesRead} GetRegions/GetAllocations pages read at checkpoints; GetState's first page held at most ${s.peakStatePage} regions (${s.statePaged} checkpoints needed more pages); freed_bytes probes ${s.freedProbes}`,
    `MSG_CTRUNC probe: ${s.ctrunc}`,
    `server descriptors: ${f.baselineFds} right after start -> ${f.finalFds} at the end`,
    `server mappings: start ${mapsLine(f.baselineMaps)}`,
    `                 end   ${mapsLine(f.finalMaps)}`,
    `slots_used ${f.slotsUsed} = ${f.ramSlots} RAM + ${f.preparedArenas} prepared arenas; allocations: ${(f.allocations as string[] | undefined)?.join(", ") ?? "n/a"}`,
    `server exit on SIGTERM: ${f.serverExit}; server WARN/ERROR log lines: ${f.serverWarnings}`,
  ];
  if (s.abandonedByCount > 0) lines.push(`connections hung up on after an absurd num_file_mappings: ${s.abandonedByCount}`);
  if (s.sendRefused.size > 0) lines.push(`packets the kernel refused to send (not counted): ${sortDesc(s.sendRefused)}`);
  if (server.warnings.length > 0) lines.push("first server warnings:", ...server.warnings.slice(0, 5).map((l) => "  " + l));
  lines.push(`violations: ${r.violationCount}${r.violationCount ? " (" + Object.entries(r.violationsByKind).map(([k, v]) => `${k} ${v}`).join(", ") + ")" : ""}`);
  if (r.distinct.length > 0) lines.push("distinct violations:", ...r.distinct.map(([sig, n]) => `  ${n} x ${sig}`));
  const shown = new Set<string>();
  for (const v of r.violations) {
    // One example of each distinct violation, with the packet that caused it.
    const sig = `${v.kind}: ${v.detail.replace(/0x[0-9a-f]+|\d+/gi, "N").slice(0, 160)}`;
    if (shown.has(sig) || shown.size >= 12) continue;
    shown.add(sig);
    lines.push(`- [${v.kind}] ${v.detail}`);
    if (v.context) lines.push(v.context.split("\n").map((l) => "    " + l).join("\n"));
  }
  return lines.join("\n");
}
