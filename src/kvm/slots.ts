// Memory slot numbers: the lowest free one is handed out, as crosvm's KvmVm does
// with its min-heap of freed slots (`mem_slot_gaps`).

export type MemSlot = number;

/** A binary min-heap of numbers. */
export class MinHeap {
  private readonly items: number[] = [];
  get size(): number {
    return this.items.length;
  }
  peek(): number | undefined {
    return this.items[0];
  }
  push(v: number): void {
    const a = this.items;
    let i = a.push(v) - 1;
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if (a[parent]! <= v) break;
      a[i] = a[parent]!;
      i = parent;
    }
    a[i] = v;
  }
  pop(): number | undefined {
    const a = this.items;
    if (a.length === 0) return undefined;
    const top = a[0]!;
    const last = a.pop()!;
    if (a.length > 0) {
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        if (l >= a.length) break;
        const r = l + 1;
        const c = r < a.length && a[r]! < a[l]! ? r : l;
        if (a[c]! >= last) break;
        a[i] = a[c]!;
        i = c;
      }
      a[i] = last;
    }
    return top;
  }
}

/** Slot numbers 0..max-1: freed ones first (lowest first), then never-used ones in order. */
export class SlotAllocator {
  private readonly freed = new MinHeap();
  private next = 0;
  private used = 0;
  constructor(readonly max: number) {}

  get inUse(): number {
    return this.used;
  }
  /** The lowest free slot, or undefined when all `max` are taken. */
  take(): MemSlot | undefined {
    let slot = this.freed.pop();
    if (slot === undefined) {
      if (this.next >= this.max) return undefined;
      slot = this.next++;
    }
    this.used++;
    return slot;
  }
  release(slot: MemSlot): void {
    this.freed.push(slot);
    this.used--;
  }
}
