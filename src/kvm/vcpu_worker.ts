// The vCPU thread: a Worker entry point. Every vCPU ioctl (KVM_CREATE_VCPU, KVM_SET_CPUID2,
// KVM_GET/SET_SREGS, KVM_SET_REGS, KVM_RUN) is issued here, on the thread that runs the
// vCPU; KVM only requires that it be the VM's process. Talks to the main thread through
// VcpuShared and an eventfd only (vcpu_shared.ts). Extra entry point of the compiled
// binary: `bun build --compile ... src/main.ts src/kvm/vcpu_worker.ts` (see vcpu.ts).
import * as sys from "../sys";
import { describeRegisters, setBootRegs, setBootSregs } from "./boot";
import { hex } from "./layout";
import { COM1, COM1_IRQ, Uart8250 } from "./uart";
import { Cnt, Ctl, type VcpuInit, type VcpuMessage, VcpuShared, VcpuStateCode } from "./vcpu_shared";

declare const self: Worker;

// Port I/O of the boot contract (docs/boot.md).
const PORT_SERIAL = 0x3f8;
const PORT_SERIAL_LSR = 0x3fd;
const LSR_IDLE = 0x60; // THR empty, transmitter empty
const PORT_EXIT = 0xf4;
const KVM_EXIT_IO_IN = 0;
// The PC devices a Linux guest touches beyond the in-kernel ones.
const PORT_CMOS_DATA = 0x71; // reads 0: no update in progress, a clock at zero
const PORT_I8042_COMMAND = 0x64; // 0xFE there pulses the CPU reset line
const I8042_RESET = 0xfe;
// Opcodes vmemd completes where the host's KVM cannot emulate them (emulateMissing).
const INT3 = 0xcc;
const FWAIT = 0x9b;

/** How long one blocking wait lasts before flags are looked at again (ms). Blocking, never spinning. */
const WAIT_MS = 50;

class VcpuThread {
  private readonly sh: VcpuShared;
  private readonly ctl: Int32Array;
  private readonly cnt: Float64Array;
  private readonly encoder = new TextEncoder();
  private vcpuFd = -1;
  private runAddr = 0;
  private run: Uint8Array | null = null;
  private rv: DataView | null = null;
  /** COM1 for a Linux guest (the contract's serial is write-only port 0x3F8 instead). */
  private readonly uart: Uart8250 | null;
  private readonly irqLevel = new DataView(new ArrayBuffer(8));

  constructor(private readonly init: VcpuInit) {
    this.sh = new VcpuShared(init.sab);
    this.ctl = this.sh.ctl;
    this.cnt = this.sh.cnt;
    this.uart = init.linux ? new Uart8250((b) => this.serialByte(b), () => this.pulseIrq(COM1_IRQ)) : null;
  }

  /** An edge on an irqchip line (ISA interrupts are edge-triggered). */
  private pulseIrq(irq: number): void {
    for (const level of [1, 0]) {
      this.irqLevel.setUint32(0, irq, true);
      this.irqLevel.setUint32(4, level, true);
      sys.tryIoctl(this.init.vmFd, sys.KVM_IRQ_LINE, this.irqLevel, "KVM_IRQ_LINE");
    }
  }

  /** The guest asks to end (port 0xF4, or a Linux reset or shutdown): main stops with `status`. */
  private requestExit(msg: string, status: number): void {
    // The record first, so main logs it before it acts on the request.
    this.message({ level: "info", msg, fields: { status } });
    Atomics.store(this.ctl, Ctl.EXIT_STATUS, status);
    this.sh.set(Ctl.EXIT_REQUEST, 1);
    this.setState(VcpuStateCode.stopped);
  }

  /** Wakes the main thread once per batch of output (it clears NOTIFY when it services us). */
  private notify(): void {
    if (Atomics.exchange(this.ctl, Ctl.NOTIFY, 1) === 0) {
      try {
        sys.writeCounter(this.init.eventFd, 1n);
      } catch {
        // EAGAIN: the counter is saturated, main is awake anyway.
      }
    }
  }

  private stopRequested(): boolean {
    return Atomics.load(this.ctl, Ctl.STOP) !== 0;
  }

  /** Sends a log record to the main thread; waits for room, drops it when stopping. */
  private message(m: VcpuMessage): void {
    const line = this.encoder.encode(JSON.stringify(m, (_k, v) => (typeof v === "bigint" ? v.toString() : v)) + "\n");
    if (line.byteLength > this.sh.messages.capacity) return;
    for (;;) {
      if (this.sh.messages.capacity - this.sh.messages.used() >= line.byteLength) {
        this.sh.messages.push(line);
        this.notify();
        return;
      }
      this.notify();
      if (this.stopRequested()) return;
      Atomics.wait(this.ctl, Ctl.MSG_TAIL, this.sh.messages.tail(), WAIT_MS);
    }
  }

  private serialByte(b: number): void {
    while (!this.sh.serial.pushByte(b)) {
      // Ring full: main is behind. Block (no spin) until it drains, unless we are stopping.
      this.notify();
      if (this.stopRequested()) {
        Atomics.add(this.ctl, Ctl.SERIAL_DROPPED, 1);
        return;
      }
      Atomics.wait(this.ctl, Ctl.SERIAL_TAIL, this.sh.serial.tail(), WAIT_MS);
    }
    this.notify();
  }

  private setState(code: number): void {
    this.sh.set(Ctl.STATE, code);
    this.notify();
  }

  private registers(): Record<string, string> {
    try {
      const regs = new DataView(new ArrayBuffer(sys.KVM_REGS_SIZE));
      const sregs = new DataView(new ArrayBuffer(sys.KVM_SREGS_SIZE));
      sys.ioctl(this.vcpuFd, sys.KVM_GET_REGS, regs, "KVM_GET_REGS");
      sys.ioctl(this.vcpuFd, sys.KVM_GET_SREGS, sregs, "KVM_GET_SREGS");
      return describeRegisters(regs, sregs);
    } catch (e) {
      return { registers: `unavailable: ${e}` };
    }
  }

  setup(): void {
    const { vmFd, vcpuId, mmapSize, cpuid } = this.init;
    this.vcpuFd = sys.ioctl(vmFd, sys.KVM_CREATE_VCPU, vcpuId, "KVM_CREATE_VCPU");
    this.runAddr = sys.mmap(0, mmapSize, sys.PROT_READ | sys.PROT_WRITE, sys.MAP_SHARED, this.vcpuFd, 0);
    this.cnt[Cnt.KVM_RUN_ADDR] = this.runAddr;
    this.sh.set(Ctl.MAPPED, 1);
    this.run = sys.memoryView(this.runAddr, mmapSize);
    this.rv = new DataView(this.run.buffer, this.run.byteOffset, this.run.byteLength);
    // A copy: KVM_SET_CPUID2 reads the buffer; the structured clone gave us our own anyway.
    sys.ioctl(this.vcpuFd, sys.KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2");
    const sregs = new DataView(new ArrayBuffer(sys.KVM_SREGS_SIZE));
    sys.ioctl(this.vcpuFd, sys.KVM_GET_SREGS, sregs, "KVM_GET_SREGS");
    setBootSregs(sregs, this.init.entry);
    sys.ioctl(this.vcpuFd, sys.KVM_SET_SREGS, sregs, "KVM_SET_SREGS");
    const regs = new DataView(new ArrayBuffer(sys.KVM_REGS_SIZE));
    setBootRegs(regs, this.init.entry);
    sys.ioctl(this.vcpuFd, sys.KVM_SET_REGS, regs, "KVM_SET_REGS");
  }

  /** Runs the vCPU until HLT, a fatal exit, an exit request or STOP. */
  loop(): void {
    const run = this.run!;
    const rv = this.rv!;
    const cnt = this.cnt;
    const fd = this.vcpuFd;
    this.cnt[Cnt.RUNNING_SINCE] = performance.timeOrigin + performance.now();
    this.setState(VcpuStateCode.running);
    for (;;) {
      if (this.stopRequested()) {
        this.setState(VcpuStateCode.stopped);
        return;
      }
      const err = sys.kvmRun(fd);
      if (err !== 0) {
        // EINTR: a signal or immediate_exit (stop() kicked us); EAGAIN: try again.
        if (err === sys.Errno.EINTR || err === sys.Errno.EAGAIN) {
          cnt[Cnt.INTERRUPTS]!++;
          continue;
        }
        throw new sys.SysError("KVM_RUN", err);
      }
      cnt[Cnt.EXITS]!++;
      const reason = rv.getUint32(sys.KVM_RUN_EXIT_REASON, true);
      switch (reason) {
        case sys.KVM_EXIT_MMIO: {
          const len = rv.getUint32(sys.KVM_RUN_MMIO_LEN, true);
          if (run[sys.KVM_RUN_MMIO_IS_WRITE] !== 0) {
            cnt[Cnt.MMIO_WRITES]!++;
          } else {
            cnt[Cnt.MMIO_READS]!++;
            run.fill(0xff, sys.KVM_RUN_MMIO_DATA, sys.KVM_RUN_MMIO_DATA + Math.min(len, 8));
          }
          break;
        }
        case sys.KVM_EXIT_IO: {
          cnt[Cnt.IO_EXITS]!++;
          if (this.io(run, rv)) return;
          break;
        }
        case sys.KVM_EXIT_INTR:
          break;
        case sys.KVM_EXIT_HLT:
          this.message({ level: "info", msg: "vcpu halted", fields: { rip: this.registers().rip, exits: cnt[Cnt.EXITS] } });
          this.setState(VcpuStateCode.halted);
          return;
        case sys.KVM_EXIT_SHUTDOWN:
          // A Linux guest resets this way when it reboots: its end, not a fault.
          if (this.init.linux) {
            this.requestExit("guest reset (shutdown)", 0);
            return;
          }
          this.fatal("vcpu shutdown (triple fault)", reason, {});
          return;
        case sys.KVM_EXIT_INTERNAL_ERROR: {
          if (this.init.linux && this.emulateMissing(rv)) break;
          const ndata = Math.min(rv.getUint32(sys.KVM_RUN_INTERNAL_SUBERROR + 4, true), 16);
          const data: string[] = [];
          for (let i = 0; i < ndata; i++) data.push(hex(rv.getBigUint64(sys.KVM_RUN_INTERNAL_SUBERROR + 8 + i * 8, true)));
          this.fatal("vcpu internal error", reason, {
            suberror: rv.getUint32(sys.KVM_RUN_INTERNAL_SUBERROR, true),
            data: data.join(","),
          });
          return;
        }
        case sys.KVM_EXIT_FAIL_ENTRY:
          this.fatal("vcpu entry failed", reason, {
            hardware_entry_failure_reason: hex(rv.getBigUint64(sys.KVM_RUN_FAIL_ENTRY_REASON, true)),
          });
          return;
        default:
          this.fatal("vcpu exit vmemd does not handle", reason, {});
          return;
      }
    }
  }

  /**
   * An instruction the host's KVM could not emulate (software-nested KVMs lack a few) that
   * vmemd can complete itself: INT3 becomes the #BP it raises, RIP past it, as the CPU does
   * (Linux runs one at boot to test its handler); FWAIT, with no x87 exception ever pending
   * in a guest that uses none, does nothing but move RIP on. False for any other failure.
   */
  private emulateMissing(rv: DataView): boolean {
    const base = sys.KVM_RUN_INTERNAL_SUBERROR;
    if (rv.getUint32(base, true) !== sys.KVM_INTERNAL_ERROR_EMULATION) return false;
    // emulation_failure: suberror, ndata, u64 flags, u8 insn_size, u8 insn_bytes[15].
    if ((Number(rv.getBigUint64(base + 8, true)) & sys.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) === 0) return false;
    if (rv.getUint8(base + 16) < 1) return false;
    const opcode = rv.getUint8(base + 17);
    if (opcode !== INT3 && opcode !== FWAIT) return false;
    const regs = new DataView(new ArrayBuffer(sys.KVM_REGS_SIZE));
    sys.ioctl(this.vcpuFd, sys.KVM_GET_REGS, regs, "KVM_GET_REGS");
    const rip = regs.getBigUint64(sys.KVM_REGS.rip, true);
    regs.setBigUint64(sys.KVM_REGS.rip, rip + 1n, true);
    sys.ioctl(this.vcpuFd, sys.KVM_SET_REGS, regs, "KVM_SET_REGS");
    if (opcode === INT3) {
      const ev = new DataView(new ArrayBuffer(sys.VCPU_EVENTS_SIZE));
      sys.ioctl(this.vcpuFd, sys.KVM_GET_VCPU_EVENTS, ev, "KVM_GET_VCPU_EVENTS");
      ev.setUint8(sys.VCPU_EVENTS.exceptionInjected, 1);
      ev.setUint8(sys.VCPU_EVENTS.exceptionNr, 3); // #BP
      ev.setUint8(sys.VCPU_EVENTS.exceptionHasErrorCode, 0);
      ev.setUint8(sys.VCPU_EVENTS.exceptionPending, 0);
      ev.setUint32(sys.VCPU_EVENTS.flags, 0, true); // leave NMI, SIPI, SMM and the rest as they are
      sys.ioctl(this.vcpuFd, sys.KVM_SET_VCPU_EVENTS, ev, "KVM_SET_VCPU_EVENTS");
    }
    if (this.emulated++ === 0) {
      this.message({ level: "info", msg: "vcpu: completing instructions the host's KVM cannot emulate (INT3, FWAIT)", fields: { rip: hex(rip), opcode: hex(opcode) } });
    }
    return true;
  }
  private emulated = 0;

  private fatal(msg: string, reason: number, fields: Record<string, unknown>): void {
    this.message({ level: "error", msg, fields: { exit_reason: reason, ...fields, ...this.registers(), exits: this.cnt[Cnt.EXITS] } });
    this.setState(VcpuStateCode.stopped);
  }

  /** One KVM_EXIT_IO; true when the run loop must end (exit request). */
  private io(run: Uint8Array, rv: DataView): boolean {
    const dir = run[sys.KVM_RUN_IO_DIRECTION]!;
    const size = run[sys.KVM_RUN_IO_SIZE]!;
    const port = rv.getUint16(sys.KVM_RUN_IO_PORT, true);
    const count = rv.getUint32(sys.KVM_RUN_IO_COUNT, true);
    const off = Number(rv.getBigUint64(sys.KVM_RUN_IO_DATA_OFFSET, true));
    if (this.uart !== null) return this.linuxIo(run, dir, size, port, count, off);
    if (dir === KVM_EXIT_IO_IN) {
      // All ones, except the serial line status register, which says "ready".
      run.fill(0xff, off, off + size * count);
      if (port === PORT_SERIAL_LSR) for (let i = 0; i < count; i++) run[off + i * size] = LSR_IDLE;
      return false;
    }
    if (port === PORT_SERIAL) {
      for (let i = 0; i < count; i++) this.serialByte(run[off + i * size]!);
      return false;
    }
    if (port === PORT_EXIT) {
      this.requestExit("guest asked vmemd to exit", run[off]!);
      return true;
    }
    return false;
  }

  /** Port I/O of a Linux guest: COM1, the CMOS clock, the i8042's reset, port 0xF4 as above. */
  private linuxIo(run: Uint8Array, dir: number, size: number, port: number, count: number, off: number): boolean {
    const uart = this.uart!;
    for (let i = 0; i < count; i++) {
      const at = off + i * size;
      if (dir === KVM_EXIT_IO_IN) {
        run.fill(0xff, at, at + size);
        if (port >= COM1 && port < COM1 + 8) run[at] = uart.read(port - COM1);
        else if (port === PORT_CMOS_DATA) run[at] = 0;
        else if (port === PORT_I8042_COMMAND) run[at] = 0; // buffers empty
        continue;
      }
      if (port >= COM1 && port < COM1 + 8) uart.write(port - COM1, run[at]!);
      else if (port === PORT_I8042_COMMAND && run[at] === I8042_RESET) {
        this.requestExit("guest reset (i8042)", 0);
        return true;
      } else if (port === PORT_EXIT) {
        this.requestExit("guest asked vmemd to exit", run[at]!);
        return true;
      }
    }
    return false;
  }

  /** After the loop: wait (blocking) until main is done kicking, then release everything. */
  finish(): void {
    this.sh.set(Ctl.LOOP_DONE, 1);
    this.notify();
    while (Atomics.load(this.ctl, Ctl.RELEASE) === 0) Atomics.wait(this.ctl, Ctl.RELEASE, 0, 1000);
    this.sh.set(Ctl.MAPPED, 0);
    if (this.runAddr !== 0) {
      try {
        sys.munmap(this.runAddr, this.init.mmapSize);
      } catch {}
      this.runAddr = 0;
      this.run = null;
      this.rv = null;
    }
    if (this.vcpuFd !== -1) {
      try {
        sys.close(this.vcpuFd);
      } catch {}
      this.vcpuFd = -1;
    }
    this.sh.set(Ctl.CLOSED, 1);
    this.notify();
  }

  main(): void {
    this.sh.set(Ctl.TID, sys.gettid());
    try {
      // The signals serve handles (SIGTERM, SIGINT, SIGHUP...) go to the main thread, never to this one.
      sys.blockSignals(this.init.blockSignals);
      this.setup();
      this.loop();
    } catch (e) {
      this.message({ level: "error", msg: "vcpu failed", fields: { error: String(e) } });
      this.setState(VcpuStateCode.stopped);
    } finally {
      this.finish();
    }
  }
}

self.onmessage = (e: MessageEvent<VcpuInit>) => {
  new VcpuThread(e.data).main();
};
