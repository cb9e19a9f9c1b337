// The register/unregister path allocates what it keeps and little else (issue 5: remove
// per-request allocations). Counted in heap cells, not timed: the real Server on real KVM,
// driven one wake-up at a time from this process, its heap read with bun:jsc's census.
import { afterAll, describe, expect, test } from "bun:test";
import { heapStats } from "bun:jsc";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as sys from "../src/sys";
import { DEFAULT_SERVER_OPTIONS, Logger, Server } from "../src/server";
import { encodeRequest, VmemClient } from "../src/client";
import { memfd, newContext } from "./helpers";

const dir = mkdtempSync(join(tmpdir(), "vmemd-alloc-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** Heap cells alive or not yet swept: what `f` allocates shows as growth (until a GC). */
function cells(): number {
  let n = 0;
  for (const count of Object.values(heapStats().objectTypeCounts)) n += count;
  return n;
}

const median = (xs: number[]) => [...xs].sort((x, y) => x - y)[xs.length >> 1]!;

/** What one census adds to the next (its own result objects). */
function censusCells(): number {
  const per: number[] = [];
  for (let i = 0; i < 21; i++) {
    const a = cells();
    per.push(cells() - a);
  }
  return median(per);
}

describe("allocation on the hot path", () => {
  test("a RegisterMemory + UnregisterMemory cycle allocates at most 30 heap cells in the server", () => {
    const ctx = newContext();
    const socketPath = join(dir, "sock");
    const server = new Server(ctx, { ...DEFAULT_SERVER_OPTIONS, socketPath, log: new Logger("warn") });
    // Private on purpose: one wake-up's work, without the epoll loop that would block here.
    const s = server as unknown as { listen(): void; acceptAll(): void; conns: Map<number, unknown>; readAll(c: unknown, ev: number): void; shutdown(): void };
    s.listen();
    const client = VmemClient.connect(socketPath);
    s.acceptAll();
    const conn = [...s.conns.values()][0];
    const fd = memfd(4096);
    const guest = 0x1_0000_0000;
    const reg = encodeRequest({ RegisterMemory: { source: { SharedMemory: { descriptor: fd, size: 4096 } }, dest: { GuestPhysicalAddress: guest }, prot: { read: true, write: true }, cache: "CacheCoherent" } });
    const unreg = encodeRequest({ UnregisterMemory: guest });
    try {
      let serverCells = 0;
      const count = (measure: boolean) => (measure ? cells() : 0);
      const cycle = (measure: boolean, extra = 0) => {
        client.sendPacket(reg);
        let a = count(measure);
        s.readAll(conn, sys.EPOLLIN);
        for (let i = 0; i < extra; i++) (globalThis as { sink?: unknown }).sink = { i };
        serverCells = count(measure) - a;
        const r = client.recv();
        if (typeof r !== "object" || !("RegisterMemory" in r)) throw new Error(JSON.stringify(r));
        client.sendPacket(unreg);
        a = count(measure);
        s.readAll(conn, sys.EPOLLIN);
        serverCells += count(measure) - a;
        if (client.recv() !== "Ok") throw new Error("UnregisterMemory failed");
      };
      for (let i = 0; i < 5000; i++) cycle(false); // past the lower JIT tiers
      // Median over 101 cycles (a GC midway makes one read low), less the two censuses'
      // own cells. It sees allocations: ten more objects read as ten more cells.
      const census = (extra: number) => {
        const per: number[] = [];
        for (let i = 0; i < 101; i++) {
          cycle(true, extra);
          per.push(serverCells);
        }
        return median(per) - 2 * censusCells();
      };
      const plain = census(0);
      expect(census(10) - plain).toBeGreaterThanOrEqual(9);
      // What it keeps: the region, its tree node, mapping and slot record. What it must make:
      // the decoded request (6 objects), the response, the packet's descriptor list. 18 when
      // this was written; 35 before the hot path was trimmed (tuples in the treap, a cursor
      // and a view per packet, strings and a closure scope per register, key arrays). 28 with
      // the one shape-driven decoder (no hand-written fast path), the ledger's record of what
      // the connection holds, and the source's inspection (size, seals).
      expect(plain).toBeGreaterThan(0);
      expect(plain).toBeLessThanOrEqual(30);
    } finally {
      client.close();
      sys.close(fd);
      s.shutdown();
      ctx.vm.close();
    }
  }, 60_000);
});
