// Fault injection: a chosen system call fails; the request answers Err and every
// slot, mapping, descriptor, region and allocation is exactly as before.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import * as sys from "../src/sys";
import { KvmVm, MiB } from "../src/kvm";
import type { ExecContext } from "../src/memory";
import type { Alloc, VmMemoryFileMapping, VmMemoryRequest, VmMemoryResponse } from "../src/protocol";
import { allocated, executeAll as execute, closeAll, fdCount, memfd, memfdMappings, newContext, requireKvm } from "./helpers";

const HIGH = 0x2_0000_0000;
const BAR: Alloc = { PciBar: { bus: 0, dev: 4, func: 0, bar: 0 } };
let ctx: ExecContext & { vm: KvmVm };
let fd: number;
let files: number[];
let ev: number;

beforeAll(() => {
  ctx = newContext(32 * MiB);
  fd = memfd(8192);
  files = [memfd(4096), memfd(4096)];
  ev = sys.eventfd();
  allocated(ctx.allocator.allocate(BAR, 1 * MiB));
  ok(execute({ PrepareSharedMemoryRegion: { alloc: BAR, cache: "CacheCoherent" } }, ctx));
  // Something registered of each kind, so removal paths can be faulted too.
  ok(execute(reg(HIGH), ctx));
  ok(execute(reg(ctx.allocator.get(BAR)!.start), ctx));
  ok(execute({ IoEventRaw: { event: ev, addr: 0xe000_0000, datamatch: "AnyLength", register: true } }, ctx));
});
afterAll(() => {
  sys.clearFaults();
  closeAll([fd, ...files, ev]);
  ctx.vm.close();
});

function ok(r: VmMemoryResponse): void {
  if (typeof r === "object" && "Err" in r) throw new Error(JSON.stringify(r));
}
function reg(guest: number): VmMemoryRequest {
  return { RegisterMemory: { source: { SharedMemory: { descriptor: fd, size: 8192 } }, dest: { GuestPhysicalAddress: guest }, prot: { read: true, write: true }, cache: "CacheCoherent" } };
}

/** Everything a failed request must leave untouched. */
function snapshot() {
  const state = execute("GetState", ctx);
  return {
    state: JSON.stringify(state, (_k, v) => (typeof v === "bigint" ? String(v) : v)),
    kvmRegions: JSON.stringify([...ctx.vm.regions()]),
    slots: ctx.vm.slotsUsed(),
    fds: fdCount(),
    memfdMaps: memfdMappings(),
  };
}

const mmapReq = (): VmMemoryRequest => ({
  MmapAndRegisterMemory: {
    shm: { descriptor: fd, size: 8192 },
    dest: { GuestPhysicalAddress: HIGH + 0x100000 },
    num_file_mappings: 2,
  },
});
/** What mmapReq's follow-up chunks carry: each file at its own page of the shm. */
const mmapFiles = (): VmMemoryFileMapping[] => files.map((file, i) => ({ file, length: 4096, mem_offset: i * 4096, file_offset: 0 }));

const cases: [string, string, keyof typeof sys.Errno, () => VmMemoryRequest, number?][] = [
  ["RegisterMemory", "mmap", "ENOMEM", () => reg(HIGH + 0x10000)],
  ["RegisterMemory", "KVM_SET_USER_MEMORY_REGION", "EFAULT", () => reg(HIGH + 0x10000)],
  ["RegisterMemory", "fstat", "EMFILE", () => reg(HIGH + 0x10000)],
  ["RegisterMemory into the prepared BAR", "mmap", "ENOMEM", () => reg(0) /* replaced below */],
  ["UnregisterMemory (dynamic)", "KVM_SET_USER_MEMORY_REGION", "EFAULT", () => ({ UnregisterMemory: HIGH })],
  ["UnregisterMemory (fixed)", "mmap", "ENOMEM", () => ({ UnregisterMemory: 0 })],
  ["MmapAndRegisterMemory, first mmap", "mmap", "ENOMEM", mmapReq],
  ["MmapAndRegisterMemory, second file", "mmap", "ENOMEM", mmapReq, 2],
  ["MmapAndRegisterMemory, the slot", "KVM_SET_USER_MEMORY_REGION", "EFAULT", mmapReq],
  ["IoEventRaw register", "KVM_IOEVENTFD", "EFAULT", () => ({ IoEventRaw: { event: ev, addr: 0xe100_0000, datamatch: { U8: 1 }, register: true } })],
  ["IoEventRaw unregister", "KVM_IOEVENTFD", "EFAULT", () => ({ IoEventRaw: { event: ev, addr: 0xe000_0000, datamatch: "AnyLength", register: false } })],
  ["DynamicallyFreeMemoryRanges", "madvise", "EFAULT", () => ({ DynamicallyFreeMemoryRanges: { ranges: [[0, 4096]] } })],
];

describe("a failing system call leaves the state exactly as before", () => {
  for (const [what, call, errno, make, after] of cases) {
    test(`${what}: ${call} fails with ${errno}`, () => {
      const barStart = ctx.allocator.get(BAR)!.start;
      let req = make();
      if (what === "RegisterMemory into the prepared BAR") req = reg(barStart + 0x20000);
      if (what === "UnregisterMemory (fixed)") req = { UnregisterMemory: barStart };
      const before = snapshot();
      sys.injectFault(call, sys.Errno[errno], 1, after ?? 0);
      const resp = execute(req, ctx, typeof req === "object" && "MmapAndRegisterMemory" in req ? mmapFiles() : []);
      sys.clearFaults();
      expect(resp).toMatchObject({ Err: { errno: sys.Errno[errno] } });
      const chain = (resp as { Err: { chain: string[] } }).Err.chain;
      expect(chain[0]).toStartWith(call);
      expect(chain.length).toBeGreaterThanOrEqual(2);
      expect(snapshot()).toEqual(before);
    });
  }

  test("PrepareSharedMemoryRegion: mmap ENOMEM and KVM EFAULT leave no arena, slot or mapping", () => {
    const bar: Alloc = { PciBar: { bus: 0, dev: 7, func: 0, bar: 0 } };
    allocated(ctx.allocator.allocate(bar, 64 * 1024));
    for (const [call, errno] of [["mmap", "ENOMEM"], ["KVM_SET_USER_MEMORY_REGION", "EFAULT"]] as const) {
      const before = snapshot();
      const maps = require("node:fs").readFileSync("/proc/self/maps", "utf8").split("\n").filter((l: string) => l.includes("r--p 00000000 00:00 0")).length;
      sys.injectFault(call, sys.Errno[errno]);
      expect(execute({ PrepareSharedMemoryRegion: { alloc: bar, cache: "CacheCoherent" } }, ctx)).toMatchObject({ Err: { errno: sys.Errno[errno] } });
      sys.clearFaults();
      expect(snapshot()).toEqual(before);
      const after = require("node:fs").readFileSync("/proc/self/maps", "utf8").split("\n").filter((l: string) => l.includes("r--p 00000000 00:00 0")).length;
      expect(after).toBe(maps);
    }
    ok(execute({ PrepareSharedMemoryRegion: { alloc: bar, cache: "CacheCoherent" } }, ctx));
  });
});

describe("creating the VM", () => {
  test("a failure at any step releases everything made before it", () => {
    requireKvm();
    for (const [call, errno] of [
      ["open", "EMFILE"],
      ["KVM_CREATE_VM", "ENOMEM"],
      ["memfd_create", "EMFILE"],
      ["ftruncate", "ENOSPC"],
      ["mmap", "ENOMEM"],
      ["KVM_SET_USER_MEMORY_REGION", "EFAULT"],
    ] as const) {
      const fds = fdCount();
      const memfds = memfdMappings();
      sys.injectFault(call, sys.Errno[errno]);
      expect(() => KvmVm.create({ memory: 16 * MiB })).toThrow(new RegExp(errno));
      sys.clearFaults();
      expect({ call, fds: fdCount(), memfds: memfdMappings() }).toEqual({ call, fds, memfds });
    }
  });
});
