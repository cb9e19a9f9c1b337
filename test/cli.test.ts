// The binary's command line as scripts use it: version, help (-h everywhere), bad flags
// (one line, exit 2), ctl's exit statuses (1 Err, 2 usage, 3 unreachable), --timeout,
// ioevent with an inherited eventfd.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import pkg from "../package.json" with { type: "json" };
import * as sys from "../src/sys";
import { BINARY, requireBinary, VmemdProcess } from "./server_harness";

function run(...args: string[]) {
  requireBinary();
  const r = Bun.spawnSync([BINARY, ...args], { cwd: "/" });
  return { code: r.exitCode, out: r.stdout.toString(), err: r.stderr.toString() };
}

/** run() with `fd` as the child's descriptor 3. */
function runWithFd3(fd: number, ...args: string[]) {
  requireBinary();
  const r = Bun.spawnSync([BINARY, ...args], { cwd: "/", stdio: ["ignore", "pipe", "pipe", fd] });
  return { code: r.exitCode, out: r.stdout.toString(), err: r.stderr.toString() };
}

describe("command line", () => {
  test("--version and --help, from any directory", () => {
    expect(run("--version").out).toBe(`vmemd ${pkg.version}\n`);
    const help = run("--help");
    expect(help.code).toBe(0);
    expect(help.out).toContain("vmemd serve --socket PATH");
    expect(run("serve", "--help").out).toContain("--pci-bar BB:DD.F/BAR=SIZE");
    expect(run("ctl", "--help").out).toContain("mmap-register");
  });

  test("a bad flag or value is one clear line and exit 2", () => {
    for (const args of [
      ["serve", "--bogus"],
      ["serve"],
      ["serve", "--socket", "/tmp/x.sock", "--memory", "lots"],
      ["serve", "--socket", "/tmp/x.sock", "--pci-bar", "zz"],
      ["serve", "--socket", "/tmp/x.sock", "--log-level", "loud"],
      ["serve", "--socket", "/tmp/x.sock", "--socket-mode", "999"],
      ["serve", "--socket", "/tmp/x.sock", "--ready-fd", "three"],
      ["serve", "--socket", "/tmp/x.sock", "--ready-fd", "999"],
      ["ctl", "--socket", "/tmp/x.sock"],
      ["ctl", "--socket", "/tmp/x.sock", "frob"],
      ["frob"],
    ]) {
      const r = run(...args);
      expect({ args, code: r.code }).toEqual({ args, code: 2 });
      expect(r.err.trim().split("\n").length).toBe(1);
      // One style: the command that refused, then why.
      const prefix = args[0] === "serve" || args[0] === "ctl" ? `vmemd ${args[0]}` : "vmemd:";
      expect({ args, err: r.err }).toEqual({ args, err: expect.stringMatching(new RegExp(`^${prefix}`)) });
    }
  });

  test("-h everywhere: vmemd, serve, ctl, and ctl REQUEST", () => {
    for (const args of [["-h"], ["serve", "-h"], ["ctl", "-h"], ["ctl", "--socket", "/x", "state", "-h"], ["ctl", "register", "-h"]]) {
      const r = run(...args);
      expect({ args, code: r.code, err: r.err }).toEqual({ args, code: 0, err: "" });
    }
    expect(run("-h").out).toBe(run("--help").out);
    expect(run("serve", "-h").out).toBe(run("serve", "--help").out);
    const one = run("ctl", "register", "-h").out;
    expect(one).toContain("RegisterMemory");
    expect(one).not.toContain("UnregisterMemory");
    expect(one).toContain("--timeout SECONDS");
    expect(one).toContain("exit status:");
    expect(run("ctl", "frob", "-h").code).toBe(2);
  });

  test("help states the exit statuses", () => {
    const ctl = run("ctl", "--help").out;
    for (const line of [/^  0  vmemd answered the request with success$/m, /^  1  vmemd answered Err/m, /^  2  usage/m, /^  3  vmemd could not be reached or did not answer/m]) {
      expect(ctl).toMatch(line);
    }
    const serve = run("serve", "--help").out;
    expect(serve).toMatch(/^  3 \+ V  the guest wrote V to port 0xF4/m);
    expect(serve).toMatch(/^  2      usage error$/m);
  });

  test("flags a request does not take are refused, not ignored", () => {
    for (const [args, message] of [
      [["state", "--shm", "4K"], /^vmemd ctl state: --shm does not apply \(state takes --json, --all\)$/],
      [["unregister", "5", "--json"], /^vmemd ctl unregister: --json does not apply \(unregister takes no flags\)$/],
      [["register", "--shm", "4K", "--gpa", "0x200000000", "--offset", "4K"], /^vmemd ctl register: --offset applies only with --file$/],
      [["register", "--shm", "4K", "--gpa", "0x200000000", "--bar-offset", "4K"], /^vmemd ctl register: --bar-offset applies only with --bar$/],
      [["ioevent", "--addr", "0xe0000000", "--shm", "4K"], /^vmemd ctl ioevent: --shm does not apply/],
      [["ioevent", "--addr", "0xe0000000", "--eventfd-from", "0"], /^vmemd ctl: --eventfd-from: descriptor 0 is not an eventfd/],
      [["ioevent", "--addr", "0xe0000000", "--eventfd-from", "77"], /^vmemd ctl: --eventfd-from: descriptor 77 is not open/],
      [["register", "--file", "/nonexistent/file", "--gpa", "0x200000000"], /^vmemd ctl: --file: cannot open \/nonexistent\/file: ENOENT$/],
      [["state", "--timeout", "soon"], /^vmemd ctl: --timeout: "soon" is not a number of seconds/],
      [["state", "--timeout", "0"], /^vmemd ctl: --timeout: "0" is not a number of seconds/],
    ] as [string[], RegExp][]) {
      // No server at the socket: a usage error is found before any connect.
      const r = run("ctl", "--socket", "/nonexistent/vmemd.sock", ...args);
      expect({ args, code: r.code }).toEqual({ args, code: 2 });
      expect({ args, err: r.err.trimEnd() }).toEqual({ args, err: expect.stringMatching(message) });
    }
  });

  test("no vmemd to talk to is exit 3, one line", async () => {
    const { mkdtempSync, rmSync } = await import("node:fs");
    const dir = mkdtempSync("/tmp/vmemd-noserver-");
    try {
      // A socket file nobody listens on: bound, never listening.
      const fd = sys.unixSocket(sys.SOCK_SEQPACKET, false);
      sys.bindUnix(fd, `${dir}/stale.sock`);
      for (const [path, message] of [
        [`${dir}/missing.sock`, /^vmemd ctl: cannot connect to \S+missing\.sock: No such file or directory \(ENOENT\)$/],
        [`${dir}/stale.sock`, /^vmemd ctl: cannot connect to \S+stale\.sock: Connection refused \(ECONNREFUSED\)$/],
      ] as [string, RegExp][]) {
        const r = run("ctl", "--socket", path, "state");
        expect({ path, code: r.code, out: r.out }).toEqual({ path, code: 3, out: "" });
        expect(r.err.trimEnd()).toMatch(message);
      }
      sys.close(fd);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("one binary", () => {
  test("runs from another directory with no node_modules and no sources beside it", async () => {
    requireBinary();
    const { mkdtempSync, copyFileSync, rmSync } = await import("node:fs");
    const dir = mkdtempSync("/tmp/vmemd-alone-");
    try {
      copyFileSync(BINARY, `${dir}/vmemd`);
      Bun.spawnSync(["chmod", "+x", `${dir}/vmemd`]);
      const sock = `${dir}/s.sock`;
      const proc = Bun.spawn([`${dir}/vmemd`, "serve", "--socket", sock, "--memory", "16M"], { cwd: dir, env: { PATH: "/usr/bin:/bin" }, stderr: "pipe" });
      let state = "";
      for (let i = 0; i < 300 && state === ""; i++) {
        await Bun.sleep(10);
        const r = Bun.spawnSync([`${dir}/vmemd`, "ctl", "--socket", sock, "state"], { cwd: dir, env: { PATH: "/usr/bin:/bin" } });
        if (r.exitCode === 0) state = r.stdout.toString();
      }
      expect(state).toContain("RAM");
      proc.kill("SIGTERM");
      expect(await proc.exited).toBe(0);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("--die-with-parent", () => {
  test("vmemd stops and removes its socket when the process that started it exits", async () => {
    requireBinary();
    const sock = `/tmp/vmemd-dwp-${process.pid}.sock`;
    const parent = Bun.spawn(
      [process.execPath, "-e", `const p = Bun.spawn([${JSON.stringify(BINARY)}, "serve", "--socket", ${JSON.stringify(sock)}, "--memory", "16M", "--die-with-parent"], { stdout: "ignore", stderr: "ignore" }); await Bun.sleep(500); console.log(p.pid); process.exit(0);`],
      { stdout: "pipe" },
    );
    const pid = Number((await new Response(parent.stdout).text()).trim());
    expect(await parent.exited).toBe(0);
    expect(pid).toBeGreaterThan(0);
    let alive = true;
    for (let i = 0; i < 200 && alive; i++) {
      await Bun.sleep(10);
      try {
        process.kill(pid, 0);
      } catch {
        alive = false;
      }
    }
    expect(alive).toBe(false);
    expect(require("node:fs").existsSync(sock)).toBe(false);
  });
});

describe("--ready-fd", () => {
  test("one line once the socket accepts connections, then the descriptor is closed", async () => {
    requireBinary();
    const sock = `/tmp/vmemd-ready-${process.pid}.sock`;
    // fd 3 is the pipe to us; vmemd's own stdout goes elsewhere, so EOF means it closed fd 3.
    const proc = Bun.spawn(["sh", "-c", `exec "$0" serve --socket "$1" --memory 16M --ready-fd 3 3>&1 1>/dev/null`, BINARY, sock], { stdout: "pipe", stderr: "pipe" });
    try {
      const text = await new Response(proc.stdout).text(); // to EOF
      expect(text).toBe("ready\n");
      expect(proc.exitCode).toBe(null); // still serving
      const { connectSeqpacket, close } = await import("../src/sys");
      close(connectSeqpacket(sock)); // ready meant ready
    } finally {
      proc.kill("SIGTERM");
      expect(await proc.exited).toBe(0);
    }
  });

  test("a standard stream is written to but left open; a read-only or missing descriptor is refused", async () => {
    requireBinary();
    const sock = `/tmp/vmemd-ready1-${process.pid}.sock`;
    const proc = Bun.spawn([BINARY, "serve", "--socket", sock, "--memory", "16M", "--ready-fd", "1"], { stdout: "pipe", stderr: "pipe" });
    try {
      const reader = proc.stdout.getReader();
      expect(new TextDecoder().decode((await reader.read()).value)).toBe("ready\n");
      const next = reader.read().then(() => "more");
      expect(await Promise.race([next, Bun.sleep(200).then(() => "still open")])).toBe("still open");
    } finally {
      proc.kill("SIGTERM");
      expect(await proc.exited).toBe(0);
    }
    for (const redirect of ["3</dev/null", ""]) {
      const r = Bun.spawnSync(["sh", "-c", `exec "$0" serve --socket "$1" --memory 16M --ready-fd 3 ${redirect}`, BINARY, `${sock}.x`], { stderr: "pipe" });
      expect(r.exitCode).toBe(2);
      expect(r.stderr.toString()).toMatch(/^vmemd serve: --ready-fd: .*\n$/);
    }
  });
});

describe("ctl against a server that does not answer", () => {
  test("--timeout: a stopped vmemd is exit 3 once the time is up", async () => {
    const s = await VmemdProcess.start(["--memory", "16M"]);
    try {
      process.kill(s.pid, "SIGSTOP");
      const t0 = performance.now();
      const r = run("ctl", "--socket", s.socket, "--timeout", "0.3", "state");
      const took = performance.now() - t0;
      expect(r.code).toBe(3);
      expect(r.err).toBe(`vmemd ctl: no answer from vmemd at ${s.socket} within 0.3 s\n`);
      expect(took).toBeGreaterThanOrEqual(300);
      expect(took).toBeLessThan(3000);
    } finally {
      process.kill(s.pid, "SIGCONT");
      expect(await s.stop()).toBe(0);
    }
  });

  test("a vmemd that closes the connection (--allow-uid refuses us) is exit 3", async () => {
    const s = await VmemdProcess.start(["--memory", "16M", "--allow-uid", "4242"]);
    try {
      const r = run("ctl", "--socket", s.socket, "state");
      expect(r.code).toBe(3);
      expect(r.err).toMatch(/^vmemd ctl: vmemd at \S+ closed the connection \((EPIPE|ECONNRESET)\)\n$/);
    } finally {
      expect(await s.stop()).toBe(0);
    }
  });
});

describe("ctl against a running server", () => {
  let s: VmemdProcess;
  beforeAll(async () => {
    s = await VmemdProcess.start(["--memory", "64M", "--pci-bar", "00:05.0/2=16M"]);
  });
  afterAll(async () => {
    expect(await s.stop()).toBe(0);
  });

  test("register, state (drawn and JSON), unregister, Err exit status", async () => {
    const reg = run("ctl", "--socket", s.socket, "register", "--shm", "2M", "--gpa", "0x200000000");
    expect(reg.code).toBe(0);
    expect(JSON.parse(reg.out)).toEqual({ RegisterMemory: { region_id: 0x2_0000_0000, slot: 1 } });
    expect(run("ctl", "--socket", s.socket, "prepare", "00:05.0/2").out.trim()).toBe('"Ok"');
    expect(run("ctl", "--socket", s.socket, "register", "--shm", "64K", "--bar", "00:05.0/2", "--bar-offset", "64K").code).toBe(0);
    const map = run("ctl", "--socket", s.socket, "state").out;
    expect(map).toContain("PciBar 00:05.0 BAR2");
    expect(map).toMatch(/0x0002_0000_0000 +│ ■ dynamic region rw +2 MiB +slot 1/);
    expect(map).toMatch(/fixed region rw +64 KiB +slot 2/);
    const json = JSON.parse(run("ctl", "--socket", s.socket, "state", "--json").out);
    expect(json.State.slots_used).toBe(3);
    expect(run("ctl", "--socket", s.socket, "unregister", "0x200000000").code).toBe(0);
    const bad = run("ctl", "--socket", s.socket, "unregister", "0x200000000");
    expect(bad.code).toBe(1);
    expect(JSON.parse(bad.out).Err.errno).toBe(2);
    expect(run("ctl", "--socket", s.socket, "raw", '{"BalloonTargetReached":{"size":1}}').out.trim()).toBe('"Ok"');
    expect(run("ctl", "--socket", s.socket, "free", "0:1M").code).toBe(0);
    expect(run("ctl", "--socket", s.socket, "ioevent", "--addr", "0xe0000000", "--match", "u32=5").code).toBe(0);
    // Each ctl is one request on one connection, and its hang-up is seen as one (not as empty packets).
    await Bun.sleep(50);
    const counts = [...s.stderr.matchAll(/client disconnected conn=\d+ requests=(\d+)/g)].map((m) => Number(m[1]));
    expect(counts.length).toBeGreaterThanOrEqual(10);
    expect(counts.slice(1).every((n) => n === 1)).toBe(true);
  });

  test("the ready line carries the version", () => {
    expect(s.stderr).toContain(`vmemd ready version=${pkg.version} socket=${s.socket}`);
  });

  test("ioevent --eventfd-from: what one ctl registered, another unregisters", () => {
    const ev = sys.eventfd();
    try {
      const args = ["ctl", "--socket", s.socket, "ioevent", "--addr", "0xe0001000", "--match", "u32=7"];
      expect(runWithFd3(ev, ...args, "--eventfd-from", "3").code).toBe(0);
      // A new eventfd is not the registered one: KVM finds nothing to remove.
      const other = run(...args, "--unregister");
      expect(other.code).toBe(1);
      expect(JSON.parse(other.out).Err.errno).toBe(sys.Errno.ENOENT);
      const same = runWithFd3(ev, ...args, "--unregister", "--eventfd-from", "3");
      expect({ code: same.code, out: same.out }).toEqual({ code: 0, out: '"Ok"\n' });
      // Gone: unregistering again is an Err.
      expect(runWithFd3(ev, ...args, "--unregister", "--eventfd-from", "3").code).toBe(1);
    } finally {
      sys.close(ev);
    }
  });
});

describe("--prefault", () => {
  test("guest RAM is all resident (written) before the socket is ready", async () => {
    const s = await VmemdProcess.start(["--memory", "128M", "--prefault"]);
    try {
      const status = require("node:fs").readFileSync(`/proc/${s.pid}/status`, "utf8") as string;
      const shmem = Number(/RssShmem:\s+(\d+) kB/.exec(status)![1]) * 1024;
      expect(shmem).toBeGreaterThanOrEqual(128 * 2 ** 20);
    } finally {
      expect(await s.stop()).toBe(0);
    }
  });
});

describe("ctl and the device plane", () => {
  test("guest-memory, irqfd and ioevent-pio; what one ctl registered another unregisters (--eventfd-from)", async () => {
    const guest = require("node:path").join(import.meta.dir, "guest", "guest.bin");
    const s = await VmemdProcess.start(["--memory", "16M", "--guest", guest, "--share-guest-memory-with", String(process.getuid!())]);
    const sysm = await import("../src/sys");
    const ev = sysm.eventfd(0, 0x80000 /* EFD_CLOEXEC */);
    const ctl = (...args: string[]) => {
      const r = Bun.spawnSync([BINARY, "ctl", "--socket", s.socket, ...args], { stdio: ["ignore", "pipe", "pipe", ev] });
      return { code: r.exitCode, out: r.stdout.toString().trim(), err: r.stderr.toString().trim() };
    };
    try {
      expect(ctl("guest-memory")).toEqual({ code: 0, out: '{"GuestMemory":{"ranges":[{"guest_address":0,"size":16777216,"offset":0}]}}', err: "" });
      expect(ctl("irqfd", "--gsi", "5", "--eventfd-from", "3").out).toBe('"Ok"');
      expect(ctl("irqfd", "--gsi", "5", "--eventfd-from", "3", "--unregister").out).toBe('"Ok"');
      expect(ctl("ioevent-pio", "--port", "0x600", "--eventfd-from", "3").out).toBe('"Ok"');
      expect(ctl("ioevent-pio", "--port", "0x600", "--eventfd-from", "3").code).toBe(1); // EEXIST: it is the same eventfd
      expect(ctl("ioevent-pio", "--port", "0x600", "--eventfd-from", "3", "--unregister").out).toBe('"Ok"');
      const bad = ctl("irqfd", "--gsi", "24");
      expect(bad.code).toBe(1);
      expect(bad.out).toContain("not an IOAPIC pin");
      expect(ctl("guest-memory", "--gsi", "1").code).toBe(2); // a flag that does not apply
    } finally {
      sysm.close(ev);
      await s.stop();
    }
  });
});
