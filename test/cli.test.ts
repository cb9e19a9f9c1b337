// The binary's command line: version, help, bad flags (one line, exit 2), ctl.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { BINARY, requireBinary, VmemdProcess } from "./server_harness";

function run(...args: string[]) {
  requireBinary();
  const r = Bun.spawnSync([BINARY, ...args], { cwd: "/" });
  return { code: r.exitCode, out: r.stdout.toString(), err: r.stderr.toString() };
}

describe("command line", () => {
  test("--version and --help, from any directory", () => {
    expect(run("--version").out).toMatch(/^vmemd \d+\.\d+\.\d+\n$/);
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
