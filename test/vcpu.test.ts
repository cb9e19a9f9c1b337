// The vCPU runner on real /dev/kvm, in process: KvmVm + Vcpu (a Worker) + the test
// guests of test/guest/. The guest's mailbox page is registered straight on the VM.
import { afterEach, describe, expect, test } from "bun:test";
import { mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as sys from "../src/sys";
import { KvmVm, MemoryMapping, MiB } from "../src/kvm";
import { BOOT_IMAGE_MAX } from "../src/kvm/boot";
import { Vcpu, type VcpuMessage, vcpuWorkerPath } from "../src/kvm/vcpu";
import { attachGuest } from "../src/cli/guest";
import { RegionState, SystemAllocator } from "../src/memory";
import { DEFAULT_SERVER_OPTIONS, Logger, Server } from "../src/server";
import { fdCount, requireKvm } from "./helpers";

const GUEST_DIR = join(import.meta.dir, "guest");
const image = (name: string) => readFileSync(join(GUEST_DIR, name));

const MAILBOX = 0xf000_0000;
const BOOT_MAGIC = 0x4d454d56;
const BANNER = "vmemd-test-guest: ready\n";
const Op = { read32: 1, read64: 2, write32: 3, write64: 4, fill: 5, print: 6, exit: 7, hlt: 8 } as const;
const UNMAPPED = 0xe000_0000; // in the low MMIO pool: no memory slot there

interface Cmd {
  op: number;
  addr?: number;
  value?: bigint;
  result?: bigint;
}

const nap = new Int32Array(new SharedArrayBuffer(4));
/** Sleeps ~250 µs (blocking): the host must not spin against the vCPU on 2 cores. */
function napShort(): void {
  Atomics.wait(nap, 0, 0, 0.25);
}

/** One VM, one vCPU, the serial output and log records it produced, and the mailbox once registered. */
class Harness {
  serial = "";
  messages: VcpuMessage[] = [];
  states: string[] = [];
  exitRequests: number[] = [];
  bannerAt = 0;
  mailbox: DataView | null = null;
  private seq = 0;
  readonly vcpu: Vcpu;

  private constructor(
    readonly vm: KvmVm,
    img: Uint8Array,
  ) {
    const decoder = new TextDecoder();
    this.vcpu = Vcpu.start(vm, img, {
      onSerial: (b) => {
        this.serial += decoder.decode(b);
        if (this.bannerAt === 0 && this.serial.includes("\n")) this.bannerAt = performance.now();
      },
      onMessage: (m) => this.messages.push(m),
      onState: (s) => this.states.push(s),
      onExitRequest: (s) => this.exitRequests.push(s),
    });
  }

  static start(name = "guest.bin", memory = 64 * MiB): Harness {
    requireKvm();
    const vm = KvmVm.create({ memory });
    try {
      const h = new Harness(vm, image(name));
      live.push(h);
      return h;
    } catch (e) {
      vm.close();
      throw e;
    }
  }

  /** Services the vCPU's reports until `cond` holds; sleeps 1 ms between looks. */
  async until(cond: () => boolean, what: string, timeoutMs = 5000): Promise<void> {
    const end = performance.now() + timeoutMs;
    for (;;) {
      this.vcpu.service();
      if (cond()) return;
      if (performance.now() > end) {
        throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}; state=${this.vcpu.state} serial=${JSON.stringify(this.serial)} messages=${JSON.stringify(this.messages)}`);
      }
      await Bun.sleep(1);
    }
  }

  /** Registers the 4 KiB mailbox page (a memfd) at GPA 0xF0000000 and waits for the guest to see it. */
  async registerMailbox(): Promise<void> {
    const fd = sys.memfdCreate("mailbox");
    try {
      sys.ftruncate(fd, 4096);
      const mapping = MemoryMapping.fromDescriptor(fd, 0, 4096, sys.PROT_READ | sys.PROT_WRITE);
      this.vm.addMemoryRegion(MAILBOX, mapping, false, "CacheCoherent");
      const v = mapping.view();
      this.mailbox = new DataView(v.buffer, v.byteOffset, 4096);
    } finally {
      sys.close(fd);
    }
    await this.until(() => this.mailbox!.getUint32(0xc, true) === BOOT_MAGIC, "boot_magic in the mailbox");
  }

  /** Posts a batch and waits for the guest's ack (sleeping ~250 µs between looks); returns the commands as the guest left them. */
  run(cmds: Cmd[], timeoutMs = 5000): Cmd[] & { statuses: number[] } {
    const mb = this.mailbox!;
    cmds.forEach((c, i) => {
      const o = 0x40 + i * 32;
      mb.setUint32(o, c.op, true);
      mb.setUint32(o + 4, 0xeeee, true);
      mb.setBigUint64(o + 8, BigInt(c.addr ?? 0), true);
      mb.setBigUint64(o + 16, c.value ?? 0n, true);
      mb.setBigUint64(o + 24, c.result ?? 0n, true);
    });
    mb.setUint32(8, cmds.length, true);
    const seq = ++this.seq;
    const words = new Int32Array(mb.buffer, mb.byteOffset, 4);
    Atomics.store(words, 0, seq); // after the commands
    const end = performance.now() + timeoutMs;
    while (Atomics.load(words, 1) !== seq) {
      if (performance.now() > end) throw new Error(`guest did not ack batch ${seq}; state=${this.vcpu.state}`);
      napShort();
    }
    const out = cmds.map((c, i) => ({ ...c, result: mb.getBigUint64(0x40 + i * 32 + 24, true) })) as Cmd[] & { statuses: number[] };
    out.statuses = cmds.map((_, i) => mb.getUint32(0x40 + i * 32 + 4, true));
    return out;
  }

  /** Posts a batch and does not wait for an ack (for commands after which the guest stops). */
  post(cmds: Cmd[]): void {
    const mb = this.mailbox!;
    cmds.forEach((c, i) => {
      const o = 0x40 + i * 32;
      mb.setUint32(o, c.op, true);
      mb.setBigUint64(o + 8, BigInt(c.addr ?? 0), true);
      mb.setBigUint64(o + 16, c.value ?? 0n, true);
    });
    mb.setUint32(8, cmds.length, true);
    Atomics.store(new Int32Array(mb.buffer, mb.byteOffset, 4), 0, ++this.seq);
  }

  ram(gpa: number, size: number): DataView {
    const host = this.vm.ramHostAddress(gpa, size)!;
    const v = sys.memoryView(host, size);
    return new DataView(v.buffer, v.byteOffset, size);
  }

  async close(): Promise<void> {
    await this.vcpu.stop();
    this.vm.close();
  }
}

const live: Harness[] = [];
afterEach(async () => {
  for (const h of live.splice(0)) await h.close();
});

/** Descriptors of this process that are KVM vCPUs. */
function vcpuFds(): number {
  let n = 0;
  for (const fd of readdirSync("/proc/self/fd")) {
    try {
      if (readlinkSync(`/proc/self/fd/${fd}`).includes("kvm-vcpu")) n++;
    } catch {}
  }
  return n;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

describe("vCPU runner (boot contract, real KVM)", () => {
  test("the worker entry resolves from source", () => {
    expect(vcpuWorkerPath()).toEndWith("/src/kvm/vcpu_worker.ts");
  });

  test("guest.bin prints its banner; vCPU thread is a Worker with SIGINT/SIGTERM blocked", async () => {
    const h = Harness.start();
    await h.until(() => h.serial === BANNER, "the banner");
    const bootMs = h.bannerAt - h.vcpu.startedAt;
    console.log(`boot to banner: ${bootMs.toFixed(1)} ms`);
    expect(bootMs).toBeLessThan(2000);
    expect(h.vcpu.state).toBe("running");
    expect(h.states[0]).toBe("running");
    const tid = h.vcpu.tid;
    expect(tid).toBeGreaterThan(0);
    expect(tid).not.toBe(sys.gettid());
    const blocked = sys.blockedSignals(tid);
    expect(blocked).toContain(sys.SIGINT);
    expect(blocked).toContain(sys.SIGTERM);
    expect(sys.blockedSignals(sys.gettid())).not.toContain(sys.SIGTERM);
    // 24 banner bytes, one OUT exit each.
    expect(h.vcpu.ioExits).toBe(BANNER.length);
  });

  test("unmapped MMIO reads return all ones and are counted, before and after the mailbox exists", async () => {
    const h = Harness.start();
    await h.until(() => h.vcpu.summary().mmio_reads > 100, "the guest polling the unmapped mailbox");
    const s0 = h.vcpu.summary();
    expect(s0.mmio_writes).toBe(0);
    expect(s0.exits).toBeGreaterThanOrEqual(s0.mmio_reads + BANNER.length);
    await h.registerMailbox();
    // The guest now polls RAM: no more exits while it idles.
    const idle = h.vcpu.summary();
    await Bun.sleep(50);
    expect(h.vcpu.summary().exits).toBe(idle.exits);

    const r = h.run([
      { op: Op.read32, addr: UNMAPPED },
      { op: Op.read64, addr: UNMAPPED + 8 },
      { op: Op.write32, addr: UNMAPPED, value: 1n },
      { op: Op.write64, addr: UNMAPPED + 8, value: 2n },
    ]);
    expect(r[0]!.result).toBe(0xffff_ffffn);
    expect(r[1]!.result).toBe(0xffff_ffff_ffff_ffffn);
    expect(r.statuses).toEqual([0, 0, 0, 0]);
    const s1 = h.vcpu.summary();
    expect(s1.mmio_reads - idle.mmio_reads).toBe(2);
    expect(s1.mmio_writes - idle.mmio_writes).toBe(2);
    expect(s1.exits - idle.exits).toBe(4);
    expect(s1.state).toBe("running");
  });

  test("read and write commands see guest RAM, a read-only slot ignores writes, print reaches serial", async () => {
    const h = Harness.start();
    await h.registerMailbox();
    const ram = h.ram(0x50_0000, 4096);
    ram.setBigUint64(0, 0x1122_3344_5566_7788n, true);
    const r = h.run([
      { op: Op.read32, addr: 0x50_0000 },
      { op: Op.read64, addr: 0x50_0000 },
      { op: Op.write32, addr: 0x50_0010, value: 0xdead_beefn },
      { op: Op.write64, addr: 0x50_0018, value: 0x0102_0304_0506_0708n },
      { op: Op.fill, addr: 0x50_0100, value: 0xababn, result: 64n },
      { op: Op.print, value: 0xfeed_f00d_1234n },
      { op: 99 },
    ]);
    expect(r[0]!.result).toBe(0x5566_7788n);
    expect(r[1]!.result).toBe(0x1122_3344_5566_7788n);
    expect(ram.getUint32(0x10, true)).toBe(0xdead_beef);
    expect(ram.getBigUint64(0x18, true)).toBe(0x0102_0304_0506_0708n);
    for (let i = 0; i < 8; i++) expect(ram.getBigUint64(0x100 + i * 8, true)).toBe(0xababn);
    expect(ram.getBigUint64(0x140, true)).toBe(0n);
    expect(r.statuses).toEqual([0, 0, 0, 0, 0, 0, 1]);
    await h.until(() => h.serial.endsWith("0000feedf00d1234\n"), "the printed value");

    // A read-only slot: reads come from the memfd, writes are MMIO exits and are dropped.
    const fd = sys.memfdCreate("ro");
    sys.ftruncate(fd, 4096);
    sys.pwriteAll(fd, new Uint8Array(new BigUint64Array([0xc0ffeen]).buffer), 0);
    h.vm.addMemoryRegion(0x1_0000_0000 + 64 * MiB, MemoryMapping.fromDescriptor(fd, 0, 4096, sys.PROT_READ), true, "CacheCoherent");
    sys.close(fd);
    const before = h.vcpu.summary();
    const ro = h.run([
      { op: Op.write64, addr: 0x1_0000_0000 + 64 * MiB, value: 7n },
      { op: Op.read64, addr: 0x1_0000_0000 + 64 * MiB },
    ]);
    expect(ro[1]!.result).toBe(0xc0ffeen);
    expect(h.vcpu.summary().mmio_writes - before.mmio_writes).toBe(1);
  });

  test("mailbox round trip (host sleeping ~250 µs between looks)", async () => {
    const h = Harness.start();
    await h.registerMailbox();
    const times: number[] = [];
    for (let i = 0; i < 200; i++) {
      const t = performance.now();
      h.run([{ op: Op.read64, addr: 0x50_0000 }]);
      times.push(performance.now() - t);
    }
    const t100 = performance.now();
    h.run(Array.from({ length: 100 }, (_, i) => ({ op: Op.read64, addr: 0x50_0000 + i * 8 })));
    const batch100 = performance.now() - t100;
    console.log(`mailbox round trip: median ${(median(times) * 1000).toFixed(0)} µs, max ${(Math.max(...times) * 1000).toFixed(0)} µs; 100-command batch ${batch100.toFixed(2)} ms`);
    expect(median(times)).toBeLessThan(20);
  });

  test("port 0xF4 asks the main thread to exit with that status; the vCPU stops", async () => {
    const h = Harness.start();
    await h.registerMailbox();
    h.post([{ op: Op.exit, value: 0x12an }]);
    await h.until(() => h.exitRequests.length > 0, "the exit request");
    expect(h.exitRequests).toEqual([0x2a]);
    expect(h.vcpu.exitStatus).toBe(0x2a);
    await h.until(() => h.vcpu.state === "stopped", "state stopped");
    h.vcpu.service();
    expect(h.exitRequests).toEqual([0x2a]); // reported once
    expect(h.messages.some((m) => m.msg.includes("exit"))).toBe(true);
  });

  test("HLT halts the vCPU; stop() then releases it", async () => {
    const h = Harness.start();
    await h.registerMailbox();
    h.post([{ op: Op.hlt }]);
    await h.until(() => h.vcpu.summary().state === "halted", "state halted");
    // The record travels by postMessage, after the shared state word: wait for it, do not race it.
    await h.until(() => h.messages.some((m) => m.msg === "vcpu halted"), "the halted record");
    const exits = h.vcpu.summary().exits;
    await Bun.sleep(30);
    expect(h.vcpu.summary().exits).toBe(exits); // not re-entered
    const t = performance.now();
    await h.vcpu.stop();
    expect(performance.now() - t).toBeLessThan(500);
  });

  test("triple.bin: SHUTDOWN is logged with registers, the vCPU stops, the process goes on", async () => {
    const h = Harness.start("triple.bin");
    await h.until(() => h.vcpu.state === "stopped", "state stopped");
    await h.until(() => h.messages.length > 0, "the shutdown record");
    expect(h.serial).toBe("triple\n");
    const m = h.messages.find((x) => x.msg.includes("shutdown"))!;
    expect(m.level).toBe("error");
    expect(m.fields!.exit_reason).toBe(sys.KVM_EXIT_SHUTDOWN);
    expect(m.fields!.rip).toMatch(/^0x10[0-9a-f]{4}$/);
    expect(m.fields!.cr3).toBe("0x9000");
    const t = performance.now();
    await h.vcpu.stop();
    expect(performance.now() - t).toBeLessThan(500);
  });

  test("spin_mmio.bin: counted MMIO exits, and stop() ends it promptly", async () => {
    const h = Harness.start("spin_mmio.bin");
    await h.until(() => h.vcpu.summary().mmio_reads > 1000, "1000 MMIO reads");
    expect(h.serial).toBe("spin\n");
    // The main thread is free meanwhile: it runs this test.
    const t = performance.now();
    await h.vcpu.stop();
    const ms = performance.now() - t;
    console.log(`stop() of a vCPU spinning on MMIO: ${ms.toFixed(1)} ms`);
    expect(ms).toBeLessThan(500);
    expect(h.vcpu.summary().state).toBe("stopped");
  });

  test("stop() while the vCPU is inside KVM_RUN (guest polling RAM: no exits) uses immediate_exit + the kick signal", async () => {
    requireKvm();
    // Bun opens a few descriptors of its own with the first Worker of a process: count from after one.
    await Harness.start("triple.bin").close();
    live.length = 0;
    const fds0 = fdCount();
    const h = Harness.start();
    await h.registerMailbox();
    expect(vcpuFds()).toBe(1);
    const e0 = h.vcpu.summary().exits;
    await Bun.sleep(50);
    expect(h.vcpu.summary().exits).toBe(e0); // in KVM_RUN all along
    const interrupts0 = h.vcpu.interrupts;
    const t = performance.now();
    await h.vcpu.stop();
    const ms = performance.now() - t;
    console.log(`stop() from inside KVM_RUN: ${ms.toFixed(1)} ms`);
    expect(ms).toBeLessThan(500);
    expect(h.vcpu.interrupts).toBeGreaterThan(interrupts0);
    expect(h.vcpu.summary().state).toBe("stopped");
    await h.vcpu.stop(); // idempotent
    expect(vcpuFds()).toBe(0); // the Worker closed its vCPU fd
    live.splice(live.indexOf(h), 1);
    h.vm.close();
    // vCPU fd, eventfd, VM: all closed. Bun opens and releases descriptors of its own for
    // Workers, asynchronously, so the count may even drop: nothing may be left over.
    for (let i = 0; i < 50 && fdCount() > fds0; i++) await Bun.sleep(10);
    expect(fdCount()).toBeLessThanOrEqual(fds0);
  });

  test("the guest image and memory size are checked before anything runs", () => {
    requireKvm();
    const vm = KvmVm.create({ memory: 2 * MiB });
    try {
      expect(() => Vcpu.start(vm, image("guest.bin"))).toThrow(/at least 4194304 bytes/);
    } finally {
      vm.close();
    }
    const vm2 = KvmVm.create({ memory: 8 * MiB });
    try {
      expect(() => Vcpu.start(vm2, new Uint8Array(BOOT_IMAGE_MAX + 1))).toThrow(/at most 1048576 bytes/);
      expect(() => Vcpu.start(vm2, new Uint8Array(0))).toThrow(/empty/);
    } finally {
      vm2.close();
    }
  });

  test("attachGuest: serial to --serial PATH, port 0xF4 ends the server loop with that status", async () => {
    requireKvm();
    const dir = mkdtempSync(join(tmpdir(), "vmemd-guest-"));
    const vm = KvmVm.create({ memory: 64 * MiB });
    const logPath = join(dir, "log");
    const logFd = sys.open(logPath, 0o1 | 0o100 | 0o1000, 0o644); // O_WRONLY|O_CREAT|O_TRUNC
    try {
      const log = new Logger("info", "text", logFd);
      const ctx = { vm, allocator: new SystemAllocator(vm.ramSize, vm.physAddrLimit), state: new RegionState() };
      const server = new Server(ctx, { ...DEFAULT_SERVER_OPTIONS, socketPath: join(dir, "sock"), log });
      const serialPath = join(dir, "serial");
      const guest = attachGuest(vm, server, { guestPath: join(GUEST_DIR, "guest.bin"), serialPath, log });
      // Register the mailbox and post "print, exit 7" once the guest is up, while the loop runs.
      const fd = sys.memfdCreate("mailbox");
      sys.ftruncate(fd, 4096);
      const mapping = MemoryMapping.fromDescriptor(fd, 0, 4096, sys.PROT_READ | sys.PROT_WRITE);
      sys.close(fd);
      vm.addMemoryRegion(MAILBOX, mapping, false, "CacheCoherent");
      const mb = new DataView(mapping.view().buffer);
      mb.setUint32(8, 2, true);
      mb.setUint32(0x40, Op.print, true);
      mb.setBigUint64(0x50, 0xabcn, true);
      mb.setUint32(0x60, Op.exit, true);
      mb.setBigUint64(0x70, 7n, true);
      Atomics.store(new Int32Array(mb.buffer, 0, 1), 0, 1);
      const code = await Promise.race([server.run(), Bun.sleep(10_000).then(() => "timeout")]);
      expect(code).toBe(3 + 7); // past vmemd's own statuses (docs/boot.md)
      expect(guest.summary().state).toBe("stopped");
      await guest.stop();
      expect(readFileSync(serialPath, "utf8")).toBe(BANNER + "0000000000000abc\n");
      const logText = readFileSync(logPath, "utf8");
      expect(logText).toContain("guest loaded");
      expect(logText).toContain("vcpu running");
      expect(logText).toContain("guest asked vmemd to exit");
      expect(logText).toContain("vcpu stopped");
    } finally {
      sys.close(logFd);
      vm.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
