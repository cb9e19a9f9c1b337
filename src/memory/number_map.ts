// A map from integer keys in [0, 2^53) (guest addresses, region ids) to values, for
// the tables a register/unregister cycle inserts into and deletes from.
//
// Why not Map: JSC's Map and Set rebuild their table as deletions pile up, and each table
// they leave behind points at its successor (for iterators still walking it). An eden GC
// takes every old-generation object as live, so the chain of dead tables hanging off an old
// Map survives it: with one insert and one delete per request, megabytes were promoted per
// collection and a full collection (3-9 ms on the serving thread) followed every few
// seconds. This table is open addressing with linear probing and backward-shift deletion:
// no tombstones, so it allocates only when it grows or shrinks.

const EMPTY = -1;

// Clients choose guest addresses, and so region ids: a fixed hash would let one pick
// thousands of ids that share a bucket and make every lookup a scan. The hash is seeded per
// process. (Math.random: JSC seeds it from the system's random source, and nothing reveals
// its output to a client; crypto.getRandomValues would add 0.06 ms to start-up.)
const SEED_LO = (Math.random() * 0x1_0000_0000) >>> 0;
const SEED_HI = (Math.random() * 0x1_0000_0000) >>> 0;

/** MurmurHash3's 32-bit finaliser: every input bit moves every output bit. */
function mix(x: number): number {
  x ^= x >>> 16;
  x = Math.imul(x, 0x85ebca6b);
  x ^= x >>> 13;
  x = Math.imul(x, 0xc2b2ae35);
  return (x ^ (x >>> 16)) >>> 0;
}

export class NumberMap<V> {
  private keys!: Float64Array; // all four set by allocate()
  private vals!: (V | undefined)[];
  private mask!: number;
  /** log2 of the capacity; the index is the top `bits` bits of a 32-bit hash. */
  private bits!: number;
  private count = 0;

  /** The table never shrinks below its first size. */
  private readonly minBits: number;

  constructor(capacity = 16) {
    this.minBits = Math.max(3, Math.ceil(Math.log2(capacity)));
    this.allocate(this.minBits);
  }

  get size(): number {
    return this.count;
  }

  /** Both 32-bit halves, seeded and mixed; the index is the top bits. */
  private home(key: number): number {
    const lo = key >>> 0;
    const hi = (key / 0x1_0000_0000) >>> 0;
    return mix(lo ^ SEED_LO ^ mix(hi ^ SEED_HI)) >>> (32 - this.bits);
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
    keys[i] = key + 0; // -0 is stored as 0
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
    // Back to a smaller table once an eighth full (not a half: no resizing back and forth
    // around one size), so a burst of regions does not keep its table for good.
    if (this.count * 8 < this.mask + 1 && this.bits > this.minBits) this.resize(this.bits - 1);
    return true;
  }

  clear(): void {
    this.allocate(this.minBits);
    this.count = 0;
  }

  /** A snapshot of the keys (in no particular order): the map may change while it is walked. */
  keyList(): number[] {
    const out: number[] = [];
    for (let i = 0; i <= this.mask; i++) if (this.keys[i] !== EMPTY) out.push(this.keys[i]!);
    return out;
  }

  /** The longest run of occupied slots: the most probes a look-up can take (for tests). */
  longestRun(): number {
    let longest = 0;
    let run = 0;
    // Twice round, so a run that wraps past the end counts whole.
    for (let i = 0; i < 2 * (this.mask + 1); i++) {
      run = this.keys[i & this.mask] === EMPTY ? 0 : run + 1;
      longest = Math.max(longest, Math.min(run, this.mask + 1));
    }
    return longest;
  }

  private grow(): void {
    this.resize(this.bits + 1);
  }

  /** Fresh empty arrays of 2^bits entries (the count is the caller's to keep). */
  private allocate(bits: number): void {
    this.bits = bits;
    this.mask = (1 << bits) - 1;
    this.keys = new Float64Array(1 << bits).fill(EMPTY);
    this.vals = new Array<V | undefined>(1 << bits).fill(undefined);
  }

  private resize(bits: number): void {
    const oldKeys = this.keys;
    const oldVals = this.vals;
    this.allocate(bits);
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
