// The boot contract (docs/boot.md): what vmemd writes into guest RAM and into the
// vCPU's registers before the first KVM_RUN. The memory part runs on the main thread;
// the register part fills kvm_regs / kvm_sregs buffers on the vCPU thread.
import * as sys from "../sys";
import { hex, MiB } from "./layout";

export const BOOT_GDT = 0x500;
export const BOOT_PML4 = 0x9000;
export const BOOT_PDPT = 0xa000;
/** The 512 page directories, one 4 KiB page each: [0x200000, 0x400000). */
export const BOOT_PD = 0x20_0000;
export const BOOT_PD_END = 0x40_0000;
export const BOOT_IMAGE = 0x10_0000;
export const BOOT_IMAGE_MAX = 1 * MiB;
export const BOOT_RIP = BOOT_IMAGE;
export const BOOT_RSP = BOOT_IMAGE;
/** Guest RAM must cover everything above: [0, 4 MiB). */
export const BOOT_MIN_MEMORY = BOOT_PD_END;

// GDT entries (x86 segment descriptors).
const GDT_CODE64 = 0x00af9b000000ffffn; // selector 0x08: P, DPL 0, S, type 0xB, L=1, D=0, G=1
const GDT_DATA = 0x00cf93000000ffffn; //  selector 0x10: P, DPL 0, S, type 0x3, D/B=1, G=1
export const BOOT_CS = 0x08;
export const BOOT_DS = 0x10;

// Control registers (asm/processor-flags.h, asm/msr-index.h).
const CR0_PE = 1 << 0;
const CR0_MP = 1 << 1;
const CR0_ET = 1 << 4;
const CR0_NE = 1 << 5;
const CR0_WP = 1 << 16;
const CR0_PG = 1 << 31;
export const BOOT_CR0 = (CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG) >>> 0; // 0x80010033
export const BOOT_CR4 = 1 << 5; // PAE
export const BOOT_EFER = (1 << 8) | (1 << 10); // LME | LMA
const PTE_P = 1;
const PTE_RW = 2;
const PDE_PS = 0x80;

/** Checks that `image` and `memory` fit the contract; throws a plain, complete sentence otherwise. */
export function checkBootImage(imageSize: number, memory: number, path = "guest image"): void {
  if (imageSize === 0) throw new sys.SysError(`${path} is empty`, sys.Errno.EINVAL);
  if (imageSize > BOOT_IMAGE_MAX) {
    throw new sys.SysError(
      `${path} is ${imageSize} bytes; a guest image is loaded at ${hex(BOOT_IMAGE)} below the page tables at ${hex(BOOT_PD)}, so it may be at most ${BOOT_IMAGE_MAX} bytes (1 MiB)`,
      sys.Errno.EFBIG,
    );
  }
  if (memory < BOOT_MIN_MEMORY) {
    throw new sys.SysError(
      `guest memory is ${memory} bytes; running a guest needs at least ${BOOT_MIN_MEMORY} bytes (4 MiB: image at 1 MiB, page tables up to 4 MiB)`,
      sys.Errno.EINVAL,
    );
  }
}

/** Where a vCPU starts: registers and the selectors its GDT (at BOOT_GDT) holds. */
export interface BootEntry {
  rip: number;
  rsp: number;
  /** Linux's 64-bit boot protocol passes the zero page here; 0 for the contract. */
  rsi: number;
  /** Selector of the 64-bit code segment and of the flat data segment. */
  cs: number;
  ds: number;
}

/** The boot contract's entry (docs/boot.md). */
export const CONTRACT_ENTRY: BootEntry = { rip: BOOT_RIP, rsp: BOOT_RSP, rsi: 0, cs: BOOT_CS, ds: BOOT_DS };

/** Writes a GDT at BOOT_GDT holding a null entry, the 64-bit code segment at `cs` and the flat data segment at `ds`. */
export function writeGdt(low: Uint8Array, entry: BootEntry): void {
  const v = new DataView(low.buffer, low.byteOffset, BOOT_MIN_MEMORY);
  const entries = Math.max(entry.cs, entry.ds) / 8 + 1;
  for (let i = 0; i < entries; i++) v.setBigUint64(BOOT_GDT + 8 * i, 0n, true);
  v.setBigUint64(BOOT_GDT + entry.cs, GDT_CODE64, true);
  v.setBigUint64(BOOT_GDT + entry.ds, GDT_DATA, true);
}

/** GDT limit for `entry` (the last byte of its highest descriptor). */
export function gdtLimit(entry: BootEntry): number {
  return Math.max(entry.cs, entry.ds) + 7;
}

/**
 * Writes the GDT, the identity page tables for [0, 512 GiB) with 2 MiB pages, and the
 * image, into `low`: a view of guest RAM from GPA 0 of at least BOOT_MIN_MEMORY bytes.
 */
export function writeBootMemory(low: Uint8Array, image: Uint8Array): void {
  checkBootImage(image.byteLength, low.byteLength);
  writeGdt(low, CONTRACT_ENTRY);
  writeIdentityMap(low);
  low.set(image, BOOT_IMAGE);
}

/** The identity page tables for [0, 512 GiB) with 2 MiB pages, at BOOT_PML4, BOOT_PDPT and BOOT_PD. */
export function writeIdentityMap(low: Uint8Array): void {
  const v = new DataView(low.buffer, low.byteOffset, BOOT_MIN_MEMORY);
  // PML4[0] -> PDPT; the other 511 entries not present.
  low.fill(0, BOOT_PML4, BOOT_PML4 + 0x1000);
  v.setBigUint64(BOOT_PML4, BigInt(BOOT_PDPT | PTE_P | PTE_RW), true);
  // PDPT[i] -> page directory i; PD i maps [i GiB, (i+1) GiB) with 2 MiB pages.
  for (let i = 0; i < 512; i++) {
    v.setBigUint64(BOOT_PDPT + i * 8, BigInt(BOOT_PD + i * 0x1000 + (PTE_P | PTE_RW)), true);
    const pd = BOOT_PD + i * 0x1000;
    for (let j = 0; j < 512; j++) {
      // (i << 30) | (j << 21) | P | RW | PS, written as two 32-bit halves.
      const lo = (((i & 3) << 30) | (j << 21) | PTE_P | PTE_RW | PDE_PS) >>> 0;
      v.setUint32(pd + j * 8, lo, true);
      v.setUint32(pd + j * 8 + 4, i >>> 2, true);
    }
  }
}

const SEG = sys.KVM_SEGMENT;
const SREGS = sys.KVM_SREGS;

function setSegment(v: DataView, off: number, selector: number, type: number, db: number, l: number): void {
  v.setBigUint64(off + SEG.base, 0n, true);
  v.setUint32(off + SEG.limit, 0xffffffff, true);
  v.setUint16(off + SEG.selector, selector, true);
  v.setUint8(off + SEG.type, type);
  v.setUint8(off + SEG.present, 1);
  v.setUint8(off + SEG.dpl, 0);
  v.setUint8(off + SEG.db, db);
  v.setUint8(off + SEG.s, 1); // code/data
  v.setUint8(off + SEG.l, l);
  v.setUint8(off + SEG.g, 1);
  v.setUint8(off + SEG.avl, 0);
  v.setUint8(off + SEG.unusable, 0);
}

/** Turns the kvm_sregs that KVM_GET_SREGS returned into the long-mode state of `entry` (tr, ldt, apic_base kept). */
export function setBootSregs(v: DataView, entry: BootEntry = CONTRACT_ENTRY): void {
  setSegment(v, SREGS.cs, entry.cs, 0xb, 0, 1);
  for (const off of [SREGS.ds, SREGS.es, SREGS.fs, SREGS.gs, SREGS.ss]) setSegment(v, off, entry.ds, 0x3, 1, 0);
  v.setBigUint64(SREGS.gdt + sys.KVM_DTABLE.base, BigInt(BOOT_GDT), true);
  v.setUint16(SREGS.gdt + sys.KVM_DTABLE.limit, gdtLimit(entry), true);
  v.setBigUint64(SREGS.idt + sys.KVM_DTABLE.base, 0n, true);
  v.setUint16(SREGS.idt + sys.KVM_DTABLE.limit, 0, true);
  v.setBigUint64(SREGS.cr0, BigInt(BOOT_CR0), true);
  v.setBigUint64(SREGS.cr2, 0n, true);
  v.setBigUint64(SREGS.cr3, BigInt(BOOT_PML4), true);
  v.setBigUint64(SREGS.cr4, BigInt(BOOT_CR4), true);
  v.setBigUint64(SREGS.cr8, 0n, true);
  v.setBigUint64(SREGS.efer, BigInt(BOOT_EFER), true);
}

// struct kvm_regs: rax rbx rcx rdx rsi rdi rsp rbp r8..r15 (u64 each), rip@128, rflags@136.
export const REG_NAMES = [
  "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
  "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
] as const;

/** kvm_regs of `entry`: everything 0 but rip, rsp, rsi and rflags (0x2: IF=0). */
export function setBootRegs(v: DataView, entry: BootEntry = CONTRACT_ENTRY): void {
  for (let off = 0; off < sys.KVM_REGS_SIZE; off += 8) v.setBigUint64(off, 0n, true);
  v.setBigUint64(sys.KVM_REGS.rsp, BigInt(entry.rsp), true);
  v.setBigUint64(sys.KVM_REGS.rip, BigInt(entry.rip), true);
  v.setBigUint64(sys.KVM_REGS.rsi, BigInt(entry.rsi), true);
  v.setBigUint64(sys.KVM_REGS.rflags, 2n, true);
}

/** kvm_regs and the interesting kvm_sregs fields as hex strings, for logs. */
export function describeRegisters(regs: DataView, sregs: DataView): Record<string, string> {
  const out: Record<string, string> = {};
  REG_NAMES.forEach((name, i) => (out[name] = hex(regs.getBigUint64(i * 8, true))));
  out.cs = hex(sregs.getUint16(SREGS.cs + SEG.selector, true));
  out.cr0 = hex(sregs.getBigUint64(SREGS.cr0, true));
  out.cr2 = hex(sregs.getBigUint64(SREGS.cr2, true));
  out.cr3 = hex(sregs.getBigUint64(SREGS.cr3, true));
  out.cr4 = hex(sregs.getBigUint64(SREGS.cr4, true));
  out.efer = hex(sregs.getBigUint64(SREGS.efer, true));
  return out;
}
