// Shared test fixtures: real descriptors, real /dev/kvm, and the counters the
// ownership tests compare (open descriptors, mappings).
import { readFileSync } from "node:fs";
import * as sys from "../src/sys";
import { KvmVm, MiB } from "../src/kvm";
import { execute, mmapAndRegister, RegionState, SystemAllocator, type ExecContext } from "../src/memory";
import type { VmMemoryFileMapping, VmMemoryRequest, VmMemoryResponse } from "../src/protocol";

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
 * execute() for any request, as the server runs it: an MmapAndRegisterMemory takes its
 * mappings from `files`, what its follow-up chunks carry (the server gathers them from the
 * packets after the request; in-process tests have them at hand). `files` must hold exactly
 * num_file_mappings mappings, and nothing for any other request.
 */
export function executeAll(req: VmMemoryRequest, ctx: ExecContext, files: readonly VmMemoryFileMapping[] = []): VmMemoryResponse {
  if (typeof req === "object" && "MmapAndRegisterMemory" in req) {
    const { shm, dest, num_file_mappings } = req.MmapAndRegisterMemory;
    if (Number(num_file_mappings) !== files.length) throw new Error(`num_file_mappings is ${num_file_mappings} but ${files.length} file mappings follow`);
    return mmapAndRegister(ctx, shm, dest, files);
  }
  if (files.length > 0) throw new Error("file mappings follow only an MmapAndRegisterMemory");
  return execute(req, ctx);
}
