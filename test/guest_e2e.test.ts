// The guest is the final judge: every request goes through dist/vmemd's socket and is
// checked from inside a real guest on the real vCPU (test/guest/guest.bin).
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { join } from "node:path";
import * as sys from "../src/sys";
import { JSON_ENCODING, MSGPACK, VmemClient, type Encoding } from "../src/client";
import { closeAll, memfd, requireKvm } from "./helpers";
import { BOOT_MAGIC, guestRamBlocks, Mailbox, Op, SharedPage } from "./mailbox";
import { BINARY, requireBinary, VmemdProcess } from "./server_harness";

const GUEST = join(import.meta.dir, "guest", "guest.bin");
const BAR = { PciBar: { bus: 0, dev: 5, func: 0, bar: 2 } };
const DEV = 0x1_0000_0000; // device memory goes above 4 GiB (RAM is 64 MiB)
const ONES32 = 0xffff_ffff;

let server: VmemdProcess;
let client: VmemClient;
let mailbox: Mailbox;


function vcpu() {
  return client.getState().vcpu!;
}

// Every guest-visible check, once per encoding: what crosvm's JSON asks for must land exactly
// as what MessagePack asks for.
for (const enc of [MSGPACK, JSON_ENCODING] as Encoding[]) describe(`a guest on the real vCPU judges each request (${enc === MSGPACK ? "MessagePack" : "JSON"})`, () => {
  beforeAll(async () => {
    server = await VmemdProcess.start(["--memory", "64M", "--pci-bar", "00:05.0/2=2M", "--guest", GUEST]);
    client = VmemClient.connect(server.socket, enc);
    mailbox = Mailbox.register(client);
    // The first batch also proves the guest found its mailbox.
    await mailbox.run([{ op: Op.print, addr: 0, value: 0x1234abcd }]);
    expect(mailbox.bootMagic).toBe(BOOT_MAGIC);
  });
  afterAll(async () => {
    mailbox?.close();
    client?.close();
    expect(await server.stop()).toBe(0);
  });

  test("the guest's serial output shows up in vmemd's output", async () => {
    // Until the whole line is in: the serial bytes reach us as they come, not a line at a time.
    for (let i = 0; i < 100 && !server.stdout.includes("000000001234abcd\n"); i++) await Bun.sleep(10);
    expect(server.stdout).toContain("vmemd-test-guest: ready\n");
    expect(server.stdout).toContain("000000001234abcd\n");
    expect(vcpu().state).toBe("running");
  });

  test("RegisterMemory read-write: the guest reads what the device wrote, the device sees what the guest wrote", async () => {
    const page = new SharedPage(8192);
    page.view.setUint32(0, 0xcafef00d, true);
    page.view.setBigUint64(4096, 0x0123_4567_89ab_cdefn, true);
    client.registerMemory({ SharedMemory: { descriptor: page.fd, size: 8192 } }, { GuestPhysicalAddress: DEV });
    const [a, b] = await mailbox.run([
      { op: Op.read32, addr: DEV },
      { op: Op.read64, addr: DEV + 4096 },
      { op: Op.write32, addr: DEV + 16, value: 0x5eed5eed },
    ]);
    expect(Number(a)).toBe(0xcafef00d);
    expect(b).toBe(0x0123_4567_89ab_cdefn);
    expect(page.view.getUint32(16, true)).toBe(0x5eed5eed);
    // UnregisterMemory: the guest reads all ones there afterwards.
    client.unregisterMemory(DEV);
    expect(await mailbox.read32(DEV)).toBe(ONES32);
    expect(await mailbox.read64(DEV + 4096)).toBe(0xffff_ffff_ffff_ffffn);
    page.close();
  });

  test("read-only: guest writes do not land, and reach vmemd as MMIO writes", async () => {
    const page = new SharedPage(4096);
    page.view.setUint32(0, 0x11111111, true);
    client.registerMemory({ SharedMemory: { descriptor: page.fd, size: 4096 } }, { GuestPhysicalAddress: DEV }, { read: true, write: false });
    const writesBefore = Number(vcpu().mmio_writes);
    const [, after] = await mailbox.run([
      { op: Op.write32, addr: DEV, value: 0x22222222 },
      { op: Op.read32, addr: DEV },
    ]);
    expect(Number(after)).toBe(0x11111111);
    expect(page.view.getUint32(0, true)).toBe(0x11111111);
    expect(Number(vcpu().mmio_writes)).toBe(writesBefore + 1);
    client.unregisterMemory(DEV);
    page.close();
  });

  test("PrepareSharedMemoryRegion + ExistingAllocation: the mapping at BAR+offset, zeros elsewhere, zeros again after unregister", async () => {
    const bar = client.getState().allocations.find((a) => typeof a.alloc === "object" && "PciBar" in a.alloc)!;
    const start = Number(bar.start);
    client.prepareSharedMemoryRegion(BAR);
    expect(await mailbox.read32(start + 0x10000)).toBe(0); // the empty arena reads zeros
    const page = new SharedPage(4096);
    page.view.setUint32(8, 0xbeefbeef, true);
    const r = client.registerMemory({ SharedMemory: { descriptor: page.fd, size: 4096 } }, { ExistingAllocation: { allocation: BAR, offset: 0x10000 } });
    expect(Number(r.region_id)).toBe(start + 0x10000);
    const [at, before, after, first] = await mailbox.run([
      { op: Op.read32, addr: start + 0x10008 },
      { op: Op.read32, addr: start + 0x10000 - 4 },
      { op: Op.read32, addr: start + 0x11000 },
      { op: Op.read32, addr: start },
    ]);
    expect([Number(at), Number(before), Number(after), Number(first)]).toEqual([0xbeefbeef, 0, 0, 0]);
    client.unregisterMemory(r.region_id);
    expect(await mailbox.read32(start + 0x10008)).toBe(0);
    page.close();
  });

  test("MmapAndRegisterMemory: the guest sees each file at its offset", async () => {
    const shm = memfd(4 * 4096, () => 0xee);
    const f1 = memfd(4096, () => 0x11);
    const f2 = memfd(2 * 4096, (i) => (i < 4096 ? 0x22 : 0x33));
    const r = client.mmapAndRegisterMemory({ descriptor: shm, size: 4 * 4096 }, { GuestPhysicalAddress: DEV }, [
      { file: f1, length: 4096, mem_offset: 4096, file_offset: 0 },
      { file: f2, length: 4096, mem_offset: 3 * 4096, file_offset: 4096 },
    ]);
    const got = await mailbox.run([0, 1, 2, 3].map((p) => ({ op: Op.read32, addr: DEV + p * 4096 })));
    expect(got.map(Number)).toEqual([0xeeeeeeee, 0x11111111, 0xeeeeeeee, 0x33333333]);
    client.unregisterMemory(r.region_id);
    closeAll([shm, f1, f2]);
  });

  test("IoEventRaw: a matching write signals the eventfd in the kernel, another value does not, nothing after unregister", async () => {
    const addr = 0xe000_1000;
    const ev = sys.eventfd();
    client.ioEvent(ev, addr, { U32: 0x1234 }, true);
    const writes0 = Number(vcpu().mmio_writes);
    await mailbox.run([{ op: Op.write32, addr, value: 0x1234 }]);
    expect(sys.readCounter(ev)).toBe(1n);
    expect(Number(vcpu().mmio_writes)).toBe(writes0); // handled in the kernel: no exit reached vmemd
    await mailbox.run([{ op: Op.write32, addr, value: 0x9999 }]);
    expect(sys.readCounter(ev)).toBe(0n);
    expect(Number(vcpu().mmio_writes)).toBe(writes0 + 1);
    client.ioEvent(ev, addr, { U32: 0x1234 }, false);
    await mailbox.run([{ op: Op.write32, addr, value: 0x1234 }]);
    expect(sys.readCounter(ev)).toBe(0n);
    expect(Number(vcpu().mmio_writes)).toBe(writes0 + 2);
    sys.close(ev);
  });

  test("DynamicallyFreeMemoryRanges: the guest reads zeros where it had written, and the RAM memfd's blocks drop", async () => {
    const at = 8 << 20;
    const size = 1 << 20;
    await mailbox.run([{ op: Op.fill, addr: at, value: 0x5a5a5a5a5a5a5a5an, length: size }], 60_000);
    expect(await mailbox.read64(at + size - 8)).toBe(0x5a5a5a5a5a5a5a5an);
    const before = guestRamBlocks(server.pid);
    client.freeMemoryRanges([[at, size]]);
    const after = guestRamBlocks(server.pid);
    expect(before - after).toBeGreaterThanOrEqual(size / 512);
    const [a, b] = await mailbox.run([
      { op: Op.read64, addr: at },
      { op: Op.read64, addr: at + size - 8 },
    ]);
    expect([a, b]).toEqual([0n, 0n]);
  });

  test("unmapped MMIO reads are all ones and counted in GetState", async () => {
    const reads0 = Number(vcpu().mmio_reads);
    expect(await mailbox.read32(0xe800_0000)).toBe(ONES32);
    expect(Number(vcpu().mmio_reads)).toBeGreaterThan(reads0);
  });
});

describe("a faulty guest does not stop vmemd", () => {
  for (const [name, file, expected] of [
    ["a triple fault", "triple.bin", "stopped"],
    ["a guest spinning on unmapped MMIO", "spin_mmio.bin", "running"],
  ] as const) {
    test(`${name}: requests are still answered, SIGTERM still exits 0`, async () => {
      const s = await VmemdProcess.start(["--memory", "16M", "--guest", join(import.meta.dir, "guest", file)]);
      try {
        const c = s.connect();
        const fd = memfd(4096);
        for (let i = 0; i < 50; i++) {
          c.registerMemory({ SharedMemory: { descriptor: fd, size: 4096 } }, { GuestPhysicalAddress: DEV });
          c.unregisterMemory(DEV);
        }
        let st = c.getState();
        for (let i = 0; i < 100 && st.vcpu!.state !== expected; i++) {
          await Bun.sleep(10);
          st = c.getState();
        }
        expect(st.vcpu!.state).toBe(expected);
        if (file === "spin_mmio.bin") expect(Number(st.vcpu!.mmio_reads)).toBeGreaterThan(100);
        c.close();
        sys.close(fd);
      } finally {
        expect(await s.stop()).toBe(0);
      }
      if (file === "triple.bin") expect(s.stderr).toMatch(/shutdown|triple/i);
    });
  }

  test("a guest written from docs/boot.md alone (hand-assembled here) runs unchanged", async () => {
    // mov dx, 0x3f8; mov al, 'Z'; out dx, al; mov al, 5; out 0xf4, al; hlt
    requireKvm();
    requireBinary();
    const code = new Uint8Array([0x66, 0xba, 0xf8, 0x03, 0xb0, 0x5a, 0xee, 0xb0, 0x05, 0xe6, 0xf4, 0xf4]);
    const { mkdtempSync, writeFileSync, rmSync } = await import("node:fs");
    const dir = mkdtempSync("/tmp/vmemd-guest-");
    writeFileSync(`${dir}/tiny.bin`, code);
    try {
      // Spawned directly: the guest may be done before the socket is even there.
      const p = Bun.spawn([BINARY, "serve", "--socket", `${dir}/s.sock`, "--memory", "8M", "--guest", `${dir}/tiny.bin`], { stdout: "pipe", stderr: "pipe" });
      const [out, code] = await Promise.all([new Response(p.stdout).text(), p.exited]);
      expect(code).toBe(3 + 5); // docs/boot.md: past vmemd's own 0, 1 and 2
      expect(out).toBe("Z");
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  for (const [value, status] of [[0, 3], [7, 10], [122, 125], [200, 125]] as const) {
    test(`a guest that writes ${value} to port 0xF4 makes vmemd exit with ${status}, never one of its own statuses`, async () => {
      const s = await VmemdProcess.start(["--memory", "16M", "--guest", GUEST]);
      const c = s.connect();
      const mb = Mailbox.register(c);
      void mb.run([{ op: Op.exit, addr: 0, value }]).catch(() => {});
      expect(await s.proc.exited).toBe(status);
      expect(s.stderr).toContain(`guest asked vmemd to exit status=${value}`);
      mb.close();
      c.close();
      await s.stop();
    });
  }
});
