// The crosvm side of the wire, written from crosvm's own types (vm_control, resources,
// hypervisor, base) and serde's rules, not from vmemd's code. See README.md here.
//
//  - Values: crosvm's Rust types as TypeScript values (externally tagged enums: a unit
//    variant is its name as a string, any other variant an object with exactly the
//    variant's name as key; descriptors are `Fd` objects).
//  - Serializer: one function per Rust type, emitting fields in the Rust declaration
//    order, into serde's data model; then written exactly as `serde_json::to_vec` writes
//    it inside `base::Tube::send` (compact, u64 as digits), each descriptor pushed to the
//    packet's SCM_RIGHTS list and written as its index (base::descriptor_reflection).
//    The same model also gives the MessagePack form docs/protocol.md defines.
//  - Parser: a deserializer with serde_json 1.0.82's rules (the version crosvm's
//    Cargo.lock pins) and serde-derive's behaviour for each response type, so it accepts
//    what `Tube::recv::<VmMemoryResponse>()` would accept and refuses what it would refuse.

// ---------------------------------------------------------------------------
// crosvm's types as TypeScript values

/** u8..u64 and usize (64-bit on x86_64): a number (a safe integer) or a bigint. */
export type U64 = number | bigint;

/** A descriptor carried in SCM_RIGHTS (SafeDescriptor, File, Event, SharedMemory's). */
export class Fd {
  constructor(readonly fd: number) {}
}
export const fd = (n: number): Fd => new Fd(n);

/** resources::Alloc */
export type Alloc =
  | { Anon: U64 }
  | { PciBar: { bus: number; dev: number; func: number; bar: number } }
  | "GpuRenderNode"
  | { PmemDevice: U64 }
  | "Pstore"
  | { PciBridgeWindow: { bus: number; dev: number; func: number } }
  | { PciBridgePrefetchWindow: { bus: number; dev: number; func: number } }
  | { FileBacked: U64 };

/** hypervisor::MemCacheType */
export type MemCacheType = "CacheCoherent" | "CacheNonCoherent";

/** base::Protection (fields read, write) */
export interface Protection {
  read: boolean;
  write: boolean;
}

/** base::SharedMemory (descriptor with_as_descriptor, size) */
export interface SharedMemory {
  descriptor: Fd;
  size: U64;
}

/** vm_control::VmMemorySource */
export type VmMemorySource =
  | { SharedMemory: SharedMemory }
  | { Descriptor: { descriptor: Fd; offset: U64; size: U64 } }
  | {
      Vulkan: {
        descriptor: Fd;
        handle_type: number;
        memory_idx: number;
        /** [u8; 16] */
        device_uuid: ArrayLike<number>;
        /** [u8; 16] */
        driver_uuid: ArrayLike<number>;
        size: U64;
      };
    }
  | { ExternalMapping: { ptr: U64; size: U64 } };

/** vm_control::VmMemoryDestination */
export type VmMemoryDestination = { ExistingAllocation: { allocation: Alloc; offset: U64 } } | { GuestPhysicalAddress: U64 };

/** hypervisor::Datamatch */
export type Datamatch = "AnyLength" | { U8: number | null } | { U16: number | null } | { U32: number | null } | { U64: U64 | null };

/** vm_control::IoEventUpdateRequest (event: base::Event, transparent down to its descriptor) */
export interface IoEventUpdateRequest {
  event: Fd;
  addr: U64;
  datamatch: Datamatch;
  register: boolean;
}

/** vm_control::VmMemoryFileMapping (file with_as_descriptor) */
export interface VmMemoryFileMapping {
  file: Fd;
  length: U64;
  mem_offset: U64;
  file_offset: U64;
}

/** (GuestAddress, u64): GuestAddress is a newtype struct, so a bare u64. */
export type Range = [U64, U64];

/** vm_control::VmMemoryRequest (the Linux set: MmapAndRegisterMemory included) */
export type VmMemoryRequest =
  | { PrepareSharedMemoryRegion: { alloc: Alloc; cache: MemCacheType } }
  | { RegisterMemory: { source: VmMemorySource; dest: VmMemoryDestination; prot: Protection; cache: MemCacheType } }
  | { MmapAndRegisterMemory: { shm: SharedMemory; dest: VmMemoryDestination; num_file_mappings: U64 } }
  | { DynamicallyFreeMemoryRanges: { ranges: Range[] } }
  | { DynamicallyReclaimMemoryRanges: { ranges: Range[] } }
  | { BalloonTargetReached: { size: U64 } }
  /** VmMemoryRegionId(GuestAddress(u64)): two newtype structs, so a bare u64 */
  | { UnregisterMemory: U64 }
  | { IoEventRaw: IoEventUpdateRequest };

/** vmemd's extension requests, in docs/protocol.md's shapes and field order. */
export type VmemdRequest =
  | "GetState"
  | { GetRegions: { from: U64; max: number | null } }
  | { GetAllocations: { from: U64; max: number | null } }
  | { AllocateMmio: { alloc: Alloc; size: U64; align: U64 | null } }
  | { ReleaseMmio: Alloc }
  | "GetGuestMemory"
  | { IrqFd: { event: Fd; gsi: number; resample: Fd | null; register: boolean } }
  | { IoEventPio: { event: Fd; port: number; datamatch: Datamatch; register: boolean } };

export type Request = VmMemoryRequest | VmemdRequest;

/** vm_control::VmMemoryResponse, as parsed: Err is FlatVmMemoryResponseError's chain, root cause first. */
export type VmMemoryResponse = "Ok" | { RegisterMemory: { region_id: bigint; slot: number } } | { Err: string[] };

// vmemd's extension responses (docs/protocol.md), as parsed.
export interface Region {
  region_id: bigint;
  slot: number;
  size: bigint;
  read_only: boolean;
  kind: "dynamic" | "fixed" | "prepared";
}
export interface Allocation {
  alloc: Alloc;
  start: bigint;
  size: bigint;
}
export interface VcpuState {
  state: "running" | "halted" | "stopped";
  exits: bigint;
  mmio_reads: bigint;
  mmio_writes: bigint;
}
export interface State {
  ram: [bigint, bigint][];
  regions: Region[];
  regions_next: bigint | null;
  allocations: Allocation[];
  allocations_next: bigint | null;
  slots_used: number;
  slots_max: number;
  freed_bytes: bigint;
  balloon_target: bigint | null;
  vcpu: VcpuState | null;
}
export interface GuestMemoryRange {
  guest_address: bigint;
  size: bigint;
  /** an index into the response's SCM_RIGHTS */
  descriptor: number;
  offset: bigint;
}
export type VmemdResponse =
  | VmMemoryResponse
  | { State: State }
  | { Regions: { regions: Region[]; next: bigint | null } }
  | { Allocations: { allocations: Allocation[]; next: bigint | null } }
  | { Allocated: { start: bigint; size: bigint } }
  | { GuestMemory: { ranges: GuestMemoryRange[] } };

// ---------------------------------------------------------------------------
// serde's data model: what a Serialize impl hands to the format

export type Node =
  | { t: "bool"; v: boolean }
  | { t: "uint"; v: bigint }
  | { t: "str"; v: string }
  /** Option::None, and unit */
  | { t: "null" }
  /** seq, tuple, [T; N] */
  | { t: "seq"; items: Node[] }
  /** struct (fields in order), and the one-entry map of a non-unit enum variant */
  | { t: "map"; entries: [string, Node][] }
  /** serialize_descriptor: the descriptor is pushed, its index written as u32 */
  | { t: "fd"; fd: number };

class WireError extends Error {
  override name = "WireError";
}

function uint(v: unknown, max: bigint, what: string): Node {
  let b: bigint;
  if (typeof v === "bigint") b = v;
  else if (typeof v === "number" && Number.isSafeInteger(v)) b = BigInt(v);
  else throw new WireError(`${what}: ${String(v)} is not an integer (numbers above 2^53 must be bigints)`);
  if (b < 0n || b > max) throw new WireError(`${what}: ${b} is out of range [0, ${max}]`);
  return { t: "uint", v: b };
}
const u8 = (v: unknown, what: string) => uint(v, 0xffn, what);
const u16 = (v: unknown, what: string) => uint(v, 0xffffn, what);
const u32 = (v: unknown, what: string) => uint(v, 0xffff_ffffn, what);
const u64 = (v: unknown, what: string) => uint(v, 0xffff_ffff_ffff_ffffn, what);
const usize = u64; // x86_64
function bool(v: unknown, what: string): Node {
  if (typeof v !== "boolean") throw new WireError(`${what}: ${String(v)} is not a bool`);
  return { t: "bool", v };
}
function str(v: string): Node {
  return { t: "str", v };
}
function descriptor(v: unknown, what: string): Node {
  if (!(v instanceof Fd)) throw new WireError(`${what}: a descriptor must be an Fd`);
  return { t: "fd", fd: v.fd };
}
function option<T>(v: T | null | undefined, some: (x: T) => Node): Node {
  return v === null || v === undefined ? { t: "null" } : some(v);
}
function seq(items: Node[]): Node {
  return { t: "seq", items };
}
function struct(entries: [string, Node][]): Node {
  return { t: "map", entries };
}
const unitVariant = (name: string): Node => str(name);
const newtypeVariant = (name: string, inner: Node): Node => struct([[name, inner]]);
const structVariant = (name: string, fields: [string, Node][]): Node => newtypeVariant(name, struct(fields));

/** The one variant of an enum value: [name, payload]; unit variants are strings. */
function variant(v: unknown, type: string, units: readonly string[], others: readonly string[]): [string, unknown] {
  if (typeof v === "string") {
    if (units.includes(v)) return [v, undefined];
    throw new WireError(`${type}: "${v}" is not a unit variant of ${type}`);
  }
  if (typeof v !== "object" || v === null) throw new WireError(`${type}: ${String(v)} is not a ${type}`);
  const keys = Object.keys(v);
  if (keys.length !== 1 || !others.includes(keys[0]!)) throw new WireError(`${type}: {${keys.join(",")}} is not a variant of ${type}`);
  return [keys[0]!, (v as Record<string, unknown>)[keys[0]!]];
}

/** A struct's fields, checked: exactly `names` (a typo in a test must not go unnoticed). */
function fields(v: unknown, type: string, names: readonly string[]): Record<string, unknown> {
  if (typeof v !== "object" || v === null || Array.isArray(v)) throw new WireError(`${type}: not a struct`);
  const keys = Object.keys(v);
  for (const k of keys) if (!names.includes(k)) throw new WireError(`${type}: no field ${k}`);
  for (const n of names) if (!(n in v)) throw new WireError(`${type}: missing field ${n}`);
  return v as Record<string, unknown>;
}

// ---- one serializer per Rust type, fields in declaration order ------------

export function serAlloc(a: Alloc): Node {
  const [name, p] = variant(a, "Alloc", ["GpuRenderNode", "Pstore"], ["Anon", "PciBar", "PmemDevice", "PciBridgeWindow", "PciBridgePrefetchWindow", "FileBacked"]);
  switch (name) {
    case "Anon":
    case "PmemDevice":
      return newtypeVariant(name, usize(p, `Alloc::${name}`));
    case "FileBacked":
      return newtypeVariant(name, u64(p, "Alloc::FileBacked"));
    case "PciBar": {
      const f = fields(p, "Alloc::PciBar", ["bus", "dev", "func", "bar"]);
      return structVariant(name, [
        ["bus", u8(f.bus, "bus")],
        ["dev", u8(f.dev, "dev")],
        ["func", u8(f.func, "func")],
        ["bar", u8(f.bar, "bar")],
      ]);
    }
    case "PciBridgeWindow":
    case "PciBridgePrefetchWindow": {
      const f = fields(p, `Alloc::${name}`, ["bus", "dev", "func"]);
      return structVariant(name, [
        ["bus", u8(f.bus, "bus")],
        ["dev", u8(f.dev, "dev")],
        ["func", u8(f.func, "func")],
      ]);
    }
    default:
      return unitVariant(name);
  }
}

export function serMemCacheType(c: MemCacheType): Node {
  const [name] = variant(c, "MemCacheType", ["CacheCoherent", "CacheNonCoherent"], []);
  return unitVariant(name);
}

export function serProtection(p: Protection): Node {
  const f = fields(p, "Protection", ["read", "write"]);
  return struct([
    ["read", bool(f.read, "read")],
    ["write", bool(f.write, "write")],
  ]);
}

export function serSharedMemory(s: SharedMemory): Node {
  const f = fields(s, "SharedMemory", ["descriptor", "size"]);
  return struct([
    ["descriptor", descriptor(f.descriptor, "SharedMemory.descriptor")],
    ["size", u64(f.size, "SharedMemory.size")],
  ]);
}

function uuid(v: unknown, what: string): Node {
  const a = v as ArrayLike<number>;
  if (typeof v !== "object" || v === null || a.length !== 16) throw new WireError(`${what}: a [u8; 16] needs 16 elements`);
  // [u8; 16] serializes as a 16-tuple.
  return seq(Array.from({ length: 16 }, (_, i) => u8(a[i], `${what}[${i}]`)));
}

export function serVmMemorySource(s: VmMemorySource): Node {
  const [name, p] = variant(s, "VmMemorySource", [], ["SharedMemory", "Descriptor", "Vulkan", "ExternalMapping"]);
  switch (name) {
    case "SharedMemory":
      return newtypeVariant(name, serSharedMemory(p as SharedMemory));
    case "Descriptor": {
      const f = fields(p, "VmMemorySource::Descriptor", ["descriptor", "offset", "size"]);
      return structVariant(name, [
        ["descriptor", descriptor(f.descriptor, "Descriptor.descriptor")],
        ["offset", u64(f.offset, "Descriptor.offset")],
        ["size", u64(f.size, "Descriptor.size")],
      ]);
    }
    case "Vulkan": {
      const f = fields(p, "VmMemorySource::Vulkan", ["descriptor", "handle_type", "memory_idx", "device_uuid", "driver_uuid", "size"]);
      return structVariant(name, [
        ["descriptor", descriptor(f.descriptor, "Vulkan.descriptor")],
        ["handle_type", u32(f.handle_type, "Vulkan.handle_type")],
        ["memory_idx", u32(f.memory_idx, "Vulkan.memory_idx")],
        ["device_uuid", uuid(f.device_uuid, "Vulkan.device_uuid")],
        ["driver_uuid", uuid(f.driver_uuid, "Vulkan.driver_uuid")],
        ["size", u64(f.size, "Vulkan.size")],
      ]);
    }
    default: {
      const f = fields(p, "VmMemorySource::ExternalMapping", ["ptr", "size"]);
      return structVariant(name, [
        ["ptr", u64(f.ptr, "ExternalMapping.ptr")],
        ["size", u64(f.size, "ExternalMapping.size")],
      ]);
    }
  }
}

export function serVmMemoryDestination(d: VmMemoryDestination): Node {
  const [name, p] = variant(d, "VmMemoryDestination", [], ["ExistingAllocation", "GuestPhysicalAddress"]);
  if (name === "GuestPhysicalAddress") return newtypeVariant(name, u64(p, "GuestPhysicalAddress"));
  const f = fields(p, "VmMemoryDestination::ExistingAllocation", ["allocation", "offset"]);
  return structVariant(name, [
    ["allocation", serAlloc(f.allocation as Alloc)],
    ["offset", u64(f.offset, "ExistingAllocation.offset")],
  ]);
}

export function serDatamatch(d: Datamatch): Node {
  const [name, p] = variant(d, "Datamatch", ["AnyLength"], ["U8", "U16", "U32", "U64"]);
  switch (name) {
    case "AnyLength":
      return unitVariant(name);
    case "U8":
      return newtypeVariant(name, option(p, (x) => u8(x, "Datamatch::U8")));
    case "U16":
      return newtypeVariant(name, option(p, (x) => u16(x, "Datamatch::U16")));
    case "U32":
      return newtypeVariant(name, option(p, (x) => u32(x, "Datamatch::U32")));
    default:
      return newtypeVariant(name, option(p, (x) => u64(x, "Datamatch::U64")));
  }
}

export function serIoEventUpdateRequest(r: IoEventUpdateRequest): Node {
  const f = fields(r, "IoEventUpdateRequest", ["event", "addr", "datamatch", "register"]);
  return struct([
    ["event", descriptor(f.event, "IoEventUpdateRequest.event")],
    ["addr", u64(f.addr, "IoEventUpdateRequest.addr")],
    ["datamatch", serDatamatch(f.datamatch as Datamatch)],
    ["register", bool(f.register, "IoEventUpdateRequest.register")],
  ]);
}

export function serVmMemoryFileMapping(m: VmMemoryFileMapping): Node {
  const f = fields(m, "VmMemoryFileMapping", ["file", "length", "mem_offset", "file_offset"]);
  return struct([
    ["file", descriptor(f.file, "VmMemoryFileMapping.file")],
    ["length", usize(f.length, "VmMemoryFileMapping.length")],
    ["mem_offset", usize(f.mem_offset, "VmMemoryFileMapping.mem_offset")],
    ["file_offset", u64(f.file_offset, "VmMemoryFileMapping.file_offset")],
  ]);
}

function serRanges(v: unknown, what: string): Node {
  if (!Array.isArray(v)) throw new WireError(`${what}: not a Vec`);
  return seq(
    v.map((r, i) => {
      if (!Array.isArray(r) || r.length !== 2) throw new WireError(`${what}[${i}]: not a (GuestAddress, u64)`);
      return seq([u64(r[0], `${what}[${i}].0`), u64(r[1], `${what}[${i}].1`)]);
    }),
  );
}

const REQUEST_UNITS = ["GetState", "GetGuestMemory"] as const;
const REQUEST_OTHERS = [
  "PrepareSharedMemoryRegion",
  "RegisterMemory",
  "MmapAndRegisterMemory",
  "DynamicallyFreeMemoryRanges",
  "DynamicallyReclaimMemoryRanges",
  "BalloonTargetReached",
  "UnregisterMemory",
  "IoEventRaw",
  "GetRegions",
  "GetAllocations",
  "AllocateMmio",
  "ReleaseMmio",
  "IrqFd",
  "IoEventPio",
] as const;

export function serRequest(r: Request): Node {
  const [name, p] = variant(r, "VmMemoryRequest", REQUEST_UNITS, REQUEST_OTHERS);
  switch (name) {
    case "PrepareSharedMemoryRegion": {
      const f = fields(p, name, ["alloc", "cache"]);
      return structVariant(name, [
        ["alloc", serAlloc(f.alloc as Alloc)],
        ["cache", serMemCacheType(f.cache as MemCacheType)],
      ]);
    }
    case "RegisterMemory": {
      const f = fields(p, name, ["source", "dest", "prot", "cache"]);
      return structVariant(name, [
        ["source", serVmMemorySource(f.source as VmMemorySource)],
        ["dest", serVmMemoryDestination(f.dest as VmMemoryDestination)],
        ["prot", serProtection(f.prot as Protection)],
        ["cache", serMemCacheType(f.cache as MemCacheType)],
      ]);
    }
    case "MmapAndRegisterMemory": {
      const f = fields(p, name, ["shm", "dest", "num_file_mappings"]);
      return structVariant(name, [
        ["shm", serSharedMemory(f.shm as SharedMemory)],
        ["dest", serVmMemoryDestination(f.dest as VmMemoryDestination)],
        ["num_file_mappings", usize(f.num_file_mappings, "num_file_mappings")],
      ]);
    }
    case "DynamicallyFreeMemoryRanges":
    case "DynamicallyReclaimMemoryRanges": {
      const f = fields(p, name, ["ranges"]);
      return structVariant(name, [["ranges", serRanges(f.ranges, "ranges")]]);
    }
    case "BalloonTargetReached": {
      const f = fields(p, name, ["size"]);
      return structVariant(name, [["size", u64(f.size, "BalloonTargetReached.size")]]);
    }
    case "UnregisterMemory":
      return newtypeVariant(name, u64(p, "UnregisterMemory"));
    case "IoEventRaw":
      return newtypeVariant(name, serIoEventUpdateRequest(p as IoEventUpdateRequest));
    // ---- vmemd extensions (docs/protocol.md's field order)
    case "GetRegions":
    case "GetAllocations": {
      const f = fields(p, name, ["from", "max"]);
      return structVariant(name, [
        ["from", u64(f.from, `${name}.from`)],
        ["max", option(f.max, (x) => u32(x, `${name}.max`))],
      ]);
    }
    case "AllocateMmio": {
      const f = fields(p, name, ["alloc", "size", "align"]);
      return structVariant(name, [
        ["alloc", serAlloc(f.alloc as Alloc)],
        ["size", u64(f.size, "AllocateMmio.size")],
        ["align", option(f.align, (x) => u64(x, "AllocateMmio.align"))],
      ]);
    }
    case "ReleaseMmio":
      return newtypeVariant(name, serAlloc(p as Alloc));
    case "IrqFd": {
      const f = fields(p, name, ["event", "gsi", "resample", "register"]);
      return structVariant(name, [
        ["event", descriptor(f.event, "IrqFd.event")],
        ["gsi", u32(f.gsi, "IrqFd.gsi")],
        ["resample", option(f.resample, (x) => descriptor(x, "IrqFd.resample"))],
        ["register", bool(f.register, "IrqFd.register")],
      ]);
    }
    case "IoEventPio": {
      const f = fields(p, name, ["event", "port", "datamatch", "register"]);
      return structVariant(name, [
        ["event", descriptor(f.event, "IoEventPio.event")],
        ["port", u16(f.port, "IoEventPio.port")],
        ["datamatch", serDatamatch(f.datamatch as Datamatch)],
        ["register", bool(f.register, "IoEventPio.register")],
      ]);
    }
    default:
      return unitVariant(name);
  }
}

/** `&[VmMemoryFileMapping]`, as `Tube::send_with_max_fds(&chunk, chunk.len())` sends one chunk. */
export function serFileMappingChunk(chunk: VmMemoryFileMapping[]): Node {
  return seq(chunk.map(serVmMemoryFileMapping));
}

// ---- response serializers (for the byte-exactness check of what vmemd answers) ----

export function serVmemdResponse(r: VmemdResponse): Node {
  const [name, p] = variant(r, "VmMemoryResponse", ["Ok"], ["RegisterMemory", "Err", "State", "Regions", "Allocations", "Allocated", "GuestMemory"]);
  const P = p as Record<string, unknown>;
  switch (name) {
    case "Ok":
      return unitVariant(name);
    case "RegisterMemory":
      return structVariant(name, [
        ["region_id", u64(P.region_id, "region_id")],
        ["slot", u32(P.slot, "slot")],
      ]);
    case "Err":
      // VmMemoryResponseError serializes as FlatVmMemoryResponseError(Vec<String>): a newtype struct.
      return newtypeVariant(name, seq((p as string[]).map(str)));
    case "State": {
      const s = p as State;
      return structVariant(name, [
        ["ram", serRanges(s.ram, "ram")],
        ["regions", seq(s.regions.map(serRegion))],
        ["regions_next", option(s.regions_next, (x) => u64(x, "regions_next"))],
        ["allocations", seq(s.allocations.map(serAllocation))],
        ["allocations_next", option(s.allocations_next, (x) => u64(x, "allocations_next"))],
        ["slots_used", u32(s.slots_used, "slots_used")],
        ["slots_max", u32(s.slots_max, "slots_max")],
        ["freed_bytes", u64(s.freed_bytes, "freed_bytes")],
        ["balloon_target", option(s.balloon_target, (x) => u64(x, "balloon_target"))],
        [
          "vcpu",
          option(s.vcpu, (v) =>
            struct([
              ["state", unitVariant(v.state)],
              ["exits", u64(v.exits, "exits")],
              ["mmio_reads", u64(v.mmio_reads, "mmio_reads")],
              ["mmio_writes", u64(v.mmio_writes, "mmio_writes")],
            ]),
          ),
        ],
      ]);
    }
    case "Regions":
      return structVariant(name, [
        ["regions", seq((P.regions as Region[]).map(serRegion))],
        ["next", option(P.next, (x) => u64(x, "next"))],
      ]);
    case "Allocations":
      return structVariant(name, [
        ["allocations", seq((P.allocations as Allocation[]).map(serAllocation))],
        ["next", option(P.next, (x) => u64(x, "next"))],
      ]);
    case "Allocated":
      return structVariant(name, [
        ["start", u64(P.start, "start")],
        ["size", u64(P.size, "size")],
      ]);
    default:
      return structVariant(name, [
        [
          "ranges",
          seq(
            (P.ranges as GuestMemoryRange[]).map((g) =>
              struct([
                ["guest_address", u64(g.guest_address, "guest_address")],
                ["size", u64(g.size, "size")],
                ["descriptor", u32(g.descriptor, "descriptor")],
                ["offset", u64(g.offset, "offset")],
              ]),
            ),
          ),
        ],
      ]);
  }
}
function serRegion(r: Region): Node {
  return struct([
    ["region_id", u64(r.region_id, "region_id")],
    ["slot", u32(r.slot, "slot")],
    ["size", u64(r.size, "size")],
    ["read_only", bool(r.read_only, "read_only")],
    ["kind", unitVariant(r.kind)],
  ]);
}
function serAllocation(a: Allocation): Node {
  return struct([
    ["alloc", serAlloc(a.alloc)],
    ["start", u64(a.start, "start")],
    ["size", u64(a.size, "size")],
  ]);
}

// ---------------------------------------------------------------------------
// serde_json's compact writer

/** serde_json's string escaping: `"`, `\`, and control characters; everything else raw UTF-8. */
export function jsonString(s: string): string {
  let out = '"';
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c === 0x22) out += '\\"';
    else if (c === 0x5c) out += "\\\\";
    else if (c < 0x20) {
      out += c === 0x08 ? "\\b" : c === 0x09 ? "\\t" : c === 0x0a ? "\\n" : c === 0x0c ? "\\f" : c === 0x0d ? "\\r" : "\\u00" + c.toString(16).padStart(2, "0");
    } else out += s[i];
  }
  return out + '"';
}

function writeJson(n: Node, fds: number[]): string {
  switch (n.t) {
    case "bool":
      return n.v ? "true" : "false";
    case "uint":
      return n.v.toString(10);
    case "str":
      return jsonString(n.v);
    case "null":
      return "null";
    case "fd":
      fds.push(n.fd);
      return String(fds.length - 1);
    case "seq":
      return "[" + n.items.map((x) => writeJson(x, fds)).join(",") + "]";
    case "map":
      return "{" + n.entries.map(([k, v]) => jsonString(k) + ":" + writeJson(v, fds)).join(",") + "}";
  }
}

/** A packet as a Tube sends it: the body and the descriptors, in index order. */
export interface Packet {
  body: Uint8Array;
  fds: number[];
}

export function toJson(n: Node): Packet {
  const fds: number[] = [];
  const text = writeJson(n, fds);
  return { body: new TextEncoder().encode(text), fds };
}
export const jsonRequest = (r: Request): Packet => toJson(serRequest(r));
export const jsonFileMappingChunk = (chunk: VmMemoryFileMapping[]): Packet => toJson(serFileMappingChunk(chunk));
/** The JSON text alone (descriptors written as indices), for comparisons. */
export const jsonText = (n: Node): string => writeJson(n, []);

/**
 * The same value as a plain JS value for a MessagePack encoder (docs/protocol.md's MessagePack
 * form has the same shape): u64 above 2^53 as bigint, descriptors as indices.
 */
export function toPlain(n: Node, fds: number[] = []): unknown {
  switch (n.t) {
    case "bool":
    case "str":
      return n.v;
    case "uint":
      return n.v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(n.v) : n.v;
    case "null":
      return null;
    case "fd":
      fds.push(n.fd);
      return fds.length - 1;
    case "seq":
      return n.items.map((x) => toPlain(x, fds));
    case "map": {
      const o: Record<string, unknown> = {};
      for (const [k, v] of n.entries) o[k] = toPlain(v, fds);
      return o;
    }
  }
}

// ---------------------------------------------------------------------------
// The parser: serde_json 1.0.82's Deserializer and serde-derive's visitors

export class JsonError extends Error {
  override name = "JsonError";
  constructor(
    message: string,
    readonly offset: number,
  ) {
    super(`${message} at byte ${offset}`);
  }
}

const WS = new Set([0x20, 0x0a, 0x09, 0x0d]);
const U64_MAX = 0xffff_ffff_ffff_ffffn;

/** One deserializer over a packet's bytes. */
export class De {
  i = 0;
  /** serde_json's remaining_depth: 128, decremented per container entered by a typed visitor. */
  private depth = 128;
  constructor(readonly b: Uint8Array) {}

  fail(msg: string, at = this.i): never {
    throw new JsonError(msg, at);
  }
  peek(): number {
    return this.i < this.b.length ? this.b[this.i]! : -1;
  }
  /** parse_whitespace: the next non-whitespace byte (not consumed), -1 at the end. */
  ws(): number {
    while (this.i < this.b.length && WS.has(this.b[this.i]!)) this.i++;
    return this.peek();
  }
  end(): void {
    if (this.ws() !== -1) this.fail("trailing characters");
  }
  nested<T>(f: () => T): T {
    if (--this.depth === 0) this.fail("recursion limit exceeded");
    const r = f();
    this.depth++;
    return r;
  }
  private ident(rest: string): void {
    for (let k = 0; k < rest.length; k++) {
      if (this.i >= this.b.length) this.fail("EOF while parsing a value");
      if (this.b[this.i++] !== rest.charCodeAt(k)) this.fail("expected ident", this.i - 1);
    }
  }
  /** The type error serde_json reports for a value of the wrong kind (it still scans it). */
  private invalidType(expected: string): never {
    const at = this.i;
    const c = this.peek();
    let got: string;
    if (c === 0x6e) (this.i++, this.ident("ull"), (got = "null"));
    else if (c === 0x74) (this.i++, this.ident("rue"), (got = "boolean `true`"));
    else if (c === 0x66) (this.i++, this.ident("alse"), (got = "boolean `false`"));
    else if (c === 0x2d || (c >= 0x30 && c <= 0x39)) got = `number ${this.number().text}`;
    else if (c === 0x22) (this.i++, (got = `string ${JSON.stringify(this.string())}`));
    else if (c === 0x5b) got = "sequence";
    else if (c === 0x7b) got = "map";
    else this.fail(c === -1 ? "EOF while parsing a value" : "expected value");
    this.fail(`invalid type: ${got}, expected ${expected}`, at);
  }

  /** A number token as serde_json's parse_integer classifies it. */
  private number(): { kind: "u64" | "i64" | "f64"; value: bigint; text: string } {
    const start = this.i;
    let neg = false;
    if (this.peek() === 0x2d) {
      neg = true;
      this.i++;
    }
    const c = this.peek();
    if (c === 0x30) {
      this.i++;
      const d = this.peek();
      if (d >= 0x30 && d <= 0x39) this.fail("invalid number");
    } else if (c >= 0x31 && c <= 0x39) {
      while (this.peek() >= 0x30 && this.peek() <= 0x39) this.i++;
    } else this.fail(c === -1 ? "EOF while parsing a value" : "invalid number");
    const intEnd = this.i;
    let float = false;
    if (this.peek() === 0x2e) {
      float = true;
      this.i++;
      if (!(this.peek() >= 0x30 && this.peek() <= 0x39)) this.fail("invalid number");
      while (this.peek() >= 0x30 && this.peek() <= 0x39) this.i++;
    }
    if (this.peek() === 0x65 || this.peek() === 0x45) {
      float = true;
      this.i++;
      if (this.peek() === 0x2b || this.peek() === 0x2d) this.i++;
      if (!(this.peek() >= 0x30 && this.peek() <= 0x39)) this.fail("invalid number");
      while (this.peek() >= 0x30 && this.peek() <= 0x39) this.i++;
    }
    const text = new TextDecoder().decode(this.b.subarray(start, this.i));
    const digits = new TextDecoder().decode(this.b.subarray(neg ? start + 1 : start, intEnd));
    if (float) return { kind: "f64", value: 0n, text };
    const mag = BigInt(digits);
    // Past u64 the significand overflows and serde_json reads the number as an f64.
    if (mag > U64_MAX) return { kind: "f64", value: 0n, text };
    if (!neg) return { kind: "u64", value: mag, text };
    // 1.0.82: `-0` is I64(0); below i64::MIN an f64.
    if (mag > 2n ** 63n) return { kind: "f64", value: 0n, text };
    return { kind: "i64", value: -mag, text };
  }

  /** deserialize_u8..u64 with serde's primitive visitor: a non-negative integer no larger than `max`. */
  uint(max: bigint, type: string): bigint {
    const c = this.ws();
    if (!(c === 0x2d || (c >= 0x30 && c <= 0x39))) this.invalidType(type);
    const at = this.i;
    const n = this.number();
    if (n.kind === "f64") this.fail(`invalid type: floating point \`${n.text}\`, expected ${type}`, at);
    if (n.value < 0n || n.value > max) this.fail(`invalid value: integer \`${n.value}\`, expected ${type}`, at);
    return n.value;
  }
  u8 = () => Number(this.uint(0xffn, "u8"));
  u16 = () => Number(this.uint(0xffffn, "u16"));
  u32 = () => Number(this.uint(0xffff_ffffn, "u32"));
  u64 = () => this.uint(U64_MAX, "u64");

  bool = (): boolean => {
    const c = this.ws();
    if (c === 0x74) return (this.i++, this.ident("rue"), true);
    if (c === 0x66) return (this.i++, this.ident("alse"), false);
    this.invalidType("a boolean");
  };

  /** deserialize_str: a string, checked as SliceRead::parse_str checks it (valid UTF-8, escapes, no control characters). */
  str = (): string => {
    if (this.ws() !== 0x22) this.invalidType("a string");
    this.i++;
    return this.string();
  };

  /** After the opening quote: the decoded string. */
  private string(): string {
    const parts: string[] = [];
    let run = this.i;
    const utf8 = new TextDecoder("utf-8", { fatal: true });
    const flush = (to: number) => {
      if (to > run) {
        try {
          parts.push(utf8.decode(this.b.subarray(run, to)));
        } catch {
          this.fail("invalid unicode code point", run);
        }
      }
    };
    for (;;) {
      if (this.i >= this.b.length) this.fail("EOF while parsing a string");
      const c = this.b[this.i]!;
      if (c === 0x22) {
        flush(this.i);
        this.i++;
        return parts.join("");
      }
      if (c < 0x20) this.fail("control character (\\u0000-\\u001F) found while parsing a string");
      if (c === 0x5c) {
        flush(this.i);
        this.i++;
        parts.push(this.escape());
        run = this.i;
        continue;
      }
      this.i++;
    }
  }
  private hex4(): number {
    if (this.i + 4 > this.b.length) this.fail("EOF while parsing a string", this.b.length);
    let n = 0;
    for (let k = 0; k < 4; k++) {
      const c = this.b[this.i++]!;
      const v = c >= 0x30 && c <= 0x39 ? c - 0x30 : c >= 0x41 && c <= 0x46 ? c - 0x37 : c >= 0x61 && c <= 0x66 ? c - 0x57 : -1;
      if (v < 0) this.fail("invalid escape", this.i - 1);
      n = n * 16 + v;
    }
    return n;
  }
  /** After a backslash: one escape, surrogate pairs required to pair up. */
  private escape(): string {
    if (this.i >= this.b.length) this.fail("EOF while parsing a string");
    const c = this.b[this.i++]!;
    switch (c) {
      case 0x22:
        return '"';
      case 0x5c:
        return "\\";
      case 0x2f:
        return "/";
      case 0x62:
        return "\b";
      case 0x66:
        return "\f";
      case 0x6e:
        return "\n";
      case 0x72:
        return "\r";
      case 0x74:
        return "\t";
      case 0x75: {
        const n = this.hex4();
        if (n >= 0xdc00 && n <= 0xdfff) this.fail("lone leading surrogate in hex escape");
        if (n >= 0xd800 && n <= 0xdbff) {
          if (this.b[this.i] !== 0x5c || this.b[this.i + 1] !== 0x75) this.fail("unexpected end of hex escape");
          this.i += 2;
          const n2 = this.hex4();
          if (n2 < 0xdc00 || n2 > 0xdfff) this.fail("lone leading surrogate in hex escape");
          return String.fromCharCode(n, n2);
        }
        return String.fromCharCode(n);
      }
      default:
        this.fail("invalid escape", this.i - 1);
    }
  }

  /** Option<T>: null is None, anything else Some. */
  option<T>(inner: () => T): () => T | null {
    return () => {
      if (this.ws() === 0x6e) {
        this.i++;
        this.ident("ull");
        return null;
      }
      return inner();
    };
  }

  /** `()`: null. */
  unit = (): null => {
    if (this.ws() !== 0x6e) this.invalidType("unit");
    this.i++;
    this.ident("ull");
    return null;
  };

  /** SeqAccess over `[...]`, with serde_json's comma rules; `visit` pulls elements. */
  private seqAccess<T>(visit: (next: () => boolean) => T): T {
    let first = true;
    const next = (): boolean => {
      let c = this.ws();
      if (c === 0x5d) return false;
      if (c === 0x2c && !first) {
        this.i++;
        c = this.ws();
        if (c === 0x5d) this.fail("trailing comma");
      } else if (first) {
        first = false;
      } else this.fail(c === -1 ? "EOF while parsing a list" : "expected `,` or `]`");
      if (c === -1) this.fail("EOF while parsing a value");
      return true;
    };
    return visit(next);
  }
  private endSeq(): void {
    const c = this.ws();
    if (c === 0x5d) return void this.i++;
    if (c === 0x2c) {
      this.i++;
      this.fail(this.ws() === 0x5d ? "trailing comma" : "trailing characters");
    }
    this.fail(c === -1 ? "EOF while parsing a list" : "trailing characters");
  }
  private endMap(): void {
    const c = this.ws();
    if (c === 0x7d) return void this.i++;
    this.fail(c === 0x2c ? "trailing comma" : c === -1 ? "EOF while parsing an object" : "trailing characters");
  }
  private colon(): void {
    const c = this.ws();
    if (c === 0x3a) return void this.i++;
    this.fail(c === -1 ? "EOF while parsing an object" : "expected `:`");
  }

  /** Vec<T> */
  seq<T>(elem: () => T): () => T[] {
    return () => {
      if (this.ws() !== 0x5b) this.invalidType("a sequence");
      this.i++;
      const out = this.nested(() =>
        this.seqAccess((next) => {
          const items: T[] = [];
          while (next()) items.push(elem());
          return items;
        }),
      );
      this.endSeq();
      return out;
    };
  }

  /** (A, B, ...): exactly that many elements. */
  tuple<T extends unknown[]>(...elems: { [K in keyof T]: () => T[K] }): () => T {
    return () => {
      if (this.ws() !== 0x5b) this.invalidType(`a tuple of size ${elems.length}`);
      this.i++;
      const out = this.nested(() =>
        this.seqAccess((next) =>
          elems.map((e, k) => {
            if (!next()) this.fail(`invalid length ${k}, expected a tuple of size ${elems.length}`);
            return e();
          }),
        ),
      );
      this.endSeq();
      return out as T;
    };
  }

  /**
   * A derived struct: a map (fields in any order, unknown ones skipped, duplicates and
   * missing ones refused, an Option field may be missing) or a sequence of exactly its
   * fields in order (serde-derive's visit_seq, which serde_json offers for any struct).
   */
  struct<T>(type: string, spec: { [K in keyof T]: { de: () => T[K]; optional?: boolean } }): () => T {
    const names = Object.keys(spec) as (keyof T & string)[];
    return () => {
      const c = this.ws();
      if (c === 0x5b) {
        this.i++;
        const out = this.nested(() =>
          this.seqAccess((next) => {
            const o = {} as T;
            names.forEach((n, k) => {
              if (!next()) this.fail(`invalid length ${k}, expected struct ${type} with ${names.length} elements`);
              o[n] = spec[n].de();
            });
            return o;
          }),
        );
        this.endSeq();
        return out;
      }
      if (c !== 0x7b) this.invalidType(`struct ${type}`);
      this.i++;
      const out = this.nested(() => {
        const o = {} as T;
        const seen = new Set<string>();
        let first = true;
        for (;;) {
          let k = this.ws();
          if (k === 0x7d) break;
          if (k === 0x2c && !first) {
            this.i++;
            k = this.ws();
            if (k === 0x7d) this.fail("trailing comma");
          } else if (first) first = false;
          else this.fail(k === -1 ? "EOF while parsing an object" : "expected `,` or `}`");
          if (k === -1) this.fail("EOF while parsing a value");
          if (k !== 0x22) this.fail("key must be a string");
          this.i++;
          const key = this.string();
          this.colon();
          if (Object.hasOwn(spec, key)) {
            if (seen.has(key)) this.fail(`duplicate field \`${key}\``);
            seen.add(key);
            o[key as keyof T] = spec[key as keyof T].de();
          } else this.ignore();
        }
        for (const n of names) {
          if (seen.has(n)) continue;
          if (spec[n].optional) o[n] = null as T[typeof n];
          else this.fail(`missing field \`${n}\``);
        }
        return o;
      });
      this.endMap();
      return out;
    };
  }

  /**
   * An externally tagged enum: `"Unit"`, or `{"Variant": payload}` (a unit variant may also
   * come as `{"Unit": null}`, as serde_json allows). Variants: a deserializer for each
   * non-unit variant's payload, or "unit".
   */
  enumeration<T>(type: string, variants: Record<string, "unit" | (() => unknown)>, make: (name: string, payload: unknown, unit: boolean) => T): () => T {
    return () => {
      const c = this.ws();
      if (c === 0x22) {
        const at = this.i;
        this.i++;
        const name = this.string();
        const v = Object.hasOwn(variants, name) ? variants[name] : undefined;
        if (v === undefined) this.fail(`unknown variant \`${name}\` of ${type}`, at);
        if (v !== "unit") this.fail(`invalid type: unit variant, expected ${type}::${name} with a payload`, at);
        return make(name, undefined, true);
      }
      if (c !== 0x7b) this.fail(c === -1 ? "EOF while parsing a value" : `expected value (an enum ${type})`);
      this.i++;
      const out = this.nested(() => {
        this.ws();
        const at = this.i;
        const name = this.str();
        const v = Object.hasOwn(variants, name) ? variants[name] : undefined;
        if (v === undefined) this.fail(`unknown variant \`${name}\` of ${type}`, at);
        this.colon();
        return v === "unit" ? (this.unit(), make(name, undefined, true)) : make(name, v(), false);
      });
      const e = this.ws();
      if (e === 0x7d) this.i++;
      else this.fail(e === -1 ? "EOF while parsing an object" : "expected value");
      return out;
    };
  }

  /** IgnoredAny: any JSON value, scanned without a depth limit (serde_json's ignore_value). */
  ignore(): void {
    const stack: number[] = [];
    for (;;) {
      // a value
      let c = this.ws();
      if (c === -1) this.fail("EOF while parsing a value");
      if (c === 0x5b || c === 0x7b) {
        this.i++;
        stack.push(c);
        const close = c === 0x5b ? 0x5d : 0x7d;
        if (this.ws() === close) {
          this.i++;
          stack.pop();
        } else {
          if (c === 0x7b) this.ignoreKey();
          continue;
        }
      } else this.ignoreScalar(c);
      // after a value: close containers or move to the next element
      for (;;) {
        if (stack.length === 0) return;
        const top = stack[stack.length - 1]!;
        c = this.ws();
        if (c === 0x2c) {
          this.i++;
          if (top === 0x7b) this.ignoreKey();
          break;
        }
        if ((top === 0x5b && c === 0x5d) || (top === 0x7b && c === 0x7d)) {
          this.i++;
          stack.pop();
          continue;
        }
        if (c === -1) this.fail(top === 0x5b ? "EOF while parsing a list" : "EOF while parsing an object");
        this.fail(top === 0x5b ? "expected `,` or `]`" : "expected `,` or `}`");
      }
    }
  }
  private ignoreKey(): void {
    const c = this.ws();
    if (c === -1) this.fail("EOF while parsing an object");
    if (c !== 0x22) this.fail("key must be a string");
    this.i++;
    this.ignoreString();
    this.colon();
  }
  private ignoreScalar(c: number): void {
    if (c === 0x6e) (this.i++, this.ident("ull"));
    else if (c === 0x74) (this.i++, this.ident("rue"));
    else if (c === 0x66) (this.i++, this.ident("alse"));
    else if (c === 0x2d || (c >= 0x30 && c <= 0x39)) this.number();
    else if (c === 0x22) (this.i++, this.ignoreString());
    else this.fail("expected value");
  }
  /** SliceRead::ignore_str: escapes checked, bytes not checked as UTF-8. */
  private ignoreString(): void {
    for (;;) {
      if (this.i >= this.b.length) this.fail("EOF while parsing a string");
      const c = this.b[this.i]!;
      if (c === 0x22) return void this.i++;
      if (c < 0x20) this.fail("control character (\\u0000-\\u001F) found while parsing a string");
      this.i++;
      if (c === 0x5c) this.escape();
    }
  }
}

// ---- the response types' deserializers ------------------------------------

function allocDe(d: De): () => Alloc {
  const bdf = d.struct<{ bus: number; dev: number; func: number }>("PciBridgeWindow", { bus: { de: d.u8 }, dev: { de: d.u8 }, func: { de: d.u8 } });
  return d.enumeration<Alloc>(
    "Alloc",
    {
      Anon: d.u64,
      PciBar: d.struct<{ bus: number; dev: number; func: number; bar: number }>("PciBar", { bus: { de: d.u8 }, dev: { de: d.u8 }, func: { de: d.u8 }, bar: { de: d.u8 } }),
      GpuRenderNode: "unit",
      PmemDevice: d.u64,
      Pstore: "unit",
      PciBridgeWindow: bdf,
      PciBridgePrefetchWindow: bdf,
      FileBacked: d.u64,
    },
    (name, p, unit) => (unit ? (name as Alloc) : ({ [name]: p } as Alloc)),
  );
}

function regionDe(d: De): () => Region {
  const kind = d.enumeration<Region["kind"]>("RegionKind", { dynamic: "unit", fixed: "unit", prepared: "unit" }, (n) => n as Region["kind"]);
  return d.struct<Region>("Region", { region_id: { de: d.u64 }, slot: { de: d.u32 }, size: { de: d.u64 }, read_only: { de: d.bool }, kind: { de: kind } });
}
function allocationDe(d: De): () => Allocation {
  return d.struct<Allocation>("Allocation", { alloc: { de: allocDe(d) }, start: { de: d.u64 }, size: { de: d.u64 } });
}

/** The variants crosvm's VmMemoryResponse has; vmemd's extensions add more. */
function responseVariants(d: De, extensions: boolean): Record<string, "unit" | (() => unknown)> {
  const v: Record<string, "unit" | (() => unknown)> = {
    RegisterMemory: d.struct<{ region_id: bigint; slot: number }>("VmMemoryResponse::RegisterMemory", { region_id: { de: d.u64 }, slot: { de: d.u32 } }),
    Ok: "unit",
    Err: () => {
      // VmMemoryResponseError: FlatVmMemoryResponseError(Vec<String>), then TryFrom
      // ("should carry at least one error").
      const at = d.i;
      const chain = d.seq(d.str)();
      if (chain.length === 0) d.fail("should carry at least one error", at);
      return chain;
    },
  };
  if (!extensions) return v;
  const vcpu = d.struct<VcpuState>("Vcpu", {
    state: { de: d.enumeration<VcpuState["state"]>("VcpuRunState", { running: "unit", halted: "unit", stopped: "unit" }, (n) => n as VcpuState["state"]) },
    exits: { de: d.u64 },
    mmio_reads: { de: d.u64 },
    mmio_writes: { de: d.u64 },
  });
  const ranges = d.seq(d.tuple<[bigint, bigint]>(d.u64, d.u64));
  v.State = d.struct<State>("State", {
    ram: { de: ranges },
    regions: { de: d.seq(regionDe(d)) },
    regions_next: { de: d.option(d.u64), optional: true },
    allocations: { de: d.seq(allocationDe(d)) },
    allocations_next: { de: d.option(d.u64), optional: true },
    slots_used: { de: d.u32 },
    slots_max: { de: d.u32 },
    freed_bytes: { de: d.u64 },
    balloon_target: { de: d.option(d.u64), optional: true },
    vcpu: { de: d.option(vcpu), optional: true },
  });
  v.Regions = d.struct<{ regions: Region[]; next: bigint | null }>("Regions", { regions: { de: d.seq(regionDe(d)) }, next: { de: d.option(d.u64), optional: true } });
  v.Allocations = d.struct<{ allocations: Allocation[]; next: bigint | null }>("Allocations", {
    allocations: { de: d.seq(allocationDe(d)) },
    next: { de: d.option(d.u64), optional: true },
  });
  v.Allocated = d.struct<{ start: bigint; size: bigint }>("Allocated", { start: { de: d.u64 }, size: { de: d.u64 } });
  v.GuestMemory = d.struct<{ ranges: GuestMemoryRange[] }>("GuestMemory", {
    ranges: {
      de: d.seq(
        d.struct<GuestMemoryRange>("GuestMemoryRange", {
          guest_address: { de: d.u64 },
          size: { de: d.u64 },
          descriptor: { de: d.u32 },
          offset: { de: d.u64 },
        }),
      ),
    },
  });
  return v;
}

function parseWith<T>(bytes: Uint8Array, extensions: boolean): T {
  const d = new De(bytes);
  const value = d.enumeration("VmMemoryResponse", responseVariants(d, extensions), (name, p, unit) => (unit ? name : { [name]: p }))();
  d.end();
  return value as T;
}

/** `serde_json::from_slice::<VmMemoryResponse>`: what crosvm's `Tube::recv` accepts. */
export function parseVmMemoryResponse(bytes: Uint8Array): VmMemoryResponse {
  return parseWith<VmMemoryResponse>(bytes, false);
}

/** The same rules over vmemd's response set (crosvm's three variants and docs/protocol.md's extensions). */
export function parseVmemdResponse(bytes: Uint8Array): VmemdResponse {
  return parseWith<VmemdResponse>(bytes, true);
}

/** True when `bytes` are exactly what serde_json would write for the value they parse to. */
export function isCanonical(bytes: Uint8Array, value: VmemdResponse): boolean {
  const again = new TextEncoder().encode(jsonText(serVmemdResponse(value)));
  return again.length === bytes.length && again.every((b, k) => b === bytes[k]);
}
