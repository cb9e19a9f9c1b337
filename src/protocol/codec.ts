// MessagePack codec and descriptor indices (PROTOCOL.md, "Transport", "Value shapes").
import { Decoder, Encoder } from "@msgpack/msgpack";
import type * as z from "zod/mini";
import { failure, VmMemoryError } from "../memory/error";
import { descriptorSlots, type VmMemoryFileMapping, type VmMemoryRequest, type VmMemoryResponse } from "../memory/request";
import { fastRequest, fastResponse } from "./fast";
import { hotRequest } from "./hot";
import { decodePlain, encodePlain, NOT_PLAIN } from "./plain_msgpack";
import { schemas } from "./schema";

/** The largest packet body either side sends or accepts. */
export const MAX_PACKET = 65536;

// One reused Encoder/Decoder each (BUN_NOTES.md: ~0.9 µs encode+decode when reused).
// useBigInt64: uint 64 / int 64 decode as BigInt and BigInts encode as uint 64 / int 64.
const encoder = new Encoder({ useBigInt64: true, initialBufferSize: 4096 });
/**
 * Map keys repeat in every packet ("BalloonTargetReached", "descriptor", ...). The library's
 * own key cache stops at 16 bytes, shorter than most variant names: this one keeps keys up
 * to 32 bytes, a few per length, compared byte by byte.
 */
class KeyCache {
  private readonly byLength: { bytes: Uint8Array; key: string }[][] = Array.from({ length: 33 }, () => []);
  private readonly utf8 = new TextDecoder();
  canBeCached(byteLength: number): boolean {
    return byteLength > 0 && byteLength <= 32;
  }
  decode(bytes: Uint8Array, offset: number, byteLength: number): string {
    const bucket = this.byLength[byteLength]!;
    outer: for (const e of bucket) {
      for (let i = 0; i < byteLength; i++) if (e.bytes[i] !== bytes[offset + i]) continue outer;
      return e.key;
    }
    const key = this.utf8.decode(bytes.subarray(offset, offset + byteLength));
    if (bucket.length < 16) bucket.push({ bytes: bytes.slice(offset, offset + byteLength), key });
    return key;
  }
}

const decoder = new Decoder({ useBigInt64: true, maxStrLength: MAX_PACKET, maxBinLength: MAX_PACKET, keyDecoder: new KeyCache() });

/**
 * Rewrites integers of 2^32 and above as BigInt, in place, so they go out as uint 64
 * rather than float 64 (the encoder's choice for large JS numbers).
 */
function widen(v: unknown): unknown {
  if (typeof v === "number") return v >= 2 ** 32 && Number.isInteger(v) ? BigInt(v) : v;
  if (typeof v !== "object" || v === null || v instanceof Uint8Array) return v;
  if (Array.isArray(v)) {
    for (let i = 0; i < v.length; i++) v[i] = widen(v[i]);
    return v;
  }
  const o = v as Record<string, unknown>;
  for (const k in o) o[k] = widen(o[k]);
  return o;
}

const OK_BYTES = encoder.encode("Ok").slice();

/** Encodes a value; the bytes are valid until the next encode (copy to keep them). */
export function encodeValue(value: unknown): Uint8Array {
  if (value === "Ok") return OK_BYTES;
  const plain = encodePlain(value);
  if (plain !== NOT_PLAIN) return plain;
  return encodeValueGeneral(value);
}

/** The general encoder alone (what encodePlain must agree with). Rewrites `value` in place. */
export function encodeValueGeneral(value: unknown): Uint8Array {
  return encoder.encode(widen(value));
}

export function decodeValue(body: Uint8Array): unknown {
  if (body.byteLength === 0) throw new VmMemoryError(22, "empty packet").context("malformed packet");
  const plain = decodePlain(body);
  if (plain !== NOT_PLAIN) return plain;
  try {
    return decoder.decode(body);
  } catch (e) {
    throw new VmMemoryError(22, `not a single MessagePack value: ${(e as Error).message}`).context("malformed packet");
  }
}

type Issue = z.core.$ZodIssue;
const MISSING = Symbol("missing");

function at(value: unknown, path: readonly PropertyKey[]): unknown {
  let v = value;
  for (const k of path) {
    if (typeof v !== "object" || v === null || !Object.hasOwn(v, k)) return MISSING;
    v = (v as Record<PropertyKey, unknown>)[k];
  }
  return v;
}

/**
 * The most telling issue. Inside a union (an externally tagged enum), the branch whose
 * tag the value carries; a branch that only says its tag is missing tells nothing.
 */
function deepest(issue: Issue, value: unknown, base: readonly PropertyKey[]): { path: PropertyKey[]; issue: Issue } {
  const path = [...base, ...issue.path];
  if (issue.code !== "invalid_union" || issue.errors.length === 0) return { path, issue };
  let best: { path: PropertyKey[]; issue: Issue } | undefined;
  for (const branch of issue.errors) {
    if (branch.length === 0) continue;
    const d = deepest(branch[0]!, value, path);
    if (d.path.length > path.length && at(value, d.path.slice(0, path.length + 1)) === MISSING) continue; // its tag is not there
    if (best === undefined || d.path.length > best.path.length) best = d;
  }
  return best ?? { path, issue };
}

function describe(issue: Issue, value: unknown): string {
  if (value === MISSING) return "is missing";
  switch (issue.code) {
    case "invalid_type":
      return `expected ${issue.expected}`;
    case "too_small":
      return issue.origin === "array" ? `needs at least ${issue.minimum} elements` : `must be at least ${issue.minimum}`;
    case "too_big":
      return issue.origin === "array" ? `takes at most ${issue.maximum} elements` : `must be at most ${issue.maximum}`;
    case "unrecognized_keys":
      return `unknown key${issue.keys.length > 1 ? "s" : ""} ${issue.keys.map((k) => JSON.stringify(k)).join(", ")}`;
    case "invalid_value":
      return `must be one of ${issue.values.map((v) => JSON.stringify(v)).join(", ")}`;
    case "invalid_union": {
      // No branch's tag is present: name the tags that would be.
      const tags = issue.errors.flatMap((b) => (b[0] !== undefined && b[0].path.length > 0 ? [String(b[0].path[0])] : []));
      return tags.length > 0 ? `expected one of ${tags.join(", ")}` : "matches none of the allowed shapes";
    }
    default:
      return issue.message;
  }
}

function schemaError(what: string, err: z.core.$ZodError, value: unknown, prefix?: string): VmMemoryError {
  const { path, issue } = deepest(err.issues[0]!, value, []);
  const parts = [...(prefix === undefined ? [] : [prefix]), ...path.map(String)];
  const where = parts.length > 0 ? parts.join(".") : "(top level)";
  return new VmMemoryError(22, `${where}: ${describe(issue, at(value, path))}`).context(`malformed ${what}`);
}

function isPlainMap(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v) && !(v instanceof Uint8Array);
}

/** A decoded value as a typed request, with descriptor indices still in the descriptor fields. */
export function parseRequest(value: unknown): VmMemoryRequest {
  return fastRequest(value) ?? parseRequestBySchema(value);
}

/** parseRequest without the fast path: the schema's own answer (tests compare the two). */
export function parseRequestBySchema(value: unknown): VmMemoryRequest {
  const { requestPayloads, unitRequests } = schemas();
  if (typeof value === "string") {
    if ((unitRequests as readonly string[]).includes(value)) return value as VmMemoryRequest;
    throw failure("EINVAL", `unknown request variant "${value}"`).context("malformed request");
  }
  if (!isPlainMap(value)) throw failure("EINVAL", "a request must be a string or a map with one key").context("malformed request");
  const keys = Object.keys(value);
  if (keys.length !== 1) {
    throw failure("EINVAL", `a request map must have exactly one key (the variant), not ${keys.length}`).context("malformed request");
  }
  const variant = keys[0]!;
  // Object.hasOwn: "constructor" or "toString" must not find Object.prototype's members.
  const schema = Object.hasOwn(requestPayloads, variant) ? requestPayloads[variant as keyof typeof requestPayloads] : undefined;
  if (schema === undefined) throw failure("EINVAL", `unknown request variant "${variant}"`).context("malformed request");
  const parsed = schema.safeParse(value[variant]);
  if (!parsed.success) throw schemaError("request", parsed.error, value[variant], variant);
  return { [variant]: parsed.data } as VmMemoryRequest;
}

/**
 * Replaces descriptor indices with the packet's descriptors. Every attached descriptor
 * must be referenced exactly once (PROTOCOL.md); otherwise EINVAL, and the caller,
 * who owns `fds`, closes them all.
 */
export function resolveDescriptors(holders: { holder: Record<string, unknown>; key: string }[], fds: readonly number[]): void {
  if (holders.length === 0 && fds.length === 0) return;
  if (holders.length === 1 && fds.length === 1 && holders[0]!.holder[holders[0]!.key] === 0) {
    holders[0]!.holder[holders[0]!.key] = fds[0]; // the common case: one descriptor, index 0
    return;
  }
  const used = new Uint8Array(fds.length);
  for (const { holder, key } of holders) {
    const index = holder[key] as number;
    if (index >= fds.length) {
      throw failure("EINVAL", `descriptor index ${index} is out of range: the packet carries ${fds.length}`).context("malformed request");
    }
    if (used[index]++ !== 0) throw failure("EINVAL", `descriptor index ${index} is referenced twice`).context("malformed request");
  }
  const unused = used.indexOf(0);
  if (unused !== -1) {
    throw failure("EINVAL", `descriptor ${unused} of ${fds.length} attached is not referenced`).context("malformed request");
  }
  for (const { holder, key } of holders) holder[key] = fds[holder[key] as number];
}

/**
 * Decodes one request packet, bytes [start, end) of `buf` (the server reads in place: a
 * view is made only off the hot path); descriptor fields come back as the packet's
 * descriptors.
 */
export function decodeRequest(buf: Uint8Array, fds: readonly number[], start = 0, end = buf.length): VmMemoryRequest {
  return hotRequest(buf, fds, start, end) ?? decodeRequestGeneral(buf.subarray(start, end), fds);
}

/** decodeRequest without the hot path (./hot.ts): what that path must agree with. */
export function decodeRequestGeneral(body: Uint8Array, fds: readonly number[]): VmMemoryRequest {
  const req = parseRequest(decodeValue(body));
  resolveDescriptors(descriptorSlots(req), fds);
  return req;
}

/** Decodes one MmapAndRegisterMemory follow-up packet. */
export function decodeFileMappings(body: Uint8Array, fds: readonly number[]): VmMemoryFileMapping[] {
  const value = decodeValue(body);
  const parsed = schemas().fileMappingChunk.safeParse(value);
  if (!parsed.success) throw schemaError("file mapping chunk", parsed.error, value);
  const mappings = parsed.data as VmMemoryFileMapping[];
  resolveDescriptors(
    mappings.map((m) => ({ holder: m as unknown as Record<string, unknown>, key: "file" })),
    fds,
  );
  return mappings;
}

export function encodeResponse(resp: VmMemoryResponse): Uint8Array {
  return encodeValue(resp);
}

/** Client side: a response packet as a typed response (a malformed one throws). */
export function decodeResponse(body: Uint8Array): VmMemoryResponse {
  const value = decodeValue(body);
  return fastResponse(value) ?? parseResponseBySchema(value);
}

export function parseResponseBySchema(value: unknown): VmMemoryResponse {
  const parsed = schemas().response.safeParse(value);
  if (!parsed.success) throw schemaError("response", parsed.error, value);
  return parsed.data as VmMemoryResponse;
}
