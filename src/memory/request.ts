// VmMemoryRequest and VmMemoryResponse as typed values, in the wire's serde shape
// (PROTOCOL.md). src/protocol's zod schemas produce exactly these types.
// Descriptors here are open descriptors owned by the request (the server closes them).

/** u64 on the wire: a number when it fits in 2^53, a bigint above. */
export type U64 = number | bigint;
export type Fd = number;

export type Alloc =
  | { Anon: U64 }
  | { PciBar: { bus: number; dev: number; func: number; bar: number } }
  | { PmemDevice: U64 }
  | { FileBacked: U64 };

export type MemCacheType = "CacheCoherent" | "CacheNonCoherent";
export interface Protection {
  read: boolean;
  write: boolean;
}
export interface SharedMemory {
  descriptor: Fd;
  size: U64;
}
export type VmMemorySource =
  | { SharedMemory: SharedMemory }
  | { Descriptor: { descriptor: Fd; offset: U64; size: U64 } }
  | {
      Vulkan: {
        descriptor: Fd;
        handle_type: number;
        memory_idx: number;
        device_uuid: Uint8Array;
        driver_uuid: Uint8Array;
        size: U64;
      };
    }
  | { ExternalMapping: { ptr: U64; size: U64 } };
export type VmMemoryDestination = { ExistingAllocation: { allocation: Alloc; offset: U64 } } | { GuestPhysicalAddress: U64 };
export type Datamatch = "AnyLength" | { U8: number | null } | { U16: number | null } | { U32: number | null } | { U64: U64 | null };
export interface IoEventUpdateRequest {
  event: Fd;
  addr: U64;
  datamatch: Datamatch;
  register: boolean;
}
export interface VmMemoryFileMapping {
  file: Fd;
  length: U64;
  mem_offset: U64;
  file_offset: U64;
}
export type GuestRange = [U64, U64];

export type VmMemoryRequest =
  | { PrepareSharedMemoryRegion: { alloc: Alloc; cache: MemCacheType } }
  | { RegisterMemory: { source: VmMemorySource; dest: VmMemoryDestination; prot: Protection; cache: MemCacheType } }
  | {
      MmapAndRegisterMemory: {
        shm: SharedMemory;
        dest: VmMemoryDestination;
        num_file_mappings: U64;
        /** Gathered by the server from the follow-up packets; not on the wire in this packet. */
        file_mappings?: VmMemoryFileMapping[];
      };
    }
  | { DynamicallyFreeMemoryRanges: { ranges: GuestRange[] } }
  | { DynamicallyReclaimMemoryRanges: { ranges: GuestRange[] } }
  | { BalloonTargetReached: { size: U64 } }
  | { UnregisterMemory: U64 }
  | { IoEventRaw: IoEventUpdateRequest }
  // vmemd extensions
  | "GetState"
  | { AllocateMmio: { alloc: Alloc; size: U64; align: U64 | null } }
  | { ReleaseMmio: Alloc };

export type RegionKind = "dynamic" | "fixed" | "prepared";
export interface RegionSummary {
  region_id: U64;
  slot: number;
  size: U64;
  read_only: boolean;
  kind: RegionKind;
}
export interface VcpuSummary {
  state: "running" | "halted" | "stopped";
  exits: U64;
  mmio_reads: U64;
  mmio_writes: U64;
}
export interface VmState {
  ram: GuestRange[];
  regions: RegionSummary[];
  allocations: { alloc: Alloc; start: U64; size: U64 }[];
  slots_used: number;
  slots_max: number;
  freed_bytes: U64;
  balloon_target: U64 | null;
  vcpu: VcpuSummary | null;
}

export type VmMemoryResponse =
  | "Ok"
  | { RegisterMemory: { region_id: U64; slot: number } }
  | { Err: { errno: number | null; chain: string[] } }
  | { State: VmState }
  | { Allocated: { start: U64; size: U64 } };

/** A place in a request that holds a descriptor: `holder[key]`. */
export interface DescriptorSlot {
  holder: Record<string, unknown>;
  key: string;
}

/**
 * Every descriptor field of a request, in a fixed order. The protocol layer uses it to
 * resolve SCM_RIGHTS indices; owners use it to close every descriptor on every path.
 */
const NO_SLOTS: DescriptorSlot[] = [];

export function descriptorSlots(req: VmMemoryRequest): DescriptorSlot[] {
  if (typeof req === "string") return NO_SLOTS;
  const at = (holder: object, key: string): DescriptorSlot => ({ holder: holder as Record<string, unknown>, key });
  if ("RegisterMemory" in req) {
    const s = req.RegisterMemory.source;
    if ("SharedMemory" in s) return [at(s.SharedMemory, "descriptor")];
    if ("Descriptor" in s) return [at(s.Descriptor, "descriptor")];
    if ("Vulkan" in s) return [at(s.Vulkan, "descriptor")];
    return NO_SLOTS;
  }
  if ("MmapAndRegisterMemory" in req) {
    const m = req.MmapAndRegisterMemory;
    return [at(m.shm, "descriptor"), ...(m.file_mappings ?? []).map((f) => at(f, "file"))];
  }
  if ("IoEventRaw" in req) return [at(req.IoEventRaw, "event")];
  return NO_SLOTS;
}

export function requestDescriptors(req: VmMemoryRequest): Fd[] {
  const slots = descriptorSlots(req);
  const fds: Fd[] = [];
  for (const s of slots) fds.push(s.holder[s.key] as Fd);
  return fds;
}
