// A map from integer keys in [0, 2^53) (guest addresses, region ids) to values, for
// the tables a register/unregister cycle inserts into and deletes from.
//
// Why not Map: JSC's Map and Set rebuild their table as deletions pile up, and each table
// they leave behind points at its successor (for iterators still walking it). An eden GC
// takes every old-generation object as live, so the chain of dead tables hanging off an old
// Map survives it: with one insert and one delete per request, megabytes were promoted per
// collection and a full collection (3-9 ms on the serving thread) followed every few
// seconds. This table is open addressing with linear probing and backward-shift deletion:
// no tombstones, so it allocates only when it grows.

const EMPTY = -1;

export class NumberMap<V> {
  private keys: Float64Array;
  private vals: (V | undefined)[];
  private mask: number;
  /** log2 of the capacity; the index is the top `bits` bits of a 32-bit hash. */
  private bits: number;
  private count = 0;

  constructor(capacity = 16) {
    this.bits = Math.max(3, Math.ceil(Math.log2(capacity)));
    this.mask = (1 << this.bits) - 1;
    this.keys = new Float64Array(1 << this.bits).fill(EMPTY);
    this.vals = new Array<V | undefined>(1 << this.bits).fill(undefined);
  }

  get size(): number {
    return this.count;
  }

  /** Fibonacci hashing of both 32-bit halves: guest addresses differ only above bit 12. */
  private home(key: number): number {
    const lo = key >>> 0;
    const hi = (key / 0x1_0000_0000) >>> 0;
    return Math.imul(lo ^ Math.imul(hi, 0x85ebca6b), 0x9e3779b1) >>> (32 - this.bits);
  }

  /** The index holding `key`, or -1. */
  private find(key: number): number {
    const keys = this.keys;
    for (let i = this.home(key); ; i = (i + 1) & this.mask) {
      const k = keys[i]!;
      if (k === EMPTY) return -1; // first: a key of -1 must not match an empty slot
      if (k === key) return i;
    }
  }

  get(key: number): V | undefined {
    const i = this.find(key);
    return i === -1 ? undefined : this.vals[i];
  }

  has(key: number): boolean {
    return this.find(key) !== -1;
  }

  set(key: number, value: V): this {
    if (!(Number.isSafeInteger(key) && key >= 0)) throw new RangeError(`NumberMap key ${key} is not an integer in [0, 2^53)`);
    const keys = this.keys;
    let i = this.home(key);
    for (; keys[i] !== EMPTY; i = (i + 1) & this.mask) {
      if (keys[i] === key) {
        this.vals[i] = value;
        return this;
      }
    }
    keys[i] = key;
    this.vals[i] = value;
    // At most half full, so probe runs stay short.
    if (++this.count * 2 > this.mask + 1) this.grow();
    return this;
  }

  delete(key: number): boolean {
    let hole = this.find(key);
    if (hole === -1) return false;
    const keys = this.keys;
    const vals = this.vals;
    const mask = this.mask;
    // Backward shift: an entry further along the run moves into the hole when the hole lies
    // on its probe path (between its home and where it sits), so every key stays reachable
    // from its home without tombstones.
    for (let j = (hole + 1) & mask; keys[j] !== EMPTY; j = (j + 1) & mask) {
      const home = this.home(keys[j]!);
      if (((hole - home) & mask) < ((j - home) & mask)) {
        keys[hole] = keys[j]!;
        vals[hole] = vals[j];
        hole = j;
      }
    }
    keys[hole] = EMPTY;
    vals[hole] = undefined; // the value is unreachable from here at once
    this.count--;
    return true;
  }

  clear(): void {
    this.keys.fill(EMPTY);
    this.vals.fill(undefined);
    this.count = 0;
  }

  /** A snapshot of the keys (in no particular order): the map may change while it is walked. */
  keyList(): number[] {
    const out: number[] = [];
    for (let i = 0; i <= this.mask; i++) if (this.keys[i] !== EMPTY) out.push(this.keys[i]!);
    return out;
  }

  /** A snapshot of the values (in no particular order). */
  valueList(): V[] {
    const out: V[] = [];
    for (let i = 0; i <= this.mask; i++) if (this.keys[i] !== EMPTY) out.push(this.vals[i]!);
    return out;
  }

  private grow(): void {
    const oldKeys = this.keys;
    const oldVals = this.vals;
    this.bits++;
    this.mask = (1 << this.bits) - 1;
    this.keys = new Float64Array(1 << this.bits).fill(EMPTY);
    this.vals = new Array<V | undefined>(1 << this.bits).fill(undefined);
    for (let i = 0; i < oldKeys.length; i++) {
      const k = oldKeys[i]!;
      if (k === EMPTY) continue;
      let j = this.home(k);
      while (this.keys[j] !== EMPTY) j = (j + 1) & this.mask;
      this.keys[j] = k;
      this.vals[j] = oldVals[i];
    }
  }
}
