// 64-bit little-endian fields of kernel structs, read and written as two 32-bit halves:
// a number below 2^53 needs no BigInt, and a BigInt per field is an allocation per call.

/** Writes `value` (an integer in [0, 2^53)) at `offset`. */
export function setU64(view: DataView, offset: number, value: number): void {
  view.setUint32(offset, value >>> 0, true);
  view.setUint32(offset + 4, Math.floor(value / 0x1_0000_0000), true);
}

/** Reads the field at `offset`; exact below 2^53 (sizes, counts and addresses here are). */
export function getU64(view: DataView, offset: number): number {
  return view.getUint32(offset, true) + view.getUint32(offset + 4, true) * 0x1_0000_0000;
}
