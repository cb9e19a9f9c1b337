// JSON tokens (RFC 8259) for the shape walker, written as serde_json writes them (compact,
// crosvm's Tube) and read as serde_json reads them: integers from their digits (never through
// a float), unknown fields skipped, UTF-8 checked. Nothing is allocated for a value until a
// shape asks for it, and skipping is bounded in depth.
import {
  BROKEN,
  DONE,
  JSON_ENCODING,
  MORE,
  OutBuffer,
  PacketCursor,
  T_ARRAY,
  T_BOOL,
  T_MAP,
  T_NIL,
  T_NONE,
  T_NUMBER,
  T_STR,
  type WireReader,
  type WireWriter,
} from "./wire_io";

const QUOTE = 0x22;
const BACKSLASH = 0x5c;
const COMMA = 0x2c;
const COLON = 0x3a;
const MINUS = 0x2d;
const ZERO = 0x30;
const NINE = 0x39;
/** Containers open at once: far more than any message nests; a skipped value deeper is refused. */
const MAX_DEPTH = 128;
const utf8Decoder = new TextDecoder("utf-8", { fatal: true });
const utf8Encoder = new TextEncoder();

function isSpace(c: number): boolean {
  return c === 0x20 || c === 0x0a || c === 0x0d || c === 0x09;
}

/** True when the body's first byte makes it JSON (docs/protocol.md, "Transport"). */
export function startsJson(first: number): boolean {
  return first === 0x7b || first === 0x5b || first === QUOTE || isSpace(first);
}

export class JsonReader extends PacketCursor implements WireReader {
  readonly encoding = JSON_ENCODING;
  readonly strictFields = false;
  /** The last string token, when it had escapes: decoded (else its raw bytes are the token). */
  private tokDecoded: Uint8Array | null = null;
  /** Per open container: whether an entry has been read (a comma comes before the next). */
  private readonly started = new Uint8Array(MAX_DEPTH);

  private ws(): void {
    const b = this.b;
    while (this.pos < this.end && isSpace(b[this.pos]!)) this.pos++;
  }

  peek(): number {
    this.ws();
    if (this.pos >= this.end) return T_NONE;
    const c = this.b[this.pos]!;
    if (c === 0x7b) return T_MAP;
    if (c === 0x5b) return T_ARRAY;
    if (c === QUOTE) return T_STR;
    if (c === MINUS || (c >= ZERO && c <= NINE)) return T_NUMBER;
    if (c === 0x74 || c === 0x66) return T_BOOL;
    if (c === 0x6e) return T_NIL;
    return T_NONE;
  }

  /**
   * The digits of an integer at pos (after an optional minus): their range, or -1 when
   * the text is not a JSON integer (a float is named as such: serde_json refuses it too).
   */
  private digits(): number {
    const b = this.b;
    const start = this.pos;
    let i = start;
    while (i < this.end && b[i]! >= ZERO && b[i]! <= NINE) i++;
    if (i === start) return this.fail("expected an integer");
    if (b[start] === ZERO && i > start + 1) return this.fail("a number must not have leading zeros");
    const c = i < this.end ? b[i]! : 0;
    if (c === 0x2e || c === 0x65 || c === 0x45) return this.fail("expected an integer, found a floating point number");
    this.pos = i;
    return i - start;
  }

  readUint(max: bigint, numberMax: number): number | bigint {
    this.ws();
    if (this.pos < this.end && this.b[this.pos] === MINUS) return this.fail("must not be negative");
    const start = this.pos;
    const n = this.digits();
    if (n < 0) return -1;
    // 20 digits hold 2^64 - 1; more can only be too large (and need no BigInt to say so).
    if (n > 20) return this.fail(`must be at most ${max}`);
    let v: number | bigint;
    if (n <= 15) {
      let x = 0;
      for (let i = start; i < start + n; i++) x = x * 10 + (this.b[i]! - ZERO);
      v = x;
    } else {
      let x = 0n;
      for (let i = start; i < start + n; i++) x = x * 10n + BigInt(this.b[i]! - ZERO);
      v = x <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(x) : x;
    }
    if (typeof v === "number" ? v > numberMax : v > max) return this.fail(`must be at most ${max}`);
    return v;
  }

  readInt(min: number, max: number): number {
    this.ws();
    const negative = this.pos < this.end && this.b[this.pos] === MINUS;
    if (negative) this.pos++;
    const start = this.pos;
    const n = this.digits();
    if (n < 0 || n > 10) return NaN;
    let x = 0;
    for (let i = start; i < start + n; i++) x = x * 10 + (this.b[i]! - ZERO);
    const v = negative ? -x : x;
    return v >= min && v <= max ? v : NaN;
  }

  private literal(text: string): boolean {
    const b = this.b;
    if (this.pos + text.length > this.end) return false;
    for (let i = 0; i < text.length; i++) if (b[this.pos + i] !== text.charCodeAt(i)) return false;
    this.pos += text.length;
    return true;
  }

  readBool(): number {
    this.ws();
    if (this.literal("true")) return 1;
    if (this.literal("false")) return 0;
    return -1;
  }

  readNil(): boolean {
    this.ws();
    return this.literal("null");
  }

  readString(): boolean {
    this.ws();
    const b = this.b;
    if (this.pos >= this.end || b[this.pos] !== QUOTE) return false;
    let i = this.pos + 1;
    let escaped = false;
    let ascii = true;
    for (;;) {
      if (i >= this.end) return this.no("truncated: the packet ends inside a string");
      const c = b[i]!;
      if (c === QUOTE) break;
      if (c === BACKSLASH) {
        const n = escapeLength(b, i + 1, this.end);
        if (n === 0) return this.no("a string has an invalid escape");
        escaped = true;
        i += 1 + n;
        continue;
      }
      if (c < 0x20) return this.no("a control character inside a string");
      if (c >= 0x80) ascii = false;
      i++;
    }
    const start = this.pos + 1;
    this.pos = i + 1;
    this.tokStart = start;
    this.tokEnd = i;
    this.tokDecoded = null;
    if (!escaped && ascii) return true;
    let text: string;
    try {
      text = utf8Decoder.decode(b.subarray(start, i));
    } catch {
      return this.no("a string is not valid UTF-8");
    }
    // Every escape is valid and no control character is raw: a JSON string literal, which
    // JSON.parse unescapes (and cannot refuse).
    if (escaped) this.tokDecoded = utf8Encoder.encode(JSON.parse(`"${text}"`) as string);
    return true;
  }

  tokenIs(bytes: Uint8Array): boolean {
    const src = this.tokDecoded ?? this.b;
    const at = this.tokDecoded === null ? this.tokStart : 0;
    const len = this.tokDecoded === null ? this.tokEnd - this.tokStart : this.tokDecoded.length;
    if (len !== bytes.length) return false;
    for (let i = 0; i < len; i++) if (src[at + i] !== bytes[i]) return false;
    return true;
  }

  tokenText(): string {
    return utf8Decoder.decode(this.tokDecoded ?? this.b.subarray(this.tokStart, this.tokEnd));
  }

  readBin(): Uint8Array | null {
    return null; // JSON has no byte strings: bytes are arrays of numbers
  }

  private open(c: number): boolean {
    this.ws();
    if (this.pos >= this.end || this.b[this.pos] !== c) return false;
    if (this.depth >= MAX_DEPTH) {
      this.why = "nested too deeply";
      return false;
    }
    this.pos++;
    this.started[this.depth++] = 0;
    return true;
  }

  mapStart(): boolean {
    return this.open(0x7b);
  }

  arrayStart(): boolean {
    return this.open(0x5b);
  }

  /** Past the end of the current container, or past the comma before its next entry. */
  private next(close: number): number {
    this.ws();
    const c = this.pos < this.end ? this.b[this.pos]! : -1;
    if (c === close) {
      this.pos++;
      this.depth--;
      return DONE;
    }
    if (this.started[this.depth - 1] === 1) {
      if (c !== COMMA) return this.fail(c === -1 ? "truncated: the packet ends inside a container" : "expected , between entries");
      this.pos++;
    } else this.started[this.depth - 1] = 1;
    return MORE;
  }

  nextKey(): number {
    const n = this.next(0x7d);
    if (n !== MORE) return n;
    if (!this.readString()) return this.fail(this.why || "a key must be a string");
    this.ws();
    if (this.pos >= this.end || this.b[this.pos] !== COLON) return this.fail("expected : after a key");
    this.pos++;
    return MORE;
  }

  nextItem(): number {
    return this.next(0x5d);
  }

  /** Recursion is bounded: open() refuses containers past MAX_DEPTH. */
  skip(): boolean {
    const t = this.peek();
    switch (t) {
      case T_MAP:
      case T_ARRAY: {
        const map = t === T_MAP;
        if (!(map ? this.mapStart() : this.arrayStart())) return false;
        for (;;) {
          const n = map ? this.nextKey() : this.nextItem();
          if (n === DONE) return true;
          if (n === BROKEN || !this.skip()) return false;
        }
      }
      case T_STR:
        return this.readString();
      case T_NUMBER:
        if (this.b[this.pos] === MINUS) this.pos++;
        if (this.digits() >= 0) return true;
        if (!this.float()) return false;
        this.why = ""; // a float is a fine value to skip
        return true;
      case T_BOOL:
        return this.readBool() >= 0 || this.no("expected a value");
      case T_NIL:
        return this.readNil() || this.no("expected a value");
      default:
        return this.no("expected a value");
    }
  }

  /** The rest of a number that digits() called a float: fraction and exponent. */
  private float(): boolean {
    const b = this.b;
    let i = this.pos;
    if (b[i] === ZERO && b[i + 1]! >= ZERO && b[i + 1]! <= NINE) return false;
    const digitsFrom = (j: number) => {
      const s = j;
      while (j < this.end && b[j]! >= ZERO && b[j]! <= NINE) j++;
      return j > s ? j : -1;
    };
    i = digitsFrom(i);
    if (i < 0) return false;
    if (b[i] === 0x2e) {
      i = digitsFrom(i + 1);
      if (i < 0) return false;
    }
    if (b[i] === 0x65 || b[i] === 0x45) {
      i++;
      if (b[i] === 0x2b || b[i] === MINUS) i++;
      i = digitsFrom(i);
      if (i < 0) return false;
    }
    this.pos = i;
    return true;
  }

  atEnd(): boolean {
    this.ws();
    return this.pos === this.end;
  }


  private no(why: string): false {
    this.why = why;
    return false;
  }
}

/** The length of the escape whose letter is at b[at] (1, or 5 for \\uXXXX); 0 when it is malformed. */
function escapeLength(b: Uint8Array, at: number, end: number): number {
  const c = at < end ? b[at]! : 0;
  if (c !== 0x75) return ESCAPES.includes(c) ? 1 : 0; // u
  if (at + 5 > end) return 0;
  for (let i = at + 1; i < at + 5; i++) if (!isHexDigit(b[i]!)) return 0;
  return 5;
}

/** The letters after a backslash that stand alone: " \\ / b f n r t. */
const ESCAPES = [0x22, 0x5c, 0x2f, 0x62, 0x66, 0x6e, 0x72, 0x74];

function isHexDigit(c: number): boolean {
  return (c >= ZERO && c <= NINE) || ((c | 0x20) >= 0x61 && (c | 0x20) <= 0x66);
}

const HEX = "0123456789abcdef";

export class JsonWriter implements WireWriter {
  readonly encoding = JSON_ENCODING;
  readonly fds: number[] = [];
  readonly out = new OutBuffer();
  private readonly digitBuf = new Uint8Array(20);

  reset(): void {
    this.out.pos = 0;
    if (this.fds.length !== 0) this.fds.length = 0; // a store to length is a native call, even of 0 to 0
  }

  uint(v: number | bigint): void {
    if (typeof v === "bigint") return this.ascii(v.toString());
    // Digits straight into the buffer: no string per number.
    const d = this.digitBuf;
    let n = 0;
    do {
      const q = Math.floor(v / 10);
      d[n++] = ZERO + (v - q * 10);
      v = q;
    } while (v > 0);
    const o = this.out;
    o.room(n);
    while (n > 0) o.buf[o.pos++] = d[--n]!;
  }

  int(v: number): void {
    if (v < 0) {
      this.out.byte(MINUS);
      v = -v;
    }
    this.uint(v);
  }

  private ascii(s: string): void {
    const o = this.out;
    o.room(s.length);
    for (let i = 0; i < s.length; i++) o.buf[o.pos++] = s.charCodeAt(i);
  }

  bool(v: boolean): void {
    this.ascii(v ? "true" : "false");
  }

  nil(): void {
    this.ascii("null");
  }

  /** As serde_json: ", \ and control characters escaped, the rest as UTF-8. */
  str(s: string): void {
    const o = this.out;
    o.byte(QUOTE);
    for (let i = 0; i < s.length; i++) {
      const c = s.charCodeAt(i);
      if (c >= 0x20 && c < 0x80 && c !== QUOTE && c !== BACKSLASH) {
        o.byte(c);
        continue;
      }
      if (c >= 0x80) {
        // The rest of the string through the encoder (surrogate pairs stay together).
        let j = i;
        while (j < s.length && s.charCodeAt(j) >= 0x80) j++;
        o.copy(utf8Encoder.encode(s.slice(i, j)));
        i = j - 1;
        continue;
      }
      o.byte(BACKSLASH);
      const short = c === QUOTE ? '"' : c === BACKSLASH ? "\\" : c === 8 ? "b" : c === 9 ? "t" : c === 10 ? "n" : c === 12 ? "f" : c === 13 ? "r" : "";
      if (short !== "") o.byte(short.charCodeAt(0));
      else this.ascii(`u00${HEX[c >> 4]}${HEX[c & 15]}`);
    }
    o.byte(QUOTE);
  }

  name(bytes: Uint8Array): void {
    this.out.byte(QUOTE);
    this.out.copy(bytes);
    this.out.byte(QUOTE);
  }

  bin16(bytes: Uint8Array): void {
    this.arrayStart(16);
    for (let i = 0; i < 16; i++) {
      this.item(i);
      this.uint(bytes[i]!);
    }
    this.arrayEnd();
  }

  mapStart(_n: number): void {
    this.out.byte(0x7b);
  }

  key(i: number, bytes: Uint8Array): void {
    if (i > 0) this.out.byte(COMMA);
    this.name(bytes);
    this.out.byte(COLON);
  }

  mapEnd(): void {
    this.out.byte(0x7d);
  }

  arrayStart(_n: number): void {
    this.out.byte(0x5b);
  }

  item(i: number): void {
    if (i > 0) this.out.byte(COMMA);
  }

  arrayEnd(): void {
    this.out.byte(0x5d);
  }
}
