// RegionState: what the memory plane has registered, as crosvm's VmMemoryRegionState.
// Look-ups by id are a NumberMap; overlap checks go through IntervalMaps (O(log n)).
import type { GuestAddress, MemSlot } from "../kvm";
import { IntervalMap } from "./interval_map";
import { NumberMap } from "./number_map";
import { RangeSet } from "./range_set";
import type { Alloc, U64 } from "../protocol/messages";

/** A registered region's id is its first guest physical byte (crosvm's VmMemoryRegionId). */
export type RegionId = GuestAddress;

export interface PreparedArena {
  alloc: Alloc;
  start: GuestAddress;
  size: number;
  slot: MemSlot;
  /** Fixed mappings inside the arena, by guest address. */
  fixed: IntervalMap<Region>;
}

export interface Region {
  id: RegionId;
  size: number;
  slot: MemSlot;
  readOnly: boolean;
  /** The arena a fixed mapping lives in; null for a dynamic region (a slot of its own). */
  arena: PreparedArena | null;
}

export class RegionState {
  readonly regions = new NumberMap<Region>();
  /** Top-level guest ranges that own a slot: dynamic regions and prepared arenas. */
  readonly top = new IntervalMap<Region | PreparedArena>();
  /** Prepared arenas by allocKey(alloc). */
  readonly arenas = new Map<string, PreparedArena>();
  /** Guest RAM given back by DynamicallyFreeMemoryRanges and not reclaimed since. */
  readonly freed = new RangeSet();
  balloonTarget: U64 | null = null;
}

/**
 * A wire u64 as a RegionId; -1 (no region) above 2^53. A number passes through untouched:
 * `Number(x)` on the hot path made JSC's DFG speculate an int32 result, exit on every
 * guest address above 2^31, and recompile the caller over and over.
 */
export function regionIdOf(v: U64): RegionId {
  if (typeof v === "number") return v;
  return v > BigInt(Number.MAX_SAFE_INTEGER) ? -1 : Number(v);
}

export function isArena(x: Region | PreparedArena): x is PreparedArena {
  return "fixed" in x;
}
