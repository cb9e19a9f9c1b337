// MessagePack tokens (the spec's formats; integers of any width, big-endian) for the shape
// walker. The reader works in place on the receive buffer and allocates only what a shape
// asks for; every count is checked against the bytes that follow before it is used.
import {
  BROKEN,
  DONE,
  MORE,
  MSGPACK,
  OutBuffer,
  PacketCursor,
  T_ARRAY,
  T_BIN,
  T_BOOL,
  T_MAP,
  T_NIL,
  T_NONE,
  T_NUMBER,
  T_OTHER,
  T_STR,
  type WireReader,
  type WireWriter,
} from "./wire_io";

const TWO_32 = 0x1_0000_0000;
/** Entries left in each open map or array, by depth (shapes nest far less deeply). */
const MAX_DEPTH = 32;
const utf8 = new TextDecoder("utf-8", { fatal: true });
const utf8Encoder = new TextEncoder();
/** From this length a string is written by Buffer.write rather than a loop (MsgpackWriter.str). */
const LONG_STRING = 24;

export class MsgpackReader extends PacketCursor implements WireReader {
  readonly encoding = MSGPACK;
  readonly strictFields = true;
  private readonly left = new Float64Array(MAX_DEPTH);

  peek(): number {
    if (this.pos >= this.end) return T_NONE;
    const t = this.b[this.pos]!;
    if (t <= 0x7f || t >= 0xe0) return T_NUMBER;
    if (t <= 0x8f) return T_MAP;
    if (t <= 0x9f) return T_ARRAY;
    if (t <= 0xbf) return T_STR;
    switch (t) {
      case 0xc0:
        return T_NIL;
      case 0xc2:
      case 0xc3:
        return T_BOOL;
      case 0xc4:
      case 0xc5:
      case 0xc6:
        return T_BIN;
      case 0xd9:
      case 0xda:
      case 0xdb:
        return T_STR;
      case 0xdc:
      case 0xdd:
        return T_ARRAY;
      case 0xde:
      case 0xdf:
        return T_MAP;
      default:
        return (t >= 0xcc && t <= 0xd3) || t === 0xca || t === 0xcb ? T_NUMBER : t === 0xc1 ? T_NONE : T_OTHER;
    }
  }

  /** A big-endian unsigned integer of `n` (1, 2 or 4) bytes at pos; -1 if they are not there. */
  private be(n: number): number {
    const at = this.pos;
    if (at + n > this.end) return -1;
    const b = this.b;
    let v = 0;
    for (let i = 0; i < n; i++) v = v * 256 + b[at + i]!;
    this.pos = at + n;
    return v;
  }

  readUint(max: bigint, numberMax: number): number | bigint {
    if (this.pos >= this.end) return this.fail("expected an integer, found the end of the packet");
    const t = this.b[this.pos]!;
    let v: number | bigint;
    if (t <= 0x7f) {
      this.pos++;
      v = t;
    } else if (t === 0xcc || t === 0xcd || t === 0xce) {
      const save = this.pos++;
      v = this.be(t === 0xcc ? 1 : t === 0xcd ? 2 : 4);
      if (v < 0) return this.truncated(save);
    } else if (t === 0xcf || t === 0xd3) {
      const save = this.pos++;
      const hi = this.be(4);
      const lo = hi < 0 ? -1 : this.be(4);
      if (lo < 0) return this.truncated(save);
      if (t === 0xd3 && hi >= 0x8000_0000) return this.fail("must not be negative");
      // Up to 2^53 - 1 a number, exact; above, the exact bigint (no float on the way).
      v = hi < 0x20_0000 ? hi * TWO_32 + lo : (BigInt(hi) << 32n) | BigInt(lo);
    } else if (t >= 0xd0 && t <= 0xd2) {
      const save = this.pos++;
      const n = t === 0xd0 ? 1 : t === 0xd1 ? 2 : 4;
      const raw = this.be(n);
      if (raw < 0) return this.truncated(save);
      if (raw >= 2 ** (8 * n - 1)) return this.fail("must not be negative");
      v = raw;
    } else if (t === 0xca || t === 0xcb) {
      // A float holding an exact integer: what a JavaScript encoder writes for a number of
      // 2^32 and up, and what version 1 of the protocol accepted. Anything else is refused.
      const save = this.pos++;
      const n = t === 0xca ? 4 : 8;
      if (this.pos + n > this.end) return this.truncated(save);
      const view = new DataView(this.b.buffer, this.b.byteOffset + this.pos, n);
      const f = n === 4 ? view.getFloat32(0) : view.getFloat64(0);
      this.pos += n;
      if (!Number.isSafeInteger(f)) return this.fail("expected an integer, found a floating point number");
      if (f < 0) return this.fail("must not be negative");
      v = f;
    } else if (t >= 0xe0) return this.fail("must not be negative");
    else return this.fail("expected an integer");
    if (typeof v === "number" ? v > numberMax : v > max) return this.fail(`must be at most ${max}`);
    return v;
  }

  readInt(min: number, max: number): number {
    if (this.pos >= this.end) return NaN;
    const t = this.b[this.pos]!;
    let v: number;
    if (t <= 0x7f || t >= 0xe0) {
      this.pos++;
      v = t <= 0x7f ? t : t - 0x100;
    } else if (t >= 0xcc && t <= 0xd3) {
      this.pos++;
      const n = [1, 2, 4, 8][(t - 0xcc) & 3]!;
      const signed = t >= 0xd0;
      if (n === 8) {
        const hi = this.be(4);
        const lo = hi < 0 ? -1 : this.be(4);
        if (lo < 0) return NaN;
        v = signed ? (hi | 0) * TWO_32 + lo : hi * TWO_32 + lo;
      } else {
        const raw = this.be(n);
        if (raw < 0) return NaN;
        v = signed && raw >= 2 ** (8 * n - 1) ? raw - 2 ** (8 * n) : raw;
      }
    } else return NaN;
    return v >= min && v <= max ? v : NaN;
  }

  readBool(): number {
    const t = this.pos < this.end ? this.b[this.pos]! : 0;
    if (t !== 0xc2 && t !== 0xc3) return -1;
    this.pos++;
    return t === 0xc3 ? 1 : 0;
  }

  readNil(): boolean {
    if (this.pos >= this.end || this.b[this.pos] !== 0xc0) return false;
    this.pos++;
    return true;
  }

  /** A length-prefixed run (str or bin) of `n` header bytes; false if it does not fit. */
  private run(n: number): boolean {
    const save = this.pos;
    const len = n === 0 ? this.b[this.pos++]! & 0x1f : (this.pos++, this.be(n));
    if (len < 0 || this.pos + len > this.end) {
      this.truncated(save);
      return false;
    }
    this.tokStart = this.pos;
    this.tokEnd = this.pos + len;
    this.pos += len;
    return true;
  }

  readString(): boolean {
    if (this.pos >= this.end) return false;
    const t = this.b[this.pos]!;
    if (t >= 0xa0 && t <= 0xbf) return this.run(0);
    if (t === 0xd9 || t === 0xda || t === 0xdb) return this.run(t === 0xd9 ? 1 : t === 0xda ? 2 : 4);
    return false;
  }

  tokenIs(bytes: Uint8Array): boolean {
    const n = bytes.length;
    if (this.tokEnd - this.tokStart !== n) return false;
    const b = this.b;
    const at = this.tokStart;
    for (let i = 0; i < n; i++) if (b[at + i] !== bytes[i]) return false;
    return true;
  }

  tokenText(): string {
    try {
      return utf8.decode(this.b.subarray(this.tokStart, this.tokEnd));
    } catch {
      return "(not UTF-8)";
    }
  }

  readBin(): Uint8Array | null {
    const t = this.pos < this.end ? this.b[this.pos]! : 0;
    if (t < 0xc4 || t > 0xc6 || !this.run(t - 0xc3)) return null;
    return this.b.slice(this.tokStart, this.tokEnd);
  }

  /** Opens a container of `count` entries of `width` values each, if the bytes can hold them. */
  private open(count: number, width: number): boolean {
    if (count < 0) return false;
    if (count * width > this.end - this.pos) {
      this.why = `a header says ${count} entries, more than the ${this.end - this.pos} bytes that follow can hold`;
      return false;
    }
    if (this.depth >= MAX_DEPTH) {
      this.why = "nested too deeply";
      return false;
    }
    this.left[this.depth++] = count;
    return true;
  }

  private header(fix: number, h16: number, h32: number): number {
    const t = this.pos < this.end ? this.b[this.pos]! : -1;
    if (t >= fix && t <= fix + 15) {
      this.pos++;
      return t - fix;
    }
    if (t !== h16 && t !== h32) return -1;
    this.pos++;
    return this.be(t === h16 ? 2 : 4);
  }

  mapStart(): boolean {
    return this.open(this.header(0x80, 0xde, 0xdf), 2);
  }

  arrayStart(): boolean {
    return this.open(this.header(0x90, 0xdc, 0xdd), 1);
  }

  nextKey(): number {
    if (this.left[this.depth - 1] === 0) {
      this.depth--;
      return DONE;
    }
    this.left[this.depth - 1]!--;
    if (this.readString()) return MORE;
    this.why = "a map key must be a string";
    return BROKEN;
  }

  nextItem(): number {
    if (this.left[this.depth - 1] === 0) {
      this.depth--;
      return DONE;
    }
    this.left[this.depth - 1]!--;
    return MORE;
  }

  skip(): boolean {
    this.why = "unknown field"; // MessagePack fields are strict: never skipped
    return false;
  }

  atEnd(): boolean {
    return this.pos === this.end;
  }


  private truncated(at: number): number {
    this.pos = at;
    return this.fail("truncated: the packet ends inside the value");
  }
}

/** Bytes of a str header for `n` bytes: fixstr, str 8, str 16 or str 32. */
function strHeadLength(n: number): number {
  return n < 32 ? 1 : n < 0x100 ? 2 : n < 0x10000 ? 3 : 5;
}

export class MsgpackWriter implements WireWriter {
  readonly encoding = MSGPACK;
  readonly fds: number[] = [];
  readonly out = new OutBuffer();

  reset(): void {
    this.out.pos = 0;
    if (this.fds.length !== 0) this.fds.length = 0; // a store to length is a native call, even of 0 to 0
  }

  /** A head byte and a big-endian unsigned integer of `n` (1, 2 or 4) bytes, `v` below 2^32. */
  private head(h: number, v: number, n: 1 | 2 | 4): void {
    const o = this.out;
    o.room(1 + n);
    const b = o.buf;
    let p = o.pos;
    b[p++] = h;
    if (n === 4) {
      b[p++] = v >>> 24;
      b[p++] = (v >>> 16) & 0xff;
    }
    if (n >= 2) b[p++] = (v >>> 8) & 0xff;
    b[p++] = v & 0xff;
    o.pos = p;
  }

  /** uint 64 from its 32-bit halves. */
  private u64(hi: number, lo: number): void {
    this.head(0xcf, hi, 4);
    const o = this.out;
    o.room(4);
    for (let shift = 24; shift >= 0; shift -= 8) o.buf[o.pos++] = (lo >>> shift) & 0xff;
  }

  uint(v: number | bigint): void {
    if (typeof v === "bigint") return this.u64(Number(v >> 32n), Number(v & 0xffff_ffffn));
    if (v < 0x80) this.out.byte(v);
    else if (v < 0x100) this.head(0xcc, v, 1);
    else if (v < 0x10000) this.head(0xcd, v, 2);
    else if (v < TWO_32) this.head(0xce, v, 4);
    else {
      // From 2^32 up: uint 64, never float 64.
      this.u64(Math.floor(v / TWO_32), v % TWO_32);
    }
  }

  int(v: number): void {
    if (v >= 0) return this.uint(v);
    if (v >= -0x20) this.out.byte(0x100 + v);
    else if (v >= -0x80) this.head(0xd0, v & 0xff, 1);
    else if (v >= -0x8000) this.head(0xd1, v & 0xffff, 2);
    else this.head(0xd2, v >>> 0, 4);
  }

  bool(v: boolean): void {
    this.out.byte(v ? 0xc3 : 0xc2);
  }

  nil(): void {
    this.out.byte(0xc0);
  }

  private strHead(n: number): void {
    const len = strHeadLength(n);
    if (len === 1) this.out.byte(0xa0 + n);
    else if (len === 2) this.head(0xd9, n, 1);
    else if (len === 3) this.head(0xda, n, 2);
    else this.head(0xdb, n, 4);
  }

  str(s: string): void {
    // Straight into the buffer, its header sized by its length when it is ASCII (every
    // message vmemd writes); anything else through the encoder. A long string in one
    // native call (Buffer.write, about 70 ns), a short one in a loop (about 2 ns a
    // character): an Err's two 40-character chain lines took 450 ns in two loops, 150 this
    // way. (A new TextEncoder and array per string made an Err cost more than an Ok.)
    const n = s.length;
    const o = this.out;
    const head = strHeadLength(n);
    o.room(head + 3 * n);
    const b = o.buf;
    const at = o.pos + head;
    let ascii = true;
    if (n > LONG_STRING) ascii = o.text.write(s, at) === n;
    else {
      for (let i = 0; i < n && ascii; i++) {
        const c = s.charCodeAt(i);
        b[at + i] = c;
        ascii = c < 0x80;
      }
    }
    if (!ascii) {
      const bytes = utf8Encoder.encode(s);
      this.strHead(bytes.length);
      this.out.copy(bytes);
      return;
    }
    this.strHead(n);
    o.pos = at + n;
  }

  name(bytes: Uint8Array): void {
    this.strHead(bytes.length);
    this.out.copy(bytes);
  }

  bin16(bytes: Uint8Array): void {
    this.head(0xc4, 16, 1);
    this.out.copy(bytes);
  }

  mapStart(n: number): void {
    if (n < 16) this.out.byte(0x80 + n);
    else this.head(0xde, n, 2);
  }

  key(_i: number, bytes: Uint8Array): void {
    this.name(bytes);
  }

  mapEnd(): void {}

  arrayStart(n: number): void {
    if (n < 16) this.out.byte(0x90 + n);
    else if (n < 0x10000) this.head(0xdc, n, 2);
    else this.head(0xdd, n, 4);
  }

  item(_i: number): void {}

  arrayEnd(): void {}
}
