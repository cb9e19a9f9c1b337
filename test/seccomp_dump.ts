// `bun test/seccomp_dump.ts PID`: prints, as hex, the seccomp filter process PID runs,
// read from the kernel with PTRACE_SECCOMP_GET_FILTER (needs CAP_SYS_ADMIN). Test-only,
// hence its own bun:ffi use outside src/sys: vmemd itself never traces anything.
import { dlopen, FFIType, ptr, read } from "bun:ffi";

const { i32, i64, u64 } = FFIType;
const libc = dlopen("libc.so.6", {
  ptrace: { args: [i64, i32, u64, u64], returns: i64 },
  waitpid: { args: [i32, FFIType.ptr, i32], returns: i32 },
  __errno_location: { args: [], returns: FFIType.ptr },
}).symbols;
// linux/ptrace.h, linux/wait.h
const PTRACE_DETACH = 17;
const PTRACE_SEIZE = 0x4206;
const PTRACE_INTERRUPT = 0x4207;
const PTRACE_SECCOMP_GET_FILTER = 0x420c;
const __WALL = 0x40000000;

const pid = Number(process.argv[2]);
const fail = (what: string): never => {
  process.stderr.write(`${what} failed: errno ${read.i32(libc.__errno_location()!, 0)}\n`);
  process.exit(1);
};
if (Number(libc.ptrace(PTRACE_SEIZE, pid, 0, 0)) !== 0) fail("PTRACE_SEIZE");
if (Number(libc.ptrace(PTRACE_INTERRUPT, pid, 0, 0)) !== 0) fail("PTRACE_INTERRUPT");
const status = new Int32Array(1);
if (libc.waitpid(pid, status, __WALL) !== pid) fail("waitpid");
const n = Number(libc.ptrace(PTRACE_SECCOMP_GET_FILTER, pid, 0, 0));
const buf = new Uint8Array(Math.max(n, 0) * 8);
const got = n > 0 ? Number(libc.ptrace(PTRACE_SECCOMP_GET_FILTER, pid, 0, Number(ptr(buf)))) : n;
libc.ptrace(PTRACE_DETACH, pid, 0, 0);
if (n <= 0 || got !== n) fail(`PTRACE_SECCOMP_GET_FILTER (${n})`);
process.stdout.write(Buffer.from(buf).toString("hex") + "\n");
