// Packets to typed messages and back, in either encoding, by walking the shapes of
// messages.ts: validation, descriptor indices and error paths come from the shapes, so
// nothing here knows any one message. A malformed packet is a Refusal value (EINVAL, with
// the path to what is wrong), never an exception.
import { Refusal } from "../memory/error";
import { JsonReader, JsonWriter, startsJson } from "./json";
import {
  FileMappingChunk,
  VmMemoryRequest,
  VmMemoryResponse,
  type VmMemoryFileMapping,
  type VmMemoryRequest as Request,
  type VmMemoryResponse as Response,
} from "./messages";
import { MsgpackReader, MsgpackWriter } from "./msgpack";
import { array, i32, nullable, str, struct, u8, type EnumShape, type Field, type Shape, type UintShape } from "./shape";
import {
  BROKEN,
  DONE,
  JSON_ENCODING,
  MORE,
  MSGPACK,
  T_BIN,
  T_NUMBER,
  T_STR,
  type Encoding,
  type WireReader,
  type WireWriter,
} from "./wire_io";

export { JSON_ENCODING, MSGPACK, type Encoding } from "./wire_io";

const EINVAL = 22;

/** The encoding of a packet body, from its first byte (docs/protocol.md, "Transport"). */
export function encodingOf(buf: Uint8Array, start: number, end: number): Encoding {
  return end > start && startsJson(buf[start]!) ? JSON_ENCODING : MSGPACK;
}

// ---- decoding ----------------------------------------------------------------

const FAIL = Symbol("malformed");
type Out = unknown;

/** The descriptors of the packet being decoded, and which have been referenced. */
class Descriptors {
  fds: readonly number[] = [];
  readonly used = new Uint8Array(256);
  /** The packet's descriptors were cut short (MSG_CTRUNC): any index reads as -1. */
  lost = false;
  reset(fds: readonly number[], lost: boolean): void {
    this.fds = fds;
    this.lost = lost;
    // Only when there is something to clear: fill() is a native call even for no bytes.
    if (fds.length > 0) this.used.fill(0, 0, Math.min(fds.length, 256));
  }
}

/** Decode state: the failure's path (innermost first) and cause. */
class Walk {
  readonly d = new Descriptors();
  readonly path: string[] = [];
  why = "";
  errno = EINVAL;

  fail(why: string): typeof FAIL {
    this.why = why;
    return FAIL;
  }
}

const walk = new Walk();
const msgpackReader = new MsgpackReader();
const jsonReader = new JsonReader();

function readerFor(enc: Encoding, buf: Uint8Array, start: number, end: number): WireReader {
  return enc === JSON_ENCODING ? jsonReader.reset(buf, start, end) : msgpackReader.reset(buf, start, end);
}

function uint(s: UintShape<unknown>, r: WireReader, w: Walk): Out {
  if (r.peek() !== T_NUMBER) return w.fail(`expected ${s.name}`);
  const v = r.readUint(s.max, s.numberMax);
  return v === -1 ? w.fail(r.why) : v;
}

function decode(s: Shape, r: WireReader, w: Walk): Out {
  switch (s.kind) {
    case "uint":
      return uint(s, r, w);
    case "int": {
      const v = r.readInt(s.min, s.max);
      return Number.isNaN(v) ? w.fail(`expected ${s.name}`) : v;
    }
    case "bool": {
      const v = r.readBool();
      return v < 0 ? w.fail("expected a boolean") : v === 1;
    }
    case "str":
      return r.readString() ? r.tokenText() : w.fail(r.why || "expected a string");
    case "fd": {
      if (r.peek() !== T_NUMBER) return w.fail("expected a descriptor index");
      const index = r.readUint(255n, 255);
      const d = w.d;
      if (d.lost) return index === -1 ? w.fail(r.why) : -1;
      if (index === -1 || (index as number) >= d.fds.length) {
        return w.fail(`descriptor index ${index === -1 ? "" : `${index} `}is out of range: the packet carries ${d.fds.length}`);
      }
      const i = index as number;
      if (d.used[i]++ !== 0) return w.fail(`descriptor index ${i} is referenced twice`);
      return d.fds[i];
    }
    case "uuid": {
      if (r.peek() === T_BIN) {
        const b = r.readBin();
        return b !== null && b.length === 16 ? b : w.fail("must be 16 bytes");
      }
      const bytes = decode(UUID_ARRAY, r, w);
      if (bytes === FAIL) return FAIL;
      return (bytes as number[]).length === 16 ? Uint8Array.from(bytes as number[]) : w.fail("must be 16 bytes");
    }
    case "nullable":
      return r.readNil() ? null : decode(s.of, r, w);
    case "struct":
      return decodeStruct(s.fields, r, w);
    case "enum":
      return decodeEnum(s, r, w);
    case "tuple":
    case "array": {
      // A tuple is an array of exactly its items' count, each of its own shape.
      const tuple = s.kind === "tuple";
      const max = s.kind === "tuple" ? s.items.length : s.max;
      const min = s.kind === "tuple" ? max : s.min;
      const expected = tuple ? `expected an array of ${max}` : "expected an array";
      if (!r.arrayStart()) return w.fail(r.why || expected);
      const out: Out[] = [];
      for (;;) {
        const n = r.nextItem();
        if (n === DONE) break;
        if (n === BROKEN) return w.fail(r.why);
        if (out.length === max) return w.fail(tuple ? expected : `takes at most ${max} elements`);
        const v = decode(s.kind === "tuple" ? s.items[out.length]! : s.of, r, w);
        if (v === FAIL) return at(w, String(out.length));
        out.push(v);
      }
      if (out.length >= min) return out;
      return w.fail(tuple ? expected : `needs at least ${min} element${min === 1 ? "" : "s"}`);
    }
    case "errchain":
      return decodeErr(r, w);
  }
}

/**
 * A name from the packet, quoted for an error message and cut to a length that keeps any
 * answer far below a packet (a 60 KiB unknown key must not make a 120 KiB Err).
 */
function quoted(text: string): string {
  return JSON.stringify(text.length > 64 ? `${text.slice(0, 64)}…` : text);
}

/** Adds a path segment to a failure on its way out. */
function at(w: Walk, segment: string): typeof FAIL {
  w.path.push(segment);
  return FAIL;
}

function decodeStruct(fields: readonly Field[], r: WireReader, w: Walk): Out {
  if (!r.mapStart()) return w.fail(r.why || "expected a map");
  const out: Record<string, unknown> = {};
  let seen = 0; // a bit per field: structs have far fewer than 32
  let count = 0;
  for (;;) {
    const n = r.nextKey();
    if (n === DONE) break;
    if (n === BROKEN) return w.fail(r.why);
    // The sender's order is usually the declaration order: try the next field first.
    let i = count < fields.length && r.tokenIs(fields[count]!.bytes) ? count : -1;
    if (i === -1) for (let j = 0; j < fields.length && i === -1; j++) if (r.tokenIs(fields[j]!.bytes)) i = j;
    if (i === -1) {
      if (r.strictFields) return w.fail(`unknown field ${quoted(r.tokenText())}`);
      const name = quoted(r.tokenText());
      if (!r.skip()) return at(w, name), w.fail(r.why);
      continue;
    }
    const f = fields[i]!;
    if (seen & (1 << i)) return w.fail(`duplicate field "${f.name}"`);
    seen |= 1 << i;
    count++;
    const v = decode(f.shape, r, w);
    if (v === FAIL) return at(w, f.name);
    out[f.name] = v;
  }
  if (count < fields.length) {
    for (let i = 0; i < fields.length; i++) {
      if (seen & (1 << i)) continue;
      const f = fields[i]!;
      // A missing Option is None, as serde's derive has it.
      if (f.shape.kind === "nullable") out[f.name] = null;
      else return at(w, f.name), w.fail("is missing");
    }
  }
  return out;
}

function variantNames(s: EnumShape<unknown>): string {
  return s.variants.map((v) => v.name).join(", ");
}

function decodeEnum(s: EnumShape<unknown>, r: WireReader, w: Walk): Out {
  const variants = s.variants;
  if (r.peek() === T_STR) {
    if (!r.readString()) return w.fail(r.why || "malformed string");
    for (let i = 0; i < variants.length; i++) {
      const v = variants[i]!;
      if (!r.tokenIs(v.bytes)) continue;
      return v.shape === null ? v.name : w.fail(`${v.name} needs a payload: {"${v.name}": …}`);
    }
    return w.fail(`unknown ${s.name} variant ${quoted(r.tokenText())} (expected one of ${variantNames(s)})`);
  }
  if (!r.mapStart()) return w.fail(r.why || `expected a ${s.name}: a string or a map with one key (the variant)`);
  let n = r.nextKey();
  if (n !== MORE) return w.fail(n === BROKEN ? r.why : `expected a ${s.name}: a map with exactly one key (the variant), not none`);
  let variant = -1;
  for (let i = 0; i < variants.length && variant === -1; i++) if (r.tokenIs(variants[i]!.bytes)) variant = i;
  if (variant === -1) return w.fail(`unknown ${s.name} variant ${quoted(r.tokenText())} (expected one of ${variantNames(s)})`);
  const v = variants[variant]!;
  let payload: Out;
  if (v.shape === null) {
    // serde_json takes {"Unit": null} for a unit variant too.
    if (!r.readNil()) return at(w, v.name), w.fail("a unit variant takes null or no payload");
    payload = v.name;
  } else {
    payload = decode(v.shape, r, w);
    if (payload === FAIL) return at(w, v.name);
  }
  n = r.nextKey();
  if (n !== DONE) return w.fail(n === BROKEN ? r.why : `expected a ${s.name}: a map with exactly one key (the variant)`);
  if (v.shape === null) return payload;
  const out: Record<string, unknown> = {};
  out[v.name] = payload;
  return out;
}

const UUID_ARRAY = array(u8, { max: 16 });
/** The Err payload in MessagePack, and in JSON (crosvm's FlatVmMemoryResponseError). */
const MSGPACK_ERR = struct({ errno: nullable(i32), chain: array(str, { min: 1 }) });
const JSON_ERR = array(str, { min: 1 });
const ERRNO_KEY = MSGPACK_ERR.fields[0]!.bytes;
const CHAIN_KEY = MSGPACK_ERR.fields[1]!.bytes;
/** How Rust's io::Error ends its Display: "Invalid argument (os error 22)". */
const OS_ERROR = / \(os error (-?\d+)\)$/;

/**
 * The Err payload, written straight rather than walked through MSGPACK_ERR / JSON_ERR (whose
 * keys it uses): an Err is what a client with stale ids gets at request rate, and the walk
 * was seven recursive calls and, in JSON, a new array and string per answer.
 */
function encodeErr(e: { errno: number | null; chain: string[] }, w: WireWriter): void {
  const chain = e.chain;
  if (w.encoding === MSGPACK) {
    w.mapStart(2);
    w.key(0, ERRNO_KEY);
    if (e.errno === null) w.nil();
    else w.int(e.errno);
    w.key(1, CHAIN_KEY);
  }
  w.arrayStart(chain.length);
  for (let i = 0; i < chain.length; i++) {
    w.item(i);
    // crosvm's chain ends its root cause with the errno, as Rust's io::Error displays it.
    w.str(i === 0 && e.errno !== null && w.encoding !== MSGPACK ? `${chain[0]} (os error ${e.errno})` : chain[i]!);
  }
  w.arrayEnd();
  if (w.encoding === MSGPACK) w.mapEnd();
}

function decodeErr(r: WireReader, w: Walk): Out {
  if (r.encoding === MSGPACK) return decode(MSGPACK_ERR, r, w);
  const chain = decode(JSON_ERR, r, w);
  if (chain === FAIL) return FAIL;
  const c = chain as string[];
  const m = OS_ERROR.exec(c[0]!);
  if (m === null) return { errno: null, chain: c };
  c[0] = c[0]!.slice(0, m.index);
  return { errno: Number(m[1]), chain: c };
}

/** Decodes one value of `shape` from the whole of [start, end); a Refusal says what is wrong. */
function decodePacket(
  shape: Shape,
  buf: Uint8Array,
  start: number,
  end: number,
  fds: readonly number[],
  enc: Encoding,
  what: string,
  fdsLost = false,
): unknown {
  const w = walk;
  if (w.path.length !== 0) w.path.length = 0; // a store to length is a native call, even of 0 to 0
  w.why = "";
  w.d.reset(fds, fdsLost);
  if (end <= start) return new Refusal(EINVAL, ["empty packet", `malformed ${what}`]);
  const r = readerFor(enc, buf, start, end);
  const v = decode(shape, r, w);
  let why = "";
  if (v === FAIL) why = w.why;
  else if (!r.atEnd()) why = "trailing bytes after the value";
  else if (!fdsLost) {
    for (let i = 0; i < fds.length; i++) {
      if (w.d.used[i] === 0) {
        why = `descriptor ${i} of ${fds.length} attached is not referenced`;
        break;
      }
    }
  }
  if (why === "") return v;
  const path = w.path.reverse().join(".");
  return new Refusal(EINVAL, [path === "" ? why : `${path}: ${why}`, `malformed ${what}`]);
}

/**
 * One request packet, bytes [start, end) of `buf` (read in place), with its descriptors:
 * descriptor fields come back holding them. Every attached descriptor must be referenced
 * exactly once; the caller owns (and closes) them whatever the outcome.
 */
export function decodeRequest(buf: Uint8Array, start: number, end: number, fds: readonly number[], enc: Encoding): Request | Refusal {
  return decodePacket(VmMemoryRequest, buf, start, end, fds, enc, "request") as Request | Refusal;
}

/**
 * A request whose descriptors were cut short by the kernel (MSG_CTRUNC), decoded only to
 * learn what it is (its descriptor fields read -1): an MmapAndRegisterMemory among them
 * still has chunks to come, and its one answer must come after them.
 */
export function decodeRequestShape(buf: Uint8Array, start: number, end: number, enc: Encoding): Request | Refusal {
  return decodePacket(VmMemoryRequest, buf, start, end, [], enc, "request", true) as Request | Refusal;
}

/** One MmapAndRegisterMemory follow-up packet. */
export function decodeFileMappings(
  buf: Uint8Array,
  start: number,
  end: number,
  fds: readonly number[],
  enc: Encoding,
): VmMemoryFileMapping[] | Refusal {
  return decodePacket(FileMappingChunk, buf, start, end, fds, enc, "file mapping chunk") as VmMemoryFileMapping[] | Refusal;
}

/** Client side: a response packet (a malformed one is a Refusal the client reports). */
export function decodeResponse(body: Uint8Array, fds: readonly number[] = []): Response | Refusal {
  const enc = encodingOf(body, 0, body.length);
  // A response's descriptors (GetGuestMemory) are all referenced, as a request's are.
  return decodePacket(VmMemoryResponse, body, 0, body.length, fds, enc, "response") as Response | Refusal;
}

// ---- encoding ----------------------------------------------------------------

const msgpackWriter = new MsgpackWriter();
const jsonWriter = new JsonWriter();

function encode(s: Shape, v: unknown, w: WireWriter): void {
  switch (s.kind) {
    case "uint":
      return w.uint(v as number | bigint);
    case "int":
      return w.int(v as number);
    case "bool":
      return w.bool(v as boolean);
    case "str":
      return w.str(v as string);
    case "fd":
      w.fds.push(v as number);
      return w.uint(w.fds.length - 1);
    case "uuid":
      return w.bin16(v as Uint8Array);
    case "nullable":
      return v === null || v === undefined ? w.nil() : encode(s.of, v, w);
    case "struct": {
      const o = v as Record<string, unknown>;
      const fields = s.fields;
      w.mapStart(fields.length);
      for (let i = 0; i < fields.length; i++) {
        const f = fields[i]!;
        w.key(i, f.bytes);
        encode(f.shape, o[f.name], w);
      }
      return w.mapEnd();
    }
    case "enum": {
      let name: string | undefined;
      if (typeof v === "string") name = v;
      else for (const k in v as object) name ??= k;
      const i = name === undefined ? undefined : s.byName.get(name);
      if (i === undefined) throw new TypeError(`not a ${s.name}: ${String(name ?? v)}`);
      const variant = s.variants[i]!;
      if (variant.shape === null) return w.name(variant.bytes);
      w.mapStart(1);
      w.key(0, variant.bytes);
      encode(variant.shape, (v as Record<string, unknown>)[name!], w);
      return w.mapEnd();
    }
    case "tuple":
    case "array": {
      const a = v as unknown[];
      w.arrayStart(a.length);
      for (let i = 0; i < a.length; i++) {
        w.item(i);
        encode(s.kind === "tuple" ? s.items[i]! : s.of, a[i], w);
      }
      return w.arrayEnd();
    }
    case "errchain":
      return encodeErr(v as { errno: number | null; chain: string[] }, w);
  }
}

function encodeWith(s: Shape, v: unknown, enc: Encoding): WireWriter {
  const w = enc === JSON_ENCODING ? jsonWriter : msgpackWriter;
  w.reset();
  encode(s, v, w);
  return w;
}

/** A response's bytes in `enc`; valid until the next encode (copy to keep them). */
export function encodeResponse(resp: Response, enc: Encoding): Uint8Array {
  return encodeWith(VmMemoryResponse, resp, enc).out.bytes();
}

/**
 * A response encoded in the writer's own buffer: its bytes are `buf[0, pos)`, valid until
 * the next encode. For the server's send path, which copies them into its batch: no view
 * is made per response (a subarray is a native call and a cell, about 86 ns).
 */
export function encodeResponseInPlace(resp: Response, enc: Encoding): { readonly buf: Uint8Array; readonly pos: number } {
  return encodeWith(VmMemoryResponse, resp, enc).out;
}

/**
 * A response that carries descriptors (GuestMemory): its bytes (a copy) and the descriptors
 * to attach, in index order. The descriptors stay the caller's: sending duplicates them.
 */
export function encodeResponsePacket(resp: Response, enc: Encoding): Packet {
  return packetOf(encodeWith(VmMemoryResponse, resp, enc));
}

/** A message ready for the wire: its body and the descriptors to attach, in index order. */
export interface Packet {
  body: Uint8Array;
  fds: number[];
}

/** What a writer holds, copied out as a packet of its own. */
function packetOf(w: WireWriter): Packet {
  return { body: w.out.buf.slice(0, w.out.pos), fds: w.fds.slice() };
}

/** Client side: a request whose descriptor fields hold real descriptors, as a packet. */
export function encodeRequest(req: Request, enc: Encoding = MSGPACK): Packet {
  return packetOf(encodeWith(VmMemoryRequest, req, enc));
}

/** Client side: one MmapAndRegisterMemory follow-up packet. */
export function encodeFileMappings(chunk: VmMemoryFileMapping[], enc: Encoding = MSGPACK): Packet {
  return packetOf(encodeWith(FileMappingChunk, chunk, enc));
}

/** Whether a decode result is a refusal rather than a message. */
export function isRefusal(v: unknown): v is Refusal {
  return v instanceof Refusal;
}
