// A decoder and an encoder for the plain subset of MessagePack that requests and responses
// are made of: maps and arrays of up to 2^16 entries, ASCII strings, integers, booleans and
// nil. For anything else (floats, bin, ext, non-ASCII strings, non-string map keys, the key
// "__proto__", truncation, trailing bytes, deep nesting) they return NOT_PLAIN and the
// general codec (@msgpack/msgpack) decides, and explains what is wrong. Where they answer,
// they answer what the general codec does with vmemd's options (useBigInt64, and integers
// from 2^32 up written as uint 64), with one difference: a uint 64 or int 64 holding a safe
// integer (below 2^53 in magnitude) decodes as a number, not a bigint. Every reader of
// decoded values takes both (the schema's integers do; MessagePack's integer widths are
// the sender's choice), and guest addresses, the common uint 64s, then need no BigInt on
// the way in or out. test/protocol.test.ts holds the two codecs side by side on generated
// and mangled input.
//
// Why: a request is decoded and a response encoded on every round trip (issue 5); the
// general decoder takes ~0.45 µs for a RegisterMemory packet, this one ~0.2 µs.

export const NOT_PLAIN = Symbol("not plain MessagePack");

const MAX_DEPTH = 16;
/** Short ASCII strings repeat in every packet (keys, variant names): a direct-mapped cache
 * indexed by a hash of their bytes (a collision replaces the entry). */
const CACHE_MAX_LENGTH = 32;
const CACHE_SLOTS = 1024; // a power of two

class Bail extends Error {}
const BAIL = new Bail();

class PlainDecoder {
  private bytes: Uint8Array = EMPTY;
  private pos = 0;
  private readonly cacheBytes: (Uint8Array | undefined)[] = new Array(CACHE_SLOTS).fill(undefined);
  private readonly cacheText: string[] = new Array(CACHE_SLOTS).fill("");

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
      this.bytes = EMPTY;
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
      case 0xcf: {
        const hi = this.uint(4);
        const lo = this.uint(4);
        // Up to 2^53 as a number (see the top of this file); beyond, the exact bigint.
        return hi < 0x20_0000 ? hi * 0x1_0000_0000 + lo : (BigInt(hi) << 32n) | BigInt(lo);
      }
      case 0xd0:
        return (this.uint(1) << 24) >> 24;
      case 0xd1:
        return (this.uint(2) << 16) >> 16;
      case 0xd2:
        return this.uint(4) | 0;
      case 0xd3: {
        const hi = this.uint(4) | 0;
        const lo = this.uint(4);
        const n = hi * 0x1_0000_0000 + lo; // exact whenever it is a safe integer
        return Number.isSafeInteger(n) ? n : (BigInt(hi) << 32n) | BigInt(lo);
      }
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
    this.pos = end;
    if (length <= CACHE_MAX_LENGTH) {
      // The slot from the length and the two ends; one pass then compares the whole string
      // (a cached string is ASCII, so an equal one is too).
      const slot = length === 0 ? 0 : (length * 31 + bytes[start]! * 7 + bytes[end - 1]! * 131 + bytes[start + (length >> 1)]!) & (CACHE_SLOTS - 1);
      const hit = this.cacheBytes[slot];
      if (hit !== undefined && hit.length === length) {
        let i = 0;
        while (i < length && hit[i] === bytes[start + i]) i++;
        if (i === length) return this.cacheText[slot]!;
      }
      const text = this.ascii(start, end);
      this.cacheBytes[slot] = bytes.slice(start, end);
      this.cacheText[slot] = text;
      return text;
    }
    return this.ascii(start, end);
  }

  private ascii(start: number, end: number): string {
    const bytes = this.bytes;
    for (let i = start; i < end; i++) if (bytes[i]! > 0x7f) throw BAIL; // not ASCII: the general decoder's UTF-8 rules apply
    const text = String.fromCharCode(...bytes.subarray(start, end));
    return text;
  }
}

const EMPTY: Uint8Array = new Uint8Array(0);
const decoder = new PlainDecoder();

/** The value `body` holds, when it is plain MessagePack through and through; else NOT_PLAIN. */
export function decodePlain(body: Uint8Array): unknown {
  return decoder.decode(body);
}

/** Larger values go to the general encoder (and become EMSGSIZE: a packet holds 64 KiB). */
const MAX_ENCODED = 1 << 17;

class PlainEncoder {
  private buf = new Uint8Array(4096);
  private view = new DataView(this.buf.buffer);
  private pos = 0;

  encode(value: unknown): Uint8Array | typeof NOT_PLAIN {
    this.pos = 0;
    try {
      this.value(value, 0);
    } catch (e) {
      if (e === BAIL) return NOT_PLAIN;
      throw e;
    }
    return this.buf.subarray(0, this.pos);
  }

  private room(n: number): void {
    if (this.pos + n <= this.buf.byteLength) return;
    const size = Math.max(2 * this.buf.byteLength, this.pos + n);
    if (size > MAX_ENCODED) throw BAIL;
    const bigger = new Uint8Array(size);
    bigger.set(this.buf.subarray(0, this.pos));
    this.buf = bigger;
    this.view = new DataView(bigger.buffer);
  }

  private byte(b: number): void {
    this.buf[this.pos++] = b;
  }

  /** A head byte and a big-endian unsigned integer of `n` bytes. */
  private head(b: number, v: number, n: number): void {
    this.room(1 + n);
    this.buf[this.pos++] = b;
    for (let shift = 8 * (n - 1); shift >= 0; shift -= 8) this.buf[this.pos++] = (v / 2 ** shift) & 0xff;
  }

  private value(v: unknown, depth: number): void {
    if (depth > MAX_DEPTH) throw BAIL;
    if (v === null || v === undefined) {
      this.room(1);
      return this.byte(0xc0);
    }
    switch (typeof v) {
      case "boolean":
        this.room(1);
        return this.byte(v ? 0xc3 : 0xc2);
      case "number":
        return this.number(v);
      case "bigint":
        return this.bigint(v);
      case "string":
        return this.string(v);
      case "object":
        if (Array.isArray(v)) return this.array(v, depth);
        if (Object.getPrototypeOf(v) === Object.prototype) return this.map(v as Record<string, unknown>, depth);
        throw BAIL;
      default:
        throw BAIL;
    }
  }

  private number(v: number): void {
    if (!Number.isInteger(v)) throw BAIL; // floats: the general encoder's float 64
    if (v >= 0) {
      if (v < 0x80) {
        this.room(1);
        this.byte(v);
      } else if (v < 0x100) this.head(0xcc, v, 1);
      else if (v < 0x10000) this.head(0xcd, v, 2);
      else if (v < 0x1_0000_0000) this.head(0xce, v, 4);
      else if (v < 2 ** 64) {
        // vmemd widens integers from 2^32 up to BigInt, which goes out as uint 64.
        this.room(9);
        this.byte(0xcf);
        this.view.setUint32(this.pos, Math.floor(v / 0x1_0000_0000));
        this.view.setUint32(this.pos + 4, v % 0x1_0000_0000);
        this.pos += 8;
      } else throw BAIL;
      return;
    }
    if (v >= -0x20) {
      this.room(1);
      this.byte(0xe0 | (v + 0x20));
    } else if (v >= -0x80) this.head(0xd0, v & 0xff, 1);
    else if (v >= -0x8000) this.head(0xd1, v & 0xffff, 2);
    else if (v >= -0x8000_0000) this.head(0xd2, v >>> 0, 4);
    else throw BAIL; // the general encoder writes these as float 64
  }

  private bigint(v: bigint): void {
    if (v >= 0n ? v >= 1n << 64n : v < -(1n << 63n)) throw BAIL; // the general encoder would wrap
    this.room(9);
    this.byte(v >= 0n ? 0xcf : 0xd3);
    if (v >= 0n) this.view.setBigUint64(this.pos, v);
    else this.view.setBigInt64(this.pos, v);
    this.pos += 8;
  }

  private string(s: string): void {
    const n = s.length;
    if (n < 32) {
      this.room(1 + n);
      this.byte(0xa0 + n);
    } else if (n < 0x100) this.head(0xd9, n, 1);
    else if (n < 0x10000) this.head(0xda, n, 2);
    else throw BAIL;
    this.room(n);
    const buf = this.buf;
    let p = this.pos;
    for (let i = 0; i < n; i++) {
      const c = s.charCodeAt(i);
      if (c > 0x7f) throw BAIL; // not ASCII: the general encoder's UTF-8 rules apply
      buf[p++] = c;
    }
    this.pos = p;
  }

  /** The head of an array or map of `n` entries: the fix form, else the 16-bit one. */
  private entries(n: number, fix: number, head16: number): void {
    if (n < 16) {
      this.room(1);
      this.byte(fix + n);
    } else if (n < 0x10000) this.head(head16, n, 2);
    else throw BAIL;
  }

  private array(a: unknown[], depth: number): void {
    this.entries(a.length, 0x90, 0xdc);
    for (let i = 0; i < a.length; i++) this.value(a[i], depth + 1);
  }

  private map(o: Record<string, unknown>, depth: number): void {
    // for-in rather than Object.keys: no array of keys per object. It walks own keys in
    // Object.keys' order, then inherited enumerable ones, which a plain object has none of
    // unless Object.prototype was extended: then the general encoder decides.
    let n = 0;
    for (const k in o) {
      if (!Object.hasOwn(o, k)) throw BAIL;
      n++;
    }
    this.entries(n, 0x80, 0xde);
    for (const k in o) {
      this.string(k);
      this.value(o[k], depth + 1);
    }
  }
}

const encoder = new PlainEncoder();

/**
 * `value` as MessagePack, when it is plain through and through; else NOT_PLAIN. The bytes
 * are valid until the next call.
 */
export function encodePlain(value: unknown): Uint8Array | typeof NOT_PLAIN {
  return encoder.encode(value);
}
