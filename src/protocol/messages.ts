// The one description of every message on vmemd's socket (docs/protocol.md): crosvm's
// vm_control::VmMemoryRequest / VmMemoryResponse with serde's shapes, and vmemd's
// extensions. The TypeScript types below, validation, descriptor handling and both
// encodings (MessagePack, crosvm's JSON) are derived from these shapes and nothing else.
import {
  array,
  bool,
  enumOf,
  errChain,
  fd,
  nullable,
  struct,
  tuple,
  u32,
  u64,
  u8,
  u16,
  usize,
  uuid,
  maxEncodedSize,
  type TypeOf,
} from "./shape";

import { MAX_PACKET } from "./limits";
import { SCM_MAX_FD } from "../sys/socket";

export type { U64 } from "./shape";
export { MAX_PACKET } from "./limits";

/** Descriptors one packet can carry (the kernel's SCM_MAX_FD), so mappings one chunk can. */
export const MAX_FDS_PER_PACKET = SCM_MAX_FD;

const pciFunction = { bus: u8, dev: u8, func: u8 };

/** resources::Alloc. */
export const Alloc = enumOf("Alloc", {
  Anon: usize,
  PciBar: struct({ ...pciFunction, bar: u8 }),
  GpuRenderNode: null,
  PmemDevice: usize,
  Pstore: null,
  PciBridgeWindow: struct(pciFunction),
  PciBridgePrefetchWindow: struct(pciFunction),
  FileBacked: u64,
});
export const MemCacheType = enumOf("MemCacheType", { CacheCoherent: null, CacheNonCoherent: null });
/** base::Protection. */
export const Protection = struct({ read: bool, write: bool });
/** base::SharedMemory. */
export const SharedMemory = struct({ descriptor: fd, size: u64 });

export const VmMemorySource = enumOf("VmMemorySource", {
  SharedMemory,
  Descriptor: struct({ descriptor: fd, offset: u64, size: u64 }),
  Vulkan: struct({ descriptor: fd, handle_type: u32, memory_idx: u32, device_uuid: uuid, driver_uuid: uuid, size: u64 }),
  ExternalMapping: struct({ ptr: u64, size: u64 }),
});
export const VmMemoryDestination = enumOf("VmMemoryDestination", {
  ExistingAllocation: struct({ allocation: Alloc, offset: u64 }),
  GuestPhysicalAddress: u64,
});
/** hypervisor::Datamatch. */
export const Datamatch = enumOf("Datamatch", {
  AnyLength: null,
  U8: nullable(u8),
  U16: nullable(u16),
  U32: nullable(u32),
  U64: nullable(u64),
});
export const IoEventUpdateRequest = struct({ event: fd, addr: u64, datamatch: Datamatch, register: bool });
export const VmMemoryFileMapping = struct({ file: fd, length: usize, mem_offset: usize, file_offset: u64 });
/** (GuestAddress, u64): a guest range as crosvm's balloon sends it. */
export const GuestRange = tuple(u64, u64);
const ranges = struct({ ranges: array(GuestRange) });
/** A listing page request: entries from `from` on, at most `max` (nil: as many as fit). */
const pageRequest = struct({ from: u64, max: nullable(u32) });

export const VmMemoryRequest = enumOf("VmMemoryRequest", {
  PrepareSharedMemoryRegion: struct({ alloc: Alloc, cache: MemCacheType }),
  RegisterMemory: struct({ source: VmMemorySource, dest: VmMemoryDestination, prot: Protection, cache: MemCacheType }),
  MmapAndRegisterMemory: struct({ shm: SharedMemory, dest: VmMemoryDestination, num_file_mappings: usize }),
  DynamicallyFreeMemoryRanges: ranges,
  DynamicallyReclaimMemoryRanges: ranges,
  BalloonTargetReached: struct({ size: u64 }),
  UnregisterMemory: u64,
  IoEventRaw: IoEventUpdateRequest,
  // vmemd extensions
  GetState: null,
  GetRegions: pageRequest,
  GetAllocations: pageRequest,
  AllocateMmio: struct({ alloc: Alloc, size: u64, align: nullable(u64) }),
  ReleaseMmio: Alloc,
  // The device plane: guest RAM and interrupts for a device process.
  GetGuestMemory: null,
  IrqFd: struct({ event: fd, gsi: u32, resample: nullable(fd), register: bool }),
  IoEventPio: struct({ event: fd, port: u16, datamatch: Datamatch, register: bool }),
});

/** The packets that follow an MmapAndRegisterMemory: 1 to 253 mappings each. */
export const FileMappingChunk = array(VmMemoryFileMapping, { min: 1, max: MAX_FDS_PER_PACKET });

export const RegionSummary = struct({
  region_id: u64,
  slot: u32,
  size: u64,
  read_only: bool,
  kind: enumOf("RegionKind", { dynamic: null, fixed: null, prepared: null }),
});
export const AllocationSummary = struct({ alloc: Alloc, start: u64, size: u64 });
export const VcpuSummary = struct({
  state: enumOf("VcpuState", { running: null, halted: null, stopped: null }),
  exits: u64,
  mmio_reads: u64,
  mmio_writes: u64,
});
export const VmState = struct({
  ram: array(GuestRange),
  regions: array(RegionSummary),
  regions_next: nullable(u64),
  allocations: array(AllocationSummary),
  allocations_next: nullable(u64),
  slots_used: u32,
  slots_max: u32,
  freed_bytes: u64,
  balloon_target: nullable(u64),
  vcpu: nullable(VcpuSummary),
});

/** Room a listing leaves for the rest of its response (a State's RAM ranges and counters). */
const LISTING_RESERVE = 4096;
/** Entries of a listing that surely fit in a packet, in either encoding. */
export const REGIONS_PER_PAGE = Math.floor((MAX_PACKET - LISTING_RESERVE) / maxEncodedSize(RegionSummary));
export const ALLOCATIONS_PER_PAGE = Math.floor((MAX_PACKET - LISTING_RESERVE) / maxEncodedSize(AllocationSummary));

export const VmMemoryResponse = enumOf("VmMemoryResponse", {
  Ok: null,
  RegisterMemory: struct({ region_id: u64, slot: u32 }),
  Err: errChain,
  // vmemd extensions
  State: VmState,
  Regions: struct({ regions: array(RegionSummary), next: nullable(u64) }),
  Allocations: struct({ allocations: array(AllocationSummary), next: nullable(u64) }),
  Allocated: struct({ start: u64, size: u64 }),
  /** Where `size` bytes at `offset` of `descriptor` (sent with the answer) appear in the guest. */
  GuestMemory: struct({ ranges: array(struct({ guest_address: u64, size: u64, descriptor: fd, offset: u64 })) }),
});

export type Alloc = TypeOf<typeof Alloc>;
export type MemCacheType = TypeOf<typeof MemCacheType>;
export type Protection = TypeOf<typeof Protection>;
export type SharedMemory = TypeOf<typeof SharedMemory>;
export type VmMemorySource = TypeOf<typeof VmMemorySource>;
export type VmMemoryDestination = TypeOf<typeof VmMemoryDestination>;
export type Datamatch = TypeOf<typeof Datamatch>;
export type IoEventUpdateRequest = TypeOf<typeof IoEventUpdateRequest>;
export type VmMemoryFileMapping = TypeOf<typeof VmMemoryFileMapping>;
export type GuestRange = TypeOf<typeof GuestRange>;
export type VmMemoryRequest = TypeOf<typeof VmMemoryRequest>;
export type RegionSummary = TypeOf<typeof RegionSummary>;
export type RegionKind = RegionSummary["kind"];
export type AllocationSummary = TypeOf<typeof AllocationSummary>;
export type VcpuSummary = TypeOf<typeof VcpuSummary>;
export type VmState = TypeOf<typeof VmState>;
export type VmMemoryResponse = TypeOf<typeof VmMemoryResponse>;
/** A request of one variant, e.g. Request<"RegisterMemory">["RegisterMemory"] is its payload. */
export type Request<K extends string> = Extract<VmMemoryRequest, Record<K, unknown>>;
