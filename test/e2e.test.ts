// End to end: dist/vmemd over its real socket, driven by VmemClient.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync } from "node:fs";
import { encode } from "@msgpack/msgpack";
import * as sys from "../src/sys";
import { encodeRequest, VmemClient, VmemError, type Packet } from "../src/client";
import type { VmMemoryResponse, VmState } from "../src/protocol";
import { closeAll, memfd } from "./helpers";
import { VmemdProcess } from "./server_harness";

const BAR = { PciBar: { bus: 0, dev: 5, func: 0, bar: 2 } };
const HIGH = 0x2_0000_0000;
const MiB = 1 << 20;

let server: VmemdProcess;
let client: VmemClient;
let baseFds: number;

beforeAll(async () => {
  server = await VmemdProcess.start(["--memory", "64M", "--pci-bar", "00:05.0/2=16M"]);
  client = server.connect();
  client.request("GetState");
  baseFds = server.fdCount();
});
afterAll(async () => {
  client?.close();
  await server?.stop();
});

function errOf(resp: VmMemoryResponse): { errno: number | null; chain: string[] } {
  if (typeof resp !== "object" || !("Err" in resp)) throw new Error(`expected Err, got ${JSON.stringify(resp, (_k, v) => (typeof v === "bigint" ? String(v) : v))}`);
  return resp.Err;
}
function expectErr(resp: VmMemoryResponse, code: keyof typeof sys.Errno): string[] {
  const e = errOf(resp);
  expect(sys.errnoName(e.errno ?? -1)).toBe(code);
  return e.chain;
}
const raw = (body: Uint8Array | number[], fds: number[] = []): Packet => ({ body: body instanceof Uint8Array ? body : new Uint8Array(body), fds });

describe("every request variant over the wire", () => {
  test("RegisterMemory and UnregisterMemory", () => {
    const fd = memfd(2 * MiB);
    const r = client.registerMemory({ SharedMemory: { descriptor: fd, size: 2 * MiB } }, { GuestPhysicalAddress: HIGH });
    expect(r).toEqual({ region_id: HIGH, slot: 1 });
    const st = client.getState();
    expect(st.regions).toContainEqual({ region_id: HIGH, slot: 1, size: 2 * MiB, read_only: false, kind: "dynamic" });
    client.unregisterMemory(HIGH);
    expect(() => client.unregisterMemory(HIGH)).toThrow(VmemError);
    sys.close(fd);
  });

  test("PrepareSharedMemoryRegion, then RegisterMemory into the BAR as a fixed mapping", () => {
    client.prepareSharedMemoryRegion(BAR);
    expectErr(client.request({ PrepareSharedMemoryRegion: { alloc: BAR, cache: "CacheCoherent" } }), "EEXIST");
    const fd = memfd(64 * 1024);
    const r = client.registerMemory({ Descriptor: { descriptor: fd, offset: 0, size: 64 * 1024 } }, { ExistingAllocation: { allocation: BAR, offset: 0x10000 } }, { read: true, write: false });
    const st = client.getState();
    const bar = st.allocations.find((a) => typeof a.alloc === "object" && "PciBar" in a.alloc)!;
    expect(r.region_id).toBe(Number(bar.start) + 0x10000);
    expect(st.regions.map((x) => x.kind).sort()).toEqual(["fixed", "prepared"]);
    client.unregisterMemory(r.region_id);
    sys.close(fd);
  });

  test("MmapAndRegisterMemory with 300 file mappings across two chunks", async () => {
    const pages = 300;
    const shm = memfd(pages * 4096);
    const files = Array.from({ length: pages }, (_, i) => memfd(4096, () => i & 0xff));
    await server.settle(); // the previous test's connection may not be closed yet
    const before = server.fdCount();
    const r = client.mmapAndRegisterMemory(
      { descriptor: shm, size: pages * 4096 },
      { GuestPhysicalAddress: HIGH },
      files.map((file, i) => ({ file, length: 4096, mem_offset: i * 4096, file_offset: 0 })),
    );
    expect(r.region_id).toBe(HIGH);
    const region = client.getState().regions.find((x) => Number(x.region_id) === HIGH)!;
    expect(region).toMatchObject({ read_only: true, kind: "dynamic", size: pages * 4096 });
    await server.expectFdCount(before); // every received descriptor closed: the mappings hold the memory
    client.unregisterMemory(HIGH);
    closeAll([shm, ...files]);
  });

  test("Dynamically{Free,Reclaim}MemoryRanges, BalloonTargetReached", () => {
    client.freeMemoryRanges([[0, MiB], [4 * MiB, 2 * MiB]]);
    client.freeMemoryRanges([[4 * MiB, MiB]]); // freed twice: counted once
    expect(client.getState().freed_bytes).toBe(3 * MiB);
    client.reclaimMemoryRanges([[0, MiB]]); // the guest may touch it again: no longer counted
    client.balloonTargetReached(123 * MiB);
    const st = client.getState();
    expect(st.freed_bytes).toBe(2 * MiB);
    expect(st.balloon_target).toBe(123 * MiB);
    expectErr(client.request({ DynamicallyFreeMemoryRanges: { ranges: [[0, MiB], [64 * MiB, 4096]] } }), "EINVAL");
    expect(client.getState().freed_bytes).toBe(2 * MiB); // all or nothing
  });

  test("IoEventRaw register and unregister", () => {
    const ev = sys.eventfd();
    client.ioEvent(ev, 0xe000_0000, { U32: 0x1234 }, true);
    expectErr(client.request({ IoEventRaw: { event: ev, addr: 0xe000_0000, datamatch: { U32: 0x1234 }, register: true } }), "EEXIST");
    client.ioEvent(ev, 0xe000_0000, { U32: 0x1234 }, false);
    sys.close(ev);
  });

  test("AllocateMmio and ReleaseMmio (vmemd extensions)", () => {
    const bar = { PciBar: { bus: 1, dev: 0, func: 0, bar: 0 } };
    const a = client.allocateMmio(bar, 512 * MiB);
    expect(Number(a.start) % (512 * MiB)).toBe(0);
    expect(Number(a.start)).toBeGreaterThanOrEqual(0x1_0000_0000); // 256 MiB and up: the high pool
    expectErr(client.request({ AllocateMmio: { alloc: bar, size: 4096, align: null } }), "EEXIST");
    client.releaseMmio(bar);
    expectErr(client.request({ ReleaseMmio: bar }), "ENOENT");
  });

  test("values above 2^53 round-trip exactly and are refused with EOVERFLOW", () => {
    const chain = expectErr(client.request({ UnregisterMemory: 2n ** 64n - 1n }), "ENOENT");
    expect(chain[0]).toContain("0xffffffffffffffff");
    const fd = memfd(4096);
    expectErr(client.request({ RegisterMemory: { source: { SharedMemory: { descriptor: fd, size: 4096 } }, dest: { GuestPhysicalAddress: 2n ** 63n }, prot: { read: true, write: true }, cache: "CacheCoherent" } }), "EOVERFLOW");
    sys.close(fd);
  });
});

describe("Err paths named by docs/protocol.md", () => {
  test("EPERM, ENOTSUP, ENOSPC, ENOENT, EINVAL, EBUSY each arrive with a chain", async () => {
    const fd = memfd(8192);
    const reg = (source: object, dest: object = { GuestPhysicalAddress: HIGH }) =>
      client.request({ RegisterMemory: { source, dest, prot: { read: true, write: true }, cache: "CacheCoherent" } } as never);
    expectErr(reg({ ExternalMapping: { ptr: 4096, size: 4096 } }), "EPERM");
    const uuid = new Uint8Array(16);
    expectErr(reg({ Vulkan: { descriptor: fd, handle_type: 1, memory_idx: 0, device_uuid: uuid, driver_uuid: uuid, size: 4096 } }), "ENOTSUP");
    expectErr(reg({ SharedMemory: { descriptor: fd, size: 8192 } }, { GuestPhysicalAddress: 0 }), "ENOSPC"); // RAM
    expectErr(reg({ SharedMemory: { descriptor: fd, size: 4096 } }, { GuestPhysicalAddress: HIGH + 1 }), "EINVAL");
    expectErr(reg({ SharedMemory: { descriptor: fd, size: 16384 } }), "EINVAL"); // past the memfd
    expectErr(reg({ SharedMemory: { descriptor: fd, size: 4096 } }, { ExistingAllocation: { allocation: { Anon: 1 }, offset: 0 } }), "EINVAL");
    const [p1, p2] = sys.pipe();
    // Not mappable: the kernel's own answer to mmap (a pipe read end: EACCES or ENODEV).
    const pipeErr = errOf(reg({ SharedMemory: { descriptor: p1, size: 4096 } }));
    expect(["EACCES", "ENODEV"]).toContain(sys.errnoName(pipeErr.errno ?? -1));
    expect(pipeErr.chain.join(" ")).toContain("mmap");
    expectErr(client.request({ UnregisterMemory: 0x1234000 }), "ENOENT");
    const chain = expectErr(client.request({ ReleaseMmio: BAR }), "EBUSY"); // prepared above
    expect(chain.at(-1)).toContain("failed to release MMIO");
    closeAll([fd, p1, p2]);
    await server.expectFdCount(baseFds);
  });
});

describe("malformed packets: Err EINVAL, and the connection stays usable", () => {
  test("garbage, wrong shapes, unknown variants, extra keys, negative sizes, bad descriptor indices", async () => {
    const fd1 = memfd(4096);
    const fd2 = memfd(4096);
    const bodies: [string, Packet][] = [
      ["garbage bytes", raw([0xc1, 0xff, 0x00])],
      ["two values", raw([0xa2, 0x4f, 0x6b, 0xa2, 0x4f, 0x6b])],
      ["a number", raw(encode(42))],
      ["an array", raw(encode([1, 2, 3]))],
      ["unknown unit variant", raw(encode("Frobnicate"))],
      ["unknown map variant", raw(encode({ Frobnicate: 1 }))],
      ["two keys", raw(encode({ BalloonTargetReached: { size: 1 }, UnregisterMemory: 1 }))],
      ["extra key", raw(encode({ BalloonTargetReached: { size: 1, extra: true } }))],
      ["missing key", raw(encode({ BalloonTargetReached: {} }))],
      ["wrong type", raw(encode({ BalloonTargetReached: { size: "big" } }))],
      ["negative size", raw(encode({ BalloonTargetReached: { size: -1 } }))],
      ["float", raw(encode({ UnregisterMemory: 1.5 }))],
      ["empty packet", raw([])],
      ["unreferenced descriptor", { body: encode("GetState"), fds: [fd1] }],
      ["index out of range", { body: encode({ RegisterMemory: { source: { SharedMemory: { descriptor: 1, size: 4096 } }, dest: { GuestPhysicalAddress: HIGH }, prot: { read: true, write: true }, cache: "CacheCoherent" } }), fds: [fd1] }],
      ["index referenced twice", { body: encode({ MmapAndRegisterMemory: { shm: { descriptor: 0, size: 4096 }, dest: { GuestPhysicalAddress: HIGH }, num_file_mappings: 0 } }), fds: [fd1, fd2] }],
      ["oversized packet", raw(new Uint8Array(70_000))],
      ["Object.prototype member as variant", raw(encode({ constructor: 1 }))],
      ["another one", raw(encode({ toString: {} }))],
    ];
    for (const [what, packet] of bodies) {
      client.sendPacket(packet);
      const resp = client.recv();
      const e = errOf(resp);
      expect({ what, errno: e.errno }).toEqual({ what, errno: sys.Errno.EINVAL });
      expect(e.chain.length).toBeGreaterThanOrEqual(2);
    }
    // Still usable.
    expect(client.request({ BalloonTargetReached: { size: 7 } })).toBe("Ok");
    closeAll([fd1, fd2]);
    await server.expectFdCount(baseFds);
  });

  test("a schema error names the offending path", () => {
    client.sendPacket(raw(encode({ RegisterMemory: { source: { SharedMemory: { descriptor: 0, size: -5 } }, dest: { GuestPhysicalAddress: HIGH }, prot: { read: true, write: true }, cache: "CacheCoherent" } })));
    const chain = expectErr(client.recv(), "EINVAL");
    expect(chain[0]).toContain("RegisterMemory.source");
    const ev = sys.eventfd();
    client.sendPacket(raw(encode({ IoEventRaw: { event: 0, addr: 1, datamatch: "AnyLength", register: "yes" } }), [ev]));
    sys.close(ev);
    expect(expectErr(client.recv(), "EINVAL")[0]).toStartWith("IoEventRaw.register");
  });
});

describe("concurrency and pipelining", () => {
  test("1,000 pipelined requests with 64 in flight come back in order", () => {
    const packets = Array.from({ length: 1000 }, (_, i) =>
      i % 2 === 0 ? encodeRequest({ BalloonTargetReached: { size: i } }) : encodeRequest({ UnregisterMemory: 0x1000 + i * 4096 }),
    );
    const out = client.pipeline(packets, 64);
    expect(out.length).toBe(1000);
    out.forEach((r, i) => {
      if (i % 2 === 0) expect(r).toBe("Ok");
      else expect(errOf(r).chain[0]).toContain((0x1000 + i * 4096).toString(16));
    });
    expect(client.getState().balloon_target).toBe(998);
  });

  test("two clients at once, interleaved, one VM state", async () => {
    const a = server.connect();
    const b = server.connect();
    const fd = memfd(4096);
    const ra = a.registerMemory({ SharedMemory: { descriptor: fd, size: 4096 } }, { GuestPhysicalAddress: HIGH });
    expectErr(b.request({ RegisterMemory: { source: { SharedMemory: { descriptor: fd, size: 4096 } }, dest: { GuestPhysicalAddress: HIGH }, prot: { read: true, write: true }, cache: "CacheCoherent" } }), "ENOSPC");
    b.unregisterMemory(ra.region_id); // regions are the VM's, not the connection's
    const pa = Array.from({ length: 200 }, () => encodeRequest("GetState"));
    const pb = Array.from({ length: 200 }, (_, i) => encodeRequest({ BalloonTargetReached: { size: i } }));
    for (let i = 0; i < 200; i++) {
      a.sendPacket(pa[i]!);
      b.sendPacket(pb[i]!);
      expect(typeof a.recv()).toBe("object");
      expect(b.recv()).toBe("Ok");
    }
    a.close();
    b.close();
    sys.close(fd);
    await server.expectFdCount(baseFds);
  });

  test("a client that never reads is throttled, not buffered without bound", async () => {
    const c = server.connect();
    let sent = 0;
    const p = encodeRequest({ BalloonTargetReached: { size: 1 } });
    while (sent < 10_000 && c.trySendPacket(p)) sent++;
    await Bun.sleep(100);
    while (sent < 10_000 && c.trySendPacket(p)) sent++;
    // The server stopped reading once our receive queue filled: our sends hit EAGAIN, bounded by
    // the kernel's socket buffers (a few hundred small packets), far below what we tried.
    expect(sent).toBeLessThan(2000);
    // Another client is served meanwhile.
    expect(client.request("GetState")).toHaveProperty("State");
    let got = 0;
    const deadline = Date.now() + 5000;
    while (got < sent && Date.now() < deadline) {
      if (c.tryRecv() !== undefined) got++;
      else await Bun.sleep(1);
    }
    expect(got).toBe(sent);
    c.close();
    await server.expectFdCount(baseFds);
  });

  test("a client that disconnects mid-MmapAndRegisterMemory leaves nothing behind", async () => {
    const c = server.connect();
    const shm = memfd(8 * 4096);
    const files = Array.from({ length: 8 }, () => memfd(4096));
    const slots = client.getState().slots_used;
    c.sendPacket(encodeRequest({ MmapAndRegisterMemory: { shm: { descriptor: shm, size: 8 * 4096 }, dest: { GuestPhysicalAddress: HIGH }, num_file_mappings: 300 } }));
    c.sendPacket(encodeRequest(files.map((file, i) => ({ file, length: 4096, mem_offset: i * 4096, file_offset: 0 }))));
    await Bun.sleep(50);
    expect(server.fdCount()).toBeGreaterThan(baseFds); // pending: 9 descriptors and the connection held
    c.close();
    await server.expectFdCount(baseFds);
    expect(client.getState().slots_used).toBe(slots);
    closeAll([shm, ...files]);
  });

  test("a malformed chunk fails the MmapAndRegisterMemory and closes what it received", async () => {
    const shm = memfd(4 * 4096);
    const f = memfd(4096);
    client.sendPacket(encodeRequest({ MmapAndRegisterMemory: { shm: { descriptor: shm, size: 4 * 4096 }, dest: { GuestPhysicalAddress: HIGH }, num_file_mappings: 2 } }));
    client.inFlight--;
    client.sendPacket(encodeRequest([{ file: f, length: 4096, mem_offset: 0, file_offset: 0 }]));
    client.inFlight--;
    client.sendPacket(raw(encode({ not: "a chunk" })));
    const chain = expectErr(client.recv(), "EINVAL");
    expect(chain.at(-1)).toBe("failed to mmap and register memory");
    expect(client.request({ BalloonTargetReached: { size: 1 } })).toBe("Ok");
    closeAll([shm, f]);
    await server.expectFdCount(baseFds);
  });

  test("an oversized packet where a chunk is expected ends the MmapAndRegisterMemory (fuzzer regression)", async () => {
    const shm = memfd(4 * 4096);
    client.sendPacket(encodeRequest({ MmapAndRegisterMemory: { shm: { descriptor: shm, size: 4 * 4096 }, dest: { GuestPhysicalAddress: HIGH }, num_file_mappings: 1 } }));
    client.inFlight--;
    client.sendPacket(raw(new Uint8Array(70_000)));
    const chain = expectErr(client.recv(), "EINVAL");
    expect(chain[0]).toContain("packet larger than");
    expect(chain.at(-1)).toBe("failed to mmap and register memory");
    // In step again: the next request is a request, not a chunk.
    expect(expectErr(client.request({ UnregisterMemory: 0x1234000 }), "ENOENT")[0]).toContain("0x1234000");
    sys.close(shm);
    await server.expectFdCount(baseFds);
  });

  test("too many file mappings for the shm: refused, yet answered once after its chunks, in step", async () => {
    const shm = memfd(4096);
    const files = Array.from({ length: 3 }, () => memfd(4096));
    client.sendPacket(encodeRequest({ MmapAndRegisterMemory: { shm: { descriptor: shm, size: 4096 }, dest: { GuestPhysicalAddress: HIGH }, num_file_mappings: 3 } }));
    client.inFlight--;
    expect(client.tryRecv()).toBeUndefined(); // nothing yet: the chunks are still to come
    client.sendPacket(encodeRequest(files.map((file) => ({ file, length: 4096, mem_offset: 0, file_offset: 0 }))));
    const chain = expectErr(client.recv(), "EINVAL");
    expect(chain[0]).toContain("num_file_mappings 3");
    expect(chain.at(-1)).toBe("failed to mmap and register memory");
    expect(expectErr(client.request({ UnregisterMemory: 0x1234000 }), "ENOENT")[0]).toContain("0x1234000"); // in step
    closeAll([shm, ...files]);
    await server.expectFdCount(baseFds);
  });

  test("an absurd num_file_mappings allocates nothing; the connection waits for chunks until the peer goes", async () => {
    const c = server.connect();
    const shm = memfd(4096);
    c.sendPacket(encodeRequest({ MmapAndRegisterMemory: { shm: { descriptor: shm, size: 4096 }, dest: { GuestPhysicalAddress: HIGH }, num_file_mappings: 2n ** 60n } }));
    const f = memfd(4096);
    c.sendPacket(encodeRequest([{ file: f, length: 4096, mem_offset: 0, file_offset: 0 }]));
    await Bun.sleep(50);
    expect(c.tryRecv()).toBeUndefined();
    c.close();
    closeAll([shm, f]);
    await server.expectFdCount(baseFds);
  });
});

describe("a client written against docs/protocol.md alone", () => {
  test("hand-made MessagePack bytes get the documented bytes back", () => {
    // {"BalloonTargetReached": {"size": 1}} by hand; "Ok" is fixstr a2 4f 6b.
    const req = [0x81, 0xb4, ...Buffer.from("BalloonTargetReached"), 0x81, 0xa4, ...Buffer.from("size"), 0x01];
    client.sendPacket(raw(req));
    const io = new sys.PacketIo(65536);
    let n = -1;
    while ((n = io.recv(client.fd)) === -1) sys.pollOne(client.fd, sys.POLLIN, 1000);
    client.inFlight--;
    expect([...io.body.subarray(0, n)]).toEqual([0xa2, 0x4f, 0x6b]);
    // UnregisterMemory of 2^64-1 written as uint 64: the Err echoes it exactly, errno ENOENT (2).
    client.sendPacket(raw([0x81, 0xb0, ...Buffer.from("UnregisterMemory"), 0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]));
    while ((n = io.recv(client.fd)) === -1) sys.pollOne(client.fd, sys.POLLIN, 1000);
    client.inFlight--;
    const body = io.body.subarray(0, n);
    expect(body[0]).toBe(0x81); // a map of one key
    expect([...body.subarray(1, 5)]).toEqual([0xa3, ...Buffer.from("Err")]);
    expect(Buffer.from(body).includes(Buffer.from("errno"))).toBe(true);
  });

  test("a RegisterMemory response writes region_id above 2^32 as uint 64", () => {
    const fd = memfd(4096);
    const p = encodeRequest({ RegisterMemory: { source: { SharedMemory: { descriptor: fd, size: 4096 } }, dest: { GuestPhysicalAddress: HIGH }, prot: { read: true, write: true }, cache: "CacheCoherent" } });
    client.sendPacket(p);
    const io = new sys.PacketIo(65536);
    let n = -1;
    while ((n = io.recv(client.fd)) === -1) sys.pollOne(client.fd, sys.POLLIN, 1000);
    client.inFlight--;
    const body = Buffer.from(io.body.subarray(0, n));
    const at = body.indexOf(Buffer.from("region_id")) + "region_id".length;
    expect(body[at]).toBe(0xcf); // uint 64
    expect(body.readBigUInt64BE(at + 1)).toBe(BigInt(HIGH));
    client.unregisterMemory(HIGH);
    sys.close(fd);
  });
});

describe("process", () => {
  test("SIGTERM while clients keep every wake-up busy: exit 0 all the same", async () => {
    const s = await VmemdProcess.start(["--memory", "16M"]);
    // Four clients with 32 requests in flight each, for ever: the signal lands on a busy
    // server. (That a loop with no idle moment at all still yields to Bun's event loop is
    // proved in-process, in hardening.test.ts: here the clients leave it some.)
    const flood = `
      import { encodeRequest, VmemClient } from ${JSON.stringify(import.meta.dir + "/../src/client")};
      const c = VmemClient.connect(process.argv[1]);
      const p = encodeRequest({ BalloonTargetReached: { size: 1 } });
      for (let i = 0; i < 32; i++) c.sendPacket(p);
      console.log("flooding");
      try { for (;;) { c.recv(); c.sendPacket(p); } } catch { process.exit(0); }
    `;
    const clients = Array.from({ length: 4 }, () => Bun.spawn([process.execPath, "-e", flood, s.socket], { stdout: "pipe", stderr: "pipe" }));
    try {
      for (const c of clients) {
        const reader = c.stdout.getReader();
        const { value } = await reader.read();
        expect(new TextDecoder().decode(value)).toContain("flooding");
        reader.releaseLock();
      }
      await Bun.sleep(300);
      const probe = s.connect();
      expect((probe.request("GetState") as { State: VmState }).State).toBeDefined(); // still answering
      probe.close();
      s.proc.kill("SIGTERM");
      const exit = await Promise.race([s.proc.exited, Bun.sleep(5000).then(() => "still running after 5 s")]);
      expect(exit).toBe(0);
    } finally {
      for (const c of clients) c.kill("SIGKILL");
      await Promise.all(clients.map((c) => c.exited));
      await s.stop("SIGKILL"); // a no-op when it has exited
    }
  }, 20_000);

  test("SIGTERM: exit 0 and the socket file is gone; a live socket is not stolen; a stale one is replaced", async () => {
    const s = await VmemdProcess.start(["--memory", "16M"]);
    const second = Bun.spawnSync([import.meta.dir + "/../dist/vmemd", "serve", "--socket", s.socket, "--memory", "16M"]);
    expect(second.exitCode).toBe(1);
    expect(second.stderr.toString()).toContain("another server is answering");
    const c = s.connect();
    c.request("GetState");
    s.proc.kill("SIGTERM");
    expect(await s.proc.exited).toBe(0);
    expect(existsSync(s.socket)).toBe(false);
    c.close();
    // A stale socket file (nobody listening) is replaced.
    const stale = sys.listenSeqpacket(s.socket);
    sys.close(stale);
    const s2 = Bun.spawn([import.meta.dir + "/../dist/vmemd", "serve", "--socket", s.socket, "--memory", "16M"], { stderr: "pipe" });
    for (let i = 0; i < 500 && !existsSync(s.socket + ".x"); i++) {
      try {
        VmemClient.connect(s.socket).close();
        break;
      } catch {
        await Bun.sleep(10);
      }
    }
    s2.kill("SIGINT");
    expect(await s2.exited).toBe(0);
    expect(existsSync(s.socket)).toBe(false);
    await s.stop();
  });
});

export type { VmState };
