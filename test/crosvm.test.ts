// The crosvm judge, end to end: dist/vmemd driven with the exact bytes a crosvm process
// sends over its base::Tube (test/crosvm/wire.ts), every answer read with crosvm's own
// rules, and what was mapped checked from inside a real guest on the real vCPU.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as sys from "../src/sys";
import type { VmemClient } from "../src/client";
import { closeAll, memfd } from "./helpers";
import { BOOT_MAGIC, Mailbox, Op, SharedPage } from "./mailbox";
import { VmemdProcess } from "./server_harness";
import { fd, jsonRequest, type Alloc, type Datamatch, type State, type VmMemoryFileMapping, type VmMemoryResponse, type VmMemorySource, type VmemdResponse } from "./crosvm/wire";
import {
  jsonCall,
  jsonCallExt,
  describeBody,
  jsonMmapAndRegister,
  msgpackAnswer,
  msgpackCall,
  msgpackPacket,
  osError,
  parseAnswer,
  rawCall,
  rssBytes,
  TubeEnd,
  type MsgpackAnswer,
} from "./crosvm/tube";

const GUEST = join(import.meta.dir, "guest", "guest.bin");
const BAR = { PciBar: { bus: 0, dev: 5, func: 0, bar: 2 } } as const;
const PAGE = 4096;
const MiB = 1 << 20;
/** Device memory goes above 4 GiB (RAM is 64 MiB); each test takes its own 16 MiB window. */
const dev = (n: number) => 0x1_0000_0000 + n * 16 * MiB;
const ONES = 0xffff_ffff_ffff_ffffn;
const EPERM = 1,
  ENOENT = 2,
  EEXIST = 17,
  EINVAL = 22,
  ENOSPC = 28,
  ENOTSUP = 95;

let server: VmemdProcess;
let ctl: VmemClient;
let mailbox: Mailbox;
let t: TubeEnd;
let baseFds: number;
let baseNonSocketFds: number;
function nonSocketFds(pid: number): number {
  const fs = require("node:fs") as typeof import("node:fs");
  return fs.readdirSync(`/proc/${pid}/fd`).filter((f) => {
    try {
      return !fs.readlinkSync(`/proc/${pid}/fd/${f}`).startsWith("socket:");
    } catch {
      return false;
    }
  }).length;
}
async function expectNonSocketFds(n: number): Promise<void> {
  const deadline = Date.now() + 3000;
  while (nonSocketFds(server.pid) !== n) {
    if (Date.now() > deadline) throw new Error(`server holds ${nonSocketFds(server.pid)} non-socket descriptors, expected ${n}`);
    await Bun.sleep(10);
  }
}
let scratch: string;

beforeAll(async () => {
  server = await VmemdProcess.start(["--memory", "64M", "--pci-bar", "00:05.0/2=16M", "--guest", GUEST]);
  // The guest's mailbox is registered in MessagePack (vmemd's own client): the guest's
  // view must not depend on the encoding under test.
  ctl = server.connect();
  mailbox = Mailbox.register(ctl);
  await mailbox.run([{ op: Op.print, addr: 0, value: 1 }]);
  expect(mailbox.bootMagic).toBe(BOOT_MAGIC);
  t = TubeEnd.connect(server.socket);
  baseFds = server.fdCount();
  baseNonSocketFds = nonSocketFds(server.pid);
  scratch = mkdtempSync(join(tmpdir(), "vmemd-crosvm-"));
});
afterAll(async () => {
  t?.close();
  mailbox?.close();
  ctl?.close();
  if (server) expect(await server.stop()).toBe(0);
  if (scratch) rmSync(scratch, { recursive: true, force: true });
});

// ---- answers, as crosvm's VmMemoryClient takes them ----------------------------

const show = (r: unknown) => JSON.stringify(r, (_k, v) => (typeof v === "bigint" ? `${v}n` : v));

function expectOk(r: VmMemoryResponse | VmemdResponse): void {
  if (r !== "Ok") throw new Error(`expected "Ok", got ${show(r)}`);
}
function expectRegistered(r: VmMemoryResponse, gpa: number | bigint): number {
  if (typeof r !== "object" || !("RegisterMemory" in r)) throw new Error(`expected RegisterMemory at ${gpa.toString(16)}, got ${show(r)}`);
  expect(r.RegisterMemory.region_id).toBe(BigInt(gpa));
  return r.RegisterMemory.slot;
}
/** An Err whose root cause ends in " (os error N)"; returns the chain. */
function expectErr(r: VmMemoryResponse | VmemdResponse, errno: number): string[] {
  if (typeof r !== "object" || !("Err" in r)) throw new Error(`expected Err (os error ${errno}), got ${show(r)}`);
  const chain = r.Err;
  expect(chain.length).toBeGreaterThan(0);
  if (osError(chain) !== errno) throw new Error(`expected the root cause to end in " (os error ${errno})": ${show(chain)}`);
  return chain;
}
function expectMsgpackErr(r: MsgpackAnswer, errno: number): string[] {
  if (typeof r !== "object" || !("Err" in r)) throw new Error(`expected a MessagePack Err (errno ${errno}), got ${show(r)}`);
  const e = (r as { Err: { errno: number | null; chain: string[] } }).Err;
  expect(e.errno).toBe(errno);
  return e.chain;
}
function state(): State {
  const r = jsonCallExt(t, "GetState");
  if (typeof r !== "object" || !("State" in r)) throw new Error(`expected State, got ${show(r)}`);
  return r.State;
}
function register(source: VmMemorySource, gpa: number, prot = { read: true, write: true }): number {
  return expectRegistered(jsonCall(t, { RegisterMemory: { source, dest: { GuestPhysicalAddress: gpa }, prot, cache: "CacheCoherent" } }), gpa);
}
function unregister(gpa: number | bigint): void {
  expectOk(jsonCall(t, { UnregisterMemory: gpa }));
}
const namesId = (chain: string[], id: bigint) => chain.some((s) => s.includes(`0x${id.toString(16)}`) || s.includes(id.toString(10)));

// ---- the guest's view ------------------------------------------------------------

async function guest64(addrs: (number | bigint)[]): Promise<bigint[]> {
  const out: bigint[] = [];
  for (let i = 0; i < addrs.length; i += 100) out.push(...(await mailbox.run(addrs.slice(i, i + 100).map((addr) => ({ op: Op.read64, addr })))));
  return out;
}
/** Little-endian u64 of `buf` at `off`; bytes past the end read 0 (a file page past EOF). */
function le64(buf: Uint8Array, off: number): bigint {
  let v = 0n;
  for (let k = 7; k >= 0; k--) v = (v << 8n) | BigInt(off + k >= 0 ? (buf[off + k] ?? 0) : 0);
  return v;
}
function pattern(size: number, seed: number): Uint8Array<ArrayBuffer> {
  return Uint8Array.from({ length: size }, (_, k) => (k * 31 + seed + (k >> 12)) & 0xff);
}
function memfdWith(content: Uint8Array, size = content.length): number {
  const f = memfd(size);
  sys.pwriteAll(f, content, 0);
  return f;
}
const memfdBytes = (f: number): Uint8Array<ArrayBuffer> => new Uint8Array(readFileSync(`/proc/self/fd/${f}`));

// ---------------------------------------------------------------------------------

describe("every VmMemoryRequest variant, in crosvm's JSON, answered in JSON", () => {
  test("PrepareSharedMemoryRegion: Ok, and EEXIST (17) the second time", () => {
    expectOk(jsonCall(t, { PrepareSharedMemoryRegion: { alloc: BAR, cache: "CacheCoherent" } }));
    expectErr(jsonCall(t, { PrepareSharedMemoryRegion: { alloc: BAR, cache: "CacheCoherent" } }), EEXIST);
  });

  test("RegisterMemory, SharedMemory at a GuestPhysicalAddress: the guest reads and writes it; UnregisterMemory; ENOENT (2) after", async () => {
    const page = new SharedPage(2 * PAGE);
    page.view.setBigUint64(0, 0x1122_3344_5566_7788n, true);
    page.view.setBigUint64(PAGE + 8, 0x0123_4567_89ab_cdefn, true);
    const at = dev(0);
    register({ SharedMemory: { descriptor: fd(page.fd), size: 2 * PAGE } }, at);
    expect(await guest64([at, at + PAGE + 8])).toEqual([0x1122_3344_5566_7788n, 0x0123_4567_89ab_cdefn]);
    await mailbox.write32(at + 16, 0x5eed5eed);
    expect(page.view.getUint32(16, true)).toBe(0x5eed5eed);
    expect(state().regions.find((r) => r.region_id === BigInt(at))).toMatchObject({ size: BigInt(2 * PAGE), read_only: false, kind: "dynamic" });
    unregister(at);
    expect(await guest64([at])).toEqual([ONES]);
    const chain = expectErr(jsonCall(t, { UnregisterMemory: at }), ENOENT);
    expect(namesId(chain, BigInt(at))).toBe(true);
    page.close();
  });

  test("RegisterMemory, Descriptor at an offset, read-only (KVM_MEM_READONLY)", async () => {
    const content = pattern(3 * PAGE, 3);
    const f = memfdWith(content);
    const at = dev(1);
    register({ Descriptor: { descriptor: fd(f), offset: PAGE, size: 2 * PAGE } }, at, { read: true, write: false });
    expect(await guest64([at, at + PAGE + 64])).toEqual([le64(content, PAGE), le64(content, 2 * PAGE + 64)]);
    await mailbox.write32(at, 0); // lands nowhere
    expect(await guest64([at])).toEqual([le64(content, PAGE)]);
    const region = state().regions.find((r) => r.region_id === BigInt(at));
    expect(region?.read_only).toBe(true);
    unregister(at);
    sys.close(f);
  });

  test("RegisterMemory, Vulkan: ENOTSUP (95)", () => {
    const f = memfd(PAGE);
    const uuid = Array.from({ length: 16 }, (_, i) => i * 17);
    const r = jsonCall(t, {
      RegisterMemory: {
        source: { Vulkan: { descriptor: fd(f), handle_type: 1, memory_idx: 0, device_uuid: uuid, driver_uuid: uuid, size: PAGE } },
        dest: { GuestPhysicalAddress: dev(2) },
        prot: { read: true, write: true },
        cache: "CacheCoherent",
      },
    });
    expectErr(r, ENOTSUP);
    sys.close(f);
  });

  test("RegisterMemory, ExternalMapping: EPERM (1), as crosvm answers a remote peer", () => {
    const r = jsonCall(t, { RegisterMemory: { source: { ExternalMapping: { ptr: 0x7f00_0000_0000, size: PAGE } }, dest: { GuestPhysicalAddress: dev(2) }, prot: { read: true, write: true }, cache: "CacheCoherent" } });
    expectErr(r, EPERM);
  });

  test("RegisterMemory over guest RAM: ENOSPC (28)", () => {
    const f = memfd(2 * PAGE);
    for (const gpa of [0, 64 * MiB - PAGE]) {
      expectErr(jsonCall(t, { RegisterMemory: { source: { SharedMemory: { descriptor: fd(f), size: 2 * PAGE } }, dest: { GuestPhysicalAddress: gpa }, prot: { read: true, write: true }, cache: "CacheCoherent" } }), ENOSPC);
    }
    sys.close(f);
  });

  test("RegisterMemory into an ExistingAllocation that is not a PciBar: EINVAL (22), for every other Alloc", () => {
    const f = memfd(PAGE);
    const others: Alloc[] = [{ Anon: 1 }, "GpuRenderNode", { PmemDevice: 0 }, "Pstore", { PciBridgeWindow: { bus: 0, dev: 1, func: 0 } }, { PciBridgePrefetchWindow: { bus: 0, dev: 1, func: 0 } }, { FileBacked: 3 }];
    for (const allocation of others) {
      const r = jsonCall(t, { RegisterMemory: { source: { SharedMemory: { descriptor: fd(f), size: PAGE } }, dest: { ExistingAllocation: { allocation, offset: 0 } }, prot: { read: true, write: true }, cache: "CacheCoherent" } });
      expectErr(r, EINVAL);
    }
    sys.close(f);
  });

  test("MmapAndRegisterMemory: one read-only region, each file at its mem_offset", async () => {
    const shm = memfdWith(new Uint8Array(4 * PAGE).fill(0xee));
    const f1 = memfdWith(new Uint8Array(PAGE).fill(0x11));
    const f2 = memfdWith(Uint8Array.from({ length: 2 * PAGE }, (_, i) => (i < PAGE ? 0x22 : 0x33)));
    const at = dev(3);
    const r = jsonMmapAndRegister(t, { MmapAndRegisterMemory: { shm: { descriptor: fd(shm), size: 4 * PAGE }, dest: { GuestPhysicalAddress: at }, num_file_mappings: 2 } }, [
      { file: fd(f1), length: PAGE, mem_offset: PAGE, file_offset: 0 },
      { file: fd(f2), length: PAGE, mem_offset: 3 * PAGE, file_offset: PAGE },
    ]);
    expectRegistered(r, at);
    expect(await guest64([0, 1, 2, 3].map((p) => at + p * PAGE))).toEqual([0xeeeeeeeeeeeeeeeen, 0x1111111111111111n, 0xeeeeeeeeeeeeeeeen, 0x3333333333333333n]);
    expect(state().regions.find((x) => x.region_id === BigInt(at))?.read_only).toBe(true);
    unregister(at);
    closeAll([shm, f1, f2]);
  });

  test("DynamicallyFreeMemoryRanges and DynamicallyReclaimMemoryRanges: Ok, the guest reads zeros; bad ranges EINVAL (22)", async () => {
    const at = 8 * MiB;
    await mailbox.run([{ op: Op.fill, addr: at, value: 0x5a5a5a5a5a5a5a5an, length: 64 * 1024 }]);
    const freed0 = state().freed_bytes;
    expectOk(jsonCall(t, { DynamicallyFreeMemoryRanges: { ranges: [[at, 64 * 1024]] } }));
    expect(await guest64([at, at + 64 * 1024 - 8])).toEqual([0n, 0n]);
    expect(state().freed_bytes).toBe(freed0 + 64n * 1024n);
    expectErr(jsonCall(t, { DynamicallyFreeMemoryRanges: { ranges: [[at + 1, PAGE]] } }), EINVAL);
    expectErr(jsonCall(t, { DynamicallyFreeMemoryRanges: { ranges: [[64 * MiB, PAGE]] } }), EINVAL);
    expectOk(jsonCall(t, { DynamicallyReclaimMemoryRanges: { ranges: [[at, 64 * 1024]] } }));
    expectErr(jsonCall(t, { DynamicallyReclaimMemoryRanges: { ranges: [[at, 100]] } }), EINVAL);
    expectOk(jsonCall(t, { DynamicallyFreeMemoryRanges: { ranges: [] } }));
  });

  test("BalloonTargetReached: Ok, recorded for GetState", () => {
    expectOk(jsonCall(t, { BalloonTargetReached: { size: 123 * MiB } }));
    expect(state().balloon_target).toBe(123n * BigInt(MiB));
  });

  test("IoEventRaw with every Datamatch: register, EEXIST (17) twice, unregister; a matching guest write signals the eventfd", async () => {
    const ev = sys.eventfd();
    const cases: [number, Datamatch][] = [
      [0xe000_0000, "AnyLength"],
      [0xe000_0100, { U8: 0x7f }],
      [0xe000_0200, { U8: null }],
      [0xe000_0300, { U16: 0xbeef }],
      [0xe000_0400, { U32: null }],
      [0xe000_0500, { U64: 0x0102_0304_0506_0708n }],
      [0xe000_0600, { U64: null }],
    ];
    for (const [addr, datamatch] of cases) expectOk(jsonCall(t, { IoEventRaw: { event: fd(ev), addr, datamatch, register: true } }));
    expectErr(jsonCall(t, { IoEventRaw: { event: fd(ev), addr: 0xe000_0100, datamatch: { U8: 0x7f }, register: true } }), EEXIST);
    for (const [addr, datamatch] of cases) expectOk(jsonCall(t, { IoEventRaw: { event: fd(ev), addr, datamatch, register: false } }));

    const addr = 0xe000_2000;
    expectOk(jsonCall(t, { IoEventRaw: { event: fd(ev), addr, datamatch: { U32: 0x1234 }, register: true } }));
    await mailbox.write32(addr, 0x1234);
    expect(sys.readCounter(ev)).toBe(1n);
    await mailbox.write32(addr, 0x9999);
    expect(sys.readCounter(ev)).toBe(0n);
    expectOk(jsonCall(t, { IoEventRaw: { event: fd(ev), addr, datamatch: { U32: 0x1234 }, register: false } }));
    await mailbox.write32(addr, 0x1234);
    expect(sys.readCounter(ev)).toBe(0n);
    sys.close(ev);
  });

  test("malformed requests: EINVAL (22), the connection keeps serving, every descriptor closed", async () => {
    const f = memfd(PAGE);
    const reg = (source: string, rest = '"dest":{"GuestPhysicalAddress":8589934592},"prot":{"read":true,"write":true},"cache":"CacheCoherent"') => `{"RegisterMemory":{"source":${source},${rest}}}`;
    const bodies: [string, string | Uint8Array, number[]][] = [
      ["a struct variant as a unit variant", '"RegisterMemory"', []],
      ["missing field", '{"BalloonTargetReached":{}}', []],
      ["wrong type", '{"BalloonTargetReached":{"size":"1"}}', []],
      ["negative", '{"BalloonTargetReached":{"size":-1}}', []],
      ["a fraction", '{"UnregisterMemory":1.5}', []],
      ["an exponent", '{"UnregisterMemory":1e3}', []],
      ["past u64", '{"UnregisterMemory":18446744073709551616}', []],
      ["a leading zero", '{"UnregisterMemory":01}', []],
      ["two variants", '{"UnregisterMemory":1,"BalloonTargetReached":{"size":1}}', []],
      ["trailing characters", '{"UnregisterMemory":1}}', []],
      ["two values", '"GetState""GetState"', []],
      ["a trailing comma", '{"BalloonTargetReached":{"size":1,}}', []],
      ["u8 past 255", '{"PrepareSharedMemoryRegion":{"alloc":{"PciBar":{"bus":256,"dev":0,"func":0,"bar":0}},"cache":"CacheCoherent"}}', []],
      ["a uuid of 15", reg('{"Vulkan":{"descriptor":0,"handle_type":1,"memory_idx":0,"device_uuid":[0,0,0,0,0,0,0,0,0,0,0,0,0,0,0],"driver_uuid":[0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0],"size":4096}}'), [f]],
      ["descriptor index out of range", reg('{"SharedMemory":{"descriptor":1,"size":4096}}'), [f]],
      ["descriptor unreferenced", '{"BalloonTargetReached":{"size":1}}', [f]],
      ["a second descriptor unreferenced", '{"MmapAndRegisterMemory":{"shm":{"descriptor":0,"size":4096},"dest":{"GuestPhysicalAddress":0},"num_file_mappings":0}}', [f, f]],
      ["a descriptor referenced twice", '{"IrqFd":{"event":0,"gsi":5,"resample":0,"register":true}}', [f]],
      ["neither read nor write", reg('{"SharedMemory":{"descriptor":0,"size":4096}}', '"dest":{"GuestPhysicalAddress":8589934592},"prot":{"read":false,"write":false},"cache":"CacheCoherent"'), [f]],
      ["a chunk with no MmapAndRegisterMemory pending", '[{"file":0,"length":4096,"mem_offset":0,"file_offset":0}]', [f]],
      ["an empty array", "[]", []],
      ["a bare number after whitespace", " 42", []],
      ["null", "\tnull", []],
    ];
    for (const [what, body, fds] of bodies) {
      const r = rawCall(t, body, fds);
      if (typeof r !== "object" || !("Err" in r) || osError(r.Err) !== EINVAL) throw new Error(`${what}: expected Err (os error 22), got ${show(r)}`);
    }
    expectOk(jsonCall(t, { BalloonTargetReached: { size: 7 } }));
    sys.close(f);
    // Descriptors other than sockets: every memfd and eventfd sent is closed. (One client
    // socket more than at the start is still open at this point in the run; which client
    // holds it is not yet known, so sockets are left out of this count.)
    await expectNonSocketFds(baseNonSocketFds);
  });
});

describe("MessagePack and JSON on one connection, each answered in kind", () => {
  test("MessagePack alone, from the same serializer: answered in MessagePack (docs/protocol.md's own encoding)", () => {
    const c = TubeEnd.connect(server.socket);
    try {
      expect(msgpackCall(c, { BalloonTargetReached: { size: 2n ** 64n - 1n } })).toBe("Ok");
      expect(BigInt((msgpackCall(c, "GetState") as { State: { balloon_target: bigint } }).State.balloon_target)).toBe(2n ** 64n - 1n);
      expect(namesId(expectMsgpackErr(msgpackCall(c, { UnregisterMemory: 2n ** 60n + 1n }), ENOENT), 2n ** 60n + 1n)).toBe(true);
      const f = memfd(PAGE);
      const at = dev(15);
      const m = msgpackCall(c, { RegisterMemory: { source: { SharedMemory: { descriptor: fd(f), size: PAGE } }, dest: { GuestPhysicalAddress: at }, prot: { read: true, write: true }, cache: "CacheCoherent" } });
      if (typeof m !== "object" || !("RegisterMemory" in m)) throw new Error(`expected a MessagePack RegisterMemory, got ${show(m)}`);
      expect(Number((m as { RegisterMemory: { region_id: number | bigint } }).RegisterMemory.region_id)).toBe(at);
      expect(msgpackCall(c, { IoEventRaw: { event: fd(f), addr: 0xe000_4000, datamatch: "AnyLength", register: false } })).toMatchObject({ Err: {} });
      expect(msgpackCall(c, { UnregisterMemory: at })).toBe("Ok");
      sys.close(f);
    } finally {
      c.close();
    }
  });

  test("alternating requests, each answer in its request's encoding", () => {
    const c = TubeEnd.connect(server.socket);
    try {
      expectOk(jsonCall(c, { BalloonTargetReached: { size: 1 } }));
      expect(msgpackCall(c, { BalloonTargetReached: { size: 2 } })).toBe("Ok");
      expectErr(jsonCall(c, { UnregisterMemory: 0x5000 }), ENOENT);
      expectMsgpackErr(msgpackCall(c, { UnregisterMemory: 0x5000 }), ENOENT);

      const f = memfd(PAGE);
      const at = dev(4);
      expectRegistered(jsonCall(c, { RegisterMemory: { source: { SharedMemory: { descriptor: fd(f), size: PAGE } }, dest: { GuestPhysicalAddress: at }, prot: { read: true, write: true }, cache: "CacheCoherent" } }), at);
      expect(msgpackCall(c, { UnregisterMemory: at })).toBe("Ok");
      const m = msgpackCall(c, { RegisterMemory: { source: { SharedMemory: { descriptor: fd(f), size: PAGE } }, dest: { GuestPhysicalAddress: at }, prot: { read: true, write: true }, cache: "CacheCoherent" } });
      if (typeof m !== "object" || !("RegisterMemory" in m)) throw new Error(`expected a MessagePack RegisterMemory, got ${show(m)}`);
      expect(Number((m as { RegisterMemory: { region_id: number | bigint } }).RegisterMemory.region_id)).toBe(at);
      expectOk(jsonCall(c, { UnregisterMemory: at }));
      sys.close(f);

      const ms = msgpackCall(c, "GetState") as { State: { balloon_target: unknown } };
      expect(Number(ms.State.balloon_target)).toBe(2);
      const js = jsonCallExt(c, "GetState") as { State: State };
      expect(js.State.balloon_target).toBe(2n);
    } finally {
      c.close();
    }
  });

  test("pipelined: eight requests sent before any answer is read, answered in order and in kind", () => {
    const c = TubeEnd.connect(server.socket);
    try {
      const ids = Array.from({ length: 8 }, (_, k) => 0x7000_0000 + k * PAGE);
      ids.forEach((id, k) => c.send(k % 2 === 0 ? jsonRequest({ UnregisterMemory: id }) : msgpackPacket({ UnregisterMemory: id })));
      ids.forEach((id, k) => {
        const r = c.recv();
        const chain = k % 2 === 0 ? expectErr(parseAnswer(r), ENOENT) : expectMsgpackErr(msgpackAnswer(r), ENOENT);
        expect(namesId(chain, BigInt(id))).toBe(true);
      });
    } finally {
      c.close();
    }
  });

  test("unknown fields: ignored in JSON (serde's default), EINVAL in MessagePack (docs/protocol.md)", () => {
    const c = TubeEnd.connect(server.socket);
    try {
      expectOk(rawCall(c, '{"BalloonTargetReached":{"size":5,"newer_crosvm_field":true}}'));
      expectMsgpackErr(msgpackAnswer((c.send({ body: new Uint8Array([0x81, 0xb4, ...new TextEncoder().encode("BalloonTargetReached"), 0x82, 0xa4, ...new TextEncoder().encode("size"), 5, 0xa1, 0x78, 0xc3]), fds: [] }), c.recv())), EINVAL);
    } finally {
      c.close();
    }
  });
});

describe("MmapAndRegisterMemory with 300 file mappings, as VmMemoryClient sends it", () => {
  test("chunks of 253 then 47 JSON arrays; no answer before the last chunk; one after; the guest sees every file", async () => {
    const n = 300;
    const shm = memfd(n * PAGE);
    const lengths = Array.from({ length: n }, (_, i) => PAGE - (i % 3) * 1000);
    const files = Array.from({ length: n }, (_, i) => {
      const b = new Uint8Array(lengths[i]!).fill(0x5a);
      b[0] = i & 0xff;
      b[1] = i >> 8;
      return memfdWith(b);
    });
    const mappings: VmMemoryFileMapping[] = files.map((f, i) => ({ file: fd(f), length: lengths[i]!, mem_offset: i * PAGE, file_offset: 0 }));
    const at = dev(5);
    await server.settle(); // the previous test's connection may not be closed yet
    const before = server.fdCount();
    const chunks: number[] = [];
    const r = jsonMmapAndRegister(t, { MmapAndRegisterMemory: { shm: { descriptor: fd(shm), size: n * PAGE }, dest: { GuestPhysicalAddress: at }, num_file_mappings: n } }, mappings, (k) => {
      chunks.push(k);
      const early = k === 0 ? t.tryRecv(150) : undefined;
      if (early) throw new Error(`answered before the last chunk: ${describeBody(early.body)}`);
    });
    expect(chunks).toEqual([0, 1]);
    expectRegistered(r, at);
    expect(t.tryRecv(100)).toBeUndefined(); // one answer only
    const got = await guest64(files.map((_, i) => at + i * PAGE));
    expect(got).toEqual(files.map((_, i) => 0x5a5a_5a5a_5a5a_0000n | BigInt(i)));
    // The tail of a short file's last page reads zeros, not the shm.
    expect(await guest64([at + PAGE + 3096, at + 2 * PAGE + PAGE - 8])).toEqual([0n, 0n]);
    const region = state().regions.find((x) => x.region_id === BigInt(at))!;
    expect(region).toMatchObject({ read_only: true, size: BigInt(n * PAGE) });
    await server.expectFdCount(before); // the mappings hold the memory, not the descriptors
    unregister(at);
    closeAll([shm, ...files]);
  });
});

describe("crosvm's real senders", () => {
  test("pmem-ext2: files mapped at block offsets with their exact, unaligned lengths; the guest reads every file back", async () => {
    // As ext2::Builder does: a shared memory region holding the metadata, and for each
    // file one mapping per contiguous run of blocks, of length min(remaining, run), on
    // a descriptor of its own (File::try_clone), file_offset advancing run by run.
    const blocks = 48;
    const meta = new Uint8Array(blocks * PAGE);
    meta.set(pattern(2 * PAGE, 0xe2), 0); // superblock, group descriptors
    const shm = memfdWith(meta);
    const files: { name: string; size: number; runs: [number, number][] }[] = [
      { name: "one-byte", size: 1, runs: [[4, 1]] },
      { name: "almost-a-block", size: 4095, runs: [[5, 1]] },
      { name: "a-block", size: 4096, runs: [[6, 1]] },
      { name: "a-block-and-a-byte", size: 4097, runs: [[7, 2]] },
      { name: "split", size: 3 * PAGE + 123, runs: [[10, 2], [20, 2]] },
      { name: "nine-blocks", size: 9 * PAGE - 1, runs: [[30, 9]] },
    ];
    const mappings: VmMemoryFileMapping[] = [];
    const opened: number[] = [];
    const expected: [number, bigint][] = [];
    const at = dev(6);
    files.forEach((file, k) => {
      const content = pattern(file.size, 17 * k + 1);
      const path = join(scratch, file.name);
      writeFileSync(path, content);
      const base = sys.open(path, sys.O_RDONLY | sys.O_CLOEXEC);
      opened.push(base);
      let fileOffset = 0;
      for (const [block, count] of file.runs) {
        const length = Math.min(file.size - fileOffset, count * PAGE);
        const dup = sys.dupCloexec(base);
        opened.push(dup);
        mappings.push({ file: fd(dup), length, mem_offset: block * PAGE, file_offset: fileOffset });
        // What the guest must see: the file's bytes, zeros past its end up to the page.
        const mapped = Math.ceil(length / PAGE) * PAGE;
        for (const off of new Set([0, 8, Math.floor((length - 1) / 8) * 8, Math.ceil(length / 8) * 8, mapped - 8])) {
          if (off < mapped) expected.push([at + block * PAGE + off, le64(content.subarray(0, file.size), fileOffset + off)]);
        }
        fileOffset += length;
      }
      expect(fileOffset).toBe(file.size);
    });
    // Metadata blocks and a block no file uses.
    for (const off of [0, 8, PAGE + 4088, 3 * PAGE, 45 * PAGE]) expected.push([at + off, le64(meta, off)]);
    const r = jsonMmapAndRegister(t, { MmapAndRegisterMemory: { shm: { descriptor: fd(shm), size: blocks * PAGE }, dest: { GuestPhysicalAddress: at }, num_file_mappings: mappings.length } }, mappings);
    expectRegistered(r, at);
    const got = await guest64(expected.map(([a]) => a));
    expect(got.map((v, i) => [expected[i]![0].toString(16), v.toString(16)])).toEqual(expected.map(([a, v]) => [a.toString(16), v.toString(16)]));
    unregister(at);
    closeAll([shm, ...opened]);
  });

  test("virtio-gpu's write-only blob ({read: false, write: true}) registers, mapped read-write", async () => {
    const page = new SharedPage(PAGE);
    page.view.setUint32(0, 0xabcd0123, true);
    const at = dev(7);
    register({ SharedMemory: { descriptor: fd(page.fd), size: PAGE } }, at, { read: false, write: true });
    expect(state().regions.find((x) => x.region_id === BigInt(at))?.read_only).toBe(false);
    await mailbox.write32(at + 8, 0x600d600d);
    expect(page.view.getUint32(8, true)).toBe(0x600d600d);
    expect(Number((await guest64([at]))[0]! & 0xffff_ffffn)).toBe(0xabcd0123);
    unregister(at);
    page.close();
  });

  for (const [seal, value, window] of [
    ["F_SEAL_WRITE", 0x0008, 8],
    ["F_SEAL_FUTURE_WRITE", 0x0010, 13],
  ] as const) {
    test(`a ${seal}-sealed memfd registers read-only and read-write (MAP_PRIVATE, as crosvm maps it)`, async () => {
      const content = pattern(2 * PAGE, value);
      const f = memfdWith(content);
      sys.fcntl(f, sys.F_ADD_SEALS, value);
      const ro = dev(window);
      const rw = dev(window + 1);
      register({ SharedMemory: { descriptor: fd(f), size: 2 * PAGE } }, ro, { read: true, write: false });
      register({ Descriptor: { descriptor: fd(f), offset: 0, size: 2 * PAGE } }, rw, { read: true, write: true });
      expect(await guest64([ro, ro + PAGE + 8, rw, rw + PAGE + 8])).toEqual([le64(content, 0), le64(content, PAGE + 8), le64(content, 0), le64(content, PAGE + 8)]);
      await mailbox.write32(rw, 0x77777777);
      expect(Number((await guest64([rw]))[0]! & 0xffff_ffffn)).toBe(0x77777777); // the guest's private copy
      expect(memfdBytes(f)).toEqual(content); // the sealed object is untouched
      unregister(ro);
      unregister(rw);
      sys.close(f);
    });
  }

  test("a source whose size is not a page multiple registers; the guest reads its bytes and zeros past its end", async () => {
    const content = pattern(5000, 9);
    const f = memfdWith(content);
    const at = dev(10);
    register({ SharedMemory: { descriptor: fd(f), size: 5000 } }, at);
    expect(await guest64([at, at + 4096, at + 4992, at + 5000, at + 8184])).toEqual([le64(content, 0), le64(content, 4096), le64(content, 4992), 0n, 0n]);
    unregister(at);
    const big = pattern(3 * PAGE, 10);
    const g = memfdWith(big);
    register({ Descriptor: { descriptor: fd(g), offset: PAGE, size: 5000 } }, at, { read: true, write: false });
    expect(await guest64([at, at + 4096, at + 4984])).toEqual([le64(big, PAGE), le64(big, 2 * PAGE), le64(big, PAGE + 4984)]);
    unregister(at);
    closeAll([f, g]);
  });

  test("SHMEM_MAP: RegisterMemory into a prepared PciBar (PrepareSharedMemoryRegion, then ExistingAllocation), fixed mappings in the arena", async () => {
    const p = jsonCall(t, { PrepareSharedMemoryRegion: { alloc: BAR, cache: "CacheCoherent" } });
    if (p !== "Ok") expectErr(p, EEXIST); // prepared by an earlier test: fine
    const st = state();
    const bar = st.allocations.find((a) => typeof a.alloc === "object" && "PciBar" in a.alloc && a.alloc.PciBar.dev === 5)!;
    expect(bar.size).toBe(16n * BigInt(MiB));
    const arena = st.regions.find((r) => r.kind === "prepared" && r.region_id === bar.start)!;
    expect(arena).toBeDefined();
    const start = Number(bar.start);

    const content = pattern(4 * PAGE, 0x33);
    const f = memfdWith(content);
    const r1 = jsonCall(t, { RegisterMemory: { source: { Descriptor: { descriptor: fd(f), offset: PAGE, size: 2 * PAGE } }, dest: { ExistingAllocation: { allocation: BAR, offset: 0x20000 } }, prot: { read: true, write: true }, cache: "CacheCoherent" } });
    expect(expectRegistered(r1, start + 0x20000)).toBe(arena.slot);
    const page = new SharedPage(PAGE);
    page.view.setUint32(0, 0x0badcafe, true);
    const r2 = jsonCall(t, { RegisterMemory: { source: { SharedMemory: { descriptor: fd(page.fd), size: PAGE } }, dest: { ExistingAllocation: { allocation: BAR, offset: 0x40000 } }, prot: { read: true, write: false }, cache: "CacheCoherent" } });
    expect(expectRegistered(r2, start + 0x40000)).toBe(arena.slot);

    expect(await guest64([start + 0x20000, start + 0x21000 + 8, start + 0x20000 - 8, start + 0x22000, start + 0x40000])).toEqual([
      le64(content, PAGE),
      le64(content, 2 * PAGE + 8),
      0n,
      0n,
      0x0badcafen,
    ]);
    await mailbox.write32(start + 0x20010, 0x12345678);
    expect(memfdBytes(f).subarray(PAGE + 0x10, PAGE + 0x14)).toEqual(new Uint8Array([0x78, 0x56, 0x34, 0x12]));
    unregister(start + 0x20000);
    unregister(start + 0x40000);
    expect(await guest64([start + 0x20000, start + 0x40000])).toEqual([0n, 0n]); // the arena's zeros again
    expectErr(jsonCall(t, { RegisterMemory: { source: { SharedMemory: { descriptor: fd(page.fd), size: PAGE } }, dest: { ExistingAllocation: { allocation: BAR, offset: 16 * MiB } }, prot: { read: true, write: true }, cache: "CacheCoherent" } }), EINVAL);
    page.close();
    sys.close(f);
  });
});

describe("u64 values above 2^53 round-trip exactly", () => {
  test("UnregisterMemory of 2^60+1 and of 2^64-1: ENOENT naming the exact id", () => {
    for (const id of [2n ** 60n + 1n, 2n ** 64n - 1n, 2n ** 53n + 1n]) {
      const chain = expectErr(jsonCall(t, { UnregisterMemory: id }), ENOENT);
      if (!namesId(chain, id)) throw new Error(`the chain does not name ${id} (0x${id.toString(16)}): ${show(chain)}`);
    }
  });

  test("BalloonTargetReached of 2^64-1 and 2^53+1 reads back exactly, in JSON and in MessagePack", () => {
    for (const size of [2n ** 64n - 1n, 2n ** 53n + 1n]) {
      expectOk(jsonCall(t, { BalloonTargetReached: { size } }));
      expect(state().balloon_target).toBe(size);
      expect(BigInt((msgpackCall(t, "GetState") as { State: { balloon_target: bigint } }).State.balloon_target)).toBe(size);
    }
  });

  test("an IoEventRaw datamatch of 2^53+1 is not 2^53: unregistering the neighbour fails, the exact value succeeds", () => {
    const ev = sys.eventfd();
    const addr = 0xe000_3000;
    expectOk(jsonCall(t, { IoEventRaw: { event: fd(ev), addr, datamatch: { U64: 2n ** 53n + 1n }, register: true } }));
    const wrong = jsonCall(t, { IoEventRaw: { event: fd(ev), addr, datamatch: { U64: 2n ** 53n }, register: false } });
    if (typeof wrong !== "object" || !("Err" in wrong)) throw new Error(`unregistering datamatch 2^53 matched a registration of 2^53+1: ${show(wrong)}`);
    expectOk(jsonCall(t, { IoEventRaw: { event: fd(ev), addr, datamatch: { U64: 2n ** 53n + 1n }, register: false } }));
    expectOk(jsonCall(t, { IoEventRaw: { event: fd(ev), addr, datamatch: { U64: 2n ** 64n - 1n }, register: true } }));
    expectOk(jsonCall(t, { IoEventRaw: { event: fd(ev), addr, datamatch: { U64: 2n ** 64n - 1n }, register: false } }));
    sys.close(ev);
  });
});

describe("unknown fields ignored, unknown variants refused (serde's defaults)", () => {
  test("extra fields at every level, before and after the known ones, and a pretty-printed body", async () => {
    const f = memfd(PAGE);
    const at = dev(11);
    expectRegistered(
      rawCall(
        t,
        '{"RegisterMemory":{"x_first":{"a":[1,-2.5e-3,"s",null,true,{"b":{}}]},"source":{"SharedMemory":{"descriptor":0,"size":4096,"x":0}},' +
          `"dest":{"GuestPhysicalAddress":${at}},"prot":{"write":true,"read":true,"x":[]},"cache":"CacheCoherent","x_last":18446744073709551616123}}`,
        [f],
      ),
      at,
    );
    unregister(at);
    const barStart = state().allocations.find((a) => typeof a.alloc === "object" && "PciBar" in a.alloc && a.alloc.PciBar.dev === 5)!.start;
    const p = jsonCall(t, { PrepareSharedMemoryRegion: { alloc: BAR, cache: "CacheCoherent" } });
    if (p !== "Ok") expectErr(p, EEXIST);
    expectRegistered(
      rawCall(
        t,
        '{"RegisterMemory":{"source":{"Descriptor":{"size":4096,"offset":0,"descriptor":0,"future":1}},' +
          '"dest":{"ExistingAllocation":{"offset":0,"allocation":{"PciBar":{"bar":2,"func":0,"dev":5,"bus":0,"x":9}},"y":8}},"prot":{"read":true,"write":true},"cache":"CacheCoherent"}}',
        [f],
      ),
      barStart,
    );
    unregister(barStart);
    expectOk(rawCall(t, '{"BalloonTargetReached":{"size":5,"future":{"nested":[[[{"deeper":"\\u00e9\\ud83d\\ude00"}]]]}}}'));
    const ev = sys.eventfd();
    expectOk(rawCall(t, '{"IoEventRaw":{"event":0,"addr":3758116864,"datamatch":"AnyLength","register":true,"priority":"high"}}', [ev]));
    expectOk(rawCall(t, '{"IoEventRaw":{"priority":"high","event":0,"addr":3758116864,"datamatch":"AnyLength","register":false}}', [ev]));
    sys.close(ev);
    // JSON whitespace between tokens (serde_json::to_vec_pretty's shape), and before the value.
    expectOk(rawCall(t, '{\n  "BalloonTargetReached": {\n    "size": 3\n  }\n}'));
    expectOk(rawCall(t, ' \r\n\t{"BalloonTargetReached":{"size":4}}\n'));
    sys.close(f);
    // Descriptors other than sockets: every memfd and eventfd sent is closed. (One client
    // socket more than at the start is still open at this point in the run; which client
    // holds it is not yet known, so sockets are left out of this count.)
    await expectNonSocketFds(baseNonSocketFds);
  });

  test("a chunk element's extra fields are ignored too", async () => {
    const shm = memfd(2 * PAGE);
    const file = memfdWith(new Uint8Array(PAGE).fill(0x42));
    const at = dev(12);
    t.send(jsonRequest({ MmapAndRegisterMemory: { shm: { descriptor: fd(shm), size: 2 * PAGE }, dest: { GuestPhysicalAddress: at }, num_file_mappings: 1 } }));
    const r = rawCall(t, '[{"file":0,"length":4096,"mem_offset":4096,"file_offset":0,"flags":"ro"}]', [file]);
    expectRegistered(r, at);
    expect(await guest64([at + PAGE])).toEqual([0x4242424242424242n]);
    unregister(at);
    closeAll([shm, file]);
  });

  test("unknown variants at every level: EINVAL (22)", () => {
    const f = memfd(PAGE);
    const reg = (source: string, dest = '{"GuestPhysicalAddress":8589934592}', cache = '"CacheCoherent"') =>
      `{"RegisterMemory":{"source":${source},"dest":${dest},"prot":{"read":true,"write":true},"cache":${cache}}}`;
    const shm = '{"SharedMemory":{"descriptor":0,"size":4096}}';
    const bodies: [string, string, number[]][] = [
      ["request, map form", '{"Frobnicate":{}}', []],
      ["request, unit form", '"Frobnicate"', []],
      ["request, wrong case", '{"unregistermemory":1}', []],
      ["a response variant as a request", '"Ok"', []],
      ["source", reg('{"Dmabuf":{"descriptor":0,"size":4096}}'), [f]],
      ["destination", reg(shm, '{"GuestVirtualAddress":8589934592}'), [f]],
      ["Alloc", reg(shm, '{"ExistingAllocation":{"allocation":{"PciBarX":{"bus":0,"dev":5,"func":0,"bar":2}},"offset":0}}'), [f]],
      ["MemCacheType", reg(shm, undefined, '"CacheSometimes"'), [f]],
      ["Datamatch", '{"IoEventRaw":{"event":0,"addr":3758116864,"datamatch":{"U128":1},"register":true}}', [f]],
    ];
    for (const [what, body, fds] of bodies) {
      const r = rawCall(t, body, fds);
      if (typeof r !== "object" || !("Err" in r) || osError(r.Err) !== EINVAL) throw new Error(`unknown ${what}: expected Err (os error 22), got ${show(r)}`);
    }
    sys.close(f);
  });
});

describe("hostile JSON", () => {
  test("each gets an Err, the server keeps serving, and its RSS grows by less than 4 MiB", async () => {
    const s = await VmemdProcess.start(["--memory", "16M"]);
    const c = TubeEnd.connect(s.socket);
    const enc = (x: string) => new TextEncoder().encode(x);
    const cat = (...parts: (string | number[])[]) => new Uint8Array(parts.flatMap((p) => (typeof p === "string" ? Array.from(enc(p)) : p)));
    const f = memfd(PAGE);
    try {
      const N = 10_900;
      const full = jsonRequest({ RegisterMemory: { source: { SharedMemory: { descriptor: fd(f), size: PAGE } }, dest: { GuestPhysicalAddress: 0x2_0000_0000 }, prot: { read: true, write: true }, cache: "CacheCoherent" } });
      const hostile: [string, Uint8Array, number[]][] = [
        ["64 KiB of [", enc("[".repeat(65536)), []],
        ["64 KiB of {", enc("{".repeat(65536)), []],
        ["deep objects at the top", enc('{"a":'.repeat(N) + "1" + "}".repeat(N)), []],
        ["deep objects where a u64 goes", enc('{"UnregisterMemory":' + '{"a":'.repeat(N) + "0" + "}".repeat(N) + "}"), []],
        ["deep arrays where a struct goes", enc('{"BalloonTargetReached":' + "[".repeat(32000) + "]".repeat(32000) + "}"), []],
        ["65,000 digits", enc('{"UnregisterMemory":' + "9".repeat(65000) + "}"), []],
        ["65,000 digits of a size", enc('{"BalloonTargetReached":{"size":1' + "0".repeat(65000) + "}}"), []],
        ["an exponent past f64", enc('{"UnregisterMemory":1e999999999}'), []],
        ["invalid UTF-8 in a variant name", cat('{"Balloon', [0xff], 'TargetReached":{"size":1}}'), []],
        ["an overlong encoding", cat('{"', [0xc0, 0xaf], '":1}'), []],
        ["a UTF-8-encoded surrogate in a field name", cat('{"BalloonTargetReached":{"size":1,"', [0xed, 0xa0, 0x80], '":2}}'), []],
        ["a string cut inside a character", cat('"GetSt', [0xe2, 0x82]), []],
        ["a lone surrogate escape in a variant name", enc('"GetState\\ud800"'), []],
        ["a raw control character in a string", enc('{"Unregister\u0001Memory":1}'), []],
        ...[1, 2, 10, 30, full.body.length >> 1, full.body.length - 1].map((n): [string, Uint8Array, number[]] => [`truncated to ${n} bytes`, full.body.subarray(0, n), [f]]),
      ];
      for (const [, body] of hostile) expect(body.length).toBeLessThanOrEqual(65536);
      const round = () => {
        for (const [what, body, fds] of hostile) {
          const r = rawCall(c, body, fds);
          if (typeof r !== "object" || !("Err" in r) || osError(r.Err) !== EINVAL) throw new Error(`${what}: expected Err (os error 22), got ${show(r)}`);
          expectOk(jsonCall(c, { BalloonTargetReached: { size: 1 } }));
        }
      };
      // Warm up with valid JSON only, so the growth measured is what hostile input costs.
      for (let i = 0; i < 200; i++) expectOk(jsonCall(c, { BalloonTargetReached: { size: i } }));
      expectErr(jsonCall(c, { UnregisterMemory: 0x5000 }), ENOENT);
      // Three hostile rounds first: the code paths they take are compiled (JIT memory, tier
      // after tier: one round left DFG and FTL code still to come, and a run of the suite
      // read 4.3 MiB where 1.4-2.4 is usual), which is not what a packet costs. What is
      // measured after is what more of them cost: ten rounds, 200 packets, about 6 MiB sent.
      for (let i = 0; i < 3; i++) round();
      const fds0 = s.fdCount();
      const rss0 = rssBytes(s.pid);
      for (let i = 0; i < 10; i++) round();
      const rss1 = rssBytes(s.pid);
      console.log(`hostile JSON: RSS ${(rss0 / MiB).toFixed(1)} MiB -> ${(rss1 / MiB).toFixed(1)} MiB over ${10 * hostile.length} packets`);
      expect(rss1 - rss0).toBeLessThan(4 * MiB);
      await s.expectFdCount(fds0); // every descriptor sent with a truncated body closed
      // Still serving, on this connection and on a new one.
      expectOk(jsonCall(c, { BalloonTargetReached: { size: 9 } }));
      const c2 = TubeEnd.connect(s.socket);
      expectOk(jsonCall(c2, { BalloonTargetReached: { size: 9 } }));
      c2.close();
    } finally {
      sys.close(f);
      c.close();
      expect(await s.stop()).toBe(0);
    }
  });

  test("nesting deeper than serde_json's limit inside an unknown field: answered either way, and the server keeps serving", async () => {
    // serde_json skips an unknown field's value without a depth limit (ignore_value), so
    // crosvm itself would accept this; docs/protocol.md does not say. Only survival is judged.
    const r = rawCall(t, '{"BalloonTargetReached":{"size":1,"x":' + "[".repeat(30000) + "]".repeat(30000) + "}}");
    expect(r === "Ok" || (typeof r === "object" && "Err" in r)).toBe(true);
    expectOk(jsonCall(t, { BalloonTargetReached: { size: 1 } }));
  });
});
