// The short fuzz run (the long one is scripts/fuzz.ts): 20,000 mutated and random
// packets in both encodings of protocol version 2 (MessagePack and crosvm's JSON),
// MmapAndRegisterMemory sequences and descriptors of every kind over 4 pipelined connections
// to dist/vmemd. test/fuzz_lib.ts checks every response against the packet it answers and,
// at checkpoints and at the end, the server's listings, freed_bytes, descriptors, mappings
// and slots; at the end it makes the kernel cut descriptors short (MSG_CTRUNC) on purpose.
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
    for (const kind of ["valid", "mutated", "bytes", "json:valid", "json:mutated", "json:mangled"]) expect(labels).toContain(`${kind}:${v}`);
  }
  for (const l of [
    "random-bytes", "junk", "inherited-name", "mmap-seq:complete", "mmap-seq:bad-chunk", "mmap-seq:abandoned", "mmap-seq:absurd-count",
    "mmap-seq:exec-fail", "mmap-seq:bad-shm", "boundary-65536", "oversized", "empty", "deep-nesting",
    "json:junk", "json:inherited-name", "json:mmap-seq:complete", "json:mmap-seq:bad-chunk", "json:boundary-65536", "json:boundary-65537",
    "json:deep-nesting", "json:nested-unknown-field",
  ]) {
    expect(labels).toContain(l);
  }
  // Both encodings were answered, JSON requests well formed and not; every checkpoint probed freed_bytes and paged the listings.
  expect(s.jsonResponses).toBeGreaterThan(1000);
  expect(s.jsonWellFormed).toBeGreaterThan(500);
  expect(s.jsonPackets - s.jsonWellFormed).toBeGreaterThan(500);
  expect(s.freedProbes).toBe(s.checkpoints);
  expect(s.pagesRead).toBeGreaterThan(s.checkpoints * 4);
  expect(s.registered).toBeGreaterThan(100);
  expect(s.unregistered).toBeGreaterThan(100);
  expect(s.absorbed).toBeGreaterThan(100);
  expect(s.abruptDisconnects).toBeGreaterThan(0);
  expect(s.gracefulDisconnects).toBeGreaterThan(0);
  expect(s.final.finalFds).toBe(s.final.baselineFds);
}, 60_000);
