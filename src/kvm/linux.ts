// Linux's x86 64-bit boot protocol (the kernel's Documentation/arch/x86/boot.rst): an ELF
// vmlinux or a bzImage loaded into guest RAM, the zero page (struct boot_params) with the
// setup header, the command line, an initrd and an e820 map made from the very layout
// the memory plane enforces, and the long-mode entry state.
import * as sys from "../sys";
import { BOOT_MIN_MEMORY, writeGdt, writeIdentityMap, type BootEntry } from "./boot";
import { hex, LOW_MMIO_END, PCI_HOLE_START, type RamRange } from "./layout";

/** struct boot_params, 4 KiB, and where the loader puts what it points to. */
export const ZERO_PAGE = 0x7000;
const STACK_TOP = ZERO_PAGE; // grows down, towards the GDT at 0x500
export const CMDLINE = 0x2_0000;
/** Where the kernel is loaded: LOAD_PHYSICAL_ADDR of x86_64 kernels (16 MiB). */
const KERNEL_LOAD = 0x100_0000;
/** The legacy hole every PC VMM reserves: the EBDA, VGA and BIOS areas. */
export const LEGACY_HOLE_START = 0x9_fc00;
export const LEGACY_HOLE_END = 0x10_0000;

// Offsets in struct boot_params (arch/x86/include/uapi/asm/bootparam.h).
const BP_EXT_RAMDISK_IMAGE = 0x0c0;
const BP_EXT_RAMDISK_SIZE = 0x0c4;
const BP_EXT_CMD_LINE_PTR = 0x0c8;
const BP_E820_ENTRIES = 0x1e8;
const BP_HDR = 0x1f1;
const BP_SETUP_SECTS = 0x1f1;
const BP_BOOT_FLAG = 0x1fe;
const BP_JUMP = 0x200;
const BP_HEADER = 0x202;
const BP_VERSION = 0x206;
const BP_TYPE_OF_LOADER = 0x210;
const BP_LOADFLAGS = 0x211;
const BP_RAMDISK_IMAGE = 0x218;
const BP_RAMDISK_SIZE = 0x21c;
const BP_CMD_LINE_PTR = 0x228;
const BP_INITRD_ADDR_MAX = 0x22c;
const BP_KERNEL_ALIGNMENT = 0x230;
const BP_CMDLINE_SIZE = 0x238;
const BP_XLOADFLAGS = 0x236;
const BP_PREF_ADDRESS = 0x258;
const BP_INIT_SIZE = 0x260;
const BP_E820_TABLE = 0x2d0;
const E820_MAX = 128;
const E820_RAM = 1;
const E820_RESERVED = 2;
const HDRS = 0x5372_6448; // "HdrS"
const LOADED_HIGH = 0x01;
const CAN_USE_HEAP = 0x80;
const XLF_KERNEL_64 = 0x01;
/** Not a registered boot loader: type_of_loader 0xff. */
const LOADER_UNDEFINED = 0xff;
/** The 64-bit entry point of a bzImage's protected-mode part, from its start. */
const BZIMAGE_ENTRY_64 = 0x200;

/** The selectors the 64-bit boot protocol requires: __BOOT_CS and __BOOT_DS. */
const LINUX_CS = 0x10;
const LINUX_DS = 0x18;

export interface LinuxImage {
  kernel: Uint8Array;
  initrd: Uint8Array | null;
  cmdline: string;
}

/** An e820 entry as the kernel is told it. */
export interface E820Entry {
  addr: number;
  size: number;
  type: "usable" | "reserved";
}

/**
 * The guest's memory map for the kernel: RAM usable but the legacy hole, the low MMIO pool
 * reserved, nothing above RAM. The same layout GetState's `ram` reports, and that the memory
 * plane refuses regions in.
 */
export function e820Map(ram: readonly RamRange[]): E820Entry[] {
  const out: E820Entry[] = [];
  for (const r of ram) {
    const end = r.guest + r.size;
    if (r.guest < LEGACY_HOLE_START && end > LEGACY_HOLE_START) {
      out.push({ addr: r.guest, size: LEGACY_HOLE_START - r.guest, type: "usable" });
      out.push({ addr: LEGACY_HOLE_START, size: LEGACY_HOLE_END - LEGACY_HOLE_START, type: "reserved" });
      if (end > LEGACY_HOLE_END) out.push({ addr: LEGACY_HOLE_END, size: end - LEGACY_HOLE_END, type: "usable" });
    } else out.push({ addr: r.guest, size: r.size, type: "usable" });
  }
  out.push({ addr: PCI_HOLE_START, size: LOW_MMIO_END - PCI_HOLE_START, type: "reserved" });
  return out.sort((a, b) => a.addr - b.addr);
}

function fail(message: string): never {
  throw new sys.SysError(message, sys.Errno.EINVAL);
}

/** The kernel's kind, from its first bytes. */
function kindOf(kernel: Uint8Array): "elf" | "bzimage" {
  if (kernel.length >= 4 && kernel[0] === 0x7f && kernel[1] === 0x45 && kernel[2] === 0x4c && kernel[3] === 0x46) return "elf";
  const v = new DataView(kernel.buffer, kernel.byteOffset, kernel.byteLength);
  if (kernel.length > 0x264 && v.getUint16(BP_BOOT_FLAG, true) === 0xaa55 && v.getUint32(BP_HEADER, true) === HDRS) return "bzimage";
  fail("the kernel is neither an ELF vmlinux nor a bzImage (no ELF magic, no HdrS setup header)");
}

/** Copies an ELF64 vmlinux's loadable segments to their physical addresses; its entry point. */
function loadElf(ram: Uint8Array, kernel: Uint8Array): { entry: number; end: number } {
  const v = new DataView(kernel.buffer, kernel.byteOffset, kernel.byteLength);
  if (kernel[4] !== 2 || kernel[5] !== 1 || v.getUint16(18, true) !== 62) fail("the ELF kernel is not a little-endian x86-64 ELF64 file");
  const phoff = Number(v.getBigUint64(32, true));
  const phentsize = v.getUint16(54, true);
  const phnum = v.getUint16(56, true);
  let end = 0;
  for (let i = 0; i < phnum; i++) {
    const ph = phoff + i * phentsize;
    if (ph + 56 > kernel.length) fail("the ELF kernel's program headers run past its end");
    if (v.getUint32(ph, true) !== 1) continue; // PT_LOAD only
    const offset = Number(v.getBigUint64(ph + 8, true));
    const paddr = Number(v.getBigUint64(ph + 24, true));
    const filesz = Number(v.getBigUint64(ph + 32, true));
    const memsz = Number(v.getBigUint64(ph + 40, true));
    if (offset + filesz > kernel.length) fail(`ELF segment ${i} runs past the end of the file`);
    if (paddr + memsz > ram.length) fail(`ELF segment ${i} at ${hex(paddr)}+${hex(memsz)} is beyond guest RAM (${hex(ram.length)} bytes below the PCI hole)`);
    ram.set(kernel.subarray(offset, offset + filesz), paddr);
    ram.fill(0, paddr + filesz, paddr + memsz);
    end = Math.max(end, paddr + memsz);
  }
  if (end === 0) fail("the ELF kernel has no loadable segment");
  return { entry: Number(v.getBigUint64(24, true)), end };
}

/**
 * Loads `image` into `ram` (a view of guest RAM from GPA 0: the low range) with its zero page
 * and returns the entry state. `ramRanges` is the layout the kernel is told (its e820 map).
 */
export function loadLinux(ram: Uint8Array, image: LinuxImage, ramRanges: readonly RamRange[]): BootEntry {
  if (ram.length < 64 * 2 ** 20) fail(`guest memory is ${ram.length} bytes; booting Linux needs at least 64 MiB`);
  const zp = new DataView(ram.buffer, ram.byteOffset + ZERO_PAGE, 4096);
  ram.fill(0, ZERO_PAGE, ZERO_PAGE + 4096);
  const kind = kindOf(image.kernel);
  let entry: number;
  let kernelEnd: number;
  let cmdlineMax = 2047;
  let initrdMax = 0x37ff_ffff;
  if (kind === "bzimage") {
    const k = image.kernel;
    const kv = new DataView(k.buffer, k.byteOffset, k.byteLength);
    const version = kv.getUint16(BP_VERSION, true);
    if (version < 0x020c || !(kv.getUint16(BP_XLOADFLAGS, true) & XLF_KERNEL_64)) {
      fail(`the bzImage (boot protocol ${hex(version)}) has no 64-bit entry point (XLF_KERNEL_64, protocol 2.12 and later)`);
    }
    // The setup header goes into the zero page as the kernel wrote it.
    const hdrEnd = BP_JUMP + 2 + k[BP_JUMP + 1]!;
    ram.set(k.subarray(BP_HDR, hdrEnd), ZERO_PAGE + BP_HDR);
    const setupSects = k[BP_SETUP_SECTS] === 0 ? 4 : k[BP_SETUP_SECTS]!;
    const protectedMode = k.subarray((setupSects + 1) * 512);
    const load = Number(kv.getBigUint64(BP_PREF_ADDRESS, true)) || KERNEL_LOAD;
    const initSize = kv.getUint32(BP_INIT_SIZE, true);
    if (load + Math.max(initSize, protectedMode.length) > ram.length) fail(`the bzImage needs ${hex(initSize)} bytes at ${hex(load)}, beyond guest RAM`);
    ram.set(protectedMode, load);
    entry = load + BZIMAGE_ENTRY_64;
    kernelEnd = load + Math.max(initSize, protectedMode.length);
    cmdlineMax = kv.getUint32(BP_CMDLINE_SIZE, true) || cmdlineMax;
    initrdMax = kv.getUint32(BP_INITRD_ADDR_MAX, true) || initrdMax;
  } else {
    const elf = loadElf(ram, image.kernel);
    entry = elf.entry;
    kernelEnd = elf.end;
    zp.setUint16(BP_BOOT_FLAG, 0xaa55, true);
    zp.setUint32(BP_HEADER, HDRS, true);
    zp.setUint16(BP_VERSION, 0x020f, true);
    zp.setUint32(BP_KERNEL_ALIGNMENT, 0x100_0000, true);
  }
  zp.setUint8(BP_TYPE_OF_LOADER, LOADER_UNDEFINED);
  zp.setUint8(BP_LOADFLAGS, zp.getUint8(BP_LOADFLAGS) | LOADED_HIGH | CAN_USE_HEAP);

  const cmd = new TextEncoder().encode(image.cmdline);
  if (cmd.length > cmdlineMax) fail(`the command line is ${cmd.length} bytes; the kernel takes at most ${cmdlineMax}`);
  ram.set(cmd, CMDLINE);
  ram[CMDLINE + cmd.length] = 0;
  zp.setUint32(BP_CMD_LINE_PTR, CMDLINE, true);
  zp.setUint32(BP_EXT_CMD_LINE_PTR, 0, true);
  zp.setUint32(BP_CMDLINE_SIZE, cmdlineMax, true);

  if (image.initrd !== null && image.initrd.length > 0) {
    // As high as the kernel allows, page aligned, below the end of low RAM and clear of the kernel.
    const top = Math.min(ram.length, initrdMax + 1);
    const at = Math.floor((top - image.initrd.length) / sys.PAGE_SIZE) * sys.PAGE_SIZE;
    if (at < kernelEnd) fail(`the initrd (${image.initrd.length} bytes) does not fit in guest RAM above the kernel (which ends at ${hex(kernelEnd)})`);
    ram.set(image.initrd, at);
    zp.setUint32(BP_RAMDISK_IMAGE, at, true);
    zp.setUint32(BP_RAMDISK_SIZE, image.initrd.length, true);
    zp.setUint32(BP_EXT_RAMDISK_IMAGE, 0, true);
    zp.setUint32(BP_EXT_RAMDISK_SIZE, 0, true);
  }

  const map = e820Map(ramRanges);
  if (map.length > E820_MAX) fail(`${map.length} e820 entries, more than the zero page holds`);
  zp.setUint8(BP_E820_ENTRIES, map.length);
  map.forEach((e, i) => {
    const o = BP_E820_TABLE + 20 * i;
    sys.setU64(zp, o, e.addr);
    sys.setU64(zp, o + 8, e.size);
    zp.setUint32(o + 16, e.type === "usable" ? E820_RAM : E820_RESERVED, true);
  });

  const boot: BootEntry = { rip: entry, rsp: STACK_TOP, rsi: ZERO_PAGE, cs: LINUX_CS, ds: LINUX_DS };
  const low = ram.subarray(0, BOOT_MIN_MEMORY);
  writeGdt(low, boot);
  writeIdentityMap(low);
  return boot;
}
