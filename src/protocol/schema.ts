// zod schemas for every request and response in PROTOCOL.md. The TypeScript types
// of src/memory/request.ts are what these produce; the asserts at the bottom keep
// the two in step at compile time.
// zod/mini: the same parser core as zod's classic API, a third of its start-up cost
// (vmemd's time to a ready socket is a benchmarked figure). Most packets never reach zod
// (the fast paths in fast.ts), so it is loaded with the schemas, on the first packet that
// needs them: that packet waits ~7 ms, once. Loading it before then cost 0.3 ms of
// start-up, or, built in the first idle moment, 3 MiB of idle memory (both measured).
import type * as Zod from "zod/mini";
import type * as M from "../memory/request";

let z: typeof Zod;

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
    z.int().check(z.minimum(0), z.maximum(numberMax)),
    z.pipe(
      z.bigint().check(z.minimum(0n), z.maximum(max)),
      z.transform((v: bigint): number | bigint => (v <= BigInt(MAX_SAFE) ? Number(v) : v)),
    ),
  ]);
}
function small(max: number) {
  return z.union([
    z.int().check(z.minimum(0), z.maximum(max)),
    z.pipe(z.bigint().check(z.minimum(0n), z.maximum(BigInt(max))), z.transform((v: bigint) => Number(v))),
  ]);
}
/**
 * Builds every schema. zod builds schemas slowly (~3 ms for these, before the JIT warms
 * up), so this runs on the first packet rather than before the socket is ready.
 */
function build() {
  // A require() inside a function: the bundle evaluates zod here, not at start-up.
  z = require("zod/mini") as typeof Zod;
  const u8 = small(0xff);
  const u32 = small(0xffff_ffff);
  const u64 = uint(U64_MAX);
  const i32 = z.int().check(z.minimum(-(2 ** 31)), z.maximum(2 ** 31 - 1));
  /** A descriptor: its index in the packet's SCM_RIGHTS array (resolved after parsing). */
  const fd = small(252);
  const bin16 = z.custom<Uint8Array>((b) => b instanceof Uint8Array && b.length === 16, { message: "must be 16 bytes" });

  const obj = z.strictObject;

  const alloc = z.union([
    obj({ Anon: u64 }),
    obj({ PciBar: obj({ bus: u8, dev: u8, func: u8, bar: u8 }) }),
    obj({ PmemDevice: u64 }),
    obj({ FileBacked: u64 }),
  ]);
  const memCacheType = z.enum(["CacheCoherent", "CacheNonCoherent"]);
  const protection = obj({ read: z.boolean(), write: z.boolean() });
  const sharedMemory = obj({ descriptor: fd, size: u64 });
  const vmMemorySource = z.union([
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
  const vmMemoryDestination = z.union([
    obj({ ExistingAllocation: obj({ allocation: alloc, offset: u64 }) }),
    obj({ GuestPhysicalAddress: u64 }),
  ]);
  const datamatch = z.union([
    z.literal("AnyLength"),
    obj({ U8: z.nullable(u8) }),
    obj({ U16: z.nullable(small(0xffff)) }),
    obj({ U32: z.nullable(u32) }),
    obj({ U64: z.nullable(u64) }),
  ]);
  const ioEventUpdateRequest = obj({ event: fd, addr: u64, datamatch, register: z.boolean() });
  const vmMemoryFileMapping = obj({ file: fd, length: u64, mem_offset: u64, file_offset: u64 });
  const ranges = z.array(z.tuple([u64, u64]));

  /** Payload schema of each map-shaped request variant, by variant name. */
  const requestPayloads = {
    PrepareSharedMemoryRegion: obj({ alloc, cache: memCacheType }),
    RegisterMemory: obj({ source: vmMemorySource, dest: vmMemoryDestination, prot: protection, cache: memCacheType }),
    MmapAndRegisterMemory: obj({ shm: sharedMemory, dest: vmMemoryDestination, num_file_mappings: u64 }),
    DynamicallyFreeMemoryRanges: obj({ ranges }),
    DynamicallyReclaimMemoryRanges: obj({ ranges }),
    BalloonTargetReached: obj({ size: u64 }),
    UnregisterMemory: u64,
    IoEventRaw: ioEventUpdateRequest,
    AllocateMmio: obj({ alloc, size: u64, align: z.nullable(u64) }),
    ReleaseMmio: alloc,
  } as const;
  /** Unit request variants (sent as a bare string). */
  const unitRequests = ["GetState"] as const;

  /** The follow-up packets of MmapAndRegisterMemory: at most SCM_MAX_FD mappings each. */
  const fileMappingChunk = z.array(vmMemoryFileMapping).check(z.minLength(1), z.maxLength(253));

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
  const vmState = obj({
    ram: ranges,
    regions: z.array(regionSummary),
    allocations: z.array(obj({ alloc, start: u64, size: u64 })),
    slots_used: u32,
    slots_max: u32,
    freed_bytes: u64,
    balloon_target: z.nullable(u64),
    vcpu: z.nullable(vcpuSummary),
  });
  const response = z.union([
    z.literal("Ok"),
    obj({ RegisterMemory: obj({ region_id: u64, slot: u32 }) }),
    obj({ Err: obj({ errno: z.nullable(i32), chain: z.array(z.string()) }) }),
    obj({ State: vmState }),
    obj({ Allocated: obj({ start: u64, size: u64 }) }),
  ]);

  return {
    u64,
    alloc,
    requestPayloads,
    unitRequests,
    fileMappingChunk,
    response,
  };
}

export type Schemas = ReturnType<typeof build>;
let built: Schemas | undefined;
/** The schemas, built on first use. */
export function schemas(): Schemas {
  return (built ??= build());
}

// Compile-time: the schemas produce exactly the memory layer's types.
type Same<A, B> = [A] extends [B] ? ([B] extends [A] ? true : false) : false;
type Payloads = Schemas["requestPayloads"];
type Payload<K extends keyof Payloads> = Zod.output<Payloads[K]>;
type Req<K extends string> = Extract<M.VmMemoryRequest, Record<K, unknown>>[K & keyof Extract<M.VmMemoryRequest, Record<K, unknown>>];
const _register: Same<Payload<"RegisterMemory">, Req<"RegisterMemory">> = true;
const _ioevent: Same<Payload<"IoEventRaw">, Req<"IoEventRaw">> = true;
const _alloc: Same<Zod.output<Schemas["alloc"]>, M.Alloc> = true;
const _resp: Same<Zod.output<Schemas["response"]>, M.VmMemoryResponse> = true;
void [_register, _ioevent, _alloc, _resp];
