// Hand-written fast paths for the shapes that make up most traffic. Each one returns
// exactly what the zod schema in schema.ts would return for the same value, or undefined
// for anything else, and then zod decides (and explains what is wrong). Values are checked
// in place, and uint 64 bigints up to 2^53 become numbers in place, as the schema converts
// them; that leaves what zod will see just as valid or invalid as before. The schema stays
// the one definition of the protocol: test/protocol.test.ts feeds both the same generated
// values, valid and broken, and requires the fast path never to accept what zod refuses,
// nor to return anything zod would not.
import type { VmMemoryRequest, VmMemoryResponse } from "../memory/request";

const MAX_SAFE = Number.MAX_SAFE_INTEGER;

/** A plain map whose own keys are exactly `keys`. */
function exactly(v: unknown, keys: readonly string[]): v is Record<string, unknown> {
  if (typeof v !== "object" || v === null || Array.isArray(v) || v instanceof Uint8Array) return false;
  let n = 0;
  for (const k in v) {
    if (!Object.hasOwn(v, k)) return false;
    n++;
  }
  if (n !== keys.length) return false;
  for (const k of keys) if (!Object.hasOwn(v, k)) return false;
  return true;
}

const MAX_SAFE_BIG = BigInt(MAX_SAFE);

/**
 * `o[k]` is an unsigned integer up to `max` (at most 2^53), as the schema's uint does it:
 * a uint 64 on the wire decodes as a bigint, and comes out as a number, converted here in
 * place. A bigint above 2^53 stays for zod, which keeps it a bigint.
 */
function uint(o: Record<string | number, unknown>, k: string | number, max = MAX_SAFE): boolean {
  const v = o[k];
  if (typeof v === "number") return Number.isInteger(v) && v >= 0 && v <= max;
  if (typeof v !== "bigint" || v < 0n || v > MAX_SAFE_BIG) return false;
  const n = Number(v);
  if (n > max) return false;
  o[k] = n;
  return true;
}

function single(v: unknown): string | undefined {
  if (typeof v !== "object" || v === null || Array.isArray(v) || v instanceof Uint8Array) return undefined;
  let key: string | undefined;
  for (const k in v) {
    if (key !== undefined || !Object.hasOwn(v, k)) return undefined;
    key = k;
  }
  return key;
}

const FD = ["descriptor", "size"] as const;
const DESCRIPTOR = ["descriptor", "offset", "size"] as const;
const REGISTER = ["source", "dest", "prot", "cache"] as const;
const PROT = ["read", "write"] as const;
const PCI = ["bus", "dev", "func", "bar"] as const;
const EXISTING = ["allocation", "offset"] as const;

function source(v: unknown): boolean {
  const kind = single(v);
  const o = v as Record<string, Record<string, unknown>>;
  if (kind === "SharedMemory") {
    const m = o.SharedMemory;
    return exactly(m, FD) && uint(m, "descriptor", 252) && uint(m, "size");
  }
  if (kind === "Descriptor") {
    const d = o.Descriptor;
    return exactly(d, DESCRIPTOR) && uint(d, "descriptor", 252) && uint(d, "offset") && uint(d, "size");
  }
  return false;
}

function dest(v: unknown): boolean {
  const kind = single(v);
  const o = v as Record<string, unknown>;
  if (kind === "GuestPhysicalAddress") return uint(o, "GuestPhysicalAddress");
  if (kind !== "ExistingAllocation") return false;
  const e = o.ExistingAllocation;
  if (!exactly(e, EXISTING) || !uint(e, "offset") || single(e.allocation) !== "PciBar") return false;
  const bar = (e.allocation as Record<string, unknown>).PciBar;
  return exactly(bar, PCI) && uint(bar, "bus", 255) && uint(bar, "dev", 255) && uint(bar, "func", 255) && uint(bar, "bar", 255);
}

function ranges(v: unknown): boolean {
  if (!Array.isArray(v)) return false;
  for (const r of v) if (!Array.isArray(r) || r.length !== 2 || !uint(r as unknown as Record<number, unknown>, 0) || !uint(r as unknown as Record<number, unknown>, 1)) return false;
  return true;
}

/** The request, when `value` is one of the common shapes in its plainest form; else undefined. */
export function fastRequest(value: unknown): VmMemoryRequest | undefined {
  const variant = single(value);
  if (variant === undefined) return undefined;
  const p = (value as Record<string, unknown>)[variant];
  switch (variant) {
    case "BalloonTargetReached":
      return exactly(p, ["size"]) && uint(p, "size") ? (value as VmMemoryRequest) : undefined;
    case "UnregisterMemory":
      return uint(value as Record<string, unknown>, variant) ? (value as VmMemoryRequest) : undefined;
    case "RegisterMemory":
      if (!exactly(p, REGISTER) || !source(p.source) || !dest(p.dest)) return undefined;
      if (!exactly(p.prot, PROT) || typeof p.prot.read !== "boolean" || typeof p.prot.write !== "boolean") return undefined;
      return p.cache === "CacheCoherent" || p.cache === "CacheNonCoherent" ? (value as VmMemoryRequest) : undefined;
    case "DynamicallyFreeMemoryRanges":
    case "DynamicallyReclaimMemoryRanges":
      return exactly(p, ["ranges"]) && ranges(p.ranges) ? (value as VmMemoryRequest) : undefined;
    default:
      return undefined;
  }
}

/** Client side: "Ok", RegisterMemory and Err in their plainest form; else undefined. */
export function fastResponse(value: unknown): VmMemoryResponse | undefined {
  if (value === "Ok") return "Ok";
  const variant = single(value);
  const p = variant === undefined ? undefined : (value as Record<string, unknown>)[variant];
  if (variant === "RegisterMemory") {
    return exactly(p, ["region_id", "slot"]) && uint(p, "region_id") && uint(p, "slot", 0xffff_ffff) ? (value as VmMemoryResponse) : undefined;
  }
  if (variant === "Err") {
    if (!exactly(p, ["errno", "chain"]) || !Array.isArray(p.chain)) return undefined;
    const errno = p.errno;
    if (errno !== null && !(typeof errno === "number" && Number.isInteger(errno) && errno >= -(2 ** 31) && errno < 2 ** 31)) return undefined;
    for (const s of p.chain) if (typeof s !== "string") return undefined;
    return value as VmMemoryResponse;
  }
  return undefined;
}
