// Hostile surroundings, against dist/vmemd: a working directory with a bunfig.toml and a
// .env, other programs' files and sockets at the socket path, stray signals, inherited
// descriptors, and a peer flooding connections that are refused.
import { afterAll, describe, expect, test } from "bun:test";
import { existsSync, lstatSync, mkdtempSync, readFileSync, renameSync, rmSync, statSync, symlinkSync, unlinkSync, utimesSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Subprocess } from "bun";
import * as sys from "../src/sys";
import { VmemClient } from "../src/client";
import { Logger, RateLimitedLog } from "../src/server";
import { requireKvm } from "./helpers";
import { BINARY, requireBinary } from "./server_harness";

const dirs: string[] = [];
function tempDir(): string {
  const d = mkdtempSync(join(tmpdir(), "vmemd-surr-"));
  dirs.push(d);
  return d;
}
const children: Subprocess[] = [];
afterAll(async () => {
  for (const c of children) c.kill("SIGKILL");
  await Promise.all(children.map((c) => c.exited));
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

/** dist/vmemd serve, started through sh so descriptor `readyFd` is a pipe to us; resolves once it wrote "ready". */
class Served {
  stderr = "";
  /** Settles when stderr has been read to its end. */
  private pumped: Promise<void> = Promise.resolve();
  private constructor(
    readonly proc: Subprocess<"ignore", "pipe", "pipe">,
    readonly socket: string,
  ) {}

  static async start(socket: string, args: string[] = [], opts: { cwd?: string; readyFd?: number; umask?: string } = {}): Promise<Served> {
    const s = Served.spawn(socket, args, opts);
    const ready = await Promise.race([new Response(s.proc.stdout).text(), Bun.sleep(15_000).then(() => "(no answer in 15 s)")]);
    if (ready !== "ready\n") {
      s.proc.kill("SIGKILL");
      await s.proc.exited;
      throw new Error(`vmemd did not come up (${JSON.stringify(ready)}, exit ${s.proc.exitCode}): ${s.stderr}`);
    }
    return s;
  }

  /** Spawns without waiting (for starts that are meant to fail). */
  static spawn(socket: string, args: string[] = [], opts: { cwd?: string; readyFd?: number; umask?: string } = {}): Served {
    requireKvm();
    requireBinary();
    const n = opts.readyFd ?? 3;
    const umask = opts.umask === undefined ? "" : `umask ${opts.umask}; `;
    const proc = Bun.spawn(
      ["sh", "-c", `${umask}exec "$0" serve "$@" --ready-fd ${n} ${n}>&1 1>/dev/null`, BINARY, "--socket", socket, "--memory", "16M", "--die-with-parent", ...args],
      { cwd: opts.cwd, stdin: "ignore", stdout: "pipe", stderr: "pipe" },
    );
    children.push(proc);
    const s = new Served(proc, socket);
    s.pumped = (async () => {
      const dec = new TextDecoder();
      for await (const chunk of proc.stderr) s.stderr += dec.decode(chunk, { stream: true });
    })();
    return s;
  }

  /** Exit status (and all of stderr read), waiting at most `ms`. */
  async exit(ms = 10_000): Promise<number | string> {
    const done = this.proc.exited.then(async (code) => (await this.pumped, code));
    return Promise.race([done, Bun.sleep(ms).then(() => `still running after ${ms} ms`)]);
  }

  async stop(signal: NodeJS.Signals = "SIGTERM"): Promise<number | string> {
    this.proc.kill(signal);
    return this.exit();
  }

  serves(): boolean {
    const c = VmemClient.connect(this.socket);
    try {
      return "State" in (c.request("GetState") as object);
    } finally {
      c.close();
    }
  }
}

/** A socket of another program bound (and listening, unless told) at `path`. */
function foreignSocket(path: string, type: number, listen = true, backlog = 16): number {
  const fd = sys.unixSocket(type, true);
  sys.bindUnix(fd, path);
  if (listen && type !== sys.SOCK_DGRAM) sys.listen(fd, backlog);
  return fd;
}

describe("no configuration from the working directory", () => {
  test("a bunfig.toml preload and .env files there are not loaded by --version, ctl --help or serve", async () => {
    const dir = tempDir();
    const marker = join(dir, "MARKER");
    writeFileSync(join(dir, "evil.ts"), `require("node:fs").writeFileSync(${JSON.stringify(marker)}, "preload ran: " + process.argv.join(" "));\n`);
    writeFileSync(join(dir, "bunfig.toml"), `preload = ["./evil.ts"]\n`);
    const envFiles = [".env", ".env.local", ".env.production"].map((f) => join(dir, f));
    for (const f of envFiles) writeFileSync(f, `VMEMD_EVIL=1\nBUN_JSC_useJIT=0\n`);
    // A .env file that is read shows in its access time (an old atime is always updated).
    const old = new Date("2000-01-01T00:00:00Z");
    const probe = join(dir, "atime-probe");
    writeFileSync(probe, "x");
    utimesSync(probe, old, new Date());
    readFileSync(probe);
    if (statSync(probe).atimeMs === old.getTime()) throw new Error(`CANNOT CHECK: the file system of ${dir} does not update access times`);
    for (const f of envFiles) utimesSync(f, old, new Date());

    const run = (...args: string[]) => Bun.spawnSync([BINARY, ...args], { cwd: dir, env: { PATH: "/usr/bin:/bin" } });
    requireBinary();
    const version = run("--version");
    expect(version.exitCode).toBe(0);
    expect(version.stdout.toString()).toMatch(/^vmemd \d+\.\d+\.\d+\n$/);
    expect(run("ctl", "--help").stdout.toString()).toContain("mmap-register");
    const s = await Served.start(join(dir, "s.sock"), [], { cwd: dir });
    expect(s.serves()).toBe(true);
    expect(await s.stop()).toBe(0);

    expect(existsSync(marker)).toBe(false);
    for (const f of envFiles) expect({ f, atime: statSync(f).atimeMs }).toEqual({ f, atime: old.getTime() });
  });
});

describe("the socket path", () => {
  test("another program's live socket (stream, datagram, seqpacket, or bound and not listening) is not unlinked: vmemd refuses to start", async () => {
    const dir = tempDir();
    const cases = [
      ["stream", sys.SOCK_STREAM, true],
      ["datagram", sys.SOCK_DGRAM, true],
      ["seqpacket", sys.SOCK_SEQPACKET, true],
      ["stream, bound only", sys.SOCK_STREAM, false],
    ] as const;
    for (const [name, type, listen] of cases) {
      const path = join(dir, `${name.replace(/\W/g, "_")}.sock`);
      const fd = foreignSocket(path, type, listen);
      const ino = lstatSync(path).ino;
      const s = Served.spawn(path);
      expect({ name, exit: await s.exit() }).toEqual({ name, exit: 1 });
      expect(s.stderr).toContain(`another server is answering on ${path}`);
      expect(s.stderr).toContain("refusing to replace it");
      expect({ name, ino: lstatSync(path).ino }).toEqual({ name, ino });
      if (listen) {
        // Still reachable: the other program keeps its socket.
        const c = sys.unixSocket(type, true);
        sys.connectUnix(c, path);
        sys.close(c);
      }
      sys.close(fd);
    }
  });

  test("a regular file, a directory or a symlink at the path is left untouched", async () => {
    const dir = tempDir();
    const file = join(dir, "precious");
    writeFileSync(file, "keep me");
    const target = join(dir, "target.sock");
    const t = foreignSocket(target, sys.SOCK_SEQPACKET, false); // a socket nobody answers on: stale
    const link = join(dir, "link.sock");
    symlinkSync(target, link);
    for (const path of [file, dir, link]) {
      const s = Served.spawn(path);
      expect({ path, exit: await s.exit() }).toEqual({ path, exit: 1 });
      expect(s.stderr).toContain(`${path} exists and is not a socket; refusing to replace it`);
    }
    expect(readFileSync(file, "utf8")).toBe("keep me");
    expect(lstatSync(link).isSymbolicLink()).toBe(true);
    expect(lstatSync(target).isSocket()).toBe(true);
    sys.close(t);
  });

  test("a stale socket (nobody listening) is replaced", async () => {
    const dir = tempDir();
    const path = join(dir, "stale.sock");
    sys.close(foreignSocket(path, sys.SOCK_SEQPACKET));
    const s = await Served.start(path);
    expect(s.serves()).toBe(true);
    expect(s.stderr).toContain("replaced a stale socket file");
    expect(await s.stop()).toBe(0);
    expect(existsSync(path)).toBe(false);
  });

  test("a socket whose backlog is full does not hang start-up: refused within a bounded time", async () => {
    const dir = tempDir();
    const path = join(dir, "full.sock");
    const l = foreignSocket(path, sys.SOCK_SEQPACKET, true, 0);
    const queued: number[] = [];
    for (let i = 0; i < 64; i++) {
      try {
        queued.push(sys.connectSeqpacket(path, true));
      } catch (e) {
        expect((e as sys.SysError).errno).toBe(sys.Errno.EAGAIN);
        break;
      }
    }
    const t0 = performance.now();
    const s = Served.spawn(path);
    expect(await s.exit(10_000)).toBe(1);
    expect(performance.now() - t0).toBeLessThan(5000);
    expect(s.stderr).toContain("backlog is full");
    expect(lstatSync(path).isSocket()).toBe(true);
    for (const fd of [...queued, l]) sys.close(fd);
  });

  test("at shutdown, a path swapped for another file or another program's socket is not deleted", async () => {
    const dir = tempDir();
    // A regular file put in place of vmemd's socket.
    const a = join(dir, "a.sock");
    const s1 = await Served.start(a);
    renameSync(a, `${a}.moved`);
    writeFileSync(a, "someone else's");
    expect(await s1.stop()).toBe(0);
    expect(readFileSync(a, "utf8")).toBe("someone else's");
    expect(s1.stderr).toContain("the socket path now names another file; leaving it");
    // Another program's socket in its place.
    const b = join(dir, "b.sock");
    const s2 = await Served.start(b);
    unlinkSync(b);
    const other = foreignSocket(b, sys.SOCK_SEQPACKET);
    expect(await s2.stop()).toBe(0);
    sys.close(sys.connectSeqpacket(b, true)); // still there, still answering
    sys.close(other);
    // Removed by someone else: nothing to do, still exit 0.
    const c = join(dir, "c.sock");
    const s3 = await Served.start(c);
    unlinkSync(c);
    expect(await s3.stop()).toBe(0);
    expect(s3.stderr).toContain("the socket file was already removed");
  });

  test("the socket's mode is right from the moment it appears (default 0600, whatever the umask)", async () => {
    const dir = tempDir();
    for (const [umask, mode, args] of [
      ["000", 0o600, []],
      ["077", 0o660, ["--socket-mode", "0660"]],
      ["000", 0o640, ["--socket-mode", "640"]],
    ] as const) {
      const path = join(dir, `m${mode.toString(8)}.sock`);
      const s = Served.spawn(path, [...args], { umask });
      // Spin on lstat until the file exists: the first sight of it is within microseconds of bind.
      const deadline = Date.now() + 15_000;
      let first: ReturnType<typeof lstatSync> | undefined;
      while ((first = lstatSync(path, { throwIfNoEntry: false })) === undefined) {
        if (Date.now() > deadline || s.proc.exitCode !== null) throw new Error(`no socket appeared: ${s.stderr}`);
      }
      expect({ umask, first: (first.mode & 0o7777).toString(8), socket: first.isSocket() }).toEqual({ umask, first: mode.toString(8), socket: true });
      expect(await new Response(s.proc.stdout).text()).toBe("ready\n");
      expect(statSync(path).mode & 0o7777).toBe(mode);
      expect(await s.stop()).toBe(0);
    }
  });
});

describe("signals", () => {
  test("SIGHUP, SIGUSR1 and SIGUSR2 leave it serving (also with a guest on its vCPU); SIGTERM then ends it and removes the socket", async () => {
    const dir = tempDir();
    for (const args of [[], ["--guest", join(import.meta.dir, "guest", "guest.bin"), "--serial", join(dir, "serial")]]) {
      const s = await Served.start(join(dir, "hup.sock"), args);
      for (const sig of ["SIGHUP", "SIGUSR1", "SIGUSR2", "SIGHUP"] as const) {
        s.proc.kill(sig);
        await Bun.sleep(50);
      }
      await Bun.sleep(300); // the handlers run when the loop's tick lets Bun's event loop turn
      expect(s.proc.exitCode).toBeNull();
      expect(s.serves()).toBe(true);
      expect(s.stderr).toContain("ignored SIGHUP");
      expect(s.stderr).toContain("ignored SIGUSR1");
      expect(s.stderr).toContain("ignored SIGUSR2");
      expect(await s.stop("SIGTERM")).toBe(0);
      expect(existsSync(s.socket)).toBe(false);
    }
  });

  test("every way of ending removes the socket file: SIGTERM, SIGINT, SIGHUP then SIGTERM, parent death", async () => {
    const dir = tempDir();
    for (const signals of [["SIGTERM"], ["SIGINT"], ["SIGHUP", "SIGTERM"]] as const) {
      const s = await Served.start(join(dir, `${signals.join("-")}.sock`));
      for (const sig of signals) {
        s.proc.kill(sig);
        await Bun.sleep(200);
      }
      expect({ signals, exit: await s.exit() }).toEqual({ signals, exit: 0 });
      expect({ signals, left: existsSync(s.socket) }).toEqual({ signals, left: false });
    }
    // --die-with-parent: a parent that is sent SIGHUP-proof vmemd, then exits.
    const sock = join(dir, "orphan.sock");
    const script = `
      const p = Bun.spawn(["sh", "-c", 'exec "$0" serve --socket "$1" --memory 16M --die-with-parent --ready-fd 3 3>&1 1>/dev/null', ${JSON.stringify(BINARY)}, ${JSON.stringify(sock)}], { stdout: "pipe", stderr: "ignore" });
      if ((await new Response(p.stdout).text()) !== "ready\\n") process.exit(3);
      p.kill("SIGHUP");
      await Bun.sleep(300);
      console.log(p.pid);
      process.exit(p.exitCode === null ? 0 : 4);
    `;
    const parent = Bun.spawn([process.execPath, "-e", script], { stdout: "pipe", stderr: "inherit" });
    const pid = Number((await new Response(parent.stdout).text()).trim());
    expect(await parent.exited).toBe(0);
    let alive = true;
    for (let i = 0; i < 500 && alive; i++) {
      await Bun.sleep(10);
      try {
        process.kill(pid, 0);
      } catch {
        alive = false;
      }
    }
    expect(alive).toBe(false);
    expect(existsSync(sock)).toBe(false);
  });
});

describe("--ready-fd", () => {
  test("N = 3, 5 and 9 as pipes, 9 as a file, 6 as a socket: one line, once listening", async () => {
    const dir = tempDir();
    for (const n of [3, 5, 9]) {
      const s = await Served.start(join(dir, `r${n}.sock`), [], { readyFd: n });
      expect(s.serves()).toBe(true);
      expect(await s.stop()).toBe(0);
    }
    // A regular file (appended to) as descriptor 9.
    const file = join(dir, "ready.txt");
    writeFileSync(file, "before\n");
    const sock = join(dir, "rf.sock");
    const p = Bun.spawn(["sh", "-c", `exec "$0" serve --socket "$1" --memory 16M --die-with-parent --ready-fd 9 9>>"$2"`, BINARY, sock, file], { stdout: "ignore", stderr: "pipe" });
    children.push(p);
    for (let i = 0; i < 1500 && readFileSync(file, "utf8") === "before\n" && p.exitCode === null; i++) await Bun.sleep(10);
    expect(readFileSync(file, "utf8")).toBe("before\nready\n");
    sys.close(sys.connectSeqpacket(sock));
    p.kill("SIGTERM");
    expect(await p.exited).toBe(0);
    // A socket (Bun's extra stdio "pipe") as descriptor 6.
    const sock6 = join(dir, "r6.sock");
    const q = Bun.spawn([BINARY, "serve", "--socket", sock6, "--memory", "16M", "--die-with-parent", "--ready-fd", "6"], {
      stdio: ["ignore", "ignore", "pipe", "ignore", "ignore", "ignore", "pipe"],
    });
    children.push(q);
    const end = q.stdio[6] as unknown as number;
    expect(sys.pollOne(end, sys.POLLIN, 15_000) & sys.POLLIN).toBeTruthy();
    const buf = new Uint8Array(16);
    expect(new TextDecoder().decode(buf.subarray(0, sys.read(end, buf)))).toBe("ready\n");
    sys.close(sys.connectSeqpacket(sock6));
    q.kill("SIGTERM");
    expect(await q.exited).toBe(0);
  });

  test("a descriptor that was not passed (the runtime's own epoll and eventfd live at 3 and 4) is refused", () => {
    requireBinary();
    for (const n of [3, 4, 7]) {
      const r = Bun.spawnSync([BINARY, "serve", "--socket", "/nonexistent/x.sock", "--ready-fd", String(n)], { stdio: ["ignore", "ignore", "pipe"] });
      expect({ n, code: r.exitCode }).toEqual({ n, code: 2 });
      expect(r.stderr.toString()).toMatch(/^vmemd serve: --ready-fd: .*\n$/);
    }
  });
});

describe("refused connections are logged at most once a second", () => {
  /** [lines, events]: a line without a count is one event; "(and N more" is 1 + N; ": N more" (the flush) is N. */
  function tally(stderr: string, msg: string): [number, number] {
    let lines = 0;
    let events = 0;
    for (const line of stderr.split("\n")) {
      if (!line.includes(msg)) continue;
      lines++;
      const and = /\(and (\d+) more in the last [\d.]+s\)/.exec(line);
      const flushed = /: (\d+) more in the last [\d.]+s$/.exec(line);
      events += and ? 1 + Number(and[1]) : flushed ? Number(flushed[1]) : 1;
    }
    return [lines, events];
  }

  /**
   * Connects `n` times and hangs up; returns once the server has taken every one (it closed
   * the last). Non-blocking, yielding on a full backlog: a server stalled on its stderr pipe
   * must fail the test, not hang this process (which reads that pipe).
   */
  async function flood(path: string, n: number): Promise<void> {
    const deadline = Date.now() + 20_000;
    let last = -1;
    for (let i = 0; i < n; ) {
      try {
        const fd = sys.connectSeqpacket(path, true);
        if (++i === n) last = fd;
        else sys.close(fd);
      } catch (e) {
        if ((e as sys.SysError).errno !== sys.Errno.EAGAIN || Date.now() > deadline) throw e;
        await Bun.sleep(1);
      }
    }
    while (!(sys.pollOne(last, sys.POLLRDHUP, 0) & (sys.POLLRDHUP | sys.POLLHUP))) {
      if (Date.now() > deadline) throw new Error("the server did not take every connection");
      await Bun.sleep(5);
    }
    sys.close(last);
  }

  test("2000 peers not in --allow-uid, 2000 over --max-connections: a handful of lines, every event counted", async () => {
    const dir = tempDir();
    const a = await Served.start(join(dir, "uid.sock"), ["--allow-uid", "4242"]);
    const b = await Served.start(join(dir, "max.sock"), ["--max-connections", "1"]);
    const holder = VmemClient.connect(b.socket);
    holder.request("GetState");
    // Five bursts over about two seconds, so several intervals pass.
    for (let i = 0; i < 5; i++) {
      await Promise.all([flood(a.socket, 400), flood(b.socket, 400)]);
      await Bun.sleep(400);
    }
    holder.close();
    expect(await a.stop()).toBe(0);
    expect(await b.stop()).toBe(0);
    const [uidLines, uidEvents] = tally(a.stderr, "refused a peer not in --allow-uid");
    const [maxLines, maxEvents] = tally(b.stderr, "refused a connection: limit reached");
    expect(uidEvents).toBe(2000);
    expect(maxEvents).toBe(2000);
    // One line a second at most, plus the count still owed at shutdown.
    expect(uidLines).toBeGreaterThanOrEqual(2);
    expect(uidLines).toBeLessThanOrEqual(6);
    expect(maxLines).toBeGreaterThanOrEqual(2);
    expect(maxLines).toBeLessThanOrEqual(6);
    expect(a.stderr).toMatch(/refused a peer not in --allow-uid \(and \d+ more in the last [\d.]+s\) pid=\d+ uid=\d+ gid=\d+/);
  }, 60_000);

  test("RateLimitedLog: the first event logs, the rest ride on the next line after the interval, flush writes what is owed", () => {
    const [r, w] = sys.pipe();
    try {
      let now = 0;
      const log = new RateLimitedLog(new Logger("info", "text", w), 1000, () => now);
      for (let i = 0; i < 500; i++) log.warn("refused", { i });
      log.warn("other");
      now = 999;
      log.warn("refused", { i: 500 });
      now = 1500;
      log.warn("refused", { i: 501 });
      now = 1600;
      log.warn("refused", { i: 502 });
      log.flush();
      log.flush();
      const buf = new Uint8Array(4096);
      const lines = new TextDecoder()
        .decode(buf.subarray(0, sys.read(r, buf)))
        .trim()
        .split("\n")
        .map((l) => l.replace(/^\S+ /, ""));
      expect(lines).toEqual(["WARN  refused i=0", "WARN  other", "WARN  refused (and 500 more in the last 1.5s) i=501", "WARN  refused: 1 more in the last 0.1s"]);
    } finally {
      sys.close(r);
      sys.close(w);
    }
  });
});
