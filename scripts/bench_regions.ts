// In-process: cost of one RegisterMemory + UnregisterMemory pair through execute()
// on a real KvmVm, at 1, 1k, 10k and 30k live regions. Reported as ratios to the
// cost at 1 live region, measured in the same run (per-request work stays flat).
import * as sys from "../src/sys";
import { KvmVm, MiB } from "../src/kvm";
import { execute, RegionState, SystemAllocator } from "../src/memory";
import type { Request } from "../src/protocol";

const BASE = 0x40_0000_0000; // 256 GiB: far from RAM and the MMIO pools
const LEVELS = [1, 1_000, 10_000, 30_000];
const SAMPLES = 2_000;

const vm = KvmVm.create({ memory: 64 * MiB });
const ctx = { vm, allocator: new SystemAllocator(64 * MiB, vm.physAddrLimit), state: new RegionState() };
const fd = sys.memfdCreate("bench");
sys.ftruncate(fd, 4096);
const reg = (guest: number): Request<"RegisterMemory"> => ({
  RegisterMemory: {
    source: { SharedMemory: { descriptor: fd, size: 4096 } },
    dest: { GuestPhysicalAddress: guest },
    prot: { read: true, write: true },
    cache: "CacheCoherent",
  },
});
function must(r: unknown): void {
  if (typeof r === "object" && r !== null && "Err" in r) throw new Error(JSON.stringify(r));
}

let live = 0;
const rows: { live: number; median_us: number; p99_us: number }[] = [];
for (const level of LEVELS) {
  while (live < level) must(execute(reg(BASE + live++ * 8192), ctx));
  // Probe addresses sit between live regions (odd pages), so the overlap check works on a full tree.
  const times: number[] = [];
  for (let i = 0; i < SAMPLES; i++) {
    const g = BASE + ((i * 7919) % level) * 8192 + 4096;
    const t0 = Bun.nanoseconds();
    must(execute(reg(g), ctx));
    must(execute({ UnregisterMemory: g }, ctx));
    times.push(Bun.nanoseconds() - t0);
  }
  times.sort((a, b) => a - b);
  rows.push({ live: level, median_us: times[SAMPLES >> 1]! / 1e3, p99_us: times[Math.floor(SAMPLES * 0.99)]! / 1e3 });
}
const base = rows[0]!.median_us;
console.log("live regions | median µs | p99 µs | ratio to 1 region");
for (const r of rows) {
  console.log(`${String(r.live).padStart(12)} | ${r.median_us.toFixed(1).padStart(9)} | ${r.p99_us.toFixed(1).padStart(6)} | ${(r.median_us / base).toFixed(2)}×`);
}
vm.close();
sys.close(fd);
if (import.meta.main && process.argv.includes("--json")) console.log(JSON.stringify(rows));
