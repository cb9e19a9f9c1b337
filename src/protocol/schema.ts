// zod schemas for every request and response in PROTOCOL.md. The TypeScript types
// of src/memory/request.ts are what these produce; the asserts at the bottom keep
// the two in step at compile time.
import { z } from "zod";
import type * as M from "../memory/request";

const MAX_SAFE = Number.MAX_SAFE_INTEGER;
const U64_MAX = 2n ** 64n - 1n;

/**
 * An unsigned integer of any MessagePack width up to `max` (uint 64 decodes as a bigint).
 * A value that fits in 2^53 comes out as a number, a larger one as a bigint. The number
 * branch comes first and needs no conversion: the common case allocates nothing.
 */
function uint(max: bigint) {
  const numberMax = max < BigInt(MAX_SAFE) ? Number(max) : MAX_SAFE;
  return z.union([
    z.number().int().min(0).max(numberMax),
    z
      .bigint()
      .min(0n)
      .max(max)
      .transform((v): number | bigint => (v <= BigInt(MAX_SAFE) ? Number(v) : v)),
  ]);
}
function small(max: number) {
  return z.union([z.number().int().min(0).max(max), z.bigint().min(0n).max(BigInt(max)).transform(Number)]);
}
export const u8 = small(0xff);
export const u32 = small(0xffff_ffff);
export const u64 = uint(U64_MAX);
export const i32 = z.number().int().min(-(2 ** 31)).max(2 ** 31 - 1);
/** A descriptor: its index in the packet's SCM_RIGHTS array (resolved after parsing). */
export const fd = small(252);
const bin16 = z.custom<Uint8Array>((b) => b instanceof Uint8Array && b.length === 16, { message: "must be 16 bytes" });

const obj = z.strictObject;

export const alloc = z.union([
  obj({ Anon: u64 }),
  obj({ PciBar: obj({ bus: u8, dev: u8, func: u8, bar: u8 }) }),
  obj({ PmemDevice: u64 }),
  obj({ FileBacked: u64 }),
]);
export const memCacheType = z.enum(["CacheCoherent", "CacheNonCoherent"]);
export const protection = obj({ read: z.boolean(), write: z.boolean() });
export const sharedMemory = obj({ descriptor: fd, size: u64 });
export const vmMemorySource = z.union([
  obj({ SharedMemory: sharedMemory }),
  obj({ Descriptor: obj({ descriptor: fd, offset: u64, size: u64 }) }),
  obj({
    Vulkan: obj({
      descriptor: fd,
      handle_type: u32,
      memory_idx: u32,
      device_uuid: bin16,
      driver_uuid: bin16,
      size: u64,
    }),
  }),
  obj({ ExternalMapping: obj({ ptr: u64, size: u64 }) }),
]);
export const vmMemoryDestination = z.union([
  obj({ ExistingAllocation: obj({ allocation: alloc, offset: u64 }) }),
  obj({ GuestPhysicalAddress: u64 }),
]);
export const datamatch = z.union([
  z.literal("AnyLength"),
  obj({ U8: u8.nullable() }),
  obj({ U16: small(0xffff).nullable() }),
  obj({ U32: u32.nullable() }),
  obj({ U64: u64.nullable() }),
]);
export const ioEventUpdateRequest = obj({ event: fd, addr: u64, datamatch, register: z.boolean() });
export const vmMemoryFileMapping = obj({ file: fd, length: u64, mem_offset: u64, file_offset: u64 });
const ranges = z.array(z.tuple([u64, u64]));

/** Payload schema of each map-shaped request variant, by variant name. */
export const requestPayloads = {
  PrepareSharedMemoryRegion: obj({ alloc, cache: memCacheType }),
  RegisterMemory: obj({ source: vmMemorySource, dest: vmMemoryDestination, prot: protection, cache: memCacheType }),
  MmapAndRegisterMemory: obj({ shm: sharedMemory, dest: vmMemoryDestination, num_file_mappings: u64 }),
  DynamicallyFreeMemoryRanges: obj({ ranges }),
  DynamicallyReclaimMemoryRanges: obj({ ranges }),
  BalloonTargetReached: obj({ size: u64 }),
  UnregisterMemory: u64,
  IoEventRaw: ioEventUpdateRequest,
  AllocateMmio: obj({ alloc, size: u64, align: u64.nullable() }),
  ReleaseMmio: alloc,
} as const;
/** Unit request variants (sent as a bare string). */
export const unitRequests = ["GetState"] as const;

/** The follow-up packets of MmapAndRegisterMemory: at most SCM_MAX_FD mappings each. */
export const fileMappingChunk = z.array(vmMemoryFileMapping).min(1).max(253);

// ---- responses -----------------------------------------------------------

const regionSummary = obj({
  region_id: u64,
  slot: u32,
  size: u64,
  read_only: z.boolean(),
  kind: z.enum(["dynamic", "fixed", "prepared"]),
});
const vcpuSummary = obj({
  state: z.enum(["running", "halted", "stopped"]),
  exits: u64,
  mmio_reads: u64,
  mmio_writes: u64,
});
export const vmState = obj({
  ram: ranges,
  regions: z.array(regionSummary),
  allocations: z.array(obj({ alloc, start: u64, size: u64 })),
  slots_used: u32,
  slots_max: u32,
  freed_bytes: u64,
  balloon_target: u64.nullable(),
  vcpu: vcpuSummary.nullable(),
});
export const response = z.union([
  z.literal("Ok"),
  obj({ RegisterMemory: obj({ region_id: u64, slot: u32 }) }),
  obj({ Err: obj({ errno: i32.nullable(), chain: z.array(z.string()) }) }),
  obj({ State: vmState }),
  obj({ Allocated: obj({ start: u64, size: u64 }) }),
]);

// Compile-time: the schemas produce exactly the memory layer's types.
type Same<A, B> = [A] extends [B] ? ([B] extends [A] ? true : false) : false;
type Payload<K extends keyof typeof requestPayloads> = z.output<(typeof requestPayloads)[K]>;
type Req<K extends string> = Extract<M.VmMemoryRequest, Record<K, unknown>>[K & keyof Extract<M.VmMemoryRequest, Record<K, unknown>>];
const _register: Same<Payload<"RegisterMemory">, Req<"RegisterMemory">> = true;
const _ioevent: Same<Payload<"IoEventRaw">, Req<"IoEventRaw">> = true;
const _alloc: Same<z.output<typeof alloc>, M.Alloc> = true;
const _resp: Same<z.output<typeof response>, M.VmMemoryResponse> = true;
void [_register, _ioevent, _alloc, _resp];
