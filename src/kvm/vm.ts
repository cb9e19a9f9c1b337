// The Vm interface the memory layer is written against, shaped like crosvm's
// hypervisor::Vm: memory regions in slots, fixed mappings in prepared arenas,
// ioeventfds, and giving RAM back.
import type { GuestAddress, RamRange } from "./layout";
import type { MemoryMapping } from "./mapping";
import type { MemSlot } from "./slots";

export type MemCacheType = "CacheCoherent" | "CacheNonCoherent";

/** KVM_IOEVENTFD's match: `length` 0 is any length; `value` null matches any value. */
export interface IoeventDatamatch {
  length: 0 | 1 | 2 | 4 | 8;
  value: bigint | null;
}

export interface VmMemoryRegionInfo {
  slot: MemSlot;
  guest: GuestAddress;
  size: number;
  readOnly: boolean;
  /** A prepared arena (from prepareArena) rather than a plain mapping. */
  arena: boolean;
}

export interface Vm {
  /** One past the highest guest physical address the guest can reach. */
  readonly physAddrLimit: GuestAddress;
  readonly ram: readonly RamRange[];
  readonly slotsMax: number;
  slotsUsed(): number;

  /**
   * Maps `mapping` at `guest` in the lowest free slot. Takes ownership of `mapping`
   * whatever the outcome: it is released on failure and by removeMemoryRegion.
   */
  addMemoryRegion(guest: GuestAddress, mapping: MemoryMapping, readOnly: boolean, cache: MemCacheType): MemSlot;
  /** Removes the slot and releases its mapping. */
  removeMemoryRegion(slot: MemSlot): void;

  /** Reserves [guest, guest+size) as read-only anonymous memory in one slot (an arena). */
  prepareArena(guest: GuestAddress, size: number, cache: MemCacheType): MemSlot;
  /** Maps `size` bytes of `fd` at `fdOffset` into the arena in `slot` at `offset` (MAP_FIXED). */
  /** 0, or the errno mmap gave for the client's descriptor (nothing thrown for those). */
  addFdMapping(slot: MemSlot, offset: number, size: number, fd: number, fdOffset: number, prot: number, private_: boolean): number;
  /** Puts the arena's anonymous read-only memory back over [offset, offset+size). */
  removeMapping(slot: MemSlot, offset: number, size: number): void;

  /**
   * 0, or the errno KVM answered: a client drives these, so failure is a value. `pio`: `addr`
   * is a port (KVM_IOEVENTFD_FLAG_PIO), else a guest physical address.
   */
  registerIoevent(eventFd: number, addr: GuestAddress, datamatch: IoeventDatamatch, pio?: boolean): number;
  unregisterIoevent(eventFd: number, addr: GuestAddress, datamatch: IoeventDatamatch, pio?: boolean): number;

  /** Whether the VM has an in-kernel interrupt controller (irqfds need one). */
  readonly irqchip: boolean;
  /**
   * KVM_IRQFD: a signal on `eventFd` raises `gsi`; with `resampleFd` (not -1) the line is
   * level-triggered and `resampleFd` is signalled at the guest's EOI. 0, or KVM's errno.
   */
  registerIrqfd(eventFd: number, gsi: number, resampleFd: number): number;
  unregisterIrqfd(eventFd: number, gsi: number): number;

  /** The descriptor backing all of guest RAM (ranges' fileOffset index into it). */
  readonly ramDescriptor: number;

  /** Gives [guest, guest+size) of RAM back to the host; the guest reads zeros there afterwards. */
  removeRamRange(guest: GuestAddress, size: number): void;

  regions(): IterableIterator<VmMemoryRegionInfo>;
}
