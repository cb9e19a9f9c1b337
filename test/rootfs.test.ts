// The minimal root filesystem (scripts/rootfs.sh, contrib/Containerfile's contents), against
// dist/vmemd: built, checked to hold exactly the binary, its shared objects and mount points,
// and run as a container runtime would (new mount and pid namespaces, /proc mounted, /dev a
// tmpfs with /dev/kvm bound in, chroot), with its socket in a directory bound in from outside
// and driven from outside.
import { afterAll, describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";
import type { Subprocess } from "bun";
import * as sys from "../src/sys";
import { VmemClient } from "../src/client";
import { requireKvm } from "./helpers";
import { BINARY, requireBinary } from "./server_harness";

const SCRIPT = join(import.meta.dir, "..", "scripts", "rootfs.sh");

function requireTools(): void {
  for (const cmd of ["unshare", "chroot", "mount", "ldd"]) {
    if (Bun.which(cmd) === null) throw new Error(`ROOTFS TESTS CANNOT RUN: ${cmd} is not installed (scripts/test_deps.sh installs it)`);
  }
  if (process.getuid?.() !== 0) throw new Error("ROOTFS TESTS CANNOT RUN: they mount and chroot, which needs root");
}

const dirs: string[] = [];
const children: Subprocess[] = [];
afterAll(async () => {
  for (const c of children) c.kill("SIGKILL");
  await Promise.all(children.map((c) => c.exited));
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

function tempDir(): string {
  const d = mkdtempSync(join(tmpdir(), "vmemd-rootfs-"));
  dirs.push(d);
  return d;
}

/** Every path under `root`, relative, directories with a trailing slash. */
function tree(root: string, dir = root): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const p = join(dir, e.name);
    return e.isDirectory() ? [relative(root, p) + "/", ...tree(root, p)] : [relative(root, p)];
  });
}

function buildRoot(): string {
  const root = join(tempDir(), "root");
  const r = Bun.spawnSync(["bash", SCRIPT, root, BINARY], { stdout: "pipe", stderr: "pipe" });
  if (r.exitCode !== 0) throw new Error(`scripts/rootfs.sh failed (${r.exitCode}): ${r.stderr.toString()}`);
  return root;
}

/**
 * vmemd in `root` as a container: private mounts and pids, /proc, a tmpfs /dev holding only
 * /dev/kvm, `sockDir` at /run/vmemd. vmemd is pid 1 in its namespace.
 */
function runInRoot(root: string, sockDir: string, args: string[], mountProc = true): Subprocess<"ignore", "pipe", "pipe"> {
  const script = [
    "set -e",
    mountProc ? 'mount -t proc proc "$1/proc"' : "",
    'mount -t tmpfs -o mode=0755,nosuid,noexec tmpfs "$1/dev"',
    'touch "$1/dev/kvm" && mount --bind /dev/kvm "$1/dev/kvm"',
    'mount --bind "$2" "$1/run/vmemd"',
    'root=$1; shift 2; exec chroot "$root" /usr/bin/vmemd "$@"',
  ].join("\n");
  const proc = Bun.spawn(["unshare", "--mount", "--pid", "--fork", "--kill-child", "sh", "-c", script, "sh", root, sockDir, ...args], {
    stdin: "ignore",
    stdout: "pipe",
    stderr: "pipe",
  });
  children.push(proc);
  return proc;
}

describe("scripts/rootfs.sh", () => {
  test("the root holds the binary, exactly the shared objects ldd lists (with the loader), and mount points", () => {
    requireBinary();
    requireTools();
    const root = buildRoot();
    const ldd = Bun.spawnSync(["ldd", BINARY]).stdout.toString();
    const libs = [...ldd.matchAll(/=> (\/\S+)|^\s*(\/\S+) \(/gm)].map((m) => (m[1] ?? m[2])!.slice(1));
    expect(libs.some((l) => /ld-linux-x86-64\.so\.2$/.test(l))).toBe(true);
    expect(libs.some((l) => /libc\.so\.6$/.test(l))).toBe(true);
    const files = tree(root).filter((p) => !p.endsWith("/"));
    expect(files.sort()).toEqual(["usr/bin/vmemd", ...libs].sort());
    for (const d of ["proc/", "dev/", "run/vmemd/"]) {
      expect(tree(root)).toContain(d);
      expect(readdirSync(join(root, d))).toEqual([]);
    }
    expect(statSync(join(root, "usr/bin/vmemd")).size).toBe(statSync(BINARY).size);
    expect(statSync(join(root, "usr/bin/vmemd")).mode & 0o777).toBe(0o755);
    const containerfile = readFileSync(join(import.meta.dir, "..", "contrib", "Containerfile"), "utf8");
    expect(containerfile).toMatch(/^FROM scratch$/m);
    expect(containerfile).toMatch(/^COPY dist\/rootfs\/ \/$/m);
  });

  test("vmemd serves from inside it, through a socket in a directory bound in from outside", async () => {
    requireKvm();
    requireBinary();
    requireTools();
    const root = buildRoot();
    const sockDir = tempDir();
    const sock = join(sockDir, "vm.sock");
    const proc = runInRoot(root, sockDir, ["serve", "--socket", "/run/vmemd/vm.sock", "--memory", "16M", "--die-with-parent"]);
    let stderr = "";
    void (async () => {
      for await (const chunk of proc.stderr) stderr += new TextDecoder().decode(chunk);
    })();
    // Driven from outside: the typed client, then the ctl of this tree. (The file appears at
    // bind, a moment before vmemd listens.)
    let c: VmemClient | null = null;
    for (let i = 0; i < 500 && c === null && proc.exitCode === null; i++) {
      try {
        c = VmemClient.connect(sock);
      } catch {
        await Bun.sleep(10);
      }
    }
    if (c === null) throw new Error(`vmemd did not come up in the root (exit ${proc.exitCode}): ${stderr}`);
    const fd = sys.memfdCreate("rootfs-test");
    sys.ftruncate(fd, 2 << 20);
    const { region_id } = c.registerMemory({ SharedMemory: { descriptor: fd, size: 2 << 20 } }, { GuestPhysicalAddress: 0x2_0000_0000 });
    expect(c.getState().slots_used).toBe(2);
    // vmemd runs in the root: its / is the root's directory, and it is pid 1 there.
    const pid = sys.peerCred(c.fd).pid;
    expect(readlinkSync(`/proc/${pid}/root`)).toBe(root);
    expect(readFileSync(`/proc/${pid}/status`, "utf8")).toMatch(/^NSpid:\s+\d+\s+1$/m);
    c.unregisterMemory(region_id);
    c.close();
    sys.close(fd);
    const ctl = Bun.spawnSync([BINARY, "ctl", "--socket", sock, "register", "--shm", "64K", "--gpa", "0x300000000"]);
    expect(ctl.exitCode).toBe(0);
    expect(JSON.parse(ctl.stdout.toString())).toEqual({ RegisterMemory: { region_id: 0x3_0000_0000, slot: 1 } });
    expect(Bun.spawnSync([BINARY, "ctl", "--socket", sock, "unregister", "0x300000000"]).exitCode).toBe(0);

    process.kill(pid, "SIGTERM");
    expect(await proc.exited).toBe(0); // unshare passes on vmemd's status
    expect(existsSync(sock)).toBe(false); // removed through the bind mount
    expect(stderr).toContain("vmemd ready");
    expect(stderr).toContain("sandbox entered");
  });

  test("without /proc mounted, the runtime refuses to start (what the README says it needs)", async () => {
    requireKvm();
    requireBinary();
    requireTools();
    const root = buildRoot();
    const proc = runInRoot(root, tempDir(), ["--version"], false);
    const [out, code] = await Promise.all([new Response(proc.stdout).text(), proc.exited]);
    expect(code).not.toBe(0);
    expect(out).not.toContain("vmemd");
    const withProc = runInRoot(root, tempDir(), ["--version"]);
    const [out2, code2] = await Promise.all([new Response(withProc.stdout).text(), withProc.exited]);
    expect({ code2, out2 }).toEqual({ code2: 0, out2: expect.stringMatching(/^vmemd \d+\.\d+\.\d+\n$/) });
  });
});
