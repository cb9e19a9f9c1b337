// The short fuzz run of issue 6 (the long one is scripts/fuzz.ts): 20,000 mutated and random
// packets, MmapAndRegisterMemory sequences and descriptors of every kind over 4 pipelined
// connections to dist/vmemd. test/fuzz_lib.ts checks every response against the packet it
// answers and, at checkpoints and at the end, the server's descriptors, mappings and slots.
import { expect, test } from "bun:test";
import { requireKvm } from "./helpers";
import { BINARY, requireBinary } from "./server_harness";
import { runFuzz, VARIANTS } from "./fuzz_lib";


test("fuzz: 20,000 packets over 4 connections; every request answered once and well formed, nothing leaked", async () => {
  requireKvm();
  requireBinary();
  const report = await runFuzz({ packets: 20_000, connections: 4, seed: 6, binary: BINARY, checkpoints: 2, stallMs: 15_000 });
  // The whole summary, with one example packet per distinct violation, is the failure message.
  if (!report.ok) throw new Error(`fuzz found ${report.violationCount} violations\n${report.text}`);

  // The run did what it says: every variant valid and mutated, every kind of garbage,
  // MmapAndRegisterMemory sequences, state that changed, connections dropped mid-stream.
  const s = report.stats;
  expect(s.fuzzPackets).toBeGreaterThanOrEqual(20_000);
  const labels = [...s.sentByLabel.keys()];
  for (const v of VARIANTS) {
    expect(labels).toContain(`valid:${v}`);
    expect(labels).toContain(`mutated:${v}`);
  }
  for (const l of ["random-bytes", "junk", "inherited-name", "mmap-seq:complete", "mmap-seq:bad-chunk", "mmap-seq:abandoned", "mmap-seq:absurd-count", "boundary-65536", "oversized", "empty", "deep-nesting"]) {
    expect(labels).toContain(l);
  }
  expect(s.registered).toBeGreaterThan(100);
  expect(s.unregistered).toBeGreaterThan(100);
  expect(s.absorbed).toBeGreaterThan(100);
  expect(s.abruptDisconnects).toBeGreaterThan(0);
  expect(s.gracefulDisconnects).toBeGreaterThan(0);
  expect(s.final.finalFds).toBe(s.final.baselineFds);
}, 60_000);
