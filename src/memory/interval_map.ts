// Non-overlapping half-open ranges [start, end) keyed by start, in a treap:
// insert, remove, and the overlap query are O(log n) expected, so register and
// unregister cost stays flat with tens of thousands of regions.

interface Node<V> {
  start: number;
  end: number;
  value: V;
  priority: number;
  left: Node<V> | null;
  right: Node<V> | null;
}

export class IntervalMap<V> {
  private root: Node<V> | null = null;
  private count = 0;

  get size(): number {
    return this.count;
  }

  /**
   * An entry intersecting [start, end), if any: the last one starting before `end`.
   * Stored ranges are disjoint, so if that one ends at or before `start`, all earlier ones do too.
   */
  findOverlap(start: number, end: number): { start: number; end: number; value: V } | undefined {
    const n = this.lastStartingBefore(end);
    return n !== null && n.end > start ? n : undefined;
  }

  /** The entry containing `addr`. */
  find(addr: number): { start: number; end: number; value: V } | undefined {
    return this.findOverlap(addr, addr + 1);
  }

  get(start: number): V | undefined {
    let n = this.root;
    while (n !== null) {
      if (start === n.start) return n.value;
      n = start < n.start ? n.left : n.right;
    }
    return undefined;
  }

  private lastStartingBefore(x: number): Node<V> | null {
    let n = this.root;
    let best: Node<V> | null = null;
    while (n !== null) {
      if (n.start < x) {
        best = n;
        n = n.right;
      } else n = n.left;
    }
    return best;
  }

  /** Inserts [start, end); the caller has checked it overlaps nothing. */
  insert(start: number, end: number, value: V): void {
    const node: Node<V> = { start, end, value, priority: Math.random(), left: null, right: null };
    const [l, r] = split(this.root, start);
    this.root = merge(merge(l, node), r);
    this.count++;
  }

  /** Removes the entry starting at `start`; returns whether there was one. */
  remove(start: number): boolean {
    const [l, rest] = split(this.root, start);
    const [mid, r] = split(rest, start + 1);
    this.root = merge(l, r);
    if (mid === null) return false;
    this.count--;
    return true;
  }

  *entries(): IterableIterator<{ start: number; end: number; value: V }> {
    const stack: Node<V>[] = [];
    let n = this.root;
    while (n !== null || stack.length > 0) {
      while (n !== null) {
        stack.push(n);
        n = n.left;
      }
      n = stack.pop()!;
      yield n;
      n = n.right;
    }
  }
}

/** Splits into (starts < key, starts >= key). */
function split<V>(t: Node<V> | null, key: number): [Node<V> | null, Node<V> | null] {
  if (t === null) return [null, null];
  if (t.start < key) {
    const [l, r] = split(t.right, key);
    t.right = l;
    return [t, r];
  }
  const [l, r] = split(t.left, key);
  t.left = r;
  return [l, t];
}

function merge<V>(a: Node<V> | null, b: Node<V> | null): Node<V> | null {
  if (a === null) return b;
  if (b === null) return a;
  if (a.priority > b.priority) {
    a.right = merge(a.right, b);
    return a;
  }
  b.left = merge(a, b.left);
  return b;
}
