// KvmVm: one KVM virtual machine, its guest RAM, its memory slots and ioeventfds.
// Shaped like crosvm's hypervisor/src/kvm KvmVm.
import * as sys from "../sys";
import { Kvm } from "./kvm";
import { type GuestAddress, hex, type RamRange, ramLayout } from "./layout";
import { MemoryMapping } from "./mapping";
import { type MemSlot, SlotAllocator } from "./slots";
import type { IoeventDatamatch, MemCacheType, Vm, VmMemoryRegionInfo } from "./vm";

interface SlotRegion {
  guest: GuestAddress;
  size: number;
  readOnly: boolean;
  /** Owned by the slot: released when the slot is removed. Null for guest RAM. */
  mapping: MemoryMapping | null;
  arena: boolean;
}

export interface KvmVmOptions {
  /** Guest RAM in bytes (page aligned). */
  memory: number;
  kvm?: Kvm;
  /** Limit slots below the kernel's (tests); never above it. */
  maxSlots?: number;
  /** Allocate all guest RAM now, by touching every page as a guest would, instead of on first touch. */
  prefault?: boolean;
  /** Create the in-kernel interrupt controller (PICs, IOAPIC, LAPICs) and timer (PIT). */
  irqchip?: boolean;
}

export class KvmVm implements Vm {
  readonly kvm: Kvm;
  readonly fd: number;
  readonly physAddrLimit: GuestAddress;
  readonly physAddrBits: number;
  readonly ram: readonly RamRange[];
  readonly ramSize: number;
  readonly slotsMax: number;
  readonly readonlyMemSupported: boolean;
  /** The memfd that backs all guest RAM, and its one mapping. */
  readonly ramFd: number;
  readonly ramMapping: MemoryMapping;
  readonly irqchip: boolean;

  private readonly slots: SlotAllocator;
  /**
   * Indexed by slot number (dense, lowest first). An array rather than a Map: a Map that
   * sees an insert and a delete per request churns garbage the GC has to promote
   * (memory/number_map.ts says why).
   */
  private readonly bySlot: (SlotRegion | undefined)[] = [];
  private readonly regionBuf = new DataView(new ArrayBuffer(sys.MEMORY_REGION_SIZE));
  private readonly ioeventBuf = new DataView(new ArrayBuffer(sys.IOEVENTFD_SIZE));
  private readonly irqfdBuf = new DataView(new ArrayBuffer(sys.IRQFD_SIZE));
  private closed = false;

  private constructor(kvm: Kvm, fd: number, ramFd: number, ramMapping: MemoryMapping, memory: number, maxSlots: number, irqchip: boolean) {
    this.kvm = kvm;
    this.irqchip = irqchip;
    this.fd = fd;
    this.ramFd = ramFd;
    this.ramMapping = ramMapping;
    this.ramSize = memory;
    this.ram = ramLayout(memory);
    this.slotsMax = maxSlots;
    this.slots = new SlotAllocator(maxSlots);
    this.physAddrBits = kvm.physAddrBits();
    this.physAddrLimit = 2 ** this.physAddrBits;
    this.readonlyMemSupported = kvm.checkExtension(sys.KVM_CAP_READONLY_MEM) > 0;
  }

  /** Creates the VM and its guest RAM; on any failure everything made so far is released. */
  static create(opts: KvmVmOptions): KvmVm {
    if (opts.memory <= 0 || opts.memory % sys.PAGE_SIZE !== 0) {
      throw new sys.SysError(`guest memory size ${opts.memory} is not a positive multiple of 4096`, sys.Errno.EINVAL);
    }
    const ownKvm = opts.kvm === undefined;
    const kvm = opts.kvm ?? new Kvm();
    const undo: Array<() => void> = ownKvm ? [() => kvm.close()] : [];
    try {
      if (kvm.checkExtension(sys.KVM_CAP_USER_MEMORY) <= 0 || kvm.checkExtension(sys.KVM_CAP_IOEVENTFD) <= 0) {
        throw new sys.SysError("KVM lacks KVM_CAP_USER_MEMORY or KVM_CAP_IOEVENTFD", sys.Errno.ENOTSUP);
      }
      const kernelSlots = kvm.maxMemSlots();
      const maxSlots = Math.min(kernelSlots, opts.maxSlots ?? kernelSlots);
      const fd = kvm.createVmFd();
      undo.push(() => sys.close(fd));
      // Intel VMX needs a TSS address below 4 GiB for real mode; harmless elsewhere.
      try {
        sys.ioctl(fd, sys.KVM_SET_TSS_ADDR, 0xfffb_d000, "KVM_SET_TSS_ADDR");
      } catch {}
      if (opts.irqchip) {
        // Before any vCPU exists: each vCPU created afterwards gets an in-kernel LAPIC.
        if (kvm.checkExtension(sys.KVM_CAP_IRQCHIP) <= 0 || kvm.checkExtension(sys.KVM_CAP_PIT2) <= 0 || kvm.checkExtension(sys.KVM_CAP_IRQFD) <= 0) {
          throw new sys.SysError("KVM lacks KVM_CAP_IRQCHIP, KVM_CAP_PIT2 or KVM_CAP_IRQFD", sys.Errno.ENOTSUP);
        }
        sys.ioctl(fd, sys.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP");
        const pit = new DataView(new ArrayBuffer(sys.KVM_PIT_CONFIG_SIZE));
        pit.setUint32(0, sys.KVM_PIT_SPEAKER_DUMMY, true);
        sys.ioctl(fd, sys.KVM_CREATE_PIT2, pit, "KVM_CREATE_PIT2");
      }
      const ramFd = sys.memfdCreate("vmemd-guest-ram");
      undo.push(() => sys.close(ramFd));
      sys.ftruncate(ramFd, opts.memory);
      const ramMapping = MemoryMapping.fromDescriptor(ramFd, 0, opts.memory, sys.PROT_READ | sys.PROT_WRITE);
      undo.push(() => ramMapping.release());
      if (opts.prefault) {
        // MADV_POPULATE_WRITE faults every page in writable, in the kernel: about 1 s per GiB
        // here, against 6 s for a write per page from JavaScript. (Its pages, like
        // MAP_POPULATE's, are freed by MADV_REMOVE some 30% slower than pages a guest wrote,
        // measured; start-up is what --prefault is for.) A kernel before 5.14 answers EINVAL,
        // and then a write per page it is.
        if (sys.tryMadvise(ramMapping.addr, opts.memory, sys.MADV_POPULATE_WRITE) !== 0) {
          const view = ramMapping.view();
          for (let off = 0; off < opts.memory; off += sys.PAGE_SIZE) view[off] = 0;
        }
      }
      const vm = new KvmVm(kvm, fd, ramFd, ramMapping, opts.memory, maxSlots, opts.irqchip === true);
      for (const r of vm.ram) {
        vm.addSlot(r.guest, r.size, ramMapping.addr + r.fileOffset, false, null, false);
      }
      return vm;
    } catch (e) {
      for (const f of undo.reverse()) f();
      throw e;
    }
  }

  slotsUsed(): number {
    return this.slots.inUse;
  }

  private setUserMemoryRegion(slot: MemSlot, flags: number, guest: GuestAddress, size: number, host: number): void {
    sys.encodeMemoryRegion(this.regionBuf, slot, flags, guest, size, host);
    sys.ioctl(this.fd, sys.KVM_SET_USER_MEMORY_REGION, this.regionBuf, "KVM_SET_USER_MEMORY_REGION");
  }

  private addSlot(
    guest: GuestAddress,
    size: number,
    host: number,
    readOnly: boolean,
    mapping: MemoryMapping | null,
    arena: boolean,
  ): MemSlot {
    if (readOnly && !this.readonlyMemSupported) {
      throw new sys.SysError("read-only memory slot: KVM lacks KVM_CAP_READONLY_MEM", sys.Errno.ENOTSUP);
    }
    const slot = this.slots.take();
    if (slot === undefined) {
      throw new sys.SysError(`no free memory slot (all ${this.slotsMax} in use)`, sys.Errno.ENOSPC);
    }
    try {
      this.setUserMemoryRegion(slot, readOnly ? sys.KVM_MEM_READONLY : 0, guest, size, host);
    } catch (e) {
      this.slots.release(slot);
      throw e;
    }
    this.bySlot[slot] = { guest, size, readOnly, mapping, arena };
    return slot;
  }

  private overlapsRam(guest: GuestAddress, size: number): boolean {
    for (const r of this.ram) if (guest < r.guest + r.size && r.guest < guest + size) return true;
    return false;
  }

  addMemoryRegion(guest: GuestAddress, mapping: MemoryMapping, readOnly: boolean, _cache: MemCacheType): MemSlot {
    try {
      if (this.overlapsRam(guest, mapping.size)) {
        // crosvm's KvmVm::add_memory_region answers a guest memory overlap with ENOSPC.
        throw new sys.SysError(`guest range ${hex(guest)}+${hex(mapping.size)} overlaps guest RAM`, sys.Errno.ENOSPC);
      }
      return this.addSlot(guest, mapping.size, mapping.addr, readOnly, mapping, false);
    } catch (e) {
      mapping.release();
      throw e;
    }
  }

  private region(slot: MemSlot, call: string): SlotRegion {
    const r = this.bySlot[slot];
    if (r === undefined || r.mapping === null) throw new sys.SysError(`${call}: no memory region in slot ${slot}`, sys.Errno.ENOENT);
    return r;
  }

  removeMemoryRegion(slot: MemSlot): void {
    const r = this.region(slot, "remove_memory_region");
    this.setUserMemoryRegion(slot, 0, r.guest, 0, 0);
    this.bySlot[slot] = undefined;
    this.slots.release(slot);
    r.mapping!.release();
  }

  prepareArena(guest: GuestAddress, size: number, cache: MemCacheType): MemSlot {
    const arena = MemoryMapping.anonymous(size, sys.PROT_READ);
    const slot = this.addMemoryRegion(guest, arena, false, cache);
    this.bySlot[slot]!.arena = true;
    return slot;
  }

  private arena(slot: MemSlot, call: string): MemoryMapping {
    const r = this.region(slot, call);
    if (!r.arena) throw new sys.SysError(`${call}: slot ${slot} is not a prepared arena`, sys.Errno.EINVAL);
    return r.mapping!;
  }

  addFdMapping(slot: MemSlot, offset: number, size: number, fd: number, fdOffset: number, prot: number, private_: boolean): number {
    return this.arena(slot, "add_fd_mapping").tryMapFixed(offset, size, fd, fdOffset, prot, private_);
  }

  removeMapping(slot: MemSlot, offset: number, size: number): void {
    this.arena(slot, "remove_mapping").unmapFixed(offset, size);
  }

  /** KVM_IOEVENTFD; 0, or the errno KVM answered (a duplicate, an unknown one, a bad eventfd). */
  private ioeventfd(eventFd: number, addr: GuestAddress, dm: IoeventDatamatch, deassign: boolean, pio: boolean): number {
    let flags = (deassign ? sys.KVM_IOEVENTFD_FLAG_DEASSIGN : 0) | (pio ? sys.KVM_IOEVENTFD_FLAG_PIO : 0);
    if (dm.value !== null) flags |= sys.KVM_IOEVENTFD_FLAG_DATAMATCH;
    sys.encodeIoeventfd(this.ioeventBuf, dm.value ?? 0n, addr, dm.length, eventFd, flags);
    const rc = sys.tryIoctl(this.fd, sys.KVM_IOEVENTFD, this.ioeventBuf, "KVM_IOEVENTFD");
    return rc < 0 ? -rc : 0;
  }

  registerIoevent(eventFd: number, addr: GuestAddress, datamatch: IoeventDatamatch, pio = false): number {
    return this.ioeventfd(eventFd, addr, datamatch, false, pio);
  }

  unregisterIoevent(eventFd: number, addr: GuestAddress, datamatch: IoeventDatamatch, pio = false): number {
    return this.ioeventfd(eventFd, addr, datamatch, true, pio);
  }

  private irqfd(eventFd: number, gsi: number, flags: number, resampleFd: number): number {
    if (!this.irqchip) return sys.Errno.ENOTSUP;
    sys.encodeIrqfd(this.irqfdBuf, eventFd, gsi, flags, resampleFd);
    const rc = sys.tryIoctl(this.fd, sys.KVM_IRQFD, this.irqfdBuf, "KVM_IRQFD");
    return rc < 0 ? -rc : 0;
  }

  registerIrqfd(eventFd: number, gsi: number, resampleFd: number): number {
    return this.irqfd(eventFd, gsi, resampleFd === -1 ? 0 : sys.KVM_IRQFD_FLAG_RESAMPLE, resampleFd === -1 ? 0 : resampleFd);
  }

  unregisterIrqfd(eventFd: number, gsi: number): number {
    return this.irqfd(eventFd, gsi, sys.KVM_IRQFD_FLAG_DEASSIGN, 0);
  }

  get ramDescriptor(): number {
    return this.ramFd;
  }

  /** Host address of guest RAM at `guest`, when [guest, guest+size) is all RAM. */
  ramHostAddress(guest: GuestAddress, size: number): number | undefined {
    for (const r of this.ram) {
      if (guest >= r.guest && guest + size <= r.guest + r.size) return this.ramMapping.addr + r.fileOffset + (guest - r.guest);
    }
    return undefined;
  }

  removeRamRange(guest: GuestAddress, size: number): void {
    const host = this.ramHostAddress(guest, size);
    if (host === undefined) throw new sys.SysError(`${hex(guest)}+${hex(size)} is not guest RAM`, sys.Errno.EINVAL);
    // MADV_REMOVE frees the memfd's pages; MADV_DONTNEED would only unmap them (measured).
    sys.madvise(host, size, sys.MADV_REMOVE);
  }

  /** The mapping that backs `slot` (tests read guest-visible bytes through it). */
  mappingOf(slot: MemSlot): MemoryMapping | undefined {
    return this.bySlot[slot]?.mapping ?? undefined;
  }

  *regions(): IterableIterator<VmMemoryRegionInfo> {
    for (let slot = 0; slot < this.bySlot.length; slot++) {
      const r = this.bySlot[slot];
      if (r !== undefined && r.mapping !== null) yield { slot, guest: r.guest, size: r.size, readOnly: r.readOnly, arena: r.arena };
    }
  }

  /** Removes every slot, releases guest RAM and closes the VM. Idempotent. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const r of this.bySlot) r?.mapping?.release();
    this.bySlot.length = 0;
    sys.close(this.fd);
    this.ramMapping.release();
    sys.close(this.ramFd);
    this.kvm.close();
  }
}
