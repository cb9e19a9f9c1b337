// systemd, against dist/vmemd: socket activation through systemd-socket-activate (and
// LISTEN_FDS set by hand, for what must be refused), sd_notify messages read from a socket
// the test binds (READY, STATUS, WATCHDOG, STOPPING), and the units in contrib/systemd
// checked by systemd-analyze verify.
import { afterAll, describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Subprocess } from "bun";
import * as sys from "../src/sys";
import { VmemClient } from "../src/client";
import { requireKvm } from "./helpers";
import { BINARY, requireBinary } from "./server_harness";

const UNITS = join(import.meta.dir, "..", "contrib", "systemd");

/** Fails loudly when a tool the test needs is missing (bun run test installs them: scripts/test_deps.sh). */
function requireCommand(cmd: string): string {
  const path = Bun.which(cmd);
  if (path === null) throw new Error(`SYSTEMD TESTS CANNOT RUN: ${cmd} is not installed (Debian package systemd; scripts/test_deps.sh installs it)`);
  return path;
}

const dirs: string[] = [];
const children: Subprocess[] = [];
function tempDir(): string {
  const d = mkdtempSync(join(tmpdir(), "vmemd-systemd-"));
  dirs.push(d);
  return d;
}
afterAll(async () => {
  for (const c of children) c.kill("SIGKILL");
  await Promise.all(children.map((c) => c.exited));
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

/** A NOTIFY_SOCKET: a datagram socket bound at a path or an abstract "@name", read in the background. */
class NotifySocket {
  readonly messages: string[] = [];
  /** When each message was read (performance.now()). */
  readonly arrivals: number[] = [];
  private readonly fd: number;
  private readonly io = new sys.PacketIo(4096);
  private open = true;

  constructor(readonly name: string) {
    this.fd = sys.unixSocket(sys.SOCK_DGRAM, true);
    sys.bindUnixName(this.fd, name);
    void this.pump();
  }

  private async pump(): Promise<void> {
    while (this.open) {
      for (let n = this.io.recv(this.fd); n !== -1; n = this.io.recv(this.fd)) {
        this.messages.push(new TextDecoder().decode(this.io.body.subarray(0, n)));
        this.arrivals.push(performance.now());
      }
      await Bun.sleep(5);
    }
  }

  /** Every line of every message so far. */
  lines(): string[] {
    return this.messages.flatMap((m) => m.split("\n"));
  }

  async waitFor(pred: (line: string) => boolean, what: string, timeoutMs = 5000): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const hit = this.lines().find(pred);
      if (hit !== undefined) return hit;
      if (Date.now() > deadline) throw new Error(`no ${what} within ${timeoutMs} ms; got ${JSON.stringify(this.messages)}`);
      await Bun.sleep(10);
    }
  }

  close(): void {
    this.open = false;
    sys.close(this.fd);
  }
}

function collect(stream: ReadableStream<Uint8Array>): { text: string } {
  const out = { text: "" };
  void (async () => {
    const dec = new TextDecoder();
    for await (const chunk of stream) out.text += dec.decode(chunk, { stream: true });
  })();
  return out;
}

/** A client, once whoever binds `path` listens there (bind creates the file before listen). */
async function connectWhenListening(path: string, proc: Subprocess): Promise<VmemClient> {
  for (let i = 0; ; i++) {
    try {
      return VmemClient.connect(path);
    } catch (e) {
      if (i > 500 || proc.exitCode !== null) throw new Error(`vmemd did not listen at ${path} (exit ${proc.exitCode}): ${e}`);
    }
    await Bun.sleep(10);
  }
}

async function waitForPath(path: string, proc: Subprocess): Promise<void> {
  for (let i = 0; i < 500 && !existsSync(path); i++) {
    if (proc.exitCode !== null) throw new Error(`exited (${proc.exitCode}) before ${path} appeared`);
    await Bun.sleep(10);
  }
  if (!existsSync(path)) throw new Error(`${path} did not appear`);
}

describe("socket activation through systemd-socket-activate", () => {
  test("the passed listener is served and left in place; READY, STATUS, WATCHDOG and STOPPING arrive", async () => {
    requireKvm();
    requireBinary();
    const activate = requireCommand("systemd-socket-activate");
    const dir = tempDir();
    const sock = join(dir, "vm.sock");
    const notify = new NotifySocket(join(dir, "notify"));
    try {
      // 400 ms: a ping every 200 ms. systemd-socket-activate passes only the -E variables on.
      const proc = Bun.spawn(
        [activate, "--seqpacket", "-l", sock, "--fdname=vmemd", "-E", `NOTIFY_SOCKET=${notify.name}`, "-E", "WATCHDOG_USEC=400000",
          BINARY, "serve", "--memory", "16M", "--die-with-parent"],
        { stdin: "ignore", stdout: "pipe", stderr: "pipe" },
      );
      children.push(proc);
      const stderr = collect(proc.stderr);
      await waitForPath(sock, proc);
      expect(notify.messages).toEqual([]); // nothing runs until the first connection

      // The first connection starts vmemd (exec'd in place: same pid), and is served.
      const c = await connectWhenListening(sock, proc);
      const { region_id } = c.registerMemory({ SharedMemory: { descriptor: memfd(4096), size: 4096 } }, { GuestPhysicalAddress: 0x2_0000_0000 });
      // READY went out before the loop took its first connection.
      await notify.waitFor((l) => l === "READY=1", "READY=1");
      expect(notify.messages[0]).toMatch(/^READY=1\nSTATUS=0 connections, 0 regions, 1\/\d+ slots\nWATCHDOG=1$/);
      for (let i = 0; i < 100 && !stderr.text.includes("vmemd ready"); i++) await Bun.sleep(10);
      expect(stderr.text).toMatch(/vmemd ready version=\d+\.\d+\.\d+ socket=\S*vm\.sock activated=true/);

      // STATUS follows the counts, at most once a second.
      await notify.waitFor((l) => /^STATUS=1 connection, 1 region, 2\/\d+ slots$/.test(l), "STATUS with the region", 3000);
      c.unregisterMemory(region_id);
      c.close();
      await notify.waitFor((l) => /^STATUS=0 connections, 0 regions, 1\/\d+ slots$/.test(l), "STATUS after the client left", 3000);
      const statuses = notify.lines().filter((l) => l.startsWith("STATUS="));
      expect(statuses.every((l, i) => i === 0 || l !== statuses[i - 1])).toBe(true); // sent when changed, not every second

      // Watchdog pings at half of WATCHDOG_USEC (200 ms): never faster, and they keep coming.
      const readyAt = notify.arrivals[0]!;
      await notify.waitFor(() => notify.lines().filter((l) => l === "WATCHDOG=1").length >= 6, "six watchdog pings", 5000);
      expect(performance.now() - readyAt).toBeGreaterThanOrEqual(5 * 200 - 50);

      proc.kill("SIGTERM");
      expect(await proc.exited).toBe(0);
      await notify.waitFor((l) => l === "STOPPING=1", "STOPPING=1");
      expect(notify.messages.at(-1)).toBe("STOPPING=1\nSTATUS=shutting down (SIGTERM)");
      // The socket file is the manager's: not unlinked.
      expect(sys.lstatId(sock)?.mode! & sys.S_IFMT).toBe(sys.S_IFSOCK);
    } finally {
      notify.close();
    }
  });

  test("an abstract NOTIFY_SOCKET (@name) is reached too", async () => {
    requireKvm();
    requireBinary();
    const activate = requireCommand("systemd-socket-activate");
    const dir = tempDir();
    const sock = join(dir, "vm.sock");
    const notify = new NotifySocket(`@vmemd-test-notify-${process.pid}`);
    try {
      const proc = Bun.spawn([activate, "--seqpacket", "-l", sock, "-E", `NOTIFY_SOCKET=${notify.name}`, BINARY, "serve", "--socket", sock, "--memory", "16M", "--die-with-parent"], {
        stdin: "ignore",
        stdout: "ignore",
        stderr: "pipe",
      });
      children.push(proc);
      const c = await connectWhenListening(sock, proc);
      expect(c.getState().slots_used).toBe(1);
      c.close();
      await notify.waitFor((l) => l === "READY=1", "READY=1");
      expect(notify.lines().includes("WATCHDOG=1")).toBe(false); // no WATCHDOG_USEC, no pings
      proc.kill("SIGTERM");
      expect(await proc.exited).toBe(0);
      await notify.waitFor((l) => l === "STOPPING=1", "STOPPING=1");
    } finally {
      notify.close();
    }
  });
});

/** dist/vmemd serve with `fd` as descriptor 3 and LISTEN_FDS=1; LISTEN_PID is vmemd's own unless `listenPid` says otherwise. */
function spawnWithListener(fd: number, args: string[], env: Record<string, string> = {}, listenPid?: string) {
  const pid = listenPid ?? "$$"; // sh's pid is vmemd's after exec
  const proc = Bun.spawn(["sh", "-c", `LISTEN_PID=${pid} LISTEN_FDS=1 exec "$0" "$@"`, BINARY, "serve", "--memory", "16M", "--die-with-parent", ...args], {
    stdio: ["ignore", "pipe", "pipe", fd],
    env: { PATH: process.env.PATH ?? "/usr/bin:/bin", ...env },
  });
  children.push(proc);
  return proc;
}

function listener(type: number, path: string, listening = true): number {
  const fd = sys.unixSocket(type, false);
  sys.bindUnix(fd, path);
  if (listening) sys.listen(fd, 8);
  return fd;
}

describe("what is passed in, checked", () => {
  test("only a listening SOCK_SEQPACKET socket is taken; --socket must name it; --socket-mode has no say", async () => {
    requireKvm();
    requireBinary();
    const dir = tempDir();
    const cases: [string, () => number, string[], number, RegExp][] = [
      ["a stream listener", () => listener(sys.SOCK_STREAM, join(dir, "stream.sock")), [], 1, /not SOCK_SEQPACKET/],
      ["a datagram socket", () => listener(sys.SOCK_DGRAM, join(dir, "dgram.sock"), false), [], 1, /not SOCK_SEQPACKET/],
      ["a socket not listening", () => listener(sys.SOCK_SEQPACKET, join(dir, "idle.sock"), false), [], 1, /not listening/],
      ["a pipe", () => sys.pipe()[0], [], 1, /not a socket/],
      ["another path", () => listener(sys.SOCK_SEQPACKET, join(dir, "a.sock")), ["--socket", join(dir, "b.sock")], 2, /--socket \S+b\.sock is not the socket the service manager passed in \(\S+a\.sock\)/],
      ["--socket-mode", () => listener(sys.SOCK_SEQPACKET, join(dir, "m.sock")), ["--socket-mode", "0660"], 2, /--socket-mode does not apply/],
    ];
    for (const [what, make, args, code, message] of cases) {
      const fd = make();
      const proc = spawnWithListener(fd, args);
      const [err, exit] = await Promise.all([new Response(proc.stderr).text(), proc.exited]);
      sys.close(fd);
      expect({ what, exit }).toEqual({ what, exit: code });
      expect({ what, err }).toEqual({ what, err: expect.stringMatching(message) });
      expect(err.trim().split("\n").length).toBe(1);
      expect(err).toStartWith("vmemd serve: ");
    }
  });

  test("a matching --socket (relative or absolute) is accepted; LISTEN_PID of another process means nothing was passed", async () => {
    requireKvm();
    requireBinary();
    const dir = tempDir();
    const path = join(dir, "ok.sock");
    const fd = listener(sys.SOCK_SEQPACKET, path);
    const proc = Bun.spawn(["sh", "-c", `cd "$1" && LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" serve --socket ./ok.sock --memory 16M --die-with-parent`, BINARY, dir], {
      stdio: ["ignore", "pipe", "pipe", fd],
    });
    children.push(proc);
    const c = VmemClient.connect(path);
    expect(c.getState().slots_used).toBe(1);
    c.close();
    proc.kill("SIGTERM");
    expect(await proc.exited).toBe(0);
    expect(existsSync(path)).toBe(true); // adopted, so not unlinked
    sys.close(fd);

    // LISTEN_PID=1: the variables were meant for another process. vmemd binds --socket itself
    // (and removes it at exit), leaving descriptor 3 alone.
    const own = join(dir, "own.sock");
    const other = listener(sys.SOCK_SEQPACKET, join(dir, "other.sock"));
    const p2 = spawnWithListener(other, ["--socket", own], {}, "1");
    const err = collect(p2.stderr);
    const c2 = await connectWhenListening(own, p2);
    c2.close();
    p2.kill("SIGTERM");
    expect(await p2.exited).toBe(0);
    expect(err.text).not.toContain("activated=true");
    expect(existsSync(own)).toBe(false);
    sys.close(other);
  });

  test("WATCHDOG_PID of another process: no pings", async () => {
    requireKvm();
    requireBinary();
    const dir = tempDir();
    const notify = new NotifySocket(join(dir, "notify"));
    try {
      const fd = listener(sys.SOCK_SEQPACKET, join(dir, "w.sock"));
      const proc = spawnWithListener(fd, [], { NOTIFY_SOCKET: notify.name, WATCHDOG_USEC: "100000", WATCHDOG_PID: "1" });
      await notify.waitFor((l) => l === "READY=1", "READY=1");
      await Bun.sleep(400);
      proc.kill("SIGTERM");
      expect(await proc.exited).toBe(0);
      sys.close(fd);
      expect(notify.lines().filter((l) => l === "WATCHDOG=1")).toEqual([]);
    } finally {
      notify.close();
    }
  });
});

describe("a manager that is not there", () => {
  test("a NOTIFY_SOCKET nobody listens on, or not a path, is logged once and serving goes on", async () => {
    requireKvm();
    requireBinary();
    const dir = tempDir();
    for (const [notify, message] of [
      [join(dir, "nobody"), /WARN  cannot notify the service manager notify_socket=\S+nobody error=.*ENOENT/],
      ["relative/notify", /WARN  NOTIFY_SOCKET is neither a path nor an abstract @name; not notifying/],
    ] as [string, RegExp][]) {
      const path = join(dir, `s${Math.random()}.sock`);
      const proc = Bun.spawn([BINARY, "serve", "--socket", path, "--memory", "16M", "--die-with-parent"], {
        stdin: "ignore",
        stdout: "ignore",
        stderr: "pipe",
        env: { ...process.env, NOTIFY_SOCKET: notify, WATCHDOG_USEC: "100000" },
      });
      children.push(proc);
      const err = collect(proc.stderr);
      const c = await connectWhenListening(path, proc);
      expect(c.getState().slots_used).toBe(1);
      c.close();
      await Bun.sleep(300); // watchdog pings would be due by now: none may be attempted
      proc.kill("SIGTERM");
      expect(await proc.exited).toBe(0);
      expect(err.text).toMatch(message);
      expect(err.text.split("\n").filter((l) => /notif/i.test(l)).length).toBe(1); // one warning, nothing per ping
    }
  });
});

describe("contrib/systemd", () => {
  test("the units pass systemd-analyze verify", () => {
    requireBinary();
    const analyze = requireCommand("systemd-analyze");
    // An instance of each template; ExecStart's /usr/bin/vmemd becomes this tree's binary,
    // since verify checks that the command exists. Nothing else changes.
    const dir = tempDir();
    const service = readFileSync(join(UNITS, "vmemd@.service"), "utf8");
    expect(service).toContain("ExecStart=/usr/bin/vmemd serve");
    writeFileSync(join(dir, "vmemd@test.service"), service.replaceAll("/usr/bin/vmemd", BINARY));
    writeFileSync(join(dir, "vmemd@test.socket"), readFileSync(join(UNITS, "vmemd@.socket"), "utf8"));
    const r = Bun.spawnSync([analyze, "verify", "--man=no", join(dir, "vmemd@test.socket"), join(dir, "vmemd@test.service")], { stderr: "pipe", stdout: "pipe" });
    const out = r.stdout.toString() + r.stderr.toString();
    expect({ code: r.exitCode, out }).toEqual({ code: 0, out: "" }); // warnings (unknown keys) count as failures
  });

  test("the service is hardened, and MemoryDenyWriteExecute is left off (the JIT)", () => {
    const service = readFileSync(join(UNITS, "vmemd@.service"), "utf8");
    const settings = new Map(
      service
        .split("\n")
        .filter((l) => /^[A-Za-z]+=/.test(l))
        .map((l) => [l.slice(0, l.indexOf("=")), l.slice(l.indexOf("=") + 1)] as [string, string]),
    );
    for (const [k, v] of Object.entries({
      Type: "notify",
      NoNewPrivileges: "yes",
      ProtectSystem: "strict",
      ProtectHome: "yes",
      PrivateTmp: "yes",
      PrivateNetwork: "yes",
      DevicePolicy: "closed",
      DeviceAllow: "/dev/kvm rw",
      RestrictAddressFamilies: "AF_UNIX",
      SystemCallArchitectures: "native",
      LockPersonality: "yes",
      CapabilityBoundingSet: "",
    })) {
      expect({ [k]: settings.get(k) }).toEqual({ [k]: v });
    }
    expect(settings.has("MemoryDenyWriteExecute")).toBe(false);
    expect(service).toMatch(/# - MemoryDenyWriteExecute=yes: .*JIT/);
    const socket = readFileSync(join(UNITS, "vmemd@.socket"), "utf8");
    expect(socket).toContain("ListenSequentialPacket=/run/vmemd/%i.sock");
    expect(service).toContain("--socket /run/vmemd/%i.sock");
  });
});

function memfd(size: number): number {
  const fd = sys.memfdCreate("systemd-test");
  sys.ftruncate(fd, size);
  return fd;
}
