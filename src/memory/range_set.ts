// A set of guest page ranges with its total size: the RAM the balloon has given back.
// Adding a range already (partly) in the set counts its pages once; removing splits.
import { IntervalMap } from "./interval_map";

export class RangeSet {
  private readonly map = new IntervalMap<null>();
  /** Bytes in the set. */
  total = 0;

  /** Adds [start, end), merging with what it overlaps or touches. */
  add(start: number, end: number): void {
    let s = start;
    let e = end;
    // Each pass takes out one range that overlaps or touches [s, e) and widens it.
    for (let hit = this.map.findOverlap(s - 1, e + 1); hit !== undefined; hit = this.map.findOverlap(s - 1, e + 1)) {
      s = Math.min(s, hit.start);
      e = Math.max(e, hit.end);
      this.total -= hit.end - hit.start;
      this.map.remove(hit.start);
    }
    this.map.insert(s, e, null);
    this.total += e - s;
  }

  /** Removes [start, end): what lies outside it of an overlapping range stays. */
  remove(start: number, end: number): void {
    for (let hit = this.map.findOverlap(start, end); hit !== undefined; hit = this.map.findOverlap(start, end)) {
      const { start: hs, end: he } = hit;
      this.map.remove(hs);
      this.total -= he - hs;
      if (hs < start) this.insertPart(hs, start);
      if (he > end) this.insertPart(end, he);
    }
  }

  private insertPart(s: number, e: number): void {
    this.map.insert(s, e, null);
    this.total += e - s;
  }

  get ranges(): number {
    return this.map.size;
  }
}
