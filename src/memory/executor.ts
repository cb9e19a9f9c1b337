// execute(request) for crosvm's VmMemoryRequest set plus vmemd's extensions, with crosvm's
// semantics and vmemd's rules (docs/protocol.md, "Semantics"). A refusal a client can drive
// at request rate (a bad range, an unknown region, an overlap) is returned as a Refusal
// value; only failing system calls throw (SysError), and execute() turns those into Err.
import * as sys from "../sys";
import { type GuestAddress, hex, MemoryMapping, type IoeventDatamatch, type MemSlot, type Vm } from "../kvm";
import {
  ALLOCATIONS_PER_PAGE,
  REGIONS_PER_PAGE,
  type Alloc,
  type AllocationSummary,
  type Datamatch,
  type GuestRange,
  type MemCacheType,
  type Protection,
  type RegionSummary,
  type SharedMemory,
  type U64,
  type VcpuSummary,
  type VmMemoryDestination,
  type VmMemoryFileMapping,
  type VmMemoryRequest,
  type VmMemoryResponse,
  type VmMemorySource,
} from "../protocol/messages";
import { allocKey, describeAlloc, isPciBar, type SystemAllocator } from "./allocator";
import { Refusal, VmMemoryError } from "./error";
import { IntervalMap } from "./interval_map";
import { isArena, regionIdOf, type PreparedArena, type Region, type RegionState } from "./region_state";

export const PAGE_SIZE = sys.PAGE_SIZE;

export interface ExecContext {
  vm: Vm;
  allocator: SystemAllocator;
  state: RegionState;
  /** The vCPU's counters for GetState, when a guest runs. */
  vcpu?: () => VcpuSummary | null;
}

type Result = VmMemoryResponse | Refusal;

/** The Err response for a refusal or a thrown error. */
export function errResponse(e: unknown): VmMemoryResponse {
  if (e instanceof Refusal) return e.answer();
  const r = VmMemoryError.from(e);
  return { Err: { errno: r.errno, chain: r.chain } };
}

/** Executes one request. Never throws: failures come back as an Err response with their chain. */
export function execute(req: Exclude<VmMemoryRequest, { MmapAndRegisterMemory: unknown }>, ctx: ExecContext): VmMemoryResponse {
  let r: Result;
  try {
    r = dispatch(req, ctx);
  } catch (e) {
    // A failing system call: the rare path, given the same outer context a refusal gets.
    const err = errorRefusal(e);
    const context = typeof req === "object" ? contextOf(req) : null;
    return errResponse(context === null || err.chain.at(-1) === context ? err : err.context(context));
  }
  return r instanceof Refusal ? r.answer() : r;
}

/** The outermost context of a request's failures (built only when one fails). */
function contextOf(req: Exclude<VmMemoryRequest, string | { MmapAndRegisterMemory: unknown }>): string | null {
  if ("RegisterMemory" in req) return "failed to register memory";
  if ("UnregisterMemory" in req) return `failed to unregister memory region ${hex(req.UnregisterMemory)}`;
  if ("DynamicallyFreeMemoryRanges" in req) return "failed to free guest memory ranges";
  if ("DynamicallyReclaimMemoryRanges" in req) return "failed to reclaim guest memory ranges";
  if ("PrepareSharedMemoryRegion" in req) return `failed to prepare shared memory region for ${describeAlloc(req.PrepareSharedMemoryRegion.alloc)}`;
  if ("IoEventRaw" in req) return `failed to ${req.IoEventRaw.register ? "register" : "unregister"} ioevent at ${hex(req.IoEventRaw.addr)}`;
  if ("AllocateMmio" in req) return `failed to allocate MMIO for ${describeAlloc(req.AllocateMmio.alloc)}`;
  if ("ReleaseMmio" in req) return `failed to release MMIO of ${describeAlloc(req.ReleaseMmio)}`;
  if ("IrqFd" in req) return `failed to ${req.IrqFd.register ? "register" : "unregister"} irqfd on GSI ${req.IrqFd.gsi}`;
  if ("IoEventPio" in req) return `failed to ${req.IoEventPio.register ? "register" : "unregister"} ioevent at port ${hex(req.IoEventPio.port)}`;
  return null;
}

function dispatch(req: Exclude<VmMemoryRequest, { MmapAndRegisterMemory: unknown }>, ctx: ExecContext): Result {
  if (req === "GetState") return getState(ctx);
  if (req === "GetGuestMemory") return guestMemory(ctx);
  if ("RegisterMemory" in req) {
    const r = req.RegisterMemory;
    return withContext(registerMemory(ctx, r.source, r.dest, r.prot, r.cache), "failed to register memory");
  }
  // Its refusal comes with its context (unknownRegion).
  if ("UnregisterMemory" in req) return unregisterMemory(ctx, req.UnregisterMemory);
  if ("BalloonTargetReached" in req) {
    ctx.state.balloonTarget = req.BalloonTargetReached.size;
    return "Ok";
  }
  if ("DynamicallyFreeMemoryRanges" in req) return freeRanges(ctx, req.DynamicallyFreeMemoryRanges.ranges);
  if ("DynamicallyReclaimMemoryRanges" in req) {
    return withContext(reclaimRanges(ctx, req.DynamicallyReclaimMemoryRanges.ranges), "failed to reclaim guest memory ranges");
  }
  if ("PrepareSharedMemoryRegion" in req) {
    const r = req.PrepareSharedMemoryRegion;
    const out = prepareSharedMemoryRegion(ctx, r.alloc, r.cache);
    return out instanceof Refusal ? out.context(`failed to prepare shared memory region for ${describeAlloc(r.alloc)}`) : out;
  }
  if ("IoEventRaw" in req) {
    const r = req.IoEventRaw;
    const out = ioEvent(ctx, r.event, r.addr, r.datamatch, r.register);
    return out instanceof Refusal ? out.context(`failed to ${r.register ? "register" : "unregister"} ioevent at ${hex(r.addr)}`) : out;
  }
  if ("GetRegions" in req) {
    const p = req.GetRegions;
    const page = regionsPage(ctx, num(p.from), p.max ?? REGIONS_PER_PAGE);
    return { Regions: { regions: page.entries, next: page.next } };
  }
  if ("GetAllocations" in req) {
    const p = req.GetAllocations;
    const page = allocationsPage(ctx, num(p.from), p.max ?? ALLOCATIONS_PER_PAGE);
    return { Allocations: { allocations: page.entries, next: page.next } };
  }
  if ("AllocateMmio" in req) {
    const r = req.AllocateMmio;
    const size = num(r.size);
    const align = r.align === null ? undefined : num(r.align);
    const out = ctx.allocator.allocate(r.alloc, size, align);
    if (out instanceof Refusal) return out.context(`failed to allocate MMIO for ${describeAlloc(r.alloc)}`);
    return { Allocated: { start: out.start, size: out.size } };
  }
  if ("ReleaseMmio" in req) {
    const out = releaseMmio(ctx, req.ReleaseMmio);
    return out instanceof Refusal ? out.context(`failed to release MMIO of ${describeAlloc(req.ReleaseMmio)}`) : out;
  }
  if ("IrqFd" in req) {
    const r = req.IrqFd;
    const out = irqFd(ctx, r.event, r.gsi, r.resample, r.register);
    return out instanceof Refusal ? out.context(contextOf(req)!) : out;
  }
  if ("IoEventPio" in req) {
    const r = req.IoEventPio;
    const out = ioEvent(ctx, r.event, r.port, r.datamatch, r.register, true);
    return out instanceof Refusal ? out.context(contextOf(req)!) : out;
  }
  return Refusal.of("EINVAL", "unknown request");
}

/** `r` with `message` as outer context when it is a refusal. */
function withContext(r: Result, message: string): Result {
  return r instanceof Refusal ? r.context(message) : r;
}

// ---- value checks ----------------------------------------------------------

/** A u64 as a number; -1 above 2^53, beyond any guest physical limit (callers refuse it). */
function num(v: U64): number {
  return typeof v === "number" ? v : v > BigInt(Number.MAX_SAFE_INTEGER) ? -1 : Number(v);
}

function tooLarge(what: string, v: U64): Refusal {
  return Refusal.of("EOVERFLOW", `${what} ${hex(v)} is beyond 2^53`);
}

function notAligned(what: string, v: number): Refusal {
  return Refusal.of("EINVAL", `${what} ${hex(v)} is not page aligned (4096)`);
}

/** Up to the next page boundary: crosvm maps (and KVM slots cover) whole pages. */
export function pageUp(n: number): number {
  return Math.ceil(n / PAGE_SIZE) * PAGE_SIZE;
}

/** The mmap protection for `prot`. Write-only is read-write (x86 pages cannot be write-only). */
function protBits(prot: Protection): number | Refusal {
  if (!prot.read && !prot.write) return Refusal.of("EINVAL", "protection allows neither reading nor writing");
  return prot.write ? sys.PROT_READ | sys.PROT_WRITE : sys.PROT_READ;
}

/**
 * Inspects a source descriptor: the object's size where the kernel reports one (file, memfd,
 * dma-buf), -1 if it reports none. A memfd that allows sealing is sealed against shrinking,
 * so the size checked is its size for good (the seal stays if the request is refused later);
 * one that does not allow it, or a plain file, is checked as it is. Nothing here throws or
 * allocates for a descriptor that simply is not a memfd, or cannot be sealed: the size is a
 * number, not a stat object and a SourceInfo (the register cycle's 21 heap cells became 19),
 * and the sealing's failure is not even asked why (sys.addSeals: reading errno was the one
 * call, about 30 ns, a memfd without sealing cost more than one with it). (Write seals need
 * no look: see mapSource.)
 */
function inspectSource(fd: number, what: string): number | Refusal {
  sys.addSeals(fd, sys.F_SEAL_SHRINK);
  const rc = sys.tryFstat(fd);
  if (rc < 0) return new Refusal(-rc, [sys.sysRefusalMessage("fstat", -rc), `${what}: cannot inspect descriptor ${fd}`]);
  const type = sys.statMode() & sys.S_IFMT;
  // A regular file or memfd reports its size; so does a dma-buf (an anonymous inode whose
  // size is the buffer's). Devices and other anonymous inodes report none: mmap decides.
  const size = sys.statSize();
  return type === sys.S_IFREG || (type === 0 && size > 0) ? size : -1;
}

/** [offset, offset+size) lies inside an object of `objectSize` bytes (when that is known). */
function checkInside(objectSize: number, offset: number, size: number, what: string): Refusal | null {
  if (objectSize >= 0 && offset + size > objectSize) {
    return Refusal.of("EINVAL", `${what}: range ${hex(offset)}+${hex(size)} extends past the end of the object (${hex(objectSize)} bytes)`);
  }
  return null;
}

/** [guest, guest+size) is free guest physical space: aligned, below the limit, overlapping neither RAM nor a region. */
function checkFreeGuestRange(ctx: ExecContext, guest: GuestAddress, size: number): Refusal | null {
  if (guest % PAGE_SIZE !== 0) return notAligned("guest address", guest);
  const end = guest + size;
  if (!Number.isSafeInteger(end)) return Refusal.of("EOVERFLOW", `guest range ${hex(guest)}+${hex(size)} overflows`);
  if (end > ctx.vm.physAddrLimit) {
    return Refusal.of("EINVAL", `guest range ${hex(guest)}..${hex(end)} is beyond the guest physical limit ${hex(ctx.vm.physAddrLimit)}`);
  }
  for (const r of ctx.vm.ram) {
    if (guest < r.guest + r.size && r.guest < end) {
      return Refusal.of("ENOSPC", `guest range ${hex(guest)}..${hex(end)} overlaps guest RAM ${hex(r.guest)}..${hex(r.guest + r.size)}`);
    }
  }
  const hit = ctx.state.top.findOverlap(guest, end);
  if (hit !== undefined) {
    const what = isArena(hit.value) ? `the prepared region of ${describeAlloc(hit.value.alloc)}` : `region ${hex(hit.start)}`;
    return Refusal.of("ENOSPC", `guest range ${hex(guest)}..${hex(end)} overlaps ${what} (${hex(hit.start)}..${hex(hit.end)})`);
  }
  return null;
}

// ---- RegisterMemory / UnregisterMemory -------------------------------------

interface SourceRange {
  fd: number;
  offset: number;
  /** The size asked for, and the page-rounded size that gets mapped. */
  size: number;
  mapped: number;
}

function sourceRange(source: VmMemorySource): SourceRange | Refusal {
  if ("ExternalMapping" in source) {
    return Refusal.of("EPERM", "ExternalMapping sources point into another process's address space and are refused");
  }
  if ("Vulkan" in source) return Refusal.of("ENOTSUP", "Vulkan memory sources need a GPU allocator, which vmemd does not have");
  let fd: number;
  let offset = 0;
  let size: number;
  if ("SharedMemory" in source) {
    fd = source.SharedMemory.descriptor;
    size = num(source.SharedMemory.size);
    if (size < 0) return tooLarge("shared memory size", source.SharedMemory.size);
  } else {
    const d = source.Descriptor;
    fd = d.descriptor;
    offset = num(d.offset);
    size = num(d.size);
    if (offset < 0) return tooLarge("source offset", d.offset);
    if (size < 0) return tooLarge("source size", d.size);
    if (offset % PAGE_SIZE !== 0) return notAligned("source offset", offset);
    if (!Number.isSafeInteger(offset + size)) return Refusal.of("EOVERFLOW", `source range ${hex(offset)}+${hex(size)} overflows`);
  }
  if (size === 0) return Refusal.of("EINVAL", "memory source: size is zero");
  const objectSize = inspectSource(fd, "memory source");
  if (objectSize instanceof Refusal) return objectSize;
  const outside = checkInside(objectSize, offset, size, "memory source");
  if (outside !== null) return outside;
  return { fd, offset, size, mapped: pageUp(size) };
}

/** Where a destination lands: a prepared arena (fixed mapping) or free guest space (a new slot). */
interface Placement {
  arena: PreparedArena | null;
  guest: GuestAddress;
}

function place(ctx: ExecContext, dest: VmMemoryDestination, size: number): Placement | Refusal {
  if ("ExistingAllocation" in dest) {
    const { allocation, offset } = dest.ExistingAllocation;
    const off = num(offset);
    if (off < 0) return tooLarge("allocation offset", offset);
    const arena = ctx.state.arenas.get(allocKey(allocation));
    if (arena !== undefined) {
      if (off + size > arena.size) {
        return Refusal.of("EINVAL", `offset ${hex(off)} size ${hex(size)} is outside ${describeAlloc(allocation)} (${hex(arena.size)} bytes)`);
      }
      return { arena, guest: arena.start + off };
    }
    const guest = ctx.allocator.addressFromPciOffset(allocation, off, size);
    return guest instanceof Refusal ? guest : { arena: null, guest };
  }
  const guest = num(dest.GuestPhysicalAddress);
  if (guest < 0) return tooLarge("guest address", dest.GuestPhysicalAddress);
  // vmemd maps a guest address inside a prepared arena into it (crosvm: the kernel's EEXIST).
  const hit = ctx.state.top.find(guest);
  return { arena: hit !== undefined && isArena(hit.value) ? hit.value : null, guest };
}

/**
 * The source mapped as `protection` says: shared, or, for a memfd whose writes are sealed
 * (F_SEAL_WRITE, F_SEAL_FUTURE_WRITE: the kernel refuses a shared writable mapping with
 * EPERM), a private copy-on-write one, as crosvm maps it. Trying shared first costs the
 * common case nothing; asking for the seals first was a system call on every register.
 */
function mapSource(src: SourceRange, protection: number): MemoryMapping | number {
  const shared = MemoryMapping.tryFromDescriptor(src.fd, src.offset, src.mapped, protection, false);
  if (shared !== sys.Errno.EPERM || !(protection & sys.PROT_WRITE)) return shared;
  return MemoryMapping.tryFromDescriptor(src.fd, src.offset, src.mapped, protection, true);
}

function registerMemory(ctx: ExecContext, source: VmMemorySource, dest: VmMemoryDestination, prot: Protection, cache: MemCacheType): Result {
  const protection = protBits(prot);
  if (protection instanceof Refusal) return protection;
  const src = sourceRange(source);
  if (src instanceof Refusal) return src;
  const placement = place(ctx, dest, src.mapped);
  if (placement instanceof Refusal) return placement;
  const readOnly = !prot.write;
  if (placement.arena !== null) return mapIntoArena(ctx, placement.arena, placement.guest, src, protection, readOnly);

  const guest = placement.guest;
  const busy = checkFreeGuestRange(ctx, guest, src.mapped);
  if (busy !== null) return busy;
  // try/catch inline, not a helper taking closures and a message: on this path a closure
  // makes JSC allocate the function's scope, and a template string is built on every call.
  const mapping = mapSource(src, protection);
  // A descriptor the kernel will not map (a socket, a pipe) is the client's to send: a refusal.
  if (typeof mapping === "number") return new Refusal(mapping, [sys.sysRefusalMessage("mmap", mapping), "failed to map the memory source"]);
  let slot: MemSlot;
  try {
    slot = ctx.vm.addMemoryRegion(guest, mapping, readOnly, cache);
  } catch (e) {
    throw VmMemoryError.from(e).context(`failed to add memory region at ${hex(guest)} when registering memory`);
  }
  const region: Region = { id: guest, size: src.mapped, slot, readOnly, arena: null };
  ctx.state.regions.set(guest, region);
  ctx.state.top.insert(guest, guest + src.mapped, region);
  return { RegisterMemory: { region_id: guest, slot } };
}

function mapIntoArena(ctx: ExecContext, arena: PreparedArena, guest: GuestAddress, src: SourceRange, protection: number, readOnly: boolean): Result {
  if (guest % PAGE_SIZE !== 0) return notAligned("guest address", guest);
  const end = guest + src.mapped;
  if (end > arena.start + arena.size) {
    return Refusal.of("ENOSPC", `guest range ${hex(guest)}..${hex(end)} crosses the end of the prepared region of ${describeAlloc(arena.alloc)}`);
  }
  const hit = arena.fixed.findOverlap(guest, end);
  if (hit !== undefined) {
    return Refusal.of("ENOSPC", `guest range ${hex(guest)}..${hex(end)} overlaps region ${hex(hit.start)} in the prepared region of ${describeAlloc(arena.alloc)}`);
  }
  const offset = guest - arena.start;
  // A write-sealed source refuses a shared writable mapping (EPERM): it is mapped private.
  let errno = ctx.vm.addFdMapping(arena.slot, offset, src.mapped, src.fd, src.offset, protection, false);
  if (errno === sys.Errno.EPERM && protection & sys.PROT_WRITE) errno = ctx.vm.addFdMapping(arena.slot, offset, src.mapped, src.fd, src.offset, protection, true);
  if (errno !== 0) {
    return new Refusal(errno, [sys.sysRefusalMessage("mmap", errno), `failed to add fd mapping at offset ${hex(offset)} of the prepared region of ${describeAlloc(arena.alloc)}`]);
  }
  const region: Region = { id: guest, size: src.mapped, slot: arena.slot, readOnly, arena };
  ctx.state.regions.set(guest, region);
  arena.fixed.insert(guest, end, region);
  return { RegisterMemory: { region_id: guest, slot: arena.slot } };
}

/**
 * UnregisterMemory's refusal for an id with no region, its context included. The id is
 * written once, in the root cause (where clients look for it): each string made per
 * refusal is a rope the encoder then flattens, and a client with stale ids drives this at
 * request rate.
 */
function unknownRegion(id: U64): Refusal {
  return new Refusal(sys.Errno.ENOENT, ["no registered memory region with id 0x" + id.toString(16), UNREGISTER_CONTEXT]);
}
const UNREGISTER_CONTEXT = "failed to unregister memory region";

function unregisterMemory(ctx: ExecContext, id: U64): Result {
  const region = ctx.state.regions.get(regionIdOf(id));
  if (region === undefined) return unknownRegion(id);
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

function prepareSharedMemoryRegion(ctx: ExecContext, alloc: Alloc, cache: MemCacheType): Result {
  if (!isPciBar(alloc)) return Refusal.of("EINVAL", `${describeAlloc(alloc)} is not a PciBar allocation`);
  const key = allocKey(alloc);
  if (ctx.state.arenas.has(key)) return Refusal.of("EEXIST", `${describeAlloc(alloc)} is already prepared`);
  const a = ctx.allocator.get(alloc);
  if (a === undefined) return Refusal.of("EINVAL", `${describeAlloc(alloc)} is not allocated`);
  const busy = checkFreeGuestRange(ctx, a.start, a.size);
  if (busy !== null) return busy;
  let slot: MemSlot;
  try {
    slot = ctx.vm.prepareArena(a.start, a.size, cache);
  } catch (e) {
    throw VmMemoryError.from(e).context("failed to add the arena's memory region");
  }
  const arena: PreparedArena = { alloc, start: a.start, size: a.size, slot, fixed: new IntervalMap<Region>() };
  ctx.state.arenas.set(key, arena);
  ctx.state.top.insert(a.start, a.start + a.size, arena);
  return "Ok";
}

// ---- MmapAndRegisterMemory -------------------------------------------------

/**
 * One MmapAndRegisterMemory under way: the shm is mapped when the request comes, each
 * chunk's files are mapped into it as the chunk arrives (so their descriptors can be closed
 * at once: a pending request holds mappings, not descriptors), and the slot is added when
 * the last chunk is in. It owns its mapping until finish() hands it to the VM; abort()
 * releases it on every other path.
 */
export class MmapRegistration {
  private mapping: MemoryMapping | null;
  private mapped = 0;

  private constructor(
    private readonly ctx: ExecContext,
    readonly guest: GuestAddress,
    readonly size: number,
    mapping: MemoryMapping,
  ) {
    this.mapping = mapping;
  }

  /** Checks the request and maps the shm; a refusal allocates nothing. */
  static start(ctx: ExecContext, shm: SharedMemory, dest: VmMemoryDestination): MmapRegistration | Refusal {
    const r = MmapRegistration.begin(ctx, shm, dest);
    return r instanceof Refusal ? r.context("failed to mmap and register memory") : r;
  }

  private static begin(ctx: ExecContext, shm: SharedMemory, dest: VmMemoryDestination): MmapRegistration | Refusal {
    const size = num(shm.size);
    if (size < 0) return tooLarge("shm size", shm.size);
    if (size === 0) return Refusal.of("EINVAL", "shm: size is zero");
    const objectSize = inspectSource(shm.descriptor, "shm");
    if (objectSize instanceof Refusal) return objectSize;
    const outside = checkInside(objectSize, 0, size, "shm");
    if (outside !== null) return outside;
    const mapped = pageUp(size);
    const placement = place(ctx, dest, mapped);
    if (placement instanceof Refusal) return placement;
    if (placement.arena !== null) return Refusal.of("EINVAL", "MmapAndRegisterMemory into a prepared region is not supported; use RegisterMemory");
    const busy = checkFreeGuestRange(ctx, placement.guest, mapped);
    if (busy !== null) return busy;
    const mapping = MemoryMapping.tryFromDescriptor(shm.descriptor, 0, mapped, sys.PROT_READ);
    // A descriptor the kernel will not map is the client's to send: a refusal, not an error.
    if (typeof mapping === "number") return new Refusal(mapping, [sys.sysRefusalMessage("mmap", mapping), "failed to map the shm"]);
    return new MmapRegistration(ctx, placement.guest, mapped, mapping);
  }

  /** Maps one chunk's files (read-only, MAP_FIXED into the shm); a refusal fails the request. */
  add(files: readonly VmMemoryFileMapping[]): Refusal | null {
    const mapping = this.mapping!;
    for (let i = 0; i < files.length; i++) {
      const index = this.mapped++;
      const r = this.addOne(mapping, files[i]!, `file mapping ${index}`);
      if (r !== null) return r.context("failed to mmap and register memory");
    }
    return null;
  }

  private addOne(mapping: MemoryMapping, f: VmMemoryFileMapping, what: string): Refusal | null {
    const length = num(f.length);
    const memOffset = num(f.mem_offset);
    const fileOffset = num(f.file_offset);
    if (length < 0 || memOffset < 0 || fileOffset < 0) return Refusal.of("EOVERFLOW", `${what}: a value is beyond 2^53`);
    if (length === 0) return Refusal.of("EINVAL", `${what}: length is zero`);
    if (memOffset % PAGE_SIZE !== 0) return notAligned(`${what}: mem_offset`, memOffset);
    if (fileOffset % PAGE_SIZE !== 0) return notAligned(`${what}: file_offset`, fileOffset);
    const span = pageUp(length);
    if (memOffset + span > this.size) {
      return Refusal.of("EINVAL", `${what}: ${hex(memOffset)}+${hex(span)} extends past the shm (${hex(this.size)} bytes)`);
    }
    const objectSize = inspectSource(f.file, what);
    if (objectSize instanceof Refusal) return objectSize;
    const outside = checkInside(objectSize, fileOffset, length, what);
    if (outside !== null) return outside;
    // Read-only: a write-sealed file maps shared as it is.
    const errno = mapping.tryMapFixed(memOffset, span, f.file, fileOffset, sys.PROT_READ);
    return errno === 0 ? null : new Refusal(errno, [sys.sysRefusalMessage("mmap", errno), `failed to map ${what} at offset ${hex(memOffset)}`]);
  }

  /** Adds the slot; the mapping is the VM's from here on, whatever the outcome. */
  finish(): VmMemoryResponse {
    const mapping = this.mapping!;
    this.mapping = null;
    const guest = this.guest;
    let slot: MemSlot;
    try {
      slot = this.ctx.vm.addMemoryRegion(guest, mapping, true, "CacheCoherent");
    } catch (e) {
      return errResponse(errorRefusal(e).context(`failed to add memory region at ${hex(guest)}`).context("failed to mmap and register memory"));
    }
    const region: Region = { id: guest, size: this.size, slot, readOnly: true, arena: null };
    this.ctx.state.regions.set(guest, region);
    this.ctx.state.top.insert(guest, guest + this.size, region);
    return { RegisterMemory: { region_id: guest, slot } };
  }

  /** Releases what was mapped (the request failed, or its connection went). Idempotent. */
  abort(): void {
    this.mapping?.release();
    this.mapping = null;
  }
}

function errorRefusal(e: unknown): Refusal {
  const err = VmMemoryError.from(e);
  return new Refusal(err.errno, err.chain);
}

// ---- balloon ---------------------------------------------------------------

/** Checks every range first (page aligned, non-empty, wholly in guest RAM): all or nothing. */
function checkRamRanges(vm: Vm, ranges: GuestRange[]): Array<[number, number]> | Refusal {
  const out: Array<[number, number]> = [];
  for (let i = 0; i < ranges.length; i++) {
    const [g, s] = ranges[i]!;
    const guest = num(g);
    const size = num(s);
    if (guest < 0 || size < 0) return Refusal.of("EOVERFLOW", `range ${i}: ${hex(g)}+${hex(s)} is beyond 2^53`);
    if (guest % PAGE_SIZE !== 0) return notAligned(`range ${i}: address`, guest);
    if (size % PAGE_SIZE !== 0) return notAligned(`range ${i}: size`, size);
    if (size === 0) return Refusal.of("EINVAL", `range ${i}: size is zero`);
    const inRam = vm.ram.some((r) => guest >= r.guest && guest + size <= r.guest + r.size);
    if (!inRam) return Refusal.of("EINVAL", `range ${i}: ${hex(guest)}+${hex(size)} is not inside guest RAM`);
    out.push([guest, size]);
  }
  return out;
}

function freeRanges(ctx: ExecContext, ranges: GuestRange[]): Result {
  const job = FreeRanges.start(ctx, ranges);
  if (job instanceof Refusal) return job;
  while (!job.step(Infinity));
  return job.result();
}

/**
 * A DynamicallyFreeMemoryRanges, checked whole first (all or nothing), then applied a slice
 * at a time: one packet can hold 4000 ranges, some 15 ms of madvise, and the server runs
 * other peers' requests between slices so that no peer waits behind that.
 */
export class FreeRanges {
  private next = 0;
  private failure: Refusal | null = null;

  private constructor(
    private readonly ctx: ExecContext,
    private readonly ranges: Array<[number, number]>,
  ) {}

  static start(ctx: ExecContext, ranges: GuestRange[]): FreeRanges | Refusal {
    const checked = checkRamRanges(ctx.vm, ranges);
    return checked instanceof Refusal ? checked.context("failed to free guest memory ranges") : new FreeRanges(ctx, checked);
  }

  /** Applies ranges until `until` (performance.now()) or the end; true when done. */
  step(until: number): boolean {
    const ranges = this.ranges;
    while (this.next < ranges.length && this.failure === null) {
      const [guest, size] = ranges[this.next++]!;
      try {
        this.ctx.vm.removeRamRange(guest, size);
        this.ctx.state.freed.add(guest, guest + size);
      } catch (e) {
        this.failure = errorRefusal(e).context(`failed to remove RAM range ${hex(guest)}+${hex(size)}`).context("failed to free guest memory ranges");
      }
      if ((this.next & 15) === 0 && performance.now() >= until) break;
    }
    return this.next >= ranges.length || this.failure !== null;
  }

  result(): VmMemoryResponse {
    return this.failure !== null ? errResponse(this.failure) : "Ok";
  }

  /** Ranges: a request with fewer than this is done at once (a slice would not pay for itself). */
  static readonly SLICED_FROM = 64;
}

function reclaimRanges(ctx: ExecContext, ranges: GuestRange[]): Result {
  const checked = checkRamRanges(ctx.vm, ranges);
  if (checked instanceof Refusal) return checked;
  // Pages come back zeroed on the guest's next touch: nothing to do but stop counting them.
  for (const [guest, size] of checked) ctx.state.freed.remove(guest, guest + size);
  return "Ok";
}

// ---- IoEventRaw ------------------------------------------------------------

const DATAMATCH_LENGTHS = { U8: 1, U16: 2, U32: 4, U64: 8 } as const;

function ioeventDatamatch(dm: Datamatch): IoeventDatamatch {
  if (dm === "AnyLength") return { length: 0, value: null };
  const [kind, v] = Object.entries(dm)[0] as [keyof typeof DATAMATCH_LENGTHS, U64 | null];
  return { length: DATAMATCH_LENGTHS[kind], value: v === null ? null : BigInt(v) };
}

/** KVM_IOEVENTFD on an MMIO address, or (`pio`) on a port. */
function ioEvent(ctx: ExecContext, event: number, addr: U64, dm: Datamatch, register: boolean, pio = false): Result {
  const guest = num(addr);
  if (guest < 0) return tooLarge("ioevent address", addr);
  const datamatch = ioeventDatamatch(dm);
  const errno = register ? ctx.vm.registerIoevent(event, guest, datamatch, pio) : ctx.vm.unregisterIoevent(event, guest, datamatch, pio);
  return errno === 0 ? "Ok" : new Refusal(errno, [sys.sysRefusalMessage("KVM_IOEVENTFD", errno)]);
}

// ---- the device plane ------------------------------------------------------

/** IOAPIC pins: the GSIs an irqfd may raise (the in-kernel IOAPIC has 24). */
export const IOAPIC_PINS = 24;

function irqFd(ctx: ExecContext, event: number, gsi: number, resample: number | null, register: boolean): Result {
  if (!ctx.vm.irqchip) return Refusal.of("ENOTSUP", "this VM has no in-kernel interrupt controller (it has one when vmemd runs a guest: --guest or --kernel)");
  if (gsi >= IOAPIC_PINS) return Refusal.of("EINVAL", `GSI ${gsi} is not an IOAPIC pin (0-${IOAPIC_PINS - 1})`);
  const errno = register ? ctx.vm.registerIrqfd(event, gsi, resample ?? -1) : ctx.vm.unregisterIrqfd(event, gsi);
  return errno === 0 ? "Ok" : new Refusal(errno, [sys.sysRefusalMessage("KVM_IRQFD", errno)]);
}

/** Guest RAM as a device maps it: the one memfd, and where each part of it appears. */
function guestMemory(ctx: ExecContext): VmMemoryResponse {
  const fd = ctx.vm.ramDescriptor;
  return { GuestMemory: { ranges: ctx.vm.ram.map((r) => ({ guest_address: r.guest, size: r.size, descriptor: fd, offset: r.fileOffset })) } };
}

// ---- vmemd extensions ------------------------------------------------------

function releaseMmio(ctx: ExecContext, alloc: Alloc): Result {
  const a = ctx.allocator.get(alloc);
  if (a === undefined) return Refusal.of("ENOENT", `${describeAlloc(alloc)} is not allocated`);
  const user = ctx.state.top.findOverlap(a.start, a.start + a.size);
  if (user !== undefined) {
    return Refusal.of("EBUSY", `${describeAlloc(alloc)} is in use by ${isArena(user.value) ? "its prepared region" : `region ${hex(user.start)}`}`);
  }
  ctx.allocator.release(alloc);
  return "Ok";
}

interface Page<T> {
  entries: T[];
  /** The key of the first entry not listed; null when the listing is complete. */
  next: number | null;
}

/** Regions in ascending region_id: prepared arenas, the fixed mappings inside them, dynamic regions. */
function* regionsFrom(ctx: ExecContext, from: number): IterableIterator<RegionSummary> {
  for (const { start, end, value } of ctx.state.top.entriesFrom(from)) {
    if (isArena(value)) {
      if (start >= from) yield { region_id: start, slot: value.slot, size: end - start, read_only: true, kind: "prepared" };
      for (const f of value.fixed.entriesFrom(from)) {
        if (f.start >= from) yield { region_id: f.start, slot: value.slot, size: f.value.size, read_only: f.value.readOnly, kind: "fixed" };
      }
    } else if (start >= from) {
      yield { region_id: start, slot: value.slot, size: value.size, read_only: value.readOnly, kind: "dynamic" };
    }
  }
}

/**
 * A page of up to `max` regions from `from` on (at least one if any remain). A prepared
 * arena and a fixed mapping at its first byte share a region_id: a page never ends between
 * the two (they move to the next page together, or, when the page would be empty, both stay).
 */
export function regionsPage(ctx: ExecContext, from: number, max: number): Page<RegionSummary> {
  if (from < 0) return { entries: [], next: null };
  const cap = Math.max(1, Math.min(max, REGIONS_PER_PAGE));
  const entries: RegionSummary[] = [];
  for (const r of regionsFrom(ctx, from)) {
    if (entries.length < cap) {
      entries.push(r);
      continue;
    }
    const last = entries[entries.length - 1]!;
    if (r.region_id !== last.region_id) return { entries, next: r.region_id as number };
    if (entries.length > 1) {
      entries.pop();
      return { entries, next: last.region_id as number };
    }
    entries.push(r); // a page of one arena would repeat for ever: take its first mapping too
  }
  return { entries, next: null };
}

export function allocationsPage(ctx: ExecContext, from: number, max: number): Page<AllocationSummary> {
  if (from < 0) return { entries: [], next: null };
  const cap = Math.max(1, Math.min(max, ALLOCATIONS_PER_PAGE));
  const entries: AllocationSummary[] = [];
  for (const a of ctx.allocator.allocations()) {
    if (a.start < from) continue;
    if (entries.length === cap) return { entries, next: a.start };
    entries.push({ alloc: a.alloc, start: a.start, size: a.size });
  }
  return { entries, next: null };
}

function getState(ctx: ExecContext): VmMemoryResponse {
  // Both lists share the packet: half a page each.
  const regions = regionsPage(ctx, 0, Math.floor(REGIONS_PER_PAGE / 2));
  const allocations = allocationsPage(ctx, 0, Math.floor(ALLOCATIONS_PER_PAGE / 2));
  return {
    State: {
      ram: ctx.vm.ram.map((r) => [r.guest, r.size] as GuestRange),
      regions: regions.entries,
      regions_next: regions.next,
      allocations: allocations.entries,
      allocations_next: allocations.next,
      slots_used: ctx.vm.slotsUsed(),
      slots_max: ctx.vm.slotsMax,
      freed_bytes: ctx.state.freed.total,
      balloon_target: ctx.state.balloonTarget,
      vcpu: ctx.vcpu?.() ?? null,
    },
  };
}

/** MmapAndRegisterMemory with every file mapping at hand (in-process callers and tests). */
export function mmapAndRegister(ctx: ExecContext, shm: SharedMemory, dest: VmMemoryDestination, files: readonly VmMemoryFileMapping[]): VmMemoryResponse {
  let reg: MmapRegistration | Refusal;
  try {
    reg = MmapRegistration.start(ctx, shm, dest);
  } catch (e) {
    return errResponse(e);
  }
  if (reg instanceof Refusal) return errResponse(reg);
  const bad = reg.add(files);
  if (bad !== null) {
    reg.abort();
    return errResponse(bad);
  }
  return reg.finish();
}
