// The test side of test/guest/guest.bin's mailbox (test/guest/README.md): a 4 KiB
// memfd this process maps and registers at GPA 0xF000_0000 through vmemd.
import * as sys from "../src/sys";
import type { VmemClient } from "../src/client";

export const MAILBOX_GPA = 0xf000_0000;
export const BOOT_MAGIC = 0x4d454d56;

export const Op = { read32: 1, read64: 2, write32: 3, write64: 4, fill: 5, print: 6, exit: 7, hlt: 8, irqOn: 9, out8: 10, irqOff: 11 } as const;
/** Where the guest counts interrupts: a u32 per vector from IRQ_FIRST, in the mailbox page. */
export const IRQ_COUNTS = 0xd00;
export const IRQ_FIRST = 0x20;
export interface Command {
  op: number;
  addr: number | bigint;
  value?: number | bigint;
  /** For fill: the length in bytes. */
  length?: number;
}

export class Mailbox {
  private seq = 0;
  private closed = false;
  private readonly view: DataView;

  private constructor(
    readonly fd: number,
    private readonly addr: number,
  ) {
    this.view = new DataView(sys.memoryView(addr, 4096).buffer);
  }

  /** Creates the page and registers it with vmemd; the guest finds it on its next poll. */
  static register(client: VmemClient): Mailbox {
    const fd = sys.memfdCreate("mailbox");
    sys.ftruncate(fd, 4096);
    const addr = sys.mmap(0, 4096, sys.PROT_READ | sys.PROT_WRITE, sys.MAP_SHARED, fd, 0);
    client.registerMemory({ SharedMemory: { descriptor: fd, size: 4096 } }, { GuestPhysicalAddress: MAILBOX_GPA });
    return new Mailbox(fd, addr);
  }

  /** Interrupts the guest has taken on `vector` (op irqOn counts them here). */
  irqCount(vector: number): number {
    return this.view.getUint32(IRQ_COUNTS + 4 * (vector - IRQ_FIRST), true);
  }

  get bootMagic(): number {
    return this.view.getUint32(0x0c, true);
  }

  /** Posts a batch and waits (sleeping, never spinning) for the guest's ack; returns each result. */
  async run(cmds: Command[], timeoutMs = 20_000): Promise<bigint[]> {
    if (cmds.length > 100) throw new Error("at most 100 commands per batch");
    const v = this.view;
    cmds.forEach((c, i) => {
      const o = 0x40 + i * 32;
      v.setUint32(o, c.op, true);
      v.setUint32(o + 4, 0xffff_ffff, true);
      v.setBigUint64(o + 8, BigInt(c.addr), true);
      v.setBigUint64(o + 16, BigInt(c.value ?? 0), true);
      v.setBigUint64(o + 24, BigInt(c.length ?? 0), true);
    });
    v.setUint32(0x08, cmds.length, true);
    const seq = ++this.seq;
    v.setUint32(0x00, seq, true);
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      // After close() the page is unmapped: never touch it again.
      if (this.closed) throw new Error(`mailbox closed while batch ${seq} was pending`);
      if (v.getUint32(0x04, true) === seq) break;
      if (Date.now() > deadline) throw new Error(`the guest did not answer batch ${seq} within ${timeoutMs} ms`);
      await Bun.sleep(0.3);
    }
    return cmds.map((_, i) => {
      const status = v.getUint32(0x40 + i * 32 + 4, true);
      if (status !== 0) throw new Error(`command ${i} failed with status ${status}`);
      return v.getBigUint64(0x40 + i * 32 + 24, true);
    });
  }

  async read32(addr: number | bigint): Promise<number> {
    return Number((await this.run([{ op: Op.read32, addr }]))[0]);
  }
  async read64(addr: number | bigint): Promise<bigint> {
    return (await this.run([{ op: Op.read64, addr }]))[0]!;
  }
  async write32(addr: number | bigint, value: number): Promise<void> {
    await this.run([{ op: Op.write32, addr, value }]);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    sys.munmap(this.addr, 4096);
    sys.close(this.fd);
  }
}

/** A mapping of a memfd in this process, to see what the guest wrote and to write for it. */
export class SharedPage {
  readonly fd: number;
  readonly addr: number;
  readonly view: DataView;
  constructor(readonly size: number, name = "device") {
    this.fd = sys.memfdCreate(name);
    sys.ftruncate(this.fd, size);
    this.addr = sys.mmap(0, size, sys.PROT_READ | sys.PROT_WRITE, sys.MAP_SHARED, this.fd, 0);
    this.view = new DataView(sys.memoryView(this.addr, size).buffer);
  }
  close(): void {
    sys.munmap(this.addr, this.size);
    sys.close(this.fd);
  }
}

/** Allocated 512-byte blocks of a running vmemd's guest RAM memfd (opened through /proc). */
export function guestRamBlocks(pid: number): number {
  const { readdirSync, readlinkSync } = require("node:fs") as typeof import("node:fs");
  for (const n of readdirSync(`/proc/${pid}/fd`)) {
    let target = "";
    try {
      target = readlinkSync(`/proc/${pid}/fd/${n}`);
    } catch {
      continue;
    }
    if (!target.includes("memfd:vmemd-guest-ram")) continue;
    const fd = sys.open(`/proc/${pid}/fd/${n}`, sys.O_RDONLY);
    try {
      return sys.fstat(fd).blocks;
    } finally {
      sys.close(fd);
    }
  }
  throw new Error(`no guest RAM memfd among /proc/${pid}/fd`);
}
