// The device plane against dist/vmemd with a guest on the real vCPU: a device maps guest
// RAM (GetGuestMemory), interrupts the guest (IrqFd, edge and level with resample) and is
// signalled by a guest `out` without an exit to vmemd (IoEventPio); what it bound is
// released, and only the users named may have guest RAM.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { join } from "node:path";
import * as sys from "../src/sys";
import { VmemClient, VmemError } from "../src/client";
import { MemoryMapping } from "../src/kvm";
import { Mailbox, Op } from "./mailbox";
import { VmemdProcess } from "./server_harness";

const GUEST = join(import.meta.dir, "guest", "guest.bin");
const IOAPIC = 0xfec0_0000; // IOREGSEL; IOWIN at +0x10
const uid = process.getuid!();

let server: VmemdProcess;
let client: VmemClient;
let mailbox: Mailbox;

beforeAll(async () => {
  server = await VmemdProcess.start(["--memory", "64M", "--guest", GUEST, "--share-guest-memory-with", String(uid), "--release-on-disconnect"]);
  client = server.connect();
  mailbox = Mailbox.register(client);
  await mailbox.run([{ op: Op.print, addr: 0, value: 1 }]);
  // The guest takes interrupts from here on (IDT, LAPIC enabled, PICs masked, sti).
  await mailbox.run([{ op: Op.irqOn, addr: 0 }]);
});
afterAll(async () => {
  mailbox?.close();
  client?.close();
  expect(await server.stop()).toBe(0);
});

/** IOAPIC redirection entry for `pin`: `vector`, fixed delivery to APIC 0, unmasked. */
async function route(pin: number, vector: number, level: boolean): Promise<void> {
  await mailbox.run([
    { op: Op.write32, addr: IOAPIC, value: 0x10 + 2 * pin + 1 },
    { op: Op.write32, addr: IOAPIC + 0x10, value: 0 },
    { op: Op.write32, addr: IOAPIC, value: 0x10 + 2 * pin },
    { op: Op.write32, addr: IOAPIC + 0x10, value: vector | (level ? 1 << 15 : 0) },
  ]);
}

async function until(what: string, f: () => boolean, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!f()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await Bun.sleep(1);
  }
}

function signal(fd: number): void {
  sys.writeCounter(fd, 1n);
}

function counter(fd: number): bigint {
  try {
    return sys.readCounter(fd);
  } catch (e) {
    if (e instanceof sys.SysError && e.errno === sys.Errno.EAGAIN) return 0n;
    throw e;
  }
}

describe("the device plane, judged by a guest", () => {
  test("GetGuestMemory: a device writes guest RAM the guest reads at the same address, and reads what the guest wrote", async () => {
    const ranges = client.getGuestMemory();
    expect(ranges).toEqual([{ guest_address: 0, size: 64 * 2 ** 20, descriptor: expect.any(Number), offset: 0 }]);
    const ram = MemoryMapping.fromDescriptor(ranges[0]!.descriptor, 0, 64 * 2 ** 20, sys.PROT_READ | sys.PROT_WRITE);
    sys.close(ranges[0]!.descriptor); // the mapping holds it
    try {
      const view = new DataView(ram.view().buffer, ram.view().byteOffset);
      const at = 0x80_0000; // 8 MiB: free guest RAM
      view.setBigUint64(at, 0x1234_5678_9abc_def0n, true);
      expect(await mailbox.read64(at)).toBe(0x1234_5678_9abc_def0n);
      await mailbox.run([{ op: Op.write64, addr: at + 8, value: 0x0fed_cba9_8765_4321n }]);
      expect(view.getBigUint64(at + 8, true)).toBe(0x0fed_cba9_8765_4321n);
    } finally {
      ram.release();
    }
  });

  test("GetGuestMemory: a peer the server does not name gets EPERM", async () => {
    const other = await VmemdProcess.start(["--memory", "16M"]);
    try {
      const c = other.connect();
      let e: unknown;
      try {
        c.getGuestMemory();
      } catch (x) {
        e = x;
      }
      expect(e).toBeInstanceOf(VmemError);
      expect((e as VmemError).code).toBe("EPERM");
      expect((e as VmemError).chain[0]).toContain("--share-guest-memory-with");
      c.close();
    } finally {
      await other.stop();
    }
  });

  test("IrqFd on an edge-triggered pin: N signals are N interrupts on the routed vector", async () => {
    const vector = 0x40;
    await route(5, vector, false);
    const ev = sys.eventfd();
    client.irqFd(ev, 5, null, true);
    const base = mailbox.irqCount(vector);
    for (let i = 1; i <= 5; i++) {
      signal(ev);
      await until(`interrupt ${i}`, () => mailbox.irqCount(vector) === base + i);
    }
    await Bun.sleep(50);
    expect(mailbox.irqCount(vector)).toBe(base + 5); // no extra ones
    client.irqFd(ev, 5, null, false);
    signal(ev);
    await Bun.sleep(50);
    expect(mailbox.irqCount(vector)).toBe(base + 5); // unregistered: the line is no longer raised
    sys.close(ev);
  });

  test("IrqFd with resample on a level-triggered pin: one interrupt per signal, the resample eventfd fires at the guest's EOI", async () => {
    const vector = 0x41;
    await route(6, vector, true);
    const ev = sys.eventfd();
    const resample = sys.eventfd();
    client.irqFd(ev, 6, resample, true);
    const base = mailbox.irqCount(vector);
    for (let i = 1; i <= 3; i++) {
      signal(ev);
      await until(`level interrupt ${i}`, () => mailbox.irqCount(vector) === base + i);
      await until(`resample ${i}`, () => counter(resample) === 1n);
    }
    await Bun.sleep(50);
    expect(mailbox.irqCount(vector)).toBe(base + 3);
    client.irqFd(ev, 6, null, false);
    sys.close(ev);
    sys.close(resample);
  });

  test("IrqFd refusals: a GSI past the IOAPIC's pins is EINVAL", () => {
    const ev = sys.eventfd();
    let e: unknown;
    try {
      client.irqFd(ev, 24, null, true);
    } catch (x) {
      e = x;
    }
    expect((e as VmemError).code).toBe("EINVAL");
    sys.close(ev);
  });

  test("IoEventPio: a guest out to the port signals the eventfd in the kernel, with no exit to vmemd", async () => {
    const ev = sys.eventfd();
    client.ioEventPio(ev, 0x600, "AnyLength", true);
    const exits = () => Number(client.getState().vcpu!.exits);
    const e0 = exits();
    await mailbox.run([{ op: Op.out8, addr: 0x600, value: 7 }]);
    expect(counter(ev)).toBe(1n);
    const e1 = exits();
    // The same out to a port nobody bound is an exit to vmemd.
    await mailbox.run([{ op: Op.out8, addr: 0x601, value: 7 }]);
    const e2 = exits();
    expect(e1 - e0).toBe(0);
    expect(e2 - e1).toBeGreaterThanOrEqual(1);
    client.ioEventPio(ev, 0x600, "AnyLength", false);
    await mailbox.run([{ op: Op.out8, addr: 0x600, value: 7 }]);
    expect(counter(ev)).toBe(0n);
    sys.close(ev);
  });

  test("what a device bound goes when it disconnects (--release-on-disconnect); descriptors back at baseline", async () => {
    const base = server.fdCount();
    const c = server.connect();
    const ev = sys.eventfd();
    c.irqFd(ev, 7, null, true);
    c.ioEventPio(ev, 0x700, "AnyLength", true);
    c.close();
    sys.close(ev);
    await server.expectFdCount(base);
    // Both are gone: registering them again works (KVM would say EEXIST otherwise).
    const ev2 = sys.eventfd();
    client.ioEventPio(ev2, 0x700, "AnyLength", true);
    client.ioEventPio(ev2, 0x700, "AnyLength", false);
    sys.close(ev2);
  });
});
