// What the shape walker (codec.ts) needs of an encoding: a reader of tokens over one
// packet's bytes and a writer of tokens into a buffer. msgpack.ts and json.ts implement
// them. Readers never allocate for what the packet cannot fill: counts in headers are
// checked against the bytes that follow, and nothing is preallocated from them.

export const MSGPACK = 0;
export const JSON_ENCODING = 1;
export type Encoding = typeof MSGPACK | typeof JSON_ENCODING;

// Token kinds, as peek() reports the next value.
export const T_NONE = 0; // nothing left, or a byte that starts no value
export const T_MAP = 1;
export const T_ARRAY = 2;
export const T_STR = 3;
export const T_NUMBER = 4;
export const T_BOOL = 5;
export const T_NIL = 6;
export const T_BIN = 7;
export const T_OTHER = 8; // MessagePack float or ext: never valid in a message

/** nextKey / nextItem: another entry follows, the container ended, or the bytes are malformed. */
export const MORE = 1;
export const DONE = 0;
export const BROKEN = -1;

export interface WireReader {
  readonly encoding: Encoding;
  /** Unknown struct fields: refused (MessagePack) or skipped, as serde_json does (JSON). */
  readonly strictFields: boolean;
  /** Why the last failing call failed, for the error's root cause. */
  why: string;
  peek(): number;
  /** An unsigned integer up to `max` (a number up to 2^53 - 1, else a bigint); -1 if not. */
  readUint(max: bigint, numberMax: number): number | bigint;
  /** An integer in [min, max] (both within ±2^31); NaN if not. */
  readInt(min: number, max: number): number;
  /** 1 for true, 0 for false, -1 for anything else. */
  readBool(): number;
  /** Consumes a nil if one is next. */
  readNil(): boolean;
  /** Reads a string token; then tokenIs / tokenText look at it. False if not a string. */
  readString(): boolean;
  tokenIs(bytes: Uint8Array): boolean;
  /** The token as text (error messages, and str shapes). */
  tokenText(): string;
  /** MessagePack bin: its bytes (copied), or null. */
  readBin(): Uint8Array | null;
  mapStart(): boolean;
  /** Reads the next key into the token (see readString), or ends the map. */
  nextKey(): number;
  arrayStart(): boolean;
  nextItem(): number;
  /** Skips one value of any kind (JSON's unknown fields); false if malformed or too deep. */
  skip(): boolean;
  /** True when nothing but insignificant bytes remain. */
  atEnd(): boolean;
}

/** What both readers keep: the packet's bytes, where they are, the last string token. */
export class PacketCursor {
  why = "";
  protected b: Uint8Array = new Uint8Array(0);
  protected pos = 0;
  protected end = 0;
  /** The last string token's bytes, [tokStart, tokEnd) of the packet. */
  protected tokStart = 0;
  protected tokEnd = 0;
  /** Containers open. */
  protected depth = 0;

  /** Bytes [start, end) of `b` (never past its end, whatever the caller says). */
  reset(b: Uint8Array, start: number, end: number): this {
    this.b = b;
    this.pos = start;
    this.end = Math.min(end, b.length);
    this.depth = 0;
    this.why = "";
    return this;
  }

  protected fail(why: string): number {
    this.why = why;
    return -1;
  }
}

export interface WireWriter {
  readonly encoding: Encoding;
  /** Descriptors written so far, in index order (what the packet's SCM_RIGHTS carries). */
  readonly fds: number[];
  reset(): void;
  uint(v: number | bigint): void;
  int(v: number): void;
  bool(v: boolean): void;
  nil(): void;
  str(s: string): void;
  /** A string known to be ASCII with nothing to escape (names of fields and variants). */
  name(bytes: Uint8Array): void;
  bin16(bytes: Uint8Array): void;
  mapStart(n: number): void;
  /** Before the value of entry `i`: its key. */
  key(i: number, bytes: Uint8Array): void;
  mapEnd(): void;
  arrayStart(n: number): void;
  /** Before item `i`. */
  item(i: number): void;
  arrayEnd(): void;
  /** What was written since reset: out.buf[0, out.pos), valid until the next reset. */
  readonly out: OutBuffer;
}

/** A growable output buffer, shared by both writers. */
export class OutBuffer {
  buf = new Uint8Array(4096);
  /**
   * The same bytes as a Buffer, for write(): a long string goes in with one native call
   * (MsgpackWriter.str). Not `buf` itself: a Buffer's slice() is a view, not a copy, and
   * callers slice() what the writers return to keep it.
   */
  text = Buffer.from(this.buf.buffer);
  pos = 0;

  /** Room for `n` more bytes. Past `limit` the value cannot be sent: a bug, so it throws. */
  room(n: number): void {
    if (this.pos + n <= this.buf.length) return;
    const size = Math.max(2 * this.buf.length, this.pos + n);
    if (size > OUT_LIMIT) throw new RangeError(`an encoded message would exceed ${OUT_LIMIT} bytes`);
    const bigger = new Uint8Array(size);
    bigger.set(this.buf.subarray(0, this.pos));
    this.buf = bigger;
    this.text = Buffer.from(bigger.buffer);
  }

  byte(b: number): void {
    this.room(1);
    this.buf[this.pos++] = b;
  }

  /** The bytes written (a view, valid until the buffer is written again). */
  bytes(): Uint8Array {
    return this.buf.subarray(0, this.pos);
  }

  copy(bytes: Uint8Array): void {
    const n = bytes.length;
    this.room(n);
    const b = this.buf;
    const at = this.pos;
    // Names and keys are a few bytes: a loop, not set() (a native call of about 37 ns where
    // the loop takes 7 for 3 bytes; they cost the same at about 20).
    if (n <= 16) for (let i = 0; i < n; i++) b[at + i] = bytes[i]!;
    else b.set(bytes, at);
    this.pos = at + n;
  }
}

/** Far above any packet (64 KiB): responses are paged so they never come near it. */
const OUT_LIMIT = 1 << 20;
