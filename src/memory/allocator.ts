// SystemAllocator: the guest's MMIO address space (docs/protocol.md, "Guest physical
// layout"), as crosvm's resources::SystemAllocator for what vmemd needs: PCI BARs
// and other MMIO allocations, naturally aligned, from a low and a high pool.
import { type GuestAddress, hex, highMmioStart, LOW_MMIO_END, MiB, PCI_HOLE_START } from "../kvm";
import { failure, Refusal } from "./error";
import type { Alloc } from "../protocol/messages";

export interface Allocation {
  alloc: Alloc;
  start: GuestAddress;
  size: number;
}

/** Bars of this size and up go to the high pool (crosvm does the same split). */
export const HIGH_POOL_THRESHOLD = 256 * MiB;

/** A stable key for an Alloc (bigints and numbers of the same value are the same key). */
export function allocKey(alloc: Alloc): string {
  if (typeof alloc === "string") return alloc;
  if ("PciBar" in alloc) {
    const b = alloc.PciBar;
    return `PciBar:${b.bus}:${b.dev}:${b.func}:${b.bar}`;
  }
  const [k, v] = Object.entries(alloc)[0]!;
  return typeof v === "object" ? `${k}:${v.bus}:${v.dev}:${v.func}` : `${k}:${v}`;
}

export function isPciBar(alloc: Alloc): alloc is Extract<Alloc, { PciBar: unknown }> {
  return typeof alloc === "object" && "PciBar" in alloc;
}

const h2 = (n: number) => n.toString(16).padStart(2, "0");

export function describeAlloc(alloc: Alloc): string {
  if (typeof alloc === "string") return alloc;
  if ("PciBar" in alloc) {
    const b = alloc.PciBar;
    return `PciBar ${h2(b.bus)}:${h2(b.dev)}.${b.func} BAR${b.bar}`;
  }
  const [k, v] = Object.entries(alloc)[0]!;
  return typeof v === "object" ? `${k} ${h2(v.bus)}:${h2(v.dev)}.${v.func}` : `${k}(${v})`;
}

class Pool {
  /** Allocations sorted by start. Few (one per BAR), so a sorted array is the obvious structure. */
  readonly used: Allocation[] = [];
  constructor(
    readonly name: string,
    readonly start: GuestAddress,
    readonly end: GuestAddress,
  ) {}

  /** First fit: the lowest aligned start where `size` bytes are free. */
  place(size: number, align: number): GuestAddress | undefined {
    let cursor = this.start;
    for (const a of this.used) {
      const candidate = Math.ceil(cursor / align) * align;
      if (candidate + size <= a.start) return candidate;
      cursor = Math.max(cursor, a.start + a.size);
    }
    const candidate = Math.ceil(cursor / align) * align;
    return candidate + size <= this.end ? candidate : undefined;
  }

  insert(a: Allocation): void {
    let i = this.used.findIndex((u) => u.start > a.start);
    if (i === -1) i = this.used.length;
    this.used.splice(i, 0, a);
  }

  remove(a: Allocation): void {
    this.used.splice(this.used.indexOf(a), 1);
  }
}

export class SystemAllocator {
  readonly low: Pool;
  readonly high: Pool;
  private readonly byKey = new Map<string, { a: Allocation; pool: Pool }>();

  constructor(ramSize: number, physAddrLimit: GuestAddress) {
    this.low = new Pool("low", PCI_HOLE_START, LOW_MMIO_END);
    this.high = new Pool("high", highMmioStart(ramSize), physAddrLimit);
  }

  /**
   * Allocates `size` bytes for `alloc`. A PciBar must be a power of two of at least
   * 4 KiB and is aligned to its size (the PCI rule); others align to `align` (default 4 KiB).
   */
  allocate(alloc: Alloc, size: number, align?: number): Allocation | Refusal {
    const what = describeAlloc(alloc);
    if (this.byKey.has(allocKey(alloc))) return Refusal.of("EEXIST", `${what} is already allocated`);
    if (!Number.isSafeInteger(size) || size <= 0 || size % 4096 !== 0) {
      return Refusal.of("EINVAL", `${what}: size ${size} is not a positive multiple of 4096`);
    }
    const isBar = isPciBar(alloc);
    if (isBar && !isPowerOfTwo(size)) {
      return Refusal.of("EINVAL", `${what}: a BAR size must be a power of two, not ${size}`);
    }
    const alignment = isBar ? size : (align ?? 4096);
    if (!isPowerOfTwo(alignment) || alignment < 4096) {
      return Refusal.of("EINVAL", `${what}: alignment ${alignment} is not a power of two of at least 4096`);
    }
    const pools = size >= HIGH_POOL_THRESHOLD ? [this.high] : [this.low, this.high];
    for (const pool of pools) {
      const start = pool.place(size, alignment);
      if (start === undefined) continue;
      const a: Allocation = { alloc, start, size };
      pool.insert(a);
      this.byKey.set(allocKey(alloc), { a, pool });
      return a;
    }
    return Refusal.of("ENOSPC", `${what}: no room for ${size} bytes aligned to ${alignment} in the MMIO pools`);
  }

  get(alloc: Alloc): Allocation | undefined {
    return this.byKey.get(allocKey(alloc))?.a;
  }

  release(alloc: Alloc): void {
    const e = this.byKey.get(allocKey(alloc));
    if (e === undefined) throw failure("ENOENT", `${describeAlloc(alloc)} is not allocated`);
    e.pool.remove(e.a);
    this.byKey.delete(allocKey(alloc));
  }

  /**
   * The guest address of [offset, offset+size) inside a PciBar allocation, as crosvm's
   * address_from_pci_offset: PciBar only, overflow and bounds checked; a range may end
   * exactly at the BAR's end.
   */
  addressFromPciOffset(alloc: Alloc, offset: number, size: number): GuestAddress | Refusal {
    if (!isPciBar(alloc)) return Refusal.of("EINVAL", `${describeAlloc(alloc)} is not a PciBar allocation`);
    const a = this.get(alloc);
    if (a === undefined) return Refusal.of("EINVAL", `${describeAlloc(alloc)} is not allocated`);
    const address = a.start + offset;
    const end = address + size;
    if (!Number.isSafeInteger(end) || offset < 0 || size < 0 || end > a.start + a.size) {
      return Refusal.of("EINVAL", `offset ${hex(offset)} size ${hex(size)} is outside ${describeAlloc(alloc)} (${hex(a.size)} bytes)`);
    }
    return address;
  }

  *allocations(): IterableIterator<Allocation> {
    yield* this.low.used;
    yield* this.high.used;
  }
}

function isPowerOfTwo(n: number): boolean {
  return n > 0 && Number.isSafeInteger(n) && 2 ** Math.round(Math.log2(n)) === n;
}
