// The sandbox (docs/security.md): the filter's decisions call by call, a Bun process under
// it (threads still start, refused calls fail with EPERM, execve kills the process from
// any thread), and dist/vmemd serving under it, with the filter read back from the kernel.
import { beforeAll, describe, expect, test } from "bun:test";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import * as sys from "../src/sys";
import { sandboxFilter } from "../src/cli/sandbox";
import { precompiledFilter } from "../src/cli/sandbox_filter";
import { KILLED, vmemdPolicy } from "../src/cli/sandbox_policy";
import { closeAll, memfd, requireKvm } from "./helpers";
import { decision, runFilter, type Call } from "./seccomp_bpf";
import { requireBinary, VmemdProcess } from "./server_harness";

const ROOT = join(import.meta.dir, "..");
const PID = 4242;
const prog = sys.compileSeccomp(vmemdPolicy(PID));
const nr = (name: sys.SyscallName) => sys.SYSCALLS[name];
const verdict = (name: sys.SyscallName, ...args: (number | bigint)[]) => decision(runFilter(prog, { nr: nr(name), args }));

/** What vmemd and the runtime called after start-up, under strace -f, over the test suite and the benchmark. */
const MEASURED: sys.SyscallName[] = [
  "accept4", "close", "epoll_create1", "epoll_ctl", "epoll_pwait2", "epoll_wait", "eventfd2", "exit",
  "exit_group", "fcntl", "futex", "getpid", "getrandom", "getsockopt", "gettid", "mmap", "mprotect",
  "munmap", "newfstatat", "poll", "read", "recvmmsg", "rseq", "rt_sigprocmask", "rt_sigreturn",
  "rt_sigsuspend", "sched_getaffinity", "sched_yield", "sendmmsg", "sendmsg", "set_robust_list",
  "timerfd_create", "timerfd_settime", "unlink", "write",
];

function status(pid: number | string, task?: number | string): Record<string, string> {
  const text = readFileSync(task === undefined ? `/proc/${pid}/status` : `/proc/${pid}/task/${task}/status`, "utf8");
  return Object.fromEntries(text.split("\n").filter((l) => l.includes(":")).map((l) => [l.slice(0, l.indexOf(":")), l.slice(l.indexOf(":") + 2)]));
}
const isRoot = process.getuid?.() === 0;

describe("the filter, call by call", () => {
  test("a foreign architecture and x32 numbers are killed before any lookup", () => {
    const AUDIT_ARCH_I386 = 0x40000003;
    expect(decision(runFilter(prog, { nr: nr("read"), arch: AUDIT_ARCH_I386 }))).toBe("kill");
    expect(decision(runFilter(prog, { nr: nr("read") | sys.X32_SYSCALL_BIT }))).toBe("kill");
    expect(decision(runFilter(prog, { nr: -1 }))).toBe("kill");
  });

  test("every call measured after start-up is allowed", () => {
    for (const name of MEASURED) {
      const call: Call = { nr: nr(name) };
      expect([name, decision(runFilter(prog, call))]).toEqual([name, "allow"]);
    }
  });

  test("the dangerous set is killed", () => {
    for (const name of ["execve", "execveat", "ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2", "pivot_root", "chroot", "bpf", "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot", "swapon", "swapoff", "setns", "unshare", "keyctl", "add_key", "request_key", "perf_event_open", "userfaultfd", "open_by_handle_at", "iopl", "ioperm"] as sys.SyscallName[]) {
      expect(KILLED).toContain(name);
      expect([name, verdict(name)]).toEqual([name, "kill"]);
    }
  });

  test("everything else is refused with EPERM, clone3 with ENOSYS", () => {
    for (const name of ["socket", "connect", "bind", "listen", "socketpair", "fork", "vfork", "chmod", "chown", "setuid", "capset", "seccomp", "tkill", "setrlimit", "creat", "kcmp", "pidfd_open"] as sys.SyscallName[]) {
      expect([name, verdict(name)]).toEqual([name, "EPERM"]);
    }
    // Numbers past the last one the table knows, and gaps: refused, never allowed.
    for (const n of [335, 400, 451, 1000, 0x3fffffff]) expect(decision(runFilter(prog, { nr: n }))).toBe("EPERM");
    expect(verdict("clone3")).toBe("ENOSYS");
  });

  test("the argument checks", () => {
    const CLONE_THREAD_FLAGS = 0x3d0f00; // glibc's pthread_create
    expect(verdict("clone", CLONE_THREAD_FLAGS)).toBe("allow");
    expect(verdict("clone", 0x11 /* SIGCHLD: fork */)).toBe("EPERM");
    expect(verdict("clone", 0x4111 /* CLONE_VM | CLONE_VFORK | SIGCHLD: posix_spawn */)).toBe("EPERM");

    const AT_FDCWD = -100;
    expect(verdict("openat", AT_FDCWD, 0, 0o2000000 /* O_RDONLY | O_CLOEXEC */)).toBe("allow");
    expect(verdict("openat", AT_FDCWD, 0, 0o2200000 /* O_DIRECTORY too */)).toBe("allow");
    for (const flags of [0o1, 0o2, 0o3, 0o100, 0o1000, 0o101, 0o20200002 /* O_TMPFILE */]) expect(verdict("openat", AT_FDCWD, 0, flags)).toBe("EPERM");
    expect(verdict("open", 0, 0)).toBe("allow");
    expect(verdict("open", 0, 0o1101)).toBe("EPERM");

    for (const cmd of [sys.KVM_RUN, sys.KVM_SET_USER_MEMORY_REGION, sys.KVM_IOEVENTFD, sys.KVM_CREATE_VCPU, sys.KVM_SET_CPUID2, sys.KVM_GET_SREGS, sys.KVM_SET_REGS, 0x5401 /* TCGETS */, 0x5421 /* FIONBIO */]) {
      expect(verdict("ioctl", 3, cmd)).toBe("allow");
    }
    // The kernel takes the command as an unsigned int: the upper half does not matter.
    expect(verdict("ioctl", 3, 0xffffffff_00000000n | BigInt(sys.KVM_RUN))).toBe("allow");
    for (const cmd of [0x5412 /* TIOCSTI */, 0x541c /* TIOCLINUX */, 0x541d /* TIOCCONS */, 0x4b3a /* KDSETMODE */, 0x1261 /* BLKFLSBUF */, 0x8004ae00 /* type 0xAE, different direction bits: allowed */]) {
      expect([cmd, verdict("ioctl", 3, cmd)]).toEqual([cmd, cmd === 0x8004ae00 ? "allow" : "EPERM"]);
    }

    expect(verdict("madvise", 0, 4096, sys.MADV_DONTNEED)).toBe("allow");
    expect(verdict("madvise", 0, 4096, sys.MADV_REMOVE)).toBe("allow");
    expect(verdict("madvise", 0, 4096, 100 /* MADV_HWPOISON */)).toBe("EPERM");
    expect(verdict("madvise", 0, 4096, 101 /* MADV_SOFT_OFFLINE */)).toBe("EPERM");
    expect(verdict("madvise", 0, 4096, 102 /* MADV_GUARD_INSTALL */)).toBe("allow");
    expect(verdict("madvise", 0, 4096, 104)).toBe("EPERM");

    expect(verdict("prctl", 15 /* PR_SET_NAME */)).toBe("allow");
    expect(verdict("prctl", 0x53564d41 /* PR_SET_VMA */)).toBe("allow");
    for (const op of [1 /* PR_SET_PDEATHSIG */, 4 /* PR_SET_DUMPABLE */, 22 /* PR_SET_SECCOMP */, 24 /* PR_CAPBSET_DROP */, 35 /* PR_SET_MM */, 38 /* PR_SET_NO_NEW_PRIVS */]) expect(verdict("prctl", op)).toBe("EPERM");

    expect(verdict("tgkill", PID, PID + 1, 38)).toBe("allow");
    expect(verdict("tgkill", 1, 1, 9)).toBe("EPERM");
    expect(verdict("kill", PID, 15)).toBe("allow");
    expect(verdict("kill", 1, 9)).toBe("EPERM");
    expect(verdict("kill", -1, 9)).toBe("EPERM");
    expect(verdict("kill", 0, 9)).toBe("EPERM");

    expect(verdict("prlimit64", 0, sys.RLIMIT_NOFILE, 0, 0x7ffd0000)).toBe("allow");
    expect(verdict("prlimit64", PID, sys.RLIMIT_NOFILE, 0, 0x7ffd0000)).toBe("allow");
    expect(verdict("prlimit64", 0, sys.RLIMIT_NOFILE, 0x7ffd0000, 0)).toBe("EPERM");
    expect(verdict("prlimit64", 0, sys.RLIMIT_NOFILE, 0x1_0000_0000, 0)).toBe("EPERM");
    expect(verdict("prlimit64", 1, sys.RLIMIT_NOFILE, 0, 0x7ffd0000)).toBe("EPERM");
  });

  test("the program is well formed: every path ends in a RET inside it", () => {
    expect(prog.length).toBeLessThanOrEqual(4096);
    for (let n = 0; n < 600; n++) runFilter(prog, { nr: n }); // throws on a jump out of the program
  });

  test("the syscall numbers are the kernel header's", () => {
    const header = "/usr/include/x86_64-linux-gnu/asm/unistd_64.h";
    const alt = "/usr/include/asm/unistd_64.h";
    const path = existsSync(header) ? header : alt;
    if (!existsSync(path)) throw new Error(`${header} is missing: install the Linux API headers (linux-libc-dev) to check the table`);
    const fromHeader = new Map([...readFileSync(path, "utf8").matchAll(/#define __NR_(\w+) (\d+)/g)].map((m) => [m[1]!, Number(m[2])]));
    for (const [name, n] of Object.entries(sys.SYSCALLS)) expect([name, fromHeader.get(name)]).toEqual([name, n]);
    expect(sys.NR_SECCOMP).toBe(sys.SYSCALLS.seccomp);
  });

  test("the filter assembled at build time (a macro) is the policy's program for any pid", () => {
    // sandbox.ts inlines precompiledFilter()'s words and patches the pid in at start.
    for (const pid of [1, 2, 4242, process.pid, 4194304 /* PID_MAX_LIMIT */]) {
      expect([pid, sandboxFilter(pid)]).toEqual([pid, sys.encodeBpf(sys.compileSeccomp(vmemdPolicy(pid)))]);
    }
    // The pid's three places: tgkill's and kill's argument 0, and prlimit64's.
    const f = precompiledFilter();
    expect(f.pidWords).toHaveLength(3);
    expect(f.words.length).toBe(2 * prog.length);
    expect([f.allowed, f.killed]).toEqual([vmemdPolicy(PID).allow.length, KILLED.length]);
  });

  test("a policy that lists a call twice is refused", () => {
    const p = vmemdPolicy(PID);
    expect(() => sys.compileSeccomp({ ...p, kill: [...p.kill, "read"] })).toThrow(/listed twice/);
  });
});

/** Runs `body` in a fresh `bun` process after it has entered the sandbox exactly as vmemd does. */
async function underSandbox(body: string, before = "") {
  const script = `
    import * as sys from ${JSON.stringify(join(ROOT, "src/sys"))};
    import { Logger } from ${JSON.stringify(join(ROOT, "src/server"))};
    import { enterSandbox } from ${JSON.stringify(join(ROOT, "src/cli/sandbox"))};
    import { readFileSync, writeFileSync, readdirSync } from "node:fs";
    ${EXECVE}
    const say = (s) => console.log(s);
    const failure = (f) => { try { f(); return "no error"; } catch (e) { return e.code ?? String(e); } };
    const tasksUnder = () => readdirSync("/proc/self/task").map((t) => /Seccomp:\\t(\\d)/.exec(readFileSync("/proc/self/task/" + t + "/status", "utf8"))[1]).join("");
    ${before}
    enterSandbox(new Logger("warn"));
    ${body}
  `;
  const proc = Bun.spawn([process.execPath, "-e", script], { stdout: "pipe", stderr: "pipe", cwd: ROOT });
  const [stdout, stderr] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text()]);
  await proc.exited;
  return { stdout, stderr, signal: proc.signalCode };
}

/** execve("/bin/true") through libc, with valid arguments: only the filter stands in its way. */
const EXECVE = `
  import { dlopen, FFIType, ptr } from "bun:ffi";
  const { execve } = dlopen("libc.so.6", { execve: { args: [FFIType.ptr, FFIType.ptr, FFIType.ptr], returns: FFIType.i32 } }).symbols;
  const argv = new BigUint64Array(2);
  const path = Buffer.from("/bin/true\\0");
  const exec = () => { argv[0] = BigInt(ptr(path)); return execve(path, argv, new BigUint64Array(1)); };
`;

describe("a Bun process under the filter", () => {
  test("keeps working (new threads, GC, reading /proc); socket, write-opens and spawning fail with EPERM; execve kills it", async () => {
    const r = await underSandbox(`
      say("tasks " + tasksUnder());
      say("nnp " + /NoNewPrivs:\\t(\\d)/.exec(readFileSync("/proc/self/status", "utf8"))[1]);
      // A Worker started now: its threads come from clone (clone3 is ENOSYS) and inherit the filter.
      const w = new Worker(URL.createObjectURL(new Blob(["self.onmessage = (e) => postMessage(e.data * 2);"], { type: "application/javascript" })));
      const doubled = await new Promise((res) => { w.onmessage = (e) => res(e.data); w.postMessage(21); });
      say("worker " + doubled);
      w.terminate();
      Bun.gc(true);
      say("gc ok");
      say("socket " + failure(() => sys.listenSeqpacket("/tmp/vmemd-sandbox-never.sock")));
      say("write " + failure(() => writeFileSync("/tmp/vmemd-sandbox-never", "x")));
      say("spawn " + failure(() => Bun.spawnSync(["/bin/true"])));
      say("read " + (readFileSync("/proc/self/statm", "utf8").length > 0));
      say("execve");
      exec();
      say("still alive");
    `);
    expect(r.stderr).toBe("");
    const lines = r.stdout.trim().split("\n");
    expect(lines[0]).toMatch(/^tasks 2+$/);
    expect(lines.slice(1)).toEqual(["nnp 1", "worker 42", "gc ok", "socket EPERM", "write EPERM", "spawn EPERM", "read true", "execve"]);
    expect(r.signal).toBe("SIGSYS");
  });

  test("execve from a thread that existed before the filter kills the whole process (TSYNC)", async () => {
    const worker = `${EXECVE}\nself.onmessage = () => exec();\npostMessage("up");\n`;
    const r = await underSandbox(
      `
      say("tasks " + tasksUnder());
      w.postMessage("go");
      await Bun.sleep(5000);
      say("still alive");
    `,
      `
      const w = new Worker(URL.createObjectURL(new Blob([${JSON.stringify(worker)}], { type: "application/javascript" })));
      await new Promise((res) => { w.onmessage = res; });
    `,
    );
    expect(r.stderr).toBe("");
    expect(r.stdout).toMatch(/^tasks 2+\n$/);
    expect(r.signal).toBe("SIGSYS");
  });
});

describe("dist/vmemd serve", () => {
  beforeAll(() => {
    requireKvm();
    requireBinary();
  });

  test("is sandboxed by default: every thread filtered, no new privileges, the main thread without capabilities", async () => {
    const s = await VmemdProcess.start(["--memory", "16M", "--guest", join(import.meta.dir, "guest", "guest.bin")]);
    try {
      const st = status(s.pid);
      expect(st.Seccomp).toBe("2");
      expect(st.Seccomp_filters).toBe("1");
      expect(st.NoNewPrivs).toBe("1");
      expect(st.CapEff).toBe("0000000000000000");
      expect(st.CapPrm).toBe("0000000000000000");
      expect(st.CapInh).toBe("0000000000000000");
      expect(st.CapAmb).toBe("0000000000000000");
      if (isRoot) expect(st.CapBnd).toBe("0000000000000000");
      // The runtime's threads and the vCPU thread, started before the filter, run under it too.
      const tasks = readdirSync(`/proc/${s.pid}/task`);
      expect(tasks.length).toBeGreaterThan(2);
      for (const t of tasks) {
        const ts = status(s.pid, t);
        expect([ts.Name, ts.Seccomp, ts.NoNewPrivs]).toEqual([ts.Name, "2", "1"]);
      }
      expect(s.stderr).toContain("sandbox entered");
    } finally {
      expect(await s.stop()).toBe(0);
    }
  });

  test("serves register and unregister requests under the filter", async () => {
    const s = await VmemdProcess.start(["--memory", "16M"]);
    try {
      const c = s.connect();
      const fds = [memfd(2 << 20), memfd(4096)];
      for (let round = 0; round < 50; round++) {
        const a = c.registerMemory({ SharedMemory: { descriptor: fds[0]!, size: 2 << 20 } }, { GuestPhysicalAddress: 0x2_0000_0000 });
        const b = c.registerMemory({ SharedMemory: { descriptor: fds[1]!, size: 4096 } }, { GuestPhysicalAddress: 0x3_0000_0000 }, { read: true, write: false });
        expect(c.getState().regions).toHaveLength(2);
        c.unregisterMemory(a.region_id);
        c.unregisterMemory(b.region_id);
      }
      expect(c.getState().regions).toHaveLength(0);
      c.close();
      closeAll(fds);
      expect(status(s.pid).Seccomp).toBe("2");
    } finally {
      // SIGTERM still ends it cleanly: the socket file removed, exit 0.
      expect(await s.stop()).toBe(0);
    }
    expect(existsSync(s.socket)).toBe(false);
  });

  test.skipIf(!isRoot)("the filter the server runs, read back from the kernel, is the policy's and kills execve", async () => {
    const s = await VmemdProcess.start(["--memory", "16M"]);
    try {
      const dump = Bun.spawnSync([process.execPath, join(import.meta.dir, "seccomp_dump.ts"), String(s.pid)], { stderr: "pipe" });
      expect(dump.stderr.toString()).toBe("");
      const bytes = Buffer.from(dump.stdout.toString().trim(), "hex");
      const running = sys.decodeBpf(new Uint8Array(bytes));
      expect(running).toEqual(sys.compileSeccomp(vmemdPolicy(s.pid)));
      expect(decision(runFilter(running, { nr: nr("execve") }))).toBe("kill");
      expect(decision(runFilter(running, { nr: nr("socket") }))).toBe("EPERM");
      // Having been stopped and let go, it still serves.
      const c = s.connect();
      expect(c.getState()).toBeDefined();
      c.close();
    } finally {
      expect(await s.stop()).toBe(0);
    }
  });

  test("--no-sandbox serves without a filter", async () => {
    const s = await VmemdProcess.start(["--memory", "16M", "--no-sandbox"]);
    try {
      const st = status(s.pid);
      expect(st.Seccomp).toBe("0");
      expect(st.Seccomp_filters).toBe("0");
      expect(s.stderr).not.toContain("sandbox entered");
      const c = s.connect();
      const fd = memfd(4096);
      const r = c.registerMemory({ SharedMemory: { descriptor: fd, size: 4096 } }, { GuestPhysicalAddress: 0x2_0000_0000 });
      c.unregisterMemory(r.region_id);
      c.close();
      sys.close(fd);
    } finally {
      expect(await s.stop()).toBe(0);
    }
  });
});
