// execute(request) for crosvm's VmMemoryRequest set plus vmemd's extensions,
// with crosvm's semantics and the vmemd rules of PROTOCOL.md ("Semantics").
import * as sys from "../sys";
import { type GuestAddress, hex, MemoryMapping, type IoeventDatamatch, type MemSlot, type Vm } from "../kvm";
import { allocKey, describeAlloc, type SystemAllocator } from "./allocator";
import { failure, rethrowWithContext, VmMemoryError, withContext } from "./error";
import { IntervalMap } from "./interval_map";
import { isArena, regionIdOf, type PreparedArena, type Region, type RegionState } from "./region_state";
import type {
  Alloc,
  Datamatch,
  Fd,
  GuestRange,
  MemCacheType,
  Protection,
  RegionSummary,
  SharedMemory,
  U64,
  VcpuSummary,
  VmMemoryDestination,
  VmMemoryFileMapping,
  VmMemoryRequest,
  VmMemoryResponse,
  VmMemorySource,
} from "./request";

export const PAGE_SIZE = 4096;

export interface ExecContext {
  vm: Vm;
  allocator: SystemAllocator;
  state: RegionState;
  /** The vCPU's counters for GetState, when a guest runs. */
  vcpu?: () => VcpuSummary | null;
}

/** Executes one request. Never throws: failures come back as an Err response with their chain. */
export function execute(req: VmMemoryRequest, ctx: ExecContext): VmMemoryResponse {
  try {
    return dispatch(req, ctx);
  } catch (e) {
    const err = VmMemoryError.from(e);
    return { Err: { errno: err.errno, chain: err.chain } };
  }
}

function dispatch(req: VmMemoryRequest, ctx: ExecContext): VmMemoryResponse {
  if (req === "GetState") return getState(ctx);
  if ("RegisterMemory" in req) {
    const r = req.RegisterMemory;
    try {
      return registerMemory(ctx, r.source, r.dest, r.prot, r.cache);
    } catch (e) {
      rethrowWithContext(e, "failed to register memory");
    }
  }
  if ("UnregisterMemory" in req) {
    try {
      return unregisterMemory(ctx, req.UnregisterMemory);
    } catch (e) {
      rethrowWithContext(e, `failed to unregister memory region ${hex(req.UnregisterMemory)}`);
    }
  }
  if ("BalloonTargetReached" in req) {
    ctx.state.balloonTarget = req.BalloonTargetReached.size;
    return "Ok";
  }
  return dispatchWithClosures(req, ctx);
}

/**
 * The requests whose context messages are closures. Kept apart from dispatch(): a closure
 * that captures `req` makes JSC allocate the function's scope on every call, and the
 * register/unregister path would pay for it.
 */
function dispatchWithClosures(req: Exclude<VmMemoryRequest, "GetState">, ctx: ExecContext): VmMemoryResponse {
  if ("PrepareSharedMemoryRegion" in req) {
    const r = req.PrepareSharedMemoryRegion;
    return withContext(() => `failed to prepare shared memory region for ${describeAlloc(r.alloc)}`, () =>
      prepareSharedMemoryRegion(ctx, r.alloc, r.cache),
    );
  }
  if ("MmapAndRegisterMemory" in req) {
    const r = req.MmapAndRegisterMemory;
    return withContext("failed to mmap and register memory", () =>
      mmapAndRegisterMemory(ctx, r.shm, r.dest, r.file_mappings ?? []),
    );
  }
  if ("DynamicallyFreeMemoryRanges" in req) {
    return withContext("failed to free guest memory ranges", () => freeRanges(ctx, req.DynamicallyFreeMemoryRanges.ranges));
  }
  if ("DynamicallyReclaimMemoryRanges" in req) {
    return withContext("failed to reclaim guest memory ranges", () => {
      checkRamRanges(ctx.vm, req.DynamicallyReclaimMemoryRanges.ranges);
      return "Ok";
    });
  }
  if ("IoEventRaw" in req) {
    const r = req.IoEventRaw;
    return withContext(() => `failed to ${r.register ? "register" : "unregister"} ioevent at ${hex(r.addr)}`, () =>
      ioEvent(ctx, r.event, r.addr, r.datamatch, r.register),
    );
  }
  if ("AllocateMmio" in req) {
    const r = req.AllocateMmio;
    return withContext(() => `failed to allocate MMIO for ${describeAlloc(r.alloc)}`, () => {
      const a = ctx.allocator.allocate(r.alloc, num(r.size, "size"), r.align === null ? undefined : num(r.align, "align"));
      return { Allocated: { start: a.start, size: a.size } };
    });
  }
  if ("ReleaseMmio" in req) {
    return withContext(() => `failed to release MMIO of ${describeAlloc(req.ReleaseMmio)}`, () => releaseMmio(ctx, req.ReleaseMmio));
  }
  throw failure("EINVAL", `unknown request`);
}

// ---- value checks ----------------------------------------------------------

/** A u64 as a number; values above 2^53 are beyond any guest physical limit. */
function num(v: U64, what: string): number {
  if (typeof v === "bigint") {
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw failure("EOVERFLOW", `${what} ${hex(v)} is beyond 2^53`);
    if (v < 0n) throw failure("EINVAL", `${what} ${v} is negative`);
    return Number(v);
  }
  if (!Number.isInteger(v) || v < 0) throw failure("EINVAL", `${what} ${v} is not a non-negative integer`);
  if (v > Number.MAX_SAFE_INTEGER) throw failure("EOVERFLOW", `${what} ${v} is beyond 2^53`);
  return v;
}

/** `what` and `part` make the message only when it is needed (no string per request). */
function pageAligned(v: number, what: string, part = ""): void {
  if (v % PAGE_SIZE !== 0) throw failure("EINVAL", `${what}${part} ${hex(v)} is not page aligned (4096)`);
}

function protBits(prot: Protection): number {
  if (!prot.read) throw failure("EINVAL", "guest memory must be readable (prot.read is false)");
  return sys.PROT_READ | (prot.write ? sys.PROT_WRITE : 0);
}

const FILE_TYPES: Record<number, string> = {
  [sys.S_IFDIR]: "a directory",
  [sys.S_IFCHR]: "a character device",
  [sys.S_IFBLK]: "a block device",
  [sys.S_IFIFO]: "a pipe",
  [sys.S_IFSOCK]: "a socket",
  0: "an anonymous inode (eventfd, epoll, ...)",
};

/**
 * Checks that [offset, offset+size) of `fd` can back guest memory: a regular file or
 * memfd, with the whole range inside it, so a guest access never faults on a short file.
 * A memfd that allows sealing is sealed against shrinking first, so the size checked is
 * the size for good. (The seal stays even when the request is refused later.)
 */
function checkMemorySource(fd: Fd, offset: number, size: number, what: string): void {
  if (size === 0) throw failure("EINVAL", `${what}: size is zero`);
  pageAligned(size, what, ": size");
  pageAligned(offset, what, ": offset");
  try {
    sys.fcntl(fd, sys.F_ADD_SEALS, sys.F_SEAL_SHRINK);
  } catch {
    // Not a memfd, or sealing not allowed: the size check below is what protects us then.
  }
  let st: sys.Stat;
  try {
    st = sys.fstat(fd);
  } catch (e) {
    rethrowWithContext(e, `${what}: cannot inspect descriptor ${fd}`);
  }
  const type = st.mode & sys.S_IFMT;
  if (type !== sys.S_IFREG) {
    throw failure("EINVAL", `${what}: descriptor is ${FILE_TYPES[type] ?? `of file type ${hex(type)}`}, not memory`);
  }
  checkSize(st.size, offset, size, what);
}

function checkSize(objectSize: number, offset: number, size: number, what: string): void {
  if (offset + size > objectSize) {
    throw failure("EINVAL", `${what}: range ${hex(offset)}+${hex(size)} extends past the end of the object (${hex(objectSize)} bytes)`);
  }
}

/** Checks [guest, guest+size) is free guest physical space: aligned, below the limit, overlapping neither RAM nor a region. */
function checkFreeGuestRange(ctx: ExecContext, guest: GuestAddress, size: number): void {
  pageAligned(guest, "guest address");
  const end = guest + size;
  if (!Number.isSafeInteger(end)) throw failure("EOVERFLOW", `guest range ${hex(guest)}+${hex(size)} overflows`);
  if (end > ctx.vm.physAddrLimit) {
    throw failure("EINVAL", `guest range ${hex(guest)}..${hex(end)} is beyond the guest physical limit ${hex(ctx.vm.physAddrLimit)}`);
  }
  for (const r of ctx.vm.ram) {
    if (guest < r.guest + r.size && r.guest < end) {
      throw failure("ENOSPC", `guest range ${hex(guest)}..${hex(end)} overlaps guest RAM ${hex(r.guest)}..${hex(r.guest + r.size)}`);
    }
  }
  const hit = ctx.state.top.findOverlap(guest, end);
  if (hit !== undefined) {
    const what = isArena(hit.value) ? `the prepared region of ${describeAlloc(hit.value.alloc)}` : `region ${hex(hit.start)}`;
    throw failure("ENOSPC", `guest range ${hex(guest)}..${hex(end)} overlaps ${what} (${hex(hit.start)}..${hex(hit.end)})`);
  }
}

// ---- RegisterMemory / UnregisterMemory -------------------------------------

interface SourceRange {
  fd: Fd;
  offset: number;
  size: number;
}

function sourceRange(source: VmMemorySource): SourceRange {
  if ("ExternalMapping" in source) {
    throw failure("EPERM", "ExternalMapping sources point into another process's address space and are refused");
  }
  if ("Vulkan" in source) throw failure("ENOTSUP", "Vulkan memory sources need a GPU allocator, which vmemd does not have");
  if ("SharedMemory" in source) {
    const s = source.SharedMemory;
    return { fd: s.descriptor, offset: 0, size: num(s.size, "shared memory size") };
  }
  const d = source.Descriptor;
  const offset = num(d.offset, "source offset");
  const size = num(d.size, "source size");
  if (!Number.isSafeInteger(offset + size)) throw failure("EOVERFLOW", `source range ${hex(offset)}+${hex(size)} overflows`);
  return { fd: d.descriptor, offset, size };
}

/** Where a destination lands: a prepared arena (fixed mapping) or free guest space (a new slot). */
type Placement = { arena: PreparedArena; guest: GuestAddress } | { arena: null; guest: GuestAddress };

function place(ctx: ExecContext, dest: VmMemoryDestination, size: number): Placement {
  if ("ExistingAllocation" in dest) {
    const { allocation, offset } = dest.ExistingAllocation;
    const off = num(offset, "allocation offset");
    const arena = ctx.state.arenas.get(allocKey(allocation));
    if (arena !== undefined) {
      if (off + size > arena.size) {
        throw failure("EINVAL", `offset ${hex(off)} size ${hex(size)} is outside ${describeAlloc(allocation)} (${hex(arena.size)} bytes)`);
      }
      return { arena, guest: arena.start + off };
    }
    return { arena: null, guest: ctx.allocator.addressFromPciOffset(allocation, off, size) };
  }
  const guest = num(dest.GuestPhysicalAddress, "guest address");
  const hit = ctx.state.top.find(guest);
  if (hit !== undefined && isArena(hit.value)) return { arena: hit.value, guest };
  return { arena: null, guest };
}

function registerMemory(
  ctx: ExecContext,
  source: VmMemorySource,
  dest: VmMemoryDestination,
  prot: Protection,
  cache: MemCacheType,
): VmMemoryResponse {
  const src = sourceRange(source);
  const protection = protBits(prot);
  checkMemorySource(src.fd, src.offset, src.size, "memory source");
  const placement = place(ctx, dest, src.size);
  const readOnly = !prot.write;
  if (placement.arena !== null) return mapIntoArena(ctx, placement.arena, placement.guest, src, protection, readOnly);

  const guest = placement.guest;
  checkFreeGuestRange(ctx, guest, src.size);
  let mapping: MemoryMapping;
  try {
    mapping = MemoryMapping.fromDescriptor(src.fd, src.offset, src.size, protection);
  } catch (e) {
    rethrowWithContext(e, "failed to map the memory source");
  }
  let slot: MemSlot;
  try {
    slot = ctx.vm.addMemoryRegion(guest, mapping, readOnly, cache);
  } catch (e) {
    rethrowWithContext(e, `failed to add memory region at ${hex(guest)} when registering memory`);
  }
  const region: Region = { id: guest, size: src.size, slot, readOnly, arena: null };
  ctx.state.regions.set(guest, region);
  ctx.state.top.insert(guest, guest + src.size, region);
  return { RegisterMemory: { region_id: guest, slot } };
}

function mapIntoArena(
  ctx: ExecContext,
  arena: PreparedArena,
  guest: GuestAddress,
  src: SourceRange,
  protection: number,
  readOnly: boolean,
): VmMemoryResponse {
  pageAligned(guest, "guest address");
  const end = guest + src.size;
  if (end > arena.start + arena.size) {
    throw failure("ENOSPC", `guest range ${hex(guest)}..${hex(end)} crosses the end of the prepared region of ${describeAlloc(arena.alloc)}`);
  }
  const hit = arena.fixed.findOverlap(guest, end);
  if (hit !== undefined) {
    throw failure("ENOSPC", `guest range ${hex(guest)}..${hex(end)} overlaps region ${hex(hit.start)} in the prepared region of ${describeAlloc(arena.alloc)}`);
  }
  const offset = guest - arena.start;
  withContext(() => `failed to add fd mapping at offset ${hex(offset)} of the prepared region of ${describeAlloc(arena.alloc)}`, () =>
    ctx.vm.addFdMapping(arena.slot, offset, src.size, src.fd, src.offset, protection),
  );
  const region: Region = { id: guest, size: src.size, slot: arena.slot, readOnly, arena };
  ctx.state.regions.set(guest, region);
  arena.fixed.insert(guest, end, region);
  return { RegisterMemory: { region_id: guest, slot: arena.slot } };
}

function unregisterMemory(ctx: ExecContext, id: U64): VmMemoryResponse {
  const region = ctx.state.regions.get(regionIdOf(id));
  if (region === undefined) throw failure("ENOENT", `no registered memory region with id ${hex(id)}`);
  if (region.arena !== null) {
    const arena = region.arena;
    ctx.vm.removeMapping(arena.slot, region.id - arena.start, region.size);
    arena.fixed.remove(region.id);
  } else {
    ctx.vm.removeMemoryRegion(region.slot);
    ctx.state.top.remove(region.id);
  }
  ctx.state.regions.delete(region.id);
  return "Ok";
}

// ---- PrepareSharedMemoryRegion ---------------------------------------------

function prepareSharedMemoryRegion(ctx: ExecContext, alloc: Alloc, cache: MemCacheType): VmMemoryResponse {
  if (!("PciBar" in alloc)) throw failure("EINVAL", `${describeAlloc(alloc)} is not a PciBar allocation`);
  const key = allocKey(alloc);
  if (ctx.state.arenas.has(key)) throw failure("EEXIST", `${describeAlloc(alloc)} is already prepared`);
  const a = ctx.allocator.get(alloc);
  if (a === undefined) throw failure("EINVAL", `${describeAlloc(alloc)} is not allocated`);
  checkFreeGuestRange(ctx, a.start, a.size);
  const slot: MemSlot = withContext("failed to add the arena's memory region", () => ctx.vm.prepareArena(a.start, a.size, cache));
  const arena: PreparedArena = { alloc, start: a.start, size: a.size, slot, fixed: new IntervalMap<Region>() };
  ctx.state.arenas.set(key, arena);
  ctx.state.top.insert(a.start, a.start + a.size, arena);
  return "Ok";
}

// ---- MmapAndRegisterMemory -------------------------------------------------

function mmapAndRegisterMemory(
  ctx: ExecContext,
  shm: SharedMemory,
  dest: VmMemoryDestination,
  files: VmMemoryFileMapping[],
): VmMemoryResponse {
  const size = num(shm.size, "shm size");
  checkMemorySource(shm.descriptor, 0, size, "shm");
  const checked = files.map((f, i) => {
    const what = `file mapping ${i}`;
    const length = num(f.length, `${what}: length`);
    const memOffset = num(f.mem_offset, `${what}: mem_offset`);
    const fileOffset = num(f.file_offset, `${what}: file_offset`);
    pageAligned(memOffset, what, ": mem_offset");
    if (memOffset + length > size) {
      throw failure("EINVAL", `${what}: ${hex(memOffset)}+${hex(length)} extends past the shm (${hex(size)} bytes)`);
    }
    checkMemorySource(f.file, fileOffset, length, what);
    return { fd: f.file, length, memOffset, fileOffset };
  });
  const placement = place(ctx, dest, size);
  if (placement.arena !== null) {
    throw failure("EINVAL", "MmapAndRegisterMemory into a prepared region is not supported; use RegisterMemory");
  }
  const guest = placement.guest;
  checkFreeGuestRange(ctx, guest, size);
  const mapping = withContext("failed to map the shm", () => MemoryMapping.fromDescriptor(shm.descriptor, 0, size, sys.PROT_READ));
  try {
    for (let i = 0; i < checked.length; i++) {
      const f = checked[i]!;
      withContext(() => `failed to map file mapping ${i} at offset ${hex(f.memOffset)}`, () =>
        mapping.mapFixed(f.memOffset, f.length, f.fd, f.fileOffset, sys.PROT_READ),
      );
    }
  } catch (e) {
    mapping.release();
    throw e;
  }
  const slot = withContext(() => `failed to add memory region at ${hex(guest)}`, () =>
    ctx.vm.addMemoryRegion(guest, mapping, true, "CacheCoherent"),
  );
  const region: Region = { id: guest, size, slot, readOnly: true, arena: null };
  ctx.state.regions.set(guest, region);
  ctx.state.top.insert(guest, guest + size, region);
  return { RegisterMemory: { region_id: guest, slot } };
}

// ---- balloon ---------------------------------------------------------------

/** Checks every range first (page aligned, non-empty, wholly in guest RAM): all or nothing. */
function checkRamRanges(vm: Vm, ranges: GuestRange[]): Array<[number, number]> {
  return ranges.map(([g, s], i) => {
    const guest = num(g, `range ${i}: address`);
    const size = num(s, `range ${i}: size`);
    pageAligned(guest, `range ${i}: address`);
    pageAligned(size, `range ${i}: size`);
    if (size === 0) throw failure("EINVAL", `range ${i}: size is zero`);
    const inRam = vm.ram.some((r) => guest >= r.guest && guest + size <= r.guest + r.size);
    if (!inRam) throw failure("EINVAL", `range ${i}: ${hex(guest)}+${hex(size)} is not inside guest RAM`);
    return [guest, size];
  });
}

function freeRanges(ctx: ExecContext, ranges: GuestRange[]): VmMemoryResponse {
  for (const [guest, size] of checkRamRanges(ctx.vm, ranges)) {
    withContext(() => `failed to remove RAM range ${hex(guest)}+${hex(size)}`, () => ctx.vm.removeRamRange(guest, size));
    ctx.state.freedBytes += size;
  }
  return "Ok";
}

// ---- IoEventRaw ------------------------------------------------------------

const DATAMATCH_LENGTHS = { U8: 1, U16: 2, U32: 4, U64: 8 } as const;

function ioeventDatamatch(dm: Datamatch): IoeventDatamatch {
  if (dm === "AnyLength") return { length: 0, value: null };
  const [kind, v] = Object.entries(dm)[0] as [keyof typeof DATAMATCH_LENGTHS, U64 | null];
  const length = DATAMATCH_LENGTHS[kind];
  if (v === null) return { length, value: null };
  const value = BigInt(v);
  if (value < 0n || value >= 1n << BigInt(length * 8)) throw failure("EINVAL", `datamatch ${kind} value ${hex(value)} does not fit`);
  return { length, value };
}

function ioEvent(ctx: ExecContext, event: Fd, addr: U64, dm: Datamatch, register: boolean): VmMemoryResponse {
  const guest = num(addr, "ioevent address");
  const datamatch = ioeventDatamatch(dm);
  if (register) ctx.vm.registerIoevent(event, guest, datamatch);
  else ctx.vm.unregisterIoevent(event, guest, datamatch);
  return "Ok";
}

// ---- vmemd extensions ------------------------------------------------------

function releaseMmio(ctx: ExecContext, alloc: Alloc): VmMemoryResponse {
  const a = ctx.allocator.get(alloc);
  if (a === undefined) throw failure("ENOENT", `${describeAlloc(alloc)} is not allocated`);
  const user = ctx.state.top.findOverlap(a.start, a.start + a.size);
  if (user !== undefined) {
    throw failure("EBUSY", `${describeAlloc(alloc)} is in use by ${isArena(user.value) ? "its prepared region" : `region ${hex(user.start)}`}`);
  }
  ctx.allocator.release(alloc);
  return "Ok";
}

function getState(ctx: ExecContext): VmMemoryResponse {
  const regions: RegionSummary[] = [];
  for (const { start, end, value } of ctx.state.top.entries()) {
    if (isArena(value)) {
      regions.push({ region_id: start, slot: value.slot, size: end - start, read_only: true, kind: "prepared" });
      for (const f of value.fixed.entries()) {
        regions.push({ region_id: f.start, slot: value.slot, size: f.value.size, read_only: f.value.readOnly, kind: "fixed" });
      }
    } else {
      regions.push({ region_id: start, slot: value.slot, size: value.size, read_only: value.readOnly, kind: "dynamic" });
    }
  }
  return {
    State: {
      ram: ctx.vm.ram.map((r) => [r.guest, r.size] as GuestRange),
      regions,
      allocations: [...ctx.allocator.allocations()].map((a) => ({ alloc: a.alloc, start: a.start, size: a.size })),
      slots_used: ctx.vm.slotsUsed(),
      slots_max: ctx.vm.slotsMax,
      freed_bytes: ctx.state.freedBytes,
      balloon_target: ctx.state.balloonTarget,
      vcpu: ctx.vcpu?.() ?? null,
    },
  };
}
