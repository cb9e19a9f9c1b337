// 30,000 live regions: GetState's first pages, GetRegions paging through every one, and
// `vmemd ctl state` drawing them readably, against the compiled binary.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { encodeRequest, JSON_ENCODING, MSGPACK, VmemClient, type Packet } from "../src/client";
import * as sys from "../src/sys";
import { memfd } from "./helpers";
import { BINARY, VmemdProcess } from "./server_harness";

const COUNT = 30_000;
const BASE = 0x10_0000_0000;
let server: VmemdProcess;
let fd: number;

beforeAll(async () => {
  server = await VmemdProcess.start(["--memory", "64M", "--max-regions-per-connection", "40000", "--max-mappings-per-connection", "40000"]);
  fd = memfd(4096);
  const c = server.connect();
  const packets: Packet[] = [];
  for (let i = 0; i < COUNT; i++) {
    packets.push(encodeRequest({ RegisterMemory: { source: { SharedMemory: { descriptor: fd, size: 4096 } }, dest: { GuestPhysicalAddress: BASE + i * 8192 }, prot: { read: true, write: true }, cache: "CacheCoherent" } }));
  }
  for (const r of c.pipeline(packets)) expect(r).toHaveProperty("RegisterMemory");
  c.close();
}, 120_000);
afterAll(async () => {
  sys.close(fd);
  await server?.stop();
});

describe("30,000 live regions", () => {
  for (const enc of [MSGPACK, JSON_ENCODING] as const) {
    test(`GetState answers its first page, and GetRegions pages through all, in order (${enc === MSGPACK ? "MessagePack" : "JSON"})`, () => {
      const c = VmemClient.connect(server.socket, enc);
      try {
        const st = c.getState();
        expect(st.regions.length).toBeGreaterThan(100);
        expect(st.regions_next).toBe(st.regions.length < COUNT ? BASE + st.regions.length * 8192 : null);
        let n = 0;
        let pages = 0;
        let last = -1;
        for (let from: number | bigint | null = 0; from !== null; pages++) {
          const page = c.getRegions(from);
          for (const r of page.regions) {
            expect(Number(r.region_id)).toBeGreaterThan(last);
            last = Number(r.region_id);
            n++;
          }
          from = page.next;
        }
        expect(n).toBe(COUNT);
        expect(pages).toBeGreaterThan(COUNT / 1000);
        // `max` caps a page; a page of one still moves on.
        const one = c.getRegions(BASE + 8192, 1);
        expect(one.regions.map((r) => Number(r.region_id))).toEqual([BASE + 8192]);
        expect(one.next).toBe(BASE + 2 * 8192);
        expect(c.getRegions(2n ** 63n).regions).toEqual([]);
      } finally {
        c.close();
      }
    });
  }

  test("ctl state summarises runs; --all prints every region; --json holds them all", () => {
    const run = (...args: string[]) => Bun.spawnSync([BINARY, "ctl", "--socket", server.socket, "state", ...args]);
    const short = run();
    expect(short.exitCode).toBe(0);
    const text = short.stdout.toString();
    expect(text.split("\n").length).toBeLessThan(30);
    expect(text).toContain(`×${COUNT}`);
    const all = run("--all").stdout.toString();
    expect(all.split("\n").filter((l) => l.includes("dynamic region")).length).toBe(COUNT);
    const json = JSON.parse(run("--json").stdout.toString());
    expect(json.State.regions.length).toBe(COUNT);
    expect(json.State.regions_next).toBeNull();
  });
});
