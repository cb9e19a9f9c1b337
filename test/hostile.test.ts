// Hostile peers against dist/vmemd with its default flags (or a budget made small, so the
// attack is quick): no packet, no pending request and no one peer takes the server down or
// starves the others, and what an attacker made vmemd hold is released when it leaves.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { encodeRequest, VmemClient, VmemError } from "../src/client";
import * as sys from "../src/sys";
import { mapsCount, memfd } from "./helpers";
import { VmemdProcess } from "./server_harness";

const MiB = 2 ** 20;
const GiB = 2 ** 30;
const HIGH = 0x10_0000_0000;

function rss(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
  return Number(m![1]) * 1024;
}
function register(c: VmemClient, fd: number, size: number, gpa: number) {
  return c.request({ RegisterMemory: { source: { SharedMemory: { descriptor: fd, size } }, dest: { GuestPhysicalAddress: gpa }, prot: { read: true, write: true }, cache: "CacheCoherent" } });
}
function errOf(r: unknown): { errno: number | null; chain: string[] } {
  if (typeof r !== "object" || r === null || !("Err" in r)) throw new Error(`expected Err, got ${JSON.stringify(r, (_k, v) => (typeof v === "bigint" ? String(v) : v))}`);
  return (r as { Err: { errno: number | null; chain: string[] } }).Err;
}

describe("one packet", () => {
  let s: VmemdProcess;
  beforeAll(async () => {
    s = await VmemdProcess.start(["--memory", "16M"]);
  });
  afterAll(async () => {
    expect(await s.stop()).toBe(0);
  });

  test("64 KiB of nested array16 headers, map32 counts and deep JSON: EINVAL each, RSS bounded", () => {
    const c = s.connect();
    const bodies = [
      new Uint8Array(65536).map((_, i) => (i % 3 === 0 ? 0xdc : 0xff)),
      Uint8Array.of(0x81, 0xa1, 0x78, 0xdf, 0xff, 0xff, 0xff, 0xff),
      new TextEncoder().encode(`{"GetRegions":{"x":${"[".repeat(65000)}`),
    ];
    // Once first, so code compiled for these paths is not counted as what a packet costs.
    for (const b of bodies) errOf(c.pipeline([{ body: b, fds: [] }])[0]);
    const before = rss(s.pid);
    for (let i = 0; i < 50; i++) for (const r of c.pipeline(bodies.map((b) => ({ body: b, fds: [] })))) expect(errOf(r).errno).toBe(22);
    expect(rss(s.pid) - before).toBeLessThan(8 * MiB);
    expect(c.request("GetState")).toHaveProperty("State");
    c.close();
  });

  test("a 20 KB unknown key or a 60 KB escaped string is EINVAL, never an answer too large to send (fuzzer regressions)", () => {
    const c = s.connect();
    const key = "\x01".repeat(20000);
    const bodies = [
      Uint8Array.from([0x81, 0xda, 0x4e, 0x20, ...new Uint8Array(20000).fill(1), 0x01]),
      new TextEncoder().encode(`"${'\\"'.repeat(30000)}"`),
      new TextEncoder().encode(`{"BalloonTargetReached":{"size":1,${JSON.stringify(key)}:1}}`),
    ];
    for (const r of c.pipeline(bodies.map((b) => ({ body: b, fds: [] })))) {
      const e = errOf(r);
      expect(e.errno).toBe(22);
      expect(e.chain.join("").length).toBeLessThan(1000);
    }
    c.close();
  });

  test("an MmapAndRegisterMemory whose shm the kernel will not map is an Err, and the connection stays (fuzzer regression)", () => {
    const c = s.connect();
    const ev = sys.eventfd();
    const r = c.pipeline([
      encodeRequest({ MmapAndRegisterMemory: { shm: { descriptor: ev, size: 4096 }, dest: { GuestPhysicalAddress: HIGH }, num_file_mappings: 0 } }),
      encodeRequest("GetState"),
    ]);
    expect(["ENODEV", "EACCES"]).toContain(sys.errnoName(errOf(r[0]).errno!));
    expect(r[1]).toHaveProperty("State");
    sys.close(ev);
    c.close();
  });
});

describe("a pending MmapAndRegisterMemory fed one-descriptor chunks", () => {
  test("holds mappings, not descriptors; its budget ends it; others keep working; all released when it leaves", async () => {
    const s = await VmemdProcess.start(["--memory", "16M", "--max-mappings-per-connection", "2000"]);
    try {
      const fds0 = s.fdCount();
      const maps0 = mapsCount(s.pid);
      const attacker = s.connect();
      const count = 5000;
      const shm = memfd(count * 4096);
      const file = memfd(4096);
      attacker.sendPacket(encodeRequest({ MmapAndRegisterMemory: { shm: { descriptor: shm, size: count * 4096 }, dest: { GuestPhysicalAddress: HIGH }, num_file_mappings: count } }));
      attacker.inFlight--;
      const peer = s.connect();
      const other = memfd(4096);
      for (let i = 0; i < count; i++) {
        attacker.sendPacket(encodeRequest([{ file, length: 4096, mem_offset: i * 4096, file_offset: 0 }]));
        attacker.inFlight--;
        if (i % 1000 === 999) {
          // Mid-attack: the server holds no more descriptors than at the start, plus our two
          // connections and at most one receive batch in hand (16 packets of one each); before,
          // a pending request kept every chunk's descriptor (20,000 in seconds).
          expect(s.fdCount()).toBeLessThanOrEqual(fds0 + 2 + 16 + 4);
          expect(register(peer, other, 4096, HIGH * 2 + i * 4096)).toHaveProperty("RegisterMemory");
        }
      }
      attacker.inFlight++;
      // One answer, after the last chunk: the mapping budget stopped it on the way.
      const e = errOf(attacker.recv());
      expect(e.errno).toBe(sys.Errno.ENOSPC);
      expect(e.chain.join(" ")).toContain("--max-mappings-per-connection");
      expect(register(attacker, other, 4096, HIGH)).toHaveProperty("RegisterMemory"); // in step
      attacker.close();
      peer.close();
      for (const fd of [shm, file, other]) sys.close(fd);
      await s.expectFdCount(fds0);
      // The peers' regions stay (crosvm keeps them); the attacker's half-built one is gone.
      expect(mapsCount(s.pid)).toBeLessThan(maps0 + 20);
    } finally {
      await s.stop();
    }
  }, 60_000);
});

describe("budgets", () => {
  test("guest bytes: a peer registering sparse memfds past its budget gets ENOSPC naming the flag; the total holds across peers", async () => {
    const s = await VmemdProcess.start(["--memory", "16M", "--max-guest-bytes-per-connection", "4G", "--max-guest-bytes", "6G"]);
    try {
      const fd = memfd(GiB); // sparse: costs nothing until written
      const a = s.connect();
      for (let i = 0; i < 4; i++) expect(register(a, fd, GiB, HIGH + i * GiB)).toHaveProperty("RegisterMemory");
      const e = errOf(register(a, fd, GiB, HIGH + 4 * GiB));
      expect(e.errno).toBe(sys.Errno.ENOSPC);
      expect(e.chain[0]).toContain("--max-guest-bytes-per-connection");
      const b = s.connect();
      for (let i = 0; i < 2; i++) expect(register(b, fd, GiB, HIGH * 2 + i * GiB)).toHaveProperty("RegisterMemory");
      expect(errOf(register(b, fd, GiB, HIGH * 2 + 2 * GiB)).chain[0]).toContain("--max-guest-bytes");
      // Unregistering gives the budget back.
      a.unregisterMemory(HIGH);
      expect(register(b, fd, GiB, HIGH * 2 + 2 * GiB)).toHaveProperty("RegisterMemory");
      a.close();
      b.close();
      sys.close(fd);
    } finally {
      await s.stop();
    }
  });

  test("ioeventfds: the per-connection budget is ENOSPC naming its flag", async () => {
    const s = await VmemdProcess.start(["--memory", "16M", "--max-ioevents-per-connection", "3", "--release-on-disconnect"]);
    try {
      const fds0 = s.fdCount();
      const c = s.connect();
      const ev = sys.eventfd();
      for (let i = 0; i < 3; i++) c.ioEvent(ev, 0xe000_0000 + 8 * i, "AnyLength", true);
      let e: unknown;
      try {
        c.ioEvent(ev, 0xe000_1000, "AnyLength", true);
      } catch (x) {
        e = x;
      }
      expect(e).toBeInstanceOf(VmemError);
      expect((e as VmemError).chain[0]).toContain("--max-ioevents-per-connection");
      c.close();
      sys.close(ev);
      await s.expectFdCount(fds0 - 0, 5000); // --release-on-disconnect: the kept eventfd copies are closed
    } finally {
      await s.stop();
    }
  });
});

describe("fairness by cost", () => {
  test("a peer pipelining expensive balloon requests delays another peer's round trip by milliseconds, not seconds", async () => {
    const s = await VmemdProcess.start(["--memory", "64M"]);
    try {
      // Each request frees 4000 single pages: thousands of madvise calls, some milliseconds.
      const ranges: [number, number][] = Array.from({ length: 4000 }, (_, i) => [i * 8192, 4096]);
      const heavy = encodeRequest({ DynamicallyFreeMemoryRanges: { ranges } });
      const attacker = s.connect();
      const peer = s.connect();
      const burst = 300;
      let sent = 0;
      let answered = 0;
      const worst: number[] = [];
      const t0 = performance.now();
      while (answered < burst) {
        while (sent < burst && sent - answered < 64 && attacker.trySendPacket(heavy)) sent++;
        const start = performance.now();
        expect(peer.request("GetState")).toHaveProperty("State");
        worst.push(performance.now() - start);
        for (let r = attacker.tryRecv(); r !== undefined; r = attacker.tryRecv()) answered++;
      }
      const total = performance.now() - t0;
      worst.sort((a, b) => a - b);
      const p99 = worst[Math.floor(worst.length * 0.99)]!;
      console.log(`fairness: attacker's ${burst} requests took ${total.toFixed(0)} ms; the peer's round trip p99 ${p99.toFixed(1)} ms, max ${worst.at(-1)!.toFixed(1)} ms over ${worst.length}`);
      // The attacker's backlog is seconds of work; the peer waits for a slice of it (0.5 ms)
      // and a turn, not for a whole request of thousands of madvise calls.
      expect(total).toBeGreaterThan(100);
      expect(p99).toBeLessThan(10);
      // A request run in slices still answers in order with what was pipelined behind it.
      const after = attacker.pipeline([heavy, encodeRequest({ BalloonTargetReached: { size: 7 } }), encodeRequest("GetState"), heavy]);
      expect(after[0]).toBe("Ok");
      expect(after[1]).toBe("Ok");
      expect((after[2] as { State: { balloon_target: number } }).State.balloon_target).toBe(7);
      expect(after[3]).toBe("Ok");
      attacker.close();
      peer.close();
    } finally {
      await s.stop();
    }
  }, 60_000);
});
