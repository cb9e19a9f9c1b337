// The fuzz engine of issue 6, shared by scripts/fuzz.ts (the long run) and
// test/fuzz.test.ts (a short run under `bun test`).
//
// It spawns the compiled server, opens several pipelined connections and sends
// packets that are valid requests of every variant, the same with fields swapped,
// dropped, oversized, negative, mistyped or renamed, byte-mutated packets, random
// bytes and MessagePack garbage, MmapAndRegisterMemory sequences (complete, abandoned,
// broken by a bad chunk), with descriptors of every kind attached at random indices.
//
// Accounting is exact: a small model of the server's per-connection state (is an
// MmapAndRegisterMemory waiting for chunks, and how many) written from PROTOCOL.md and
// docs/protocol.md, independent of src/protocol, says which packets get a response.
// Every response is matched to its packet in order and checked: well formed, of a
// kind its request may get, EINVAL for malformed input. The regions, allocations and
// ioevents the server reports are tracked from the responses, so at checkpoints and at
// the end the server's descriptors, mappings and slots can be compared with exactly what
// its live state needs.
//
// Deterministic from the seed: every connection slot draws from its own PRNG, never from
// server feedback, so each slot's packet sequence is a function of (seed, slot); the
// summary prints a digest of each slot's stream to show it.
//
// The model assumes the server's defaults for the limits it could hit: 65536-byte bodies,
// 253 descriptors, --max-file-mappings 65536. Valid destinations come from small address
// windows, so live regions stay at a few hundred: far below --max-regions-per-connection
// (16384) and the KVM slot limit, and few enough that a State still fits one packet
// (GetState answers EMSGSIZE from roughly 1,400 regions on).
import { Decoder, Encoder, ExtData } from "@msgpack/msgpack";
import { mkdtempSync, readFileSync, readlinkSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Subprocess } from "bun";
import * as sys from "../src/sys";

// ---- constants ---------------------------------------------------------------

export const MAX_PACKET = 65536; // PROTOCOL.md: body size at most 65536 bytes
const SCM_MAX_FD = 253;
const PAGE = 4096;
const MiB = 1 << 20;
const GiB = 1024 * MiB;
const RAM_SIZE = 64 * MiB;
/** docs/protocol.md: the default --max-file-mappings. */
const MAX_FILE_MAPPINGS = 65536n;
const U64_MAX = 2n ** 64n - 1n;
const EINVAL = 22;
const ENOENT = 2;
const CHUNK_ABORT = "failed to mmap and register memory";

type Alloc = Record<string, unknown>;
const BAR_A: Alloc = { PciBar: { bus: 0, dev: 5, func: 0, bar: 2 } };
const BAR_B: Alloc = { PciBar: { bus: 0, dev: 6, func: 0, bar: 0 } };
export const FUZZ_SERVER_ARGS = ["--memory", "64M", "--pci-bar", "00:05.0/2=16M", "--pci-bar", "00:06.0/0=1M"];
const INITIAL_ALLOCS = new Map<string, number>([
  [allocKey(BAR_A), 16 * MiB],
  [allocKey(BAR_B), 1 * MiB],
]);
/** Allocations the fuzzer allocates, releases and prepares (a small set, so state repeats). */
const ALLOC_SET: Alloc[] = [
  BAR_A,
  BAR_B,
  { PciBar: { bus: 1, dev: 0, func: 0, bar: 0 } },
  { PciBar: { bus: 1, dev: 0, func: 0, bar: 1 } },
  { PciBar: { bus: 1, dev: 1, func: 0, bar: 0 } },
  { PciBar: { bus: 2, dev: 31, func: 7, bar: 5 } },
  { Anon: 1 },
  { Anon: 2 },
  { PmemDevice: 0 },
  { FileBacked: 7 },
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
  "AllocateMmio",
  "ReleaseMmio",
] as const;
const MAP_VARIANTS = new Set<string>(VARIANTS.filter((v) => v !== "GetState"));
/** Names the mutator draws keys and strings from: every name of PROTOCOL.md, and a few hostile ones. */
const NAMES = [
  ...VARIANTS,
  "alloc", "cache", "source", "dest", "prot", "shm", "num_file_mappings", "ranges", "size", "event", "addr",
  "datamatch", "register", "descriptor", "offset", "handle_type", "memory_idx", "device_uuid", "driver_uuid",
  "ptr", "allocation", "read", "write", "file", "length", "mem_offset", "file_offset", "bus", "dev", "func",
  "bar", "align", "Anon", "PciBar", "PmemDevice", "FileBacked", "SharedMemory", "Descriptor", "Vulkan",
  "ExternalMapping", "ExistingAllocation", "GuestPhysicalAddress", "CacheCoherent", "CacheNonCoherent",
  "AnyLength", "U8", "U16", "U32", "U64", "Ok", "Err", "State", "Allocated", "errno", "chain", "file_mappings",
  "registermemory", "GETSTATE", "GetState ", "", "constructor", "toString", "hasOwnProperty", "valueOf",
  "__proto__", "prototype", "length", "then",
];
/** Keys every JS object inherits: a server that looks variants up in a plain object must still say EINVAL. */
const INHERITED = ["constructor", "toString", "hasOwnProperty", "valueOf", "isPrototypeOf", "toLocaleString", "__defineGetter__", "propertyIsEnumerable"];
const INTERESTING: (number | bigint)[] = [
  0, 1, 2, 7, 255, 256, 4095, 4096, 4097, 8192, 65535, 65536, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, 2 ** 32,
  2 ** 32 + 4096, 2 ** 52, 2 ** 53 - 1, 2n ** 53n, 2n ** 53n + 1n, 2n ** 63n - 1n, 2n ** 63n, U64_MAX, -1, -4096,
  -(2 ** 31), -(2n ** 63n), 1.5, -0.5, Number.NaN, Number.POSITIVE_INFINITY, Number.NEGATIVE_INFINITY, 1e300, -0,
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

function allocKey(alloc: unknown): string {
  const a = alloc as Record<string, unknown>;
  if ("PciBar" in a) {
    const b = a.PciBar as Record<string, unknown>;
    return `PciBar:${b.bus}:${b.dev}:${b.func}:${b.bar}`;
  }
  const [k, v] = Object.entries(a)[0]!;
  return `${k}:${v}`;
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
/** An unsigned integer of any MessagePack width up to `max` (as @msgpack/msgpack decodes it: a safe number or a bigint). */
function isUint(v: unknown, max: bigint): boolean {
  if (typeof v === "number") return Number.isSafeInteger(v) && v >= 0 && BigInt(v) <= max;
  return typeof v === "bigint" && v >= 0n && v <= max;
}
const isU64 = (v: unknown) => isUint(v, U64_MAX);
const isFdIndex = (v: unknown) => isUint(v, 252n);

function isAlloc(v: unknown): boolean {
  if (hasKeys(v, ["Anon"])) return isU64(v.Anon);
  if (hasKeys(v, ["PmemDevice"])) return isU64(v.PmemDevice);
  if (hasKeys(v, ["FileBacked"])) return isU64(v.FileBacked);
  if (hasKeys(v, ["PciBar"])) {
    const b = v.PciBar;
    return hasKeys(b, ["bus", "dev", "func", "bar"]) && [b.bus, b.dev, b.func, b.bar].every((x) => isUint(x, 255n));
  }
  return false;
}
function isDestination(v: unknown): boolean {
  if (hasKeys(v, ["GuestPhysicalAddress"])) return isU64(v.GuestPhysicalAddress);
  if (hasKeys(v, ["ExistingAllocation"])) {
    const e = v.ExistingAllocation;
    return hasKeys(e, ["allocation", "offset"]) && isAlloc(e.allocation) && isU64(e.offset);
  }
  return false;
}

/** Descriptor indices reference every attached descriptor exactly once (PROTOCOL.md). */
function indicesExact(indices: unknown[], nfds: number): boolean {
  if (indices.length !== nfds) return false;
  const used = new Uint8Array(nfds);
  for (const i of indices) {
    const n = Number(i);
    if (n >= nfds || used[n]++ !== 0) return false;
  }
  return true;
}

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

const bigintJson = (_k: string, v: unknown) => (typeof v === "bigint" ? `${v}n` : v instanceof Uint8Array ? `bin(${v.length})` : v);
function show(v: unknown, max = 300): string {
  let s: string;
  try {
    s = JSON.stringify(v, bigintJson) ?? String(v);
  } catch {
    s = String(v);
  }
  return s.length > max ? s.slice(0, max) + "…" : s;
}
function hexHead(b: Uint8Array, n = 48): string {
  return Buffer.from(b.subarray(0, n)).toString("hex") + (b.length > n ? "…" : "");
}

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
  size: number;
}
const MEMFD_NAME = "vmemd-fuzz";
const VALID_SIZES = [PAGE, 2 * PAGE, 4 * PAGE, 64 * 1024, MiB, 2 * MiB];
const O_PATH = 0o10000000;
const F_SEAL_WRITE = 0x0008;

function memfd(size: number, flags = sys.MFD_CLOEXEC | sys.MFD_ALLOW_SEALING, name = MEMFD_NAME): PoolFd {
  const fd = sys.memfdCreate(name, flags);
  sys.ftruncate(fd, size);
  return { fd, kind: flags & sys.MFD_ALLOW_SEALING ? "memfd" : "memfd-unsealable", size };
}

/** Descriptors every slot may attach: memory sources of useful sizes, and one or more of every other kind. */
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
}
interface Packet {
  body: Uint8Array;
  fds: number[];
  label: string;
  check?: Check;
  errno?: number;
  marker?: number;
  onResponse?: (resp: unknown) => void;
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
const REG_SLOTS = 128;
const MMAP_SLOTS = 16;
const IOEVENT_BASE = 0xe000_0000;

const encoder = new Encoder({ useBigInt64: true, initialBufferSize: 4096 });
function encode(v: unknown): Uint8Array {
  return encoder.encode(v).slice();
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
      [7, () => PAGE * r.range(1, 512)],
    ])();
  }

  // -- descriptors

  private validMemfd(minSize = PAGE): PoolFd {
    const ok = this.pool.memory.filter((p) => p.size >= minSize);
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
  private nonMemoryFd(): PoolFd {
    return this.rng.pick(this.pool.hostile.filter((p) => !p.kind.startsWith("memfd") || p.size % PAGE !== 0));
  }

  // -- values

  /** A valid u64 (any width on the wire), often a boundary. */
  private u64ish(): number | bigint {
    const r = this.rng;
    return r.weighted<() => number | bigint>([
      [4, () => r.int(1 << 20)],
      [2, () => PAGE * r.int(1 << 16)],
      [2, () => r.pick(INTERESTING.filter((v) => isU64(v)))],
      [1, () => r.u64()],
    ])();
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

  private regionDest(size: number): { dest: unknown; gpa: number | null } {
    const r = this.rng;
    return r.weighted<() => { dest: unknown; gpa: number | null }>([
      [6, () => {
        const gpa = this.win.regBase + 4 * MiB * r.int(REG_SLOTS);
        return { dest: { GuestPhysicalAddress: gpa }, gpa };
      }],
      // 64 and 16 places in the BARs (a State listing thousands of regions no longer fits a packet).
      [3, () => ({ dest: { ExistingAllocation: { allocation: BAR_A, offset: 256 * 1024 * r.int(64) } }, gpa: null })],
      [1, () => ({ dest: { ExistingAllocation: { allocation: BAR_B, offset: 64 * 1024 * r.int(16) } }, gpa: null })],
      [0.5, () => {
        const gpa = RAM_SIZE + 8 * MiB * r.int(256); // below the PCI hole, above RAM
        return { dest: { GuestPhysicalAddress: gpa }, gpa };
      }],
    ])();
  }

  private registerMemory(randomSource: boolean): Built {
    const r = this.rng;
    const m = randomSource ? r.pick(this.randomMemfds) : this.validMemfd();
    let source: unknown;
    let size: number;
    if (randomSource) {
      size = r.chance(0.5) ? m.size : PAGE * r.range(0, 4);
      source = { SharedMemory: { descriptor: 0, size } };
    } else if (r.chance(0.7)) {
      size = m.size;
      source = { SharedMemory: { descriptor: 0, size } };
    } else {
      const pages = m.size / PAGE;
      const len = r.range(1, pages);
      size = len * PAGE;
      source = { Descriptor: { descriptor: 0, offset: PAGE * r.int(pages - len + 1), size } };
    }
    const { dest, gpa } = this.regionDest(size);
    if (gpa !== null) this.remember(gpa);
    const value = { RegisterMemory: { source, dest, prot: { read: true, write: r.chance(0.5) }, cache: r.pick(["CacheCoherent", "CacheNonCoherent"]) } };
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

  private valid(): Built {
    const r = this.rng;
    const kind = r.weighted<string>([
      [25, "RegisterMemory"],
      [6, "RegisterRandomSource"],
      [20, "UnregisterMemory"],
      [8, "GetState"],
      [5, "BalloonTargetReached"],
      [5, "DynamicallyFreeMemoryRanges"],
      [5, "DynamicallyReclaimMemoryRanges"],
      [8, "IoEventRaw"],
      [4, "PrepareSharedMemoryRegion"],
      [4, "AllocateMmio"],
      [3, "ReleaseMmio"],
      [3, "MmapNoFiles"],
      [2, "ExternalMapping"],
      [2, "Vulkan"],
    ]);
    switch (kind) {
      case "RegisterMemory":
        return this.registerMemory(false);
      case "RegisterRandomSource":
        return this.registerMemory(true);
      case "UnregisterMemory": {
        const own = this.ownRegions.length > 0 && r.chance(0.85);
        const id = own ? this.ownRegions.splice(r.int(this.ownRegions.length), 1)[0]! : this.u64ish();
        return { value: { UnregisterMemory: id }, fds: [], variant: kind };
      }
      case "GetState":
        return { value: "GetState", fds: [], check: Check.State, variant: kind };
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
        const size = "PciBar" in alloc ? PAGE * 2 ** r.weighted([[10, r.int(15)], [1, r.range(16, 18)]]) : PAGE * r.range(1, 4096);
        const align = r.chance(0.5) ? null : PAGE * 2 ** r.int(9);
        return { value: { AllocateMmio: { alloc, size, align } }, fds: [], variant: kind };
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
      case "ExternalMapping": {
        const value = { RegisterMemory: { source: { ExternalMapping: { ptr: this.u64ish(), size: PAGE } }, dest: this.regionDest(PAGE).dest, prot: { read: true, write: true }, cache: "CacheCoherent" } };
        return { value, fds: [], check: Check.Errno, errno: sys.Errno.EPERM, variant: "RegisterMemory" };
      }
      default: {
        const uuid = () => r.bytes(16);
        const vk = { descriptor: 0, handle_type: r.u32(), memory_idx: r.int(16), device_uuid: uuid(), driver_uuid: uuid(), size: PAGE };
        const value = { RegisterMemory: { source: { Vulkan: vk }, dest: this.regionDest(PAGE).dest, prot: { read: true, write: true }, cache: "CacheCoherent" } };
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
        [5, "number"], [3, "fdindex"], [1, "grow"], [3, "variant"], [1, "inherited"],
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
          if (c.length > 0) c[0] = r.u32() & 0xff;
          return c;
        }],
      ])();
    }
    return b;
  }

  // -- MmapAndRegisterMemory sequences

  private mapping(shmPages: number, files: number[]): Record<string, unknown> {
    const r = this.rng;
    const f = this.validMemfd();
    const filePages = f.size / PAGE;
    const pages = r.range(1, Math.min(4, filePages, shmPages));
    files.push(f.fd);
    return {
      file: files.length - 1,
      length: pages * PAGE,
      mem_offset: PAGE * r.int(shmPages - pages + 1),
      file_offset: PAGE * r.int(filePages - pages + 1),
    };
  }

  private badMapping(shmPages: number, files: number[]): Record<string, unknown> {
    const r = this.rng;
    const m = this.mapping(shmPages, files);
    r.weighted<() => void>([
      [2, () => { m.mem_offset = (m.mem_offset as number) + r.range(1, PAGE - 1); }],
      [2, () => { m.length = (shmPages + 1) * PAGE; }],
      [1, () => { m.length = 0; }],
      [2, () => { m.file_offset = 64 * MiB; }],
      [3, () => { files[files.length - 1] = this.nonMemoryFd().fd; }],
      [1, () => { m.mem_offset = r.pick(INTERESTING); }],
    ])();
    return m;
  }

  private chunkPacket(mappings: Record<string, unknown>[], files: number[], label: string): Action {
    return { packet: { body: encode(mappings), fds: files, label } };
  }

  private badChunk(remaining: number, shmPages: number): Action {
    const r = this.rng;
    const label = "mmap-seq:bad-chunk";
    const files: number[] = [];
    const ms = (n: number) => Array.from({ length: n }, () => this.mapping(shmPages, files));
    return r.weighted<() => Action>([
      [2, () => ({ packet: { body: encode(ms(1)[0]), fds: files, label } })],
      [1, () => ({ packet: { body: encode([]), fds: [], label } })],
      [1, () => {
        const list = ms(Math.min(SCM_MAX_FD, 254));
        list.push({ ...list[0]!, file: 253 });
        return { packet: { body: encode(list), fds: files, label } };
      }],
      [2, () => (remaining + 1 <= SCM_MAX_FD ? this.chunkPacket(ms(remaining + 1), files, label) : { packet: { body: encode(ms(1)), fds: [], label } })],
      [2, () => {
        const list = ms(Math.min(remaining, r.range(1, 4)));
        const m = list[r.int(list.length)]!;
        r.weighted<() => void>([
          [1, () => delete m.file_offset],
          [1, () => (m.extra = 1)],
          [1, () => (m.length = "4096")],
          [1, () => (m.mem_offset = -PAGE)],
          [1, () => (m.length = 2n ** 64n - 1n)],
        ])();
        return this.chunkPacket(list, files, label);
      }],
      [3, () => {
        const list = ms(Math.min(remaining, r.range(1, 4)));
        r.weighted<() => void>([
          [1, () => (list[0]!.file = files.length)],
          [1, () => files.push(this.anyFd().fd)],
          [1, () => files.pop()],
          [1, () => { if (list.length > 1) list[1]!.file = list[0]!.file; else files.push(files[0]!); }],
        ])();
        return this.chunkPacket(list, files, label);
      }],
      [1, () => ({ packet: { body: r.bytes(MAX_PACKET + r.range(1, 20000)), fds: [], label: "mmap-seq:oversized-chunk" } })],
      [1, () => ({ packet: { body: new Uint8Array(0), fds: [], label: "mmap-seq:empty-chunk" } })],
      [1, () => ({ packet: { body: r.bytes(r.range(1, 64)), fds: r.chance(0.5) ? [this.anyFd().fd] : [], label } })],
    ])();
  }

  /** Queues an MmapAndRegisterMemory and its chunks: complete, broken, interrupted, abandoned or absurd. */
  private mmapSequence(): Action {
    const r = this.rng;
    const shm = this.validMemfd(16 * PAGE);
    const pages = shm.size / PAGE;
    const gpa = this.win.mmapBase + 4 * MiB * r.int(MMAP_SLOTS);
    const dest = r.chance(0.93) ? { GuestPhysicalAddress: gpa } : { ExistingAllocation: { allocation: BAR_A, offset: PAGE * r.int(16) } };
    const start = (count: number | bigint, label: string, check?: Check) =>
      ({ packet: { body: encode({ MmapAndRegisterMemory: { shm: { descriptor: 0, size: shm.size }, dest, num_file_mappings: count } }), fds: [shm.fd], label, check } }) as Action;
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
        const list = Array.from({ length: Math.min(left, SCM_MAX_FD) }, () => this.mapping(pages, files));
        this.seq.push(this.chunkPacket(list, files, "mmap-seq:refused-chunk"));
      }
      return start(count, "mmap-seq:too-many-mappings");
    }
    const count = r.chance(0.85) ? r.range(1, Math.min(pages, 24)) : r.range(1, Math.min(pages, 600));
    const fate = r.weighted<string>([
      [60, "complete"],
      [15, "bad-chunk"],
      [5, "interrupted"],
      [8, "abandoned"],
      [12, "exec-fail"],
    ]);
    const sizes: number[] = [];
    for (let left = count; left > 0; ) {
      const n = Math.min(left, r.chance(0.5) ? SCM_MAX_FD : r.range(1, SCM_MAX_FD));
      sizes.push(n);
      left -= n;
    }
    const at = r.int(sizes.length);
    const actions: Action[] = [start(count, `mmap-seq:${fate}`)];
    let remaining = count;
    for (let i = 0; i < sizes.length; i++) {
      if (i === at && fate === "bad-chunk") {
        // A client does not know the server failed the request: it sends the rest too.
        actions.push(this.badChunk(remaining, pages));
        remaining -= sizes[i]!;
        continue;
      }
      if (i === at && fate === "interrupted") {
        const v = this.valid();
        actions.push({ packet: { body: encode(v.value), fds: v.fds, label: "mmap-seq:interrupting-request" } });
        break;
      }
      if (i === at && fate === "abandoned") {
        actions.push({ disconnect: "abrupt" });
        break;
      }
      const files: number[] = [];
      const list = Array.from({ length: sizes[i]! }, (_, j) =>
        fate === "exec-fail" && i === at && j === 0 ? this.badMapping(pages, files) : this.mapping(pages, files),
      );
      actions.push(this.chunkPacket(list, files, `mmap-seq:chunk`));
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
    switch (kind) {
      case "valid": {
        const v = this.valid();
        return { packet: { body: encode(v.value), fds: v.fds, label: `valid:${v.variant}`, check: v.check, errno: v.errno } };
      }
      case "mutated": {
        const v = this.valid();
        return { packet: { body: this.fit(encode(this.mutate(v.value))), fds: this.attach(v.fds), label: `mutated:${v.variant}` } };
      }
      case "bytes": {
        const v = this.valid();
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
        return { packet: { body, fds: r.chance(0.2) ? this.attach([]) : [], label: "random-bytes" } };
      }
      case "junk":
        return { packet: { body: encode(this.junk()), fds: r.chance(0.2) ? [this.anyFd().fd] : [], label: "junk" } };
      case "mmap-seq":
        return this.mmapSequence();
      case "inherited": {
        const v = r.pick(INHERITED);
        const body = encode(r.chance(0.8) ? { [v]: this.junk(2) } : v);
        return { packet: { body, fds: [], label: "inherited-name", check: Check.Einval } };
      }
      case "abrupt":
        return { disconnect: "abrupt" };
      case "graceful":
        return { disconnect: "graceful" };
      default:
        return { packet: this.weird() };
    }
  }

  /** Boundaries: 65535/65536/65537-byte packets, empty, descriptors only, deep nesting, 253 descriptors. */
  private weird(): Packet {
    const r = this.rng;
    return r.weighted<() => Packet>([
      [3, () => {
        const size = r.pick([MAX_PACKET - 1, MAX_PACKET, MAX_PACKET + 1]);
        return { body: reclaimOfExactly(size), fds: [], label: `boundary-${size}`, check: size > MAX_PACKET ? Check.Einval : Check.Ok };
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
      [1, () => ({ body: encode("GetState"), fds: Array.from({ length: SCM_MAX_FD }, () => this.anyFd().fd), label: "253-unreferenced-fds", check: Check.Einval })],
    ])();
  }
}

/**
 * A valid DynamicallyReclaimMemoryRanges of exactly `size` bytes, hand-encoded (PROTOCOL.md: a body
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

// ---- the server model: which packets get a response, and what it may be ----------

const oracleDecoder = new Decoder({ useBigInt64: true, maxStrLength: MAX_PACKET, maxBinLength: MAX_PACKET });
const responseDecoder = new Decoder({ useBigInt64: true, maxStrLength: MAX_PACKET, maxBinLength: MAX_PACKET });

function decodeOrUndefined(body: Uint8Array): { value: unknown } | undefined {
  try {
    return { value: oracleDecoder.decode(body) };
  } catch {
    return undefined;
  }
}

/** A valid MmapAndRegisterMemory request packet (schema and descriptors): its count and shm size; else null. */
function mmapStart(value: Record<string, unknown>, nfds: number): { count: bigint; size: bigint } | null {
  const p = value.MmapAndRegisterMemory;
  if (!hasKeys(p, ["shm", "dest", "num_file_mappings"])) return null;
  const shm = p.shm;
  if (!hasKeys(shm, ["descriptor", "size"]) || !isFdIndex(shm.descriptor) || !isU64(shm.size)) return null;
  if (!isDestination(p.dest) || !isU64(p.num_file_mappings)) return null;
  if (!indicesExact([shm.descriptor], nfds)) return null;
  return { count: BigInt(p.num_file_mappings as number | bigint), size: BigInt(shm.size as number | bigint) };
}

/** A valid follow-up chunk: how many mappings it carries; else null. */
function chunkLength(value: unknown, nfds: number): number | null {
  if (!Array.isArray(value) || value.length < 1 || value.length > SCM_MAX_FD) return null;
  for (const m of value) {
    if (!hasKeys(m, ["file", "length", "mem_offset", "file_offset"])) return null;
    if (!isFdIndex(m.file) || !isU64(m.length) || !isU64(m.mem_offset) || !isU64(m.file_offset)) return null;
  }
  return indicesExact(value.map((m) => (m as Record<string, unknown>).file), nfds) ? value.length : null;
}

type RespKind = "Ok" | "RegisterMemory" | "Err" | "State" | "Allocated";
const isU32 = (v: unknown) => isUint(v, 0xffff_ffffn);

/** The response's kind, or why it is not a well-formed response (PROTOCOL.md, "Responses" and "vmemd extensions"). */
function responseKind(v: unknown): RespKind | { bad: string } {
  if (v === "Ok") return "Ok";
  if (!isPlainMap(v) || Object.keys(v).length !== 1) return { bad: "not \"Ok\" or a map with one key" };
  const [k] = Object.keys(v) as [string];
  const p = v[k];
  switch (k) {
    case "RegisterMemory":
      return hasKeys(p, ["region_id", "slot"]) && isU64(p.region_id) && isU32(p.slot) ? k : { bad: "RegisterMemory payload" };
    case "Allocated":
      return hasKeys(p, ["start", "size"]) && isU64(p.start) && isU64(p.size) ? k : { bad: "Allocated payload" };
    case "Err": {
      if (!hasKeys(p, ["errno", "chain"])) return { bad: "Err keys" };
      const errno = p.errno;
      if (errno !== null && !(typeof errno === "number" && Number.isInteger(errno) && errno >= -(2 ** 31) && errno < 2 ** 31)) return { bad: "errno not i32|nil" };
      if (!Array.isArray(p.chain) || p.chain.length === 0) return { bad: "chain empty or not an array" };
      if (!p.chain.every((s) => typeof s === "string")) return { bad: "chain entry not a string" };
      return k;
    }
    case "State": {
      const keys = ["ram", "regions", "allocations", "slots_used", "slots_max", "freed_bytes", "balloon_target", "vcpu"];
      if (!hasKeys(p, keys)) return { bad: "State keys" };
      if (!Array.isArray(p.ram) || !p.ram.every((r) => Array.isArray(r) && r.length === 2 && isU64(r[0]) && isU64(r[1]))) return { bad: "State.ram" };
      const regionOk = (r: unknown) =>
        hasKeys(r, ["region_id", "slot", "size", "read_only", "kind"]) && isU64(r.region_id) && isU32(r.slot) && isU64(r.size) &&
        typeof r.read_only === "boolean" && ["dynamic", "fixed", "prepared"].includes(r.kind as string);
      if (!Array.isArray(p.regions) || !p.regions.every(regionOk)) return { bad: "State.regions" };
      if (!Array.isArray(p.allocations) || !p.allocations.every((a) => hasKeys(a, ["alloc", "start", "size"]) && isAlloc(a.alloc) && isU64(a.start) && isU64(a.size))) return { bad: "State.allocations" };
      if (!isU32(p.slots_used) || !isU32(p.slots_max) || !isU64(p.freed_bytes)) return { bad: "State counters" };
      if (p.balloon_target !== null && !isU64(p.balloon_target)) return { bad: "State.balloon_target" };
      if (p.vcpu !== null && !isPlainMap(p.vcpu)) return { bad: "State.vcpu" };
      return k;
    }
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
    case "RegisterMemory":
    case "MmapAndRegisterMemory":
      return ["RegisterMemory", "Err"];
    case "AllocateMmio":
      return ["Allocated", "Err"];
    default:
      return MAP_VARIANTS.has(variant) ? ["Ok", "Err"] : ["Err"];
  }
}

interface State {
  ram: [number | bigint, number | bigint][];
  regions: { region_id: number | bigint; slot: number; size: number | bigint; read_only: boolean; kind: string }[];
  allocations: { alloc: Alloc; start: number | bigint; size: number | bigint }[];
  slots_used: number;
  slots_max: number;
}

interface Expect {
  check: Check;
  errno?: number;
  marker?: number;
  /** The request variant when the server reads the packet as a request that is answered; null otherwise. */
  variant: string | null;
  /** The decoded request (for bookkeeping), when variant is not null. */
  req: unknown;
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
    s.proc = Bun.spawn([binary, "serve", "--socket", s.socket, ...args], { stdin: "ignore", stdout: "pipe", stderr: "pipe" });
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
    this.pending = 0;
    this.pendingReq = null;
    this.pendingFailed = false;
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
      this.onResponse(this.io.body.subarray(0, n));
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

  /** What the server does with the packet: an expected response, or null when it absorbs it as a chunk. */
  private classify(p: Packet, no: number): Expect | null {
    const ex: Expect = { check: Check.Any, variant: null, req: null, fds: p.fds, label: p.label, body: p.body, pktNo: no, onResponse: p.onResponse };
    const decoded = p.body.length > MAX_PACKET ? undefined : decodeOrUndefined(p.body);
    if (this.pending > 0) {
      // A follow-up chunk (docs/protocol.md): a well-formed one counts its mappings; anything
      // else (oversized, empty and undecodable packets included) fails the request and counts
      // as min(remaining, 253). One answer after the last: Err if anything failed.
      const n = decoded === undefined ? null : chunkLength(decoded.value, p.fds.length);
      if (n !== null && n <= this.pending) this.pending -= n;
      else {
        this.pending -= Math.min(this.pending, SCM_MAX_FD);
        this.pendingFailed = true;
      }
      if (this.pending > 0) return null;
      if (this.pendingFailed) ex.check = Check.Chunk;
      else {
        ex.variant = "MmapAndRegisterMemory";
        ex.req = this.pendingReq;
      }
      this.pendingReq = null;
      this.pendingFailed = false;
      return ex;
    }
    if (decoded === undefined) {
      ex.check = Check.Einval;
      return ex;
    }
    const v = decoded.value;
    if (typeof v === "string") {
      if (v !== "GetState") ex.check = Check.Einval;
      else ex.variant = v;
    } else if (isPlainMap(v) && Object.keys(v).length === 1) {
      const variant = Object.keys(v)[0]!;
      if (!MAP_VARIANTS.has(variant)) {
        ex.check = Check.Einval;
        return ex;
      }
      ex.variant = variant;
      ex.req = v;
      if (variant === "MmapAndRegisterMemory") {
        const start = mmapStart(v, p.fds.length);
        if (start !== null && start.count > 0n) {
          // Refused at once when absurd, yet still answered after its chunks (docs/protocol.md).
          this.pendingFailed = start.count > MAX_FILE_MAPPINGS || start.count > start.size / BigInt(PAGE);
          this.pending = Number(start.count);
          this.pendingReq = v;
          return null;
        }
      }
    } else {
      ex.check = Check.Einval;
      return ex;
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
    let v: unknown;
    try {
      v = responseDecoder.decode(body);
    } catch (e) {
      this.engine.violate("response", `not a MessagePack value (${e}): ${hexHead(body)}`, this);
      this.fifo.shift();
      return;
    }
    const kind = responseKind(v);
    const ex = this.fifo.shift();
    if (ex === undefined) {
      this.engine.violate("accounting", `a response with no request outstanding: ${show(v)}`, this);
      this.needsReset = true;
      return;
    }
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
  /** GetState answered EMSGSIZE (State larger than a packet), and regions unregistered to make it fit. */
  stateTooLarge = 0;
  thinned = 0;
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
      if (errno === null) this.violate("errno", `Err without errno (PROTOCOL.md: EINVAL for malformed input): ${show(chain)}`, conn, ex);
      else if (chain.some((s) => s.startsWith("malformed")) && errno !== EINVAL) this.violate("errno", `malformed-input Err with errno ${errno}: ${show(chain)}`, conn, ex);
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
        if (errno !== EINVAL || chain.at(-1) !== CHUNK_ABORT) mismatch(`a malformed chunk must end the MmapAndRegisterMemory with one Err EINVAL whose chain ends "${CHUNK_ABORT}"`, true);
        break;
      case Check.Ok:
        if (v !== "Ok") mismatch("expected Ok");
        break;
      case Check.State:
        // A State too large for one packet is refused with EMSGSIZE (docs/protocol.md).
        if (kind !== "State" && errno !== sys.Errno.EMSGSIZE) mismatch("expected State");
        break;
      case Check.Errno:
        if (errno !== ex.errno) mismatch(`expected Err ${sys.errnoName(ex.errno!)}`);
        break;
      case Check.Marker:
        if (errno !== ENOENT || !chain[0]?.includes(hex(ex.marker!))) mismatch(`expected the sync marker's ENOENT for ${hex(ex.marker!)} (responses out of step)`, true);
        break;
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
      this.allocs.add(allocKey((req!.AllocateMmio as Record<string, unknown>).alloc), 1);
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
          this.prepared.add(allocKey((req.PrepareSharedMemoryRegion as Record<string, unknown>).alloc), 1);
          break;
        case "IoEventRaw": {
          const e = req.IoEventRaw as Record<string, unknown>;
          const fd = ex.fds[Number(e.event)]!;
          const dm = e.datamatch;
          if (dm === undefined) break;
          const [dk, dv] = dm === "AnyLength" ? ["AnyLength", null] : Object.entries(dm as Record<string, unknown>)[0]!;
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

  async state(): Promise<State> {
    for (;;) {
      const r = (await this.control(this.conns[0]!, "GetState")) as Record<string, State & { errno: number }>;
      if (isPlainMap(r) && "State" in r) return r.State!;
      // A State listing too many regions does not fit one packet (65536 bytes): unregister some
      // of the regions the responses told us about, and ask again.
      const known = this.regions.positive();
      if (!(isPlainMap(r) && "Err" in r && r.Err!.errno === sys.Errno.EMSGSIZE) || known.length === 0) {
        throw new FuzzAbort(`GetState answered ${show(r)}`);
      }
      this.stats.stateTooLarge++;
      for (const id of known.slice(0, 250)) {
        await this.control(this.conns[0]!, { UnregisterMemory: id });
        this.stats.thinned++;
      }
    }
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
    ...(s.stateTooLarge > 0 ? [`GetState answered EMSGSIZE (State over 65536 bytes) ${s.stateTooLarge} times at checkpoints; ${s.thinned} regions unregistered to make it fit`] : []),
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
