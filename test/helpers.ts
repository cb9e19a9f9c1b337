// Shared test fixtures: real descriptors, real /dev/kvm, and the counters the
// ownership tests compare (open descriptors, mappings).
import { readFileSync } from "node:fs";
import * as sys from "../src/sys";
import { KvmVm, MiB } from "../src/kvm";
import { RegionState, SystemAllocator, type ExecContext } from "../src/memory";

/** Fails loudly (never skips) when this machine has no usable /dev/kvm. */
export function requireKvm(): void {
  try {
    sys.close(sys.open("/dev/kvm", sys.O_RDWR));
  } catch (e) {
    throw new Error(`KVM TESTS CANNOT RUN: /dev/kvm is not usable here (${e}). These tests need real KVM.`);
  }
}

export function newContext(memory = 64 * MiB, maxSlots?: number): ExecContext & { vm: KvmVm } {
  requireKvm();
  const vm = KvmVm.create({ memory, maxSlots });
  return { vm, allocator: new SystemAllocator(memory, vm.physAddrLimit), state: new RegionState() };
}

/** A memfd of `size` bytes; `fill(i)` gives byte i's value when set. */
export function memfd(size: number, fill?: (i: number) => number, name = "test"): number {
  const fd = sys.memfdCreate(name);
  sys.ftruncate(fd, size);
  if (fill) {
    const buf = new Uint8Array(size);
    for (let i = 0; i < size; i++) buf[i] = fill(i);
    sys.pwriteAll(fd, buf, 0);
  }
  return fd;
}

export function fdCount(pid: number | "self" = "self"): number {
  return sys.countOpenFds(pid);
}

export function mapsCount(pid: number | "self" = "self"): number {
  return readFileSync(`/proc/${pid}/maps`, "utf8").split("\n").length - 1;
}

/**
 * Mappings of client memory: memfd-backed lines of /proc/PID/maps other than guest RAM.
 * Exact, unlike the total line count, which the JS heap also moves.
 */
export function memfdMappings(pid: number | "self" = "self"): number {
  return readFileSync(`/proc/${pid}/maps`, "utf8")
    .split("\n")
    .filter((l) => l.includes("/memfd:") && !l.includes("vmemd-guest-ram")).length;
}

export function closeAll(fds: number[]): void {
  for (const fd of fds) sys.close(fd);
}

/** A deterministic PRNG (xorshift32), so a failure repeats: rng(seed)(n) is in [0, n). */
export function rng(seed: number): (n: number) => number {
  let s = seed >>> 0 || 1;
  return (n: number) => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s % n;
  };
}

/** An allocation the test expects to succeed. */
export function allocated<T>(a: T | import("../src/memory").Refusal): T {
  if (a instanceof (require("../src/memory") as typeof import("../src/memory")).Refusal) throw new Error(`allocation refused: ${a.chain.join(": ")}`);
  return a as T;
}

/**
 * execute(), with MmapAndRegisterMemory taking its mappings from a `file_mappings` field
 * (the server gathers them from the follow-up packets; in-process tests have them at hand).
 */
export function executeAll(req: unknown, ctx: ExecContext): import("../src/protocol").VmMemoryResponse {
  const m = require("../src/memory") as typeof import("../src/memory");
  if (typeof req === "object" && req !== null && "MmapAndRegisterMemory" in req) {
    const r = (req as { MmapAndRegisterMemory: { shm: never; dest: never; file_mappings?: never[] } }).MmapAndRegisterMemory;
    return m.mmapAndRegister(ctx, r.shm, r.dest, r.file_mappings ?? []);
  }
  return m.execute(req as never, ctx);
}
