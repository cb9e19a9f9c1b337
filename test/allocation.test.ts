// The register/unregister path allocates what it keeps and little else (per-request
// allocations removed). Counted in heap cells, not timed: the real Server on real KVM,
// driven one wake-up at a time from this process, its heap read with bun:jsc's census.
import { afterAll, describe, expect, test } from "bun:test";
import { heapStats } from "bun:jsc";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as sys from "../src/sys";
import { DEFAULT_SERVER_OPTIONS, Logger, Server } from "../src/server";
import { encodeRequest, VmemClient, type Packet } from "../src/client";
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

/**
 * Heap cells the server allocates per cycle of `first` then `second` (each answered as
 * `check` says), median over 101 cycles after 5000 to warm up, the censuses' own cells
 * taken off. The real Server, one wake-up at a time, on real KVM.
 */
function serverCellsPerCycle(
  first: (fd: number) => Packet,
  second: Packet,
  check: (a: unknown, b: unknown) => void,
  sealable = true,
  level: "warn" | "info" = "warn",
): { plain: number; plus10: number } {
  const ctx = newContext();
  const socketPath = join(dir, `sock${Math.random()}`);
  // At info (serve's default) every refusal is a log event, rate limited: the lines go to /dev/null.
  const logFd = sys.open("/dev/null", sys.O_RDWR);
  const server = new Server(ctx, { ...DEFAULT_SERVER_OPTIONS, socketPath, log: new Logger(level, "text", logFd) });
  // Private on purpose: one wake-up's work, without the epoll loop that would block here.
  const s = server as unknown as { listen(): void; acceptAll(): void; conns: Map<number, unknown>; readAll(c: unknown, ev: number): void; shutdown(): void };
  s.listen();
  const client = VmemClient.connect(socketPath);
  s.acceptAll();
  const conn = [...s.conns.values()][0];
  const fd = sealable ? memfd(4096) : sys.memfdCreate("no-sealing", 1 /* MFD_CLOEXEC, no MFD_ALLOW_SEALING */);
  if (!sealable) sys.ftruncate(fd, 4096);
  const a = first(fd);
  try {
    let serverCells = 0;
    const count = (measure: boolean) => (measure ? cells() : 0);
    const cycle = (measure: boolean, extra = 0) => {
      client.sendPacket(a);
      let at = count(measure);
      s.readAll(conn, sys.EPOLLIN);
      for (let i = 0; i < extra; i++) (globalThis as { sink?: unknown }).sink = { i };
      serverCells = count(measure) - at;
      const r1 = client.recv();
      client.sendPacket(second);
      at = count(measure);
      s.readAll(conn, sys.EPOLLIN);
      serverCells += count(measure) - at;
      check(r1, client.recv());
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
    return { plain, plus10: census(10) };
  } finally {
    client.close();
    sys.close(fd);
    s.shutdown();
    ctx.vm.close();
    sys.close(logFd);
  }
}

const GUEST = 0x1_0000_0000;
/**
 * Most of each test is heapStats(): about 800 censuses of the whole heap, and in the full
 * suite (one process for every file) that heap holds what the files before left. 5-17 s
 * run alone, 11-55 s in the suite, and once past 60 s on a loaded machine.
 */
const ALLOCATION_TEST_MS = 180_000;
const register = (fd: number) =>
  encodeRequest({ RegisterMemory: { source: { SharedMemory: { descriptor: fd, size: 4096 } }, dest: { GuestPhysicalAddress: GUEST }, prot: { read: true, write: true }, cache: "CacheCoherent" } });
const unregister = encodeRequest({ UnregisterMemory: GUEST });
const registered = (r: unknown, u: unknown) => {
  if (typeof r !== "object" || r === null || !("RegisterMemory" in r)) throw new Error(JSON.stringify(r));
  if (u !== "Ok") throw new Error("UnregisterMemory failed");
};

describe("allocation on the hot path", () => {
  test("a RegisterMemory + UnregisterMemory cycle allocates at most 30 heap cells in the server", () => {
    const { plain, plus10 } = serverCellsPerCycle(register, unregister, registered);
    expect(plus10 - plain).toBeGreaterThanOrEqual(9);
    // What it keeps: the region, its tree node, mapping and slot record. What it must make:
    // the decoded request (6 objects), the response, the packet's descriptor list. 18 when
    // this was written; 35 before the hot path was trimmed (tuples in the treap, a cursor
    // and a view per packet, strings and a closure scope per register, key arrays). 28 with
    // the one shape-driven decoder (no hand-written fast path), the ledger's record of what
    // the connection holds, and the source's inspection (size, seals). 19 with the
    // inspection's size a number, not a stat object and a SourceInfo.
    expect(plain).toBeGreaterThan(0);
    expect(plain).toBeLessThanOrEqual(30);
  }, ALLOCATION_TEST_MS);

  test("a memfd that does not allow sealing allocates no more than one that does", () => {
    const sealable = serverCellsPerCycle(register, unregister, registered).plain;
    const unsealable = serverCellsPerCycle(register, unregister, registered, false).plain;
    // (Whether an error is thrown and caught shows in time, not cells: the bench compares the
    // two kinds of client. This holds the allocations to the same count: the failed
    // F_ADD_SEALS makes nothing, not even a read of errno.)
    expect(unsealable).toBeLessThanOrEqual(sealable);
  }, ALLOCATION_TEST_MS);

  const unknown = encodeRequest({ UnregisterMemory: 0x5000 });
  const balloon = encodeRequest({ BalloonTargetReached: { size: 1 } });
  const refused = (r: unknown, u: unknown) => {
    for (const x of [r, u]) if (typeof x !== "object" || x === null || !("Err" in x)) throw new Error(JSON.stringify(x));
  };
  const answeredOk = (r: unknown, u: unknown) => {
    if (r !== "Ok" || u !== "Ok") throw new Error(JSON.stringify([r, u]));
  };

  test("a refusal (UnregisterMemory of an unknown region) allocates its answer and little else", () => {
    const { plain } = serverCellsPerCycle(() => unknown, unknown, refused);
    // Per refusal, 16 when this was written: the decoded request, the Refusal, its chain and
    // its strings (the id in hex, the root cause, the context), the Err response and payload.
    // 10 since (the log line's fields are built only when it is written), and one string
    // where there were three (the id is named in the root cause only).
    expect(plain / 2).toBeLessThanOrEqual(20);
  }, ALLOCATION_TEST_MS);

  for (const level of ["warn", "info"] as const) {
    test(`an Err round trip allocates only its message beyond what an Ok one does (UnregisterMemory of an unknown region, BalloonTargetReached; log at ${level})`, () => {
      const err = serverCellsPerCycle(() => unknown, unknown, refused, true, level).plain;
      const ok = serverCellsPerCycle(() => balloon, balloon, answeredOk, true, level).plain;
      // An Ok pair is 6 cells (per request: the decoded request, its payload, the response's
      // bytes). The Err pair was 24 when this was written (its strings, refusal and
      // response), 26 at info (the log line's fields, built for every refusal and then
      // dropped by the rate limit); 20 since, at either level: per refusal its message (the
      // root cause, which names the id; the context is a constant), the refusal and its
      // chain, the Err response and its payload. A fixed text, made once, would make it as
      // cheap as an Ok, but the id in the answer is how a client pipelining requests tells
      // which one was refused.
      expect(err).toBeLessThanOrEqual(ok + 16);
    }, ALLOCATION_TEST_MS);
  }
});
