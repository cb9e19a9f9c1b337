// A decoder for the plain subset of MessagePack that requests are made of: maps and arrays
// of up to 2^16 entries, ASCII strings up to 255 bytes, integers, booleans and nil. For
// anything else (floats, bin, ext, long or non-ASCII strings, non-string map keys, the key
// "__proto__", truncation, trailing bytes, deep nesting) it returns NOT_PLAIN and the
// general decoder (@msgpack/msgpack) decides, and explains what is wrong. Where it returns
// a value, that value is exactly what the general decoder (useBigInt64) gives for the same
// bytes: test/protocol.test.ts holds the two side by side on generated and mangled input.
//
// Why: the general decoder costs ~0.45 µs for a RegisterMemory packet, this one ~0.1 µs,
// and a request is decoded on every round trip (issue 5).

export const NOT_PLAIN = Symbol("not plain MessagePack");

const MAX_DEPTH = 16;
/** Short ASCII strings repeat in every packet (keys, variant names): kept by a hash of their bytes. */
const CACHE_MAX_LENGTH = 32;
const CACHE_ENTRIES = 1024;

class Bail extends Error {}
const BAIL = new Bail();

class PlainDecoder {
  private bytes: Uint8Array = EMPTY;
  private pos = 0;
  private dataView: DataView | null = null;
  private viewOffset = 0;
  private readonly cache = new Map<number, { bytes: Uint8Array; text: string }>();

  decode(body: Uint8Array): unknown {
    this.bytes = body;
    this.pos = 0;
    try {
      const value = this.value(0);
      return this.pos === body.byteLength ? value : NOT_PLAIN;
    } catch (e) {
      if (e === BAIL) return NOT_PLAIN;
      throw e;
    } finally {
      this.bytes = EMPTY; // keep no reference to the caller's buffer
      this.dataView = null;
    }
  }

  private need(n: number): void {
    if (this.pos + n > this.bytes.byteLength) throw BAIL;
  }

  private value(depth: number): unknown {
    this.need(1);
    const b = this.bytes[this.pos++]!;
    if (b <= 0x7f) return b; // positive fixint
    if (b >= 0xe0) return b - 0x100; // negative fixint
    if (b <= 0x8f) return this.map(b & 0x0f, depth);
    if (b <= 0x9f) return this.array(b & 0x0f, depth);
    if (b <= 0xbf) return this.string(b & 0x1f);
    switch (b) {
      case 0xc0:
        return null;
      case 0xc2:
        return false;
      case 0xc3:
        return true;
      case 0xcc:
        return this.uint(1);
      case 0xcd:
        return this.uint(2);
      case 0xce:
        return this.uint(4);
      case 0xcf:
        return this.view(8).getBigUint64(this.pos - 8);
      case 0xd0:
        return (this.uint(1) << 24) >> 24;
      case 0xd1:
        return (this.uint(2) << 16) >> 16;
      case 0xd2:
        return this.uint(4) | 0;
      case 0xd3:
        return this.view(8).getBigInt64(this.pos - 8);
      case 0xd9:
        return this.string(this.uint(1));
      case 0xdc:
        return this.array(this.uint(2), depth);
      case 0xde:
        return this.map(this.uint(2), depth);
      default:
        throw BAIL;
    }
  }

  /** Takes `n` bytes; a DataView on the body, made only for the 64-bit values that need one. */
  private view(n: number): DataView {
    this.need(n);
    this.pos += n;
    const b = this.bytes;
    if (this.dataView === null || this.dataView.buffer !== b.buffer || this.viewOffset !== b.byteOffset || this.dataView.byteLength !== b.byteLength) {
      this.dataView = new DataView(b.buffer, b.byteOffset, b.byteLength);
      this.viewOffset = b.byteOffset;
    }
    return this.dataView;
  }

  /** A big-endian unsigned integer of 1, 2 or 4 bytes. */
  private uint(n: number): number {
    this.need(n);
    const bytes = this.bytes;
    let v = 0;
    for (let i = 0; i < n; i++) v = v * 256 + bytes[this.pos++]!;
    return v;
  }

  private array(n: number, depth: number): unknown[] {
    // Every element takes at least a byte: a count beyond what is left is malformed.
    if (depth >= MAX_DEPTH || n > this.bytes.byteLength - this.pos) throw BAIL;
    const out = new Array<unknown>(n);
    for (let i = 0; i < n; i++) out[i] = this.value(depth + 1);
    return out;
  }

  private map(n: number, depth: number): Record<string, unknown> {
    if (depth >= MAX_DEPTH || 2 * n > this.bytes.byteLength - this.pos) throw BAIL;
    const out: Record<string, unknown> = {};
    for (let i = 0; i < n; i++) {
      this.need(1);
      const b = this.bytes[this.pos++]!;
      let key: string;
      if (b >= 0xa0 && b <= 0xbf) key = this.string(b & 0x1f);
      else if (b === 0xd9) {
        this.need(1);
        key = this.string(this.bytes[this.pos++]!);
      } else throw BAIL; // a non-string key: the general decoder's rules apply
      if (key === "__proto__") throw BAIL;
      out[key] = this.value(depth + 1);
    }
    return out;
  }

  private string(length: number): string {
    this.need(length);
    const bytes = this.bytes;
    const start = this.pos;
    const end = start + length;
    let hash = length;
    let high = 0;
    for (let i = start; i < end; i++) {
      const c = bytes[i]!;
      high |= c;
      hash = (Math.imul(hash, 31) + c) | 0;
    }
    if (high > 0x7f) throw BAIL; // not ASCII: the general decoder's UTF-8 rules apply
    this.pos = end;
    if (length > CACHE_MAX_LENGTH) return String.fromCharCode(...bytes.subarray(start, end));
    const hit = this.cache.get(hash);
    if (hit !== undefined && hit.bytes.length === length) {
      let same = true;
      for (let i = 0; i < length; i++) if (hit.bytes[i] !== bytes[start + i]) same = false;
      if (same) return hit.text;
    }
    const text = String.fromCharCode(...bytes.subarray(start, end));
    if (hit === undefined && this.cache.size < CACHE_ENTRIES) this.cache.set(hash, { bytes: bytes.slice(start, end), text });
    return text;
  }
}

const EMPTY: Uint8Array = new Uint8Array(0);
const decoder = new PlainDecoder();

/** The value `body` holds, when it is plain MessagePack through and through; else NOT_PLAIN. */
export function decodePlain(body: Uint8Array): unknown {
  return decoder.decode(body);
}
