// x86_64 guest physical layout (docs/protocol.md, "Guest physical layout"; as crosvm's
// arch/x86_64): RAM below the PCI hole, the rest from 4 GiB, MMIO pools around it.

/** A guest physical address. Guest physical limits here are at most 2^52, so a JS number holds it exactly. */
export type GuestAddress = number;

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;

/** End of low RAM and start of the low MMIO pool. */
export const PCI_HOLE_START: GuestAddress = 0xd000_0000;
/** End of the low MMIO pool (the rest up to 4 GiB is reserved: LAPIC, IOAPIC, BIOS). */
export const LOW_MMIO_END: GuestAddress = 0xf400_0000;
export const HIGH_RAM_START: GuestAddress = 0x1_0000_0000;

export interface RamRange {
  /** First guest physical byte. */
  guest: GuestAddress;
  size: number;
  /** Offset of this range in the memfd that backs all guest RAM. */
  fileOffset: number;
}

/** Where `size` bytes of RAM go: below the PCI hole, the remainder from 4 GiB. */
export function ramLayout(size: number): RamRange[] {
  const low = Math.min(size, PCI_HOLE_START);
  const ranges: RamRange[] = [{ guest: 0, size: low, fileOffset: 0 }];
  if (size > low) ranges.push({ guest: HIGH_RAM_START, size: size - low, fileOffset: low });
  return ranges;
}

/** First address of the high MMIO pool: end of RAM above 4 GiB (or 4 GiB), rounded up to 1 GiB. */
export function highMmioStart(ramSize: number): GuestAddress {
  const ranges = ramLayout(ramSize);
  const last = ranges[ranges.length - 1]!;
  const end = last.guest >= HIGH_RAM_START ? last.guest + last.size : HIGH_RAM_START;
  return Math.ceil(end / GiB) * GiB;
}

export function hex(n: number | bigint): string {
  return "0x" + n.toString(16);
}
