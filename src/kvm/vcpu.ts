// The main thread's side of the one vCPU: loads the guest (boot.ts), starts the vCPU
// Worker, services what it reports (serial output, log records, exit request) when
// its eventfd becomes readable, and stops it, even from inside KVM_RUN.
//
// The Worker file. From source (`bun src/main.ts`, `bun test`) it is vcpu_worker.ts next
// to this file. In a binary built with
//   bun build --compile ... src/main.ts src/kvm/vcpu_worker.ts
// every entry point is embedded under /$bunfs/root/ by its path relative to the entry
// points' common directory (src/), with .js for .ts: /$bunfs/root/kvm/vcpu_worker.js.
// `new URL("./vcpu_worker.ts", import.meta.url)` does not work there (the bundled
// import.meta.url is the main entry's, /$bunfs/root/<outfile>), and a bare relative
// string is resolved against the working directory; so the path is chosen explicitly.
import { existsSync } from "node:fs";
import { dirname } from "node:path";
import * as sys from "../sys";
import { BOOT_MIN_MEMORY, checkBootImage, CONTRACT_ENTRY, writeBootMemory, type BootEntry } from "./boot";
import { loadLinux, type LinuxImage } from "./linux";
import type { KvmVm } from "./kvm_vm";
import {
  Cnt,
  Ctl,
  type VcpuInit,
  type VcpuMessage,
  VcpuShared,
  VcpuStateCode,
  type VcpuStateName,
} from "./vcpu_shared";

export type { VcpuMessage, VcpuStateName } from "./vcpu_shared";

/** Where the vCPU Worker's code is, from source or inside a compiled binary. */
export function vcpuWorkerPath(): string {
  const here = import.meta.url;
  if (!here.includes("/$bunfs/")) return new URL("./vcpu_worker.ts", here).href;
  const root = dirname(Bun.main); // /$bunfs/root
  for (const rel of ["kvm/vcpu_worker.js", "src/kvm/vcpu_worker.js"]) {
    const p = `${root}/${rel}`;
    if (existsSync(p)) return p;
  }
  throw new sys.SysError(
    `the vCPU worker is not embedded in this binary (looked for ${root}/kvm/vcpu_worker.js); build with src/kvm/vcpu_worker.ts as an extra entry point`,
    sys.Errno.ENOENT,
  );
}

export interface VcpuOptions {
  /** Serial bytes the guest wrote to port 0x3F8, in order (main thread). */
  onSerial?: (bytes: Uint8Array) => void;
  /** The guest wrote `status` to port 0xF4 (main thread, once). */
  onExitRequest?: (status: number) => void;
  /** A log record from the vCPU thread (main thread). */
  onMessage?: (m: VcpuMessage) => void;
  /** The state changed (main thread; seen when servicing, so quick transitions may merge). */
  onState?: (state: VcpuStateName) => void;
  /** CPUID bits to clear from what KVM_GET_SUPPORTED_CPUID offers (a host whose KVM cannot emulate them). */
  cpuidClear?: readonly CpuidBit[];
}

/** One CPUID feature bit: leaf (EAX in), register, bit. */
export interface CpuidBit {
  leaf: number;
  reg: "eax" | "ebx" | "ecx" | "edx";
  bit: number;
}

const CPUID_REG_OFFSET = { eax: 12, ebx: 16, ecx: 20, edx: 24 } as const;

/** kvm_cpuid2 (`raw`, from KVM_GET_SUPPORTED_CPUID) with `bits` cleared in every entry of their leaf. */
export function clearCpuidBits(raw: Uint8Array, bits: readonly CpuidBit[]): Uint8Array {
  const v = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
  const n = v.getUint32(0, true);
  for (let i = 0; i < n; i++) {
    const o = 8 + i * sys.CPUID_ENTRY_SIZE;
    for (const b of bits) {
      if (v.getUint32(o, true) !== b.leaf) continue;
      const at = o + CPUID_REG_OFFSET[b.reg];
      v.setUint32(at, v.getUint32(at, true) & ~(1 << b.bit), true);
    }
  }
  return raw;
}

/** Counters and state as GetState reports them (VcpuSummary). */
export interface VcpuCounters {
  state: "running" | "halted" | "stopped";
  exits: number;
  mmio_reads: number;
  mmio_writes: number;
}

const KICK_INTERVAL_MS = 2;
const STOP_TIMEOUT_MS = 5000;

export class Vcpu {
  /** Readable when the vCPU has something for the main thread: put it in the epoll set and call service(). */
  readonly eventFd: number;
  private readonly sh: VcpuShared;
  private readonly worker: Worker;
  private readonly kickSignal: number;
  private readonly decoder = new TextDecoder();
  private msgPartial = "";
  private lastState: VcpuStateName = "starting";
  private exitReported = false;
  private stopping: Promise<void> | null = null;
  private closed = false;
  /** performance.now() when start() began (boot timing). */
  readonly startedAt: number;

  private constructor(
    vm: KvmVm,
    private readonly opts: VcpuOptions,
    startedAt: number,
    entry: BootEntry,
    linux: boolean,
  ) {
    this.startedAt = startedAt;
    this.sh = VcpuShared.create();
    this.kickSignal = sys.vcpuKickSignal();
    sys.installNoopSignalHandler(this.kickSignal);
    this.eventFd = sys.eventfd(0, sys.EFD_CLOEXEC | sys.EFD_NONBLOCK);
    try {
      const init: VcpuInit = {
        sab: this.sh.sab,
        vmFd: vm.fd,
        vcpuId: 0,
        mmapSize: vm.kvm.vcpuMmapSize(),
        cpuid: clearCpuidBits(vm.kvm.supportedCpuid().slice(), opts.cpuidClear ?? []),
        eventFd: this.eventFd,
        blockSignals: [sys.SIGINT, sys.SIGTERM, sys.SIGHUP, sys.SIGUSR1, sys.SIGUSR2],
        entry,
        linux,
      };
      this.worker = new Worker(vcpuWorkerPath());
      // The Worker reports through the shared buffer; this only catches a Worker that
      // failed before running our code (a load error). Delivered when main's loop turns.
      this.worker.addEventListener("error", (ev) => this.workerFailed(ev));
      this.worker.postMessage(init);
    } catch (e) {
      sys.close(this.eventFd);
      throw e;
    }
  }

  /**
   * Writes the boot contract's memory (GDT, page tables, `image` at 1 MiB) into guest RAM and
   * starts vCPU 0 in a Worker. Errors about the image or memory size are thrown here.
   */
  static start(vm: KvmVm, image: Uint8Array, opts: VcpuOptions = {}): Vcpu {
    const t0 = performance.now();
    checkBootImage(image.byteLength, vm.ramSize);
    const host = vm.ramHostAddress(0, BOOT_MIN_MEMORY);
    if (host === undefined) throw new sys.SysError("guest RAM does not cover [0, 4 MiB)", sys.Errno.EINVAL);
    writeBootMemory(sys.memoryView(host, BOOT_MIN_MEMORY), image);
    return new Vcpu(vm, opts, t0, CONTRACT_ENTRY, false);
  }

  /**
   * Loads a Linux kernel (ELF vmlinux or bzImage) with its zero page, command line, initrd
   * and e820 map into guest RAM (linux.ts) and starts vCPU 0 at its 64-bit entry point.
   */
  static startLinux(vm: KvmVm, image: LinuxImage, opts: VcpuOptions = {}): Vcpu {
    const t0 = performance.now();
    const low = vm.ram[0]!;
    const entry = loadLinux(vm.ramMapping.view(low.fileOffset, low.size), image, vm.ram);
    return new Vcpu(vm, opts, t0, entry, true);
  }

  get tid(): number {
    return this.sh.get(Ctl.TID);
  }
  get state(): VcpuStateName {
    return this.sh.state();
  }
  /** The guest's exit request status (port 0xF4), or null. */
  get exitStatus(): number | null {
    return this.sh.get(Ctl.EXIT_REQUEST) ? this.sh.get(Ctl.EXIT_STATUS) : null;
  }
  get ioExits(): number {
    return this.sh.cnt[Cnt.IO_EXITS]!;
  }
  /** KVM_RUN calls that returned EINTR/EAGAIN (stop()'s kicks). */
  get interrupts(): number {
    return this.sh.cnt[Cnt.INTERRUPTS]!;
  }
  /** When the vCPU first entered KVM_RUN (performance.timeOrigin-based ms), or 0. */
  get runningSince(): number {
    return this.sh.cnt[Cnt.RUNNING_SINCE]!;
  }

  summary(): VcpuCounters {
    const s = this.sh.state();
    return {
      state: s === "starting" ? "running" : s,
      exits: this.sh.cnt[Cnt.EXITS]!,
      mmio_reads: this.sh.cnt[Cnt.MMIO_READS]!,
      mmio_writes: this.sh.cnt[Cnt.MMIO_WRITES]!,
    };
  }

  /** Call when eventFd is readable (or any time): delivers serial output, log records, state, exit request. */
  service(): void {
    if (this.closed) return;
    // Counter first, then NOTIFY: a Worker that finds NOTIFY clear after this point
    // writes the eventfd again, so nothing it adds later goes unnoticed.
    sys.readCounter(this.eventFd);
    Atomics.store(this.sh.ctl, Ctl.NOTIFY, 0);
    const serial = this.sh.serial.drain();
    if (serial !== null) this.opts.onSerial?.(serial);
    const msgs = this.sh.messages.drain();
    if (msgs !== null) {
      const lines = (this.msgPartial + this.decoder.decode(msgs)).split("\n");
      this.msgPartial = lines.pop()!;
      for (const line of lines) {
        if (line === "") continue;
        let m: VcpuMessage;
        try {
          m = JSON.parse(line) as VcpuMessage;
        } catch {
          m = { level: "warn", msg: "unreadable vcpu message", fields: { line } };
        }
        this.opts.onMessage?.(m);
      }
    }
    const state = this.sh.state();
    if (this.lastState === "starting" && state !== "starting" && state !== "running" && this.runningSince > 0) {
      // It ran and already halted or stopped before we looked: report "running" first.
      this.lastState = "running";
      this.opts.onState?.("running");
    }
    if (state !== this.lastState) {
      this.lastState = state;
      this.opts.onState?.(state);
    }
    if (!this.exitReported && this.sh.get(Ctl.EXIT_REQUEST)) {
      this.exitReported = true;
      this.opts.onExitRequest?.(this.sh.get(Ctl.EXIT_STATUS));
    }
  }

  private workerFailed(ev: ErrorEvent): void {
    this.opts.onMessage?.({ level: "error", msg: "vcpu worker failed", fields: { error: ev.message } });
    if (this.sh.get(Ctl.TID) === 0) {
      // It never ran: nothing to release. Say so for summary() and stop().
      this.sh.set(Ctl.STATE, VcpuStateCode.stopped);
      this.sh.set(Ctl.LOOP_DONE, 1);
      this.sh.set(Ctl.CLOSED, 1);
    }
  }

  /**
   * Interrupts the vCPU thread: kvm_run.immediate_exit = 1 (so the next KVM_RUN returns at
   * once) and the kick signal (so a KVM_RUN in progress returns EINTR). Safe only while
   * the Worker has not been told to RELEASE; stop() makes sure of that.
   */
  private kick(): void {
    if (this.sh.get(Ctl.MAPPED) && !this.sh.get(Ctl.RELEASE)) {
      const addr = this.sh.cnt[Cnt.KVM_RUN_ADDR]!;
      sys.memoryView(addr, 8)[sys.KVM_RUN_IMMEDIATE_EXIT] = 1;
    }
    const tid = this.sh.get(Ctl.TID);
    if (tid !== 0) sys.tgkill(tid, this.kickSignal);
  }

  /**
   * Stops the vCPU wherever it is (inside KVM_RUN, halted, blocked on a full ring),
   * waits for its thread to close the vCPU fd and unmap kvm_run, then ends the Worker
   * and closes the eventfd. Sleeps between checks; never spins. Idempotent.
   */
  stop(timeoutMs = STOP_TIMEOUT_MS): Promise<void> {
    this.stopping ??= this.doStop(timeoutMs);
    return this.stopping;
  }

  private async doStop(timeoutMs: number): Promise<void> {
    const deadline = performance.now() + timeoutMs;
    this.sh.set(Ctl.STOP, 1);
    // Until the Worker says it has left the run loop, keep kicking: a signal that lands
    // just before KVM_RUN is entered is covered by immediate_exit, and the other way round.
    while (!this.sh.get(Ctl.LOOP_DONE) && performance.now() < deadline) {
      this.kick();
      await Bun.sleep(KICK_INTERVAL_MS);
    }
    const loopDone = this.sh.get(Ctl.LOOP_DONE) !== 0;
    this.sh.set(Ctl.RELEASE, 1);
    while (!this.sh.get(Ctl.CLOSED) && performance.now() < deadline) await Bun.sleep(1);
    const closedCleanly = this.sh.get(Ctl.CLOSED) !== 0;
    this.service(); // last serial bytes and records
    this.closed = true;
    this.worker.terminate();
    sys.close(this.eventFd);
    if (!loopDone || !closedCleanly) {
      this.opts.onMessage?.({
        level: "error",
        msg: "vcpu thread did not stop in time; terminated it",
        fields: { loop_done: loopDone, closed: closedCleanly, timeout_ms: timeoutMs },
      });
    }
  }
}
