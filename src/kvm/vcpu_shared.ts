import type { BootEntry } from "./boot";
// The memory the main thread and the vCPU Worker share (one SharedArrayBuffer), and
// the message that starts the Worker. Imported by both sides; no FFI here.
//
// Worker -> main goes through this buffer plus an eventfd in the main epoll set:
// postMessage is not delivered while the main thread blocks in epoll_wait (measured).
// Main -> Worker is a flag in this buffer, plus (for a vCPU inside KVM_RUN)
// kvm_run.immediate_exit and a signal to the Worker's thread.

export const VcpuStateCode = { starting: 0, running: 1, halted: 2, stopped: 3 } as const;
export type VcpuStateName = keyof typeof VcpuStateCode;
export const VCPU_STATE_NAMES: readonly VcpuStateName[] = ["starting", "running", "halted", "stopped"];

/** Int32 control words. */
export const Ctl = {
  /** VcpuStateCode; written by the Worker. */
  STATE: 0,
  /** main -> Worker: leave the run loop (never cleared). */
  STOP: 1,
  /** main -> Worker: main is done kicking; close the vCPU fd and unmap kvm_run. */
  RELEASE: 2,
  /** The Worker's kernel thread id (0 until known). */
  TID: 3,
  /** 1 while kvm_run is mapped: main may then write immediate_exit. The Worker unmaps only after RELEASE. */
  MAPPED: 4,
  /** The Worker has left the run loop for good and will not enter KVM_RUN again. */
  LOOP_DONE: 5,
  /** The Worker has released the vCPU fd and kvm_run; main may terminate it. */
  CLOSED: 6,
  /** The Worker wrote the eventfd and main has not serviced it since (one wake-up per batch). */
  NOTIFY: 7,
  /** The guest wrote port 0xF4: 1, and EXIT_STATUS holds the byte. */
  EXIT_REQUEST: 8,
  EXIT_STATUS: 9,
  SERIAL_HEAD: 10,
  SERIAL_TAIL: 11,
  MSG_HEAD: 12,
  MSG_TAIL: 13,
  /** Serial bytes dropped because the ring was full while stopping. */
  SERIAL_DROPPED: 14,
} as const;
const CTL_WORDS = 32;

/** Float64 counters (exact up to 2^53). */
export const Cnt = {
  EXITS: 0,
  MMIO_READS: 1,
  MMIO_WRITES: 2,
  IO_EXITS: 3,
  /** Host address of the Worker's kvm_run mapping. */
  KVM_RUN_ADDR: 4,
  /** performance.timeOrigin + now() when the vCPU first entered KVM_RUN. */
  RUNNING_SINCE: 5,
  /** KVM_RUN returns with EINTR/EAGAIN (kicks: immediate_exit or the signal). Not counted in EXITS. */
  INTERRUPTS: 6,
} as const;
const CNT_WORDS = 16;

export const SERIAL_RING = 64 * 1024;
export const MSG_RING = 16 * 1024;
const CTL_OFF = 0;
const CNT_OFF = CTL_WORDS * 4;
const SERIAL_OFF = CNT_OFF + CNT_WORDS * 8;
const MSG_OFF = SERIAL_OFF + SERIAL_RING;
export const SHARED_SIZE = MSG_OFF + MSG_RING;

/**
 * A single-producer single-consumer byte ring in shared memory. head and tail are
 * free-running Int32 counters (wrapping), the capacity a power of two.
 */
export class ByteRing {
  private readonly mask: number;
  constructor(
    private readonly ctl: Int32Array,
    private readonly headIdx: number,
    private readonly tailIdx: number,
    private readonly data: Uint8Array,
  ) {
    this.mask = data.byteLength - 1;
  }

  get capacity(): number {
    return this.data.byteLength;
  }
  used(): number {
    return (Atomics.load(this.ctl, this.headIdx) - Atomics.load(this.ctl, this.tailIdx)) | 0;
  }
  tail(): number {
    return Atomics.load(this.ctl, this.tailIdx);
  }

  /** Producer: appends as much of `bytes` as fits; returns how many bytes went in. */
  push(bytes: Uint8Array): number {
    const head = Atomics.load(this.ctl, this.headIdx);
    const free = this.data.byteLength - ((head - Atomics.load(this.ctl, this.tailIdx)) | 0);
    const n = Math.min(free, bytes.byteLength);
    for (let i = 0; i < n; i++) this.data[(head + i) & this.mask] = bytes[i]!;
    Atomics.store(this.ctl, this.headIdx, (head + n) | 0);
    return n;
  }

  /** Producer: appends one byte; false when the ring is full. */
  pushByte(b: number): boolean {
    const head = Atomics.load(this.ctl, this.headIdx);
    if (((head - Atomics.load(this.ctl, this.tailIdx)) | 0) >= this.data.byteLength) return false;
    this.data[head & this.mask] = b;
    Atomics.store(this.ctl, this.headIdx, (head + 1) | 0);
    return true;
  }

  /** Consumer: copies out everything available (null when empty) and wakes a waiting producer. */
  drain(): Uint8Array | null {
    const tail = Atomics.load(this.ctl, this.tailIdx);
    const n = (Atomics.load(this.ctl, this.headIdx) - tail) | 0;
    if (n === 0) return null;
    const out = new Uint8Array(n);
    const start = tail & this.mask;
    const first = Math.min(n, this.data.byteLength - start);
    out.set(this.data.subarray(start, start + first), 0);
    if (first < n) out.set(this.data.subarray(0, n - first), first);
    Atomics.store(this.ctl, this.tailIdx, (tail + n) | 0);
    Atomics.notify(this.ctl, this.tailIdx);
    return out;
  }
}

export class VcpuShared {
  readonly ctl: Int32Array;
  readonly cnt: Float64Array;
  readonly serial: ByteRing;
  readonly messages: ByteRing;

  constructor(readonly sab: SharedArrayBuffer) {
    this.ctl = new Int32Array(sab, CTL_OFF, CTL_WORDS);
    this.cnt = new Float64Array(sab, CNT_OFF, CNT_WORDS);
    this.serial = new ByteRing(this.ctl, Ctl.SERIAL_HEAD, Ctl.SERIAL_TAIL, new Uint8Array(sab, SERIAL_OFF, SERIAL_RING));
    this.messages = new ByteRing(this.ctl, Ctl.MSG_HEAD, Ctl.MSG_TAIL, new Uint8Array(sab, MSG_OFF, MSG_RING));
  }

  static create(): VcpuShared {
    return new VcpuShared(new SharedArrayBuffer(SHARED_SIZE));
  }

  get(i: number): number {
    return Atomics.load(this.ctl, i);
  }
  set(i: number, v: number): void {
    Atomics.store(this.ctl, i, v);
    Atomics.notify(this.ctl, i);
  }
  state(): VcpuStateName {
    return VCPU_STATE_NAMES[this.get(Ctl.STATE)] ?? "stopped";
  }
}

/** A log record from the Worker (main logs it: logging is a main-thread job). One JSON line each in the message ring. */
export interface VcpuMessage {
  level: "debug" | "info" | "warn" | "error";
  msg: string;
  fields?: Record<string, unknown>;
}

/** The one postMessage main sends the Worker. */
export interface VcpuInit {
  sab: SharedArrayBuffer;
  vmFd: number;
  vcpuId: number;
  mmapSize: number;
  /** kvm_cpuid2 as KVM_GET_SUPPORTED_CPUID returned it; passed to KVM_SET_CPUID2 unchanged. */
  cpuid: Uint8Array;
  eventFd: number;
  /** Signals to block on the vCPU thread (SIGTERM, SIGINT: the main thread handles them). */
  blockSignals: number[];
  /** Registers and segments at entry. */
  entry: BootEntry;
  /** A Linux kernel runs: the PC devices it expects (UART, CMOS, i8042 reset) answer, and a reset or shutdown ends the guest. */
  linux: boolean;
}
