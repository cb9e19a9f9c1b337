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
    // Down to where the new node's priority puts it, then the subtree there splits around it.
    let parent: Node<V> | null = null;
    let t = this.root;
    while (t !== null && t.priority >= node.priority) {
      parent = t;
      t = start < t.start ? t.left : t.right;
    }
    splitInto(t, start, node);
    this.replaceChild(parent, start, node);
    this.count++;
  }

  /** Removes the entry starting at `start`; returns whether there was one. */
  remove(start: number): boolean {
    let parent: Node<V> | null = null;
    let t = this.root;
    while (t !== null && t.start !== start) {
      parent = t;
      t = start < t.start ? t.left : t.right;
    }
    if (t === null) return false;
    this.replaceChild(parent, start, merge(t.left, t.right));
    this.count--;
    return true;
  }

  /** Puts `child` where the search for `key` left `parent` (the root when there is none). */
  private replaceChild(parent: Node<V> | null, key: number, child: Node<V> | null): void {
    if (parent === null) this.root = child;
    else if (key < parent.start) parent.left = child;
    else parent.right = child;
  }

  *entries(): IterableIterator<{ start: number; end: number; value: V }> {
    yield* this.entriesFrom(-Infinity);
  }

  /**
   * In order, the entries that end after `from` (the one containing `from`, then every
   * later one): a page of a listing costs O(log n) plus its length, not the whole map.
   */
  *entriesFrom(from: number): IterableIterator<{ start: number; end: number; value: V }> {
    const stack: Node<V>[] = [];
    // The path to the first entry ending after `from`; entries are disjoint, so ends are
    // in the same order as starts.
    let n = this.root;
    while (n !== null) {
      if (n.end > from) {
        stack.push(n);
        n = n.left;
      } else n = n.right;
    }
    while (stack.length > 0) {
      const top = stack.pop()!;
      yield top;
      for (let c = top.right; c !== null; c = c.left) stack.push(c);
    }
  }
}

/**
 * Splits `t` into starts < key (as `into.left`) and starts >= key (as `into.right`), walking
 * one path down: no tuples, so register and unregister allocate only the node itself.
 */
function splitInto<V>(t: Node<V> | null, key: number, into: Node<V>): void {
  let leftTail: Node<V> | null = null; // the rightmost node of the left part so far
  let rightTail: Node<V> | null = null; // the leftmost node of the right part so far
  into.left = null;
  into.right = null;
  while (t !== null) {
    if (t.start < key) {
      if (leftTail === null) into.left = t;
      else leftTail.right = t;
      leftTail = t;
      t = t.right;
    } else {
      if (rightTail === null) into.right = t;
      else rightTail.left = t;
      rightTail = t;
      t = t.left;
    }
  }
  if (leftTail !== null) leftTail.right = null;
  if (rightTail !== null) rightTail.left = null;
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
