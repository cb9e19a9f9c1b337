// Hostile or careless clients: limits, peers, release on disconnect, load.
import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { encode } from "@msgpack/msgpack";
import * as sys from "../src/sys";
import { encodeRequest, VmemError } from "../src/client";
import { closeAll, memfd, memfdMappings, requireKvm } from "./helpers";
import { BINARY, VmemdProcess } from "./server_harness";

const ROOT = join(import.meta.dir, "..");

const HIGH = 0x2_0000_0000;
const servers: VmemdProcess[] = [];
async function start(args: string[]): Promise<VmemdProcess> {
  const s = await VmemdProcess.start(["--memory", "32M", ...args]);
  servers.push(s);
  return s;
}
afterAll(async () => {
  for (const s of servers) await s.stop();
});
const shmReq = (fd: number, guest: number) => ({
  RegisterMemory: { source: { SharedMemory: { descriptor: fd, size: 4096 } }, dest: { GuestPhysicalAddress: guest }, prot: { read: true, write: true }, cache: "CacheCoherent" as const },
});

describe("peers and the socket file", () => {
  test("the socket is mode 0600 by default, --socket-mode changes it", async () => {
    const a = await start([]);
    expect(statSync(a.socket).mode & 0o777).toBe(0o600);
    const b = await start(["--socket-mode", "0660"]);
    expect(statSync(b.socket).mode & 0o777).toBe(0o660);
  });

  test("--allow-uid refuses other users at accept, and the peer is logged", async () => {
    const s = await start(["--allow-uid", "4242"]);
    const c = s.connect();
    expect(() => c.request("GetState")).toThrow(/closed the connection|ECONNRESET|EPIPE/);
    c.close();
    const ok = await start(["--allow-uid", String(process.getuid!())]);
    const c2 = ok.connect();
    expect(c2.request("GetState")).toHaveProperty("State");
    c2.close();
    await Bun.sleep(50);
    expect(s.stderr).toContain("refused a peer not in --allow-uid");
    expect(ok.stderr).toMatch(/client connected conn=\d+ pid=\d+ uid=\d+ gid=\d+/);
  });

  test("--max-connections: one more is closed, the others keep working", async () => {
    const s = await start(["--max-connections", "2"]);
    const a = s.connect();
    const b = s.connect();
    a.request("GetState");
    b.request("GetState");
    const c = s.connect();
    expect(() => c.request("GetState")).toThrow();
    expect(a.request("GetState")).toHaveProperty("State");
    closeAll([a.fd, b.fd, c.fd]);
  });
});

describe("limits", () => {
  test("--max-regions-per-connection, --max-fds-per-packet and --max-packet answer Err and close what came", async () => {
    const s = await start(["--max-regions-per-connection", "3", "--max-fds-per-packet", "4", "--max-packet", "1K"]);
    const base = s.fdCount();
    const c = s.connect();
    const fd = memfd(4096);
    for (let i = 0; i < 3; i++) c.registerMemory({ SharedMemory: { descriptor: fd, size: 4096 } }, { GuestPhysicalAddress: HIGH + i * 4096 });
    const e = c.request(shmReq(fd, HIGH + 0x10000));
    expect(e).toMatchObject({ Err: { errno: sys.Errno.ENOSPC } });
    // Another connection has its own budget; unregistering frees budget.
    const d = s.connect();
    d.registerMemory({ SharedMemory: { descriptor: fd, size: 4096 } }, { GuestPhysicalAddress: HIGH + 0x10000 });
    c.unregisterMemory(HIGH);
    c.registerMemory({ SharedMemory: { descriptor: fd, size: 4096 } }, { GuestPhysicalAddress: HIGH });
    const fds = Array.from({ length: 5 }, () => memfd(4096));
    c.sendPacket({ body: encode("GetState"), fds });
    expect(c.recv()).toMatchObject({ Err: { errno: sys.Errno.EINVAL } });
    c.sendPacket({ body: new Uint8Array(2048), fds: [] });
    expect(c.recv()).toMatchObject({ Err: { errno: sys.Errno.EINVAL } });
    closeAll([...fds, fd]);
    c.close();
    d.close();
    await s.expectFdCount(base);
  });

  test("a memfd source is sealed against shrinking", async () => {
    const s = await start([]);
    const c = s.connect();
    const fd = memfd(8192);
    c.registerMemory({ SharedMemory: { descriptor: fd, size: 8192 } }, { GuestPhysicalAddress: HIGH });
    expect(() => sys.ftruncate(fd, 4096)).toThrow(/EPERM/);
    sys.ftruncate(fd, 16384); // growing is still allowed
    c.close();
    sys.close(fd);
  });

  test("EMFILE in the server is answered with Err or a refused connection, never a crash", async () => {
    // A server whose descriptor table is tiny: it cannot raise a hard limit of 48.
    const s = new VmemdProcess([]);
    s.proc = Bun.spawn(["sh", "-c", `ulimit -n 48; exec ${BINARY} serve --socket ${s.socket} --memory 16M`], { stdin: "ignore", stdout: "pipe", stderr: "pipe" });
    servers.push(s);
    for (let i = 0; i < 200; i++) {
      try {
        sys.close(sys.connectSeqpacket(s.socket));
        break;
      } catch {
        await Bun.sleep(10);
      }
    }
    const clients = [];
    for (let i = 0; i < 60; i++) {
      try {
        clients.push(s.connect());
      } catch {}
    }
    await Bun.sleep(100);
    const fds = Array.from({ length: 40 }, () => memfd(4096));
    const survivor = clients[0]!;
    survivor.sendPacket({ body: encode({ MmapAndRegisterMemory: { shm: { descriptor: 0, size: 4096 * 64 }, dest: { GuestPhysicalAddress: HIGH }, num_file_mappings: 39 } }), fds: fds });
    // Its descriptors may be cut short (MSG_CTRUNC): it is still an MmapAndRegisterMemory,
    // answered once, after its chunk.
    const chunk = Array.from({ length: 39 }, (_, i) => ({ file: i, length: 4096, mem_offset: 4096 * i, file_offset: 0 }));
    survivor.sendPacket({ body: encode(chunk), fds: fds.slice(0, 39) });
    const r = survivor.recv(5000);
    expect(r).toHaveProperty("Err");
    closeAll(fds);
    for (const c of clients) c.close();
    await Bun.sleep(100);
    const c = s.connect();
    expect(c.request("GetState")).toHaveProperty("State");
    c.close();
    expect(s.proc.exitCode).toBeNull();
  });
});

describe("a peer that half-closes", () => {
  test("with responses still queued: it gets every one, and the server does not spin meanwhile", async () => {
    const s = await start([]);
    const c = s.connect();
    const p = encodeRequest({ BalloonTargetReached: { size: 1 } });
    let sent = 0;
    for (let tries = 0; sent < 280 && tries < 100_000; tries++) if (c.trySendPacket(p)) sent++;
    sys.shutdownWrite(c.fd);
    const cpu = () => {
      const f = require("node:fs").readFileSync(`/proc/${s.pid}/stat`, "utf8").split(") ")[1].split(" ");
      return Number(f[11]) + Number(f[12]); // utime + stime, in clock ticks
    };
    const before = cpu();
    await Bun.sleep(500);
    expect(cpu() - before).toBeLessThan(10); // 500 ms of a spinning loop would be ~50 ticks
    let got = 0;
    for (;;) {
      try {
        if (c.recv(2000) !== undefined) got++;
      } catch {
        break; // end of stream: the server closed after answering everything
      }
    }
    expect(got).toBe(sent);
    c.close();
  });
});

describe("--release-on-disconnect", () => {
  test("a client's regions and ioevents go when it disconnects; without the flag they stay (crosvm)", async () => {
    for (const release of [true, false]) {
      const s = await start(release ? ["--release-on-disconnect"] : []);
      const watcher = s.connect();
      const maps = memfdMappings(s.pid);
      const c = s.connect();
      const fd = memfd(4096);
      const ev = sys.eventfd();
      for (let i = 0; i < 3; i++) c.registerMemory({ SharedMemory: { descriptor: fd, size: 4096 } }, { GuestPhysicalAddress: HIGH + i * 4096 });
      c.unregisterMemory(HIGH + 4096);
      c.ioEvent(ev, 0xe000_0000, { U32: 1 }, true);
      c.close();
      await Bun.sleep(100);
      const st = watcher.getState();
      expect(st.regions.length).toBe(release ? 0 : 2);
      expect(memfdMappings(s.pid)).toBe(release ? maps : maps + 2);
      // The ioevent is gone only with the flag: registering it again tells.
      const again = watcher.request({ IoEventRaw: { event: ev, addr: 0xe000_0000, datamatch: { U32: 1 }, register: true } });
      expect(again === "Ok").toBe(release);
      watcher.close();
      closeAll([fd, ev]);
    }
  });
});

describe("load", () => {
  test("16 clients x 10,000 mixed requests at once: all answered, state consistent, nothing left behind", async () => {
    const s = await start([]);
    const base = s.fdCount();
    const maps = memfdMappings(s.pid);
    const procs = Array.from({ length: 16 }, (_, i) =>
      Bun.spawn(["bun", `${import.meta.dir}/load_client.ts`, s.socket, String(i), "10000"], { stdout: "pipe", stderr: "pipe" }),
    );
    const results = await Promise.all(
      procs.map(async (p) => {
        const [out, err, code] = await Promise.all([new Response(p.stdout).text(), new Response(p.stderr).text(), p.exited]);
        if (code !== 0) throw new Error(`load client failed (${code}): ${err}`);
        return JSON.parse(out);
      }),
    );
    for (const r of results) {
      expect(r.answered).toBe(10_000);
      expect(r.wrong).toBe(0);
    }
    const c = s.connect();
    const st = c.getState();
    expect(st.regions.length).toBe(16 * 5);
    expect(st.slots_used).toBe(1 + 16 * 5);
    await s.expectFdCount(base + 1);
    expect(memfdMappings(s.pid)).toBe(maps + 16 * 5);
    for (const r of st.regions) c.unregisterMemory(r.region_id);
    expect(memfdMappings(s.pid)).toBe(maps);
    c.close();
    await s.expectFdCount(base);
  }, 120_000);

  test("a loop that never finds an idle moment still lets Bun's event loop turn (timers, signal handlers)", async () => {
    requireKvm();
    // In a child process: a loop that never yields would hang this one, test timeouts and
    // all (they are timers too). An eventfd whose count nobody drains is ready on every
    // epoll_wait, so every wake-up has work and only the tick can hand control back.
    const script = `
      import * as sys from ${JSON.stringify(`${ROOT}/src/sys`)};
      import { KvmVm, MiB } from ${JSON.stringify(`${ROOT}/src/kvm`)};
      import { RegionState, SystemAllocator } from ${JSON.stringify(`${ROOT}/src/memory`)};
      import { DEFAULT_SERVER_OPTIONS, Logger, Server } from ${JSON.stringify(`${ROOT}/src/server`)};
      const vm = KvmVm.create({ memory: 16 * MiB });
      const ctx = { vm, allocator: new SystemAllocator(vm.ramSize, vm.physAddrLimit), state: new RegionState() };
      const server = new Server(ctx, { ...DEFAULT_SERVER_OPTIONS, socketPath: process.argv[1], log: new Logger("warn") });
      server.listen();
      const busy = sys.eventfd(1);
      let wakeUps = 0;
      server.watch(busy, () => void wakeUps++);
      setTimeout(() => server.stop("test", 3), 300);
      console.log("looping");
      const code = await server.run();
      console.log(JSON.stringify({ code, wakeUps }));
    `;
    const dir = mkdtempSync(join(tmpdir(), "vmemd-busy-"));
    const child = Bun.spawn([process.execPath, "-e", script, join(dir, "sock")], { stdout: "pipe", stderr: "pipe" });
    try {
      // The clock starts once the loop runs: starting Bun and the VM is not what is judged.
      const reader = child.stdout.getReader();
      let text = "";
      while (!text.includes("looping\n")) {
        const { value, done } = await reader.read();
        if (done) throw new Error(`the child ended before looping: ${await new Response(child.stderr).text()}`);
        text += new TextDecoder().decode(value);
      }
      const exit = await Promise.race([child.exited, Bun.sleep(5000).then(() => "still looping after 5 s")]);
      expect(exit).toBe(0);
      for (let r = await reader.read(); !r.done; r = await reader.read()) text += new TextDecoder().decode(r.value);
      const out = JSON.parse(text.slice(text.indexOf("looping\n") + "looping\n".length));
      expect(out.code).toBe(3);
      expect(out.wakeUps).toBeGreaterThan(1000); // it was busy all along
    } finally {
      child.kill("SIGKILL");
      await child.exited;
      rmSync(dir, { recursive: true, force: true });
    }
  }, 60_000);
});

export { VmemError, encodeRequest };
