// seccomp: a classic-BPF filter assembled from a policy (which system calls are allowed,
// refused with an errno, or kill the process). Pure code, no FFI: the build runs it (the
// vmemd filter is assembled at bundle time, src/cli/sandbox_filter.ts). seccomp.ts installs
// a filter; the policy itself is src/cli/sandbox_policy.ts.

// asm/unistd_64.h (x86_64), every number it lists. The filter checks the architecture
// first, so these are the only numbers it ever compares against.
export const SYSCALLS = {
  read: 0, write: 1, open: 2, close: 3, stat: 4, fstat: 5, lstat: 6, poll: 7, lseek: 8, mmap: 9,
  mprotect: 10, munmap: 11, brk: 12, rt_sigaction: 13, rt_sigprocmask: 14, rt_sigreturn: 15,
  ioctl: 16, pread64: 17, pwrite64: 18, readv: 19, writev: 20, access: 21, pipe: 22, select: 23,
  sched_yield: 24, mremap: 25, msync: 26, mincore: 27, madvise: 28, shmget: 29, shmat: 30, shmctl: 31,
  dup: 32, dup2: 33, pause: 34, nanosleep: 35, getitimer: 36, alarm: 37, setitimer: 38, getpid: 39,
  sendfile: 40, socket: 41, connect: 42, accept: 43, sendto: 44, recvfrom: 45, sendmsg: 46,
  recvmsg: 47, shutdown: 48, bind: 49, listen: 50, getsockname: 51, getpeername: 52, socketpair: 53,
  setsockopt: 54, getsockopt: 55, clone: 56, fork: 57, vfork: 58, execve: 59, exit: 60, wait4: 61,
  kill: 62, uname: 63, semget: 64, semop: 65, semctl: 66, shmdt: 67, msgget: 68, msgsnd: 69,
  msgrcv: 70, msgctl: 71, fcntl: 72, flock: 73, fsync: 74, fdatasync: 75, truncate: 76, ftruncate: 77,
  getdents: 78, getcwd: 79, chdir: 80, fchdir: 81, rename: 82, mkdir: 83, rmdir: 84, creat: 85,
  link: 86, unlink: 87, symlink: 88, readlink: 89, chmod: 90, fchmod: 91, chown: 92, fchown: 93,
  lchown: 94, umask: 95, gettimeofday: 96, getrlimit: 97, getrusage: 98, sysinfo: 99, times: 100,
  ptrace: 101, getuid: 102, syslog: 103, getgid: 104, setuid: 105, setgid: 106, geteuid: 107,
  getegid: 108, setpgid: 109, getppid: 110, getpgrp: 111, setsid: 112, setreuid: 113, setregid: 114,
  getgroups: 115, setgroups: 116, setresuid: 117, getresuid: 118, setresgid: 119, getresgid: 120,
  getpgid: 121, setfsuid: 122, setfsgid: 123, getsid: 124, capget: 125, capset: 126,
  rt_sigpending: 127, rt_sigtimedwait: 128, rt_sigqueueinfo: 129, rt_sigsuspend: 130,
  sigaltstack: 131, utime: 132, mknod: 133, uselib: 134, personality: 135, ustat: 136, statfs: 137,
  fstatfs: 138, sysfs: 139, getpriority: 140, setpriority: 141, sched_setparam: 142,
  sched_getparam: 143, sched_setscheduler: 144, sched_getscheduler: 145, sched_get_priority_max: 146,
  sched_get_priority_min: 147, sched_rr_get_interval: 148, mlock: 149, munlock: 150, mlockall: 151,
  munlockall: 152, vhangup: 153, modify_ldt: 154, pivot_root: 155, _sysctl: 156, prctl: 157,
  arch_prctl: 158, adjtimex: 159, setrlimit: 160, chroot: 161, sync: 162, acct: 163,
  settimeofday: 164, mount: 165, umount2: 166, swapon: 167, swapoff: 168, reboot: 169,
  sethostname: 170, setdomainname: 171, iopl: 172, ioperm: 173, create_module: 174, init_module: 175,
  delete_module: 176, get_kernel_syms: 177, query_module: 178, quotactl: 179, nfsservctl: 180,
  getpmsg: 181, putpmsg: 182, afs_syscall: 183, tuxcall: 184, security: 185, gettid: 186,
  readahead: 187, setxattr: 188, lsetxattr: 189, fsetxattr: 190, getxattr: 191, lgetxattr: 192,
  fgetxattr: 193, listxattr: 194, llistxattr: 195, flistxattr: 196, removexattr: 197,
  lremovexattr: 198, fremovexattr: 199, tkill: 200, time: 201, futex: 202, sched_setaffinity: 203,
  sched_getaffinity: 204, set_thread_area: 205, io_setup: 206, io_destroy: 207, io_getevents: 208,
  io_submit: 209, io_cancel: 210, get_thread_area: 211, lookup_dcookie: 212, epoll_create: 213,
  epoll_ctl_old: 214, epoll_wait_old: 215, remap_file_pages: 216, getdents64: 217,
  set_tid_address: 218, restart_syscall: 219, semtimedop: 220, fadvise64: 221, timer_create: 222,
  timer_settime: 223, timer_gettime: 224, timer_getoverrun: 225, timer_delete: 226,
  clock_settime: 227, clock_gettime: 228, clock_getres: 229, clock_nanosleep: 230, exit_group: 231,
  epoll_wait: 232, epoll_ctl: 233, tgkill: 234, utimes: 235, vserver: 236, mbind: 237,
  set_mempolicy: 238, get_mempolicy: 239, mq_open: 240, mq_unlink: 241, mq_timedsend: 242,
  mq_timedreceive: 243, mq_notify: 244, mq_getsetattr: 245, kexec_load: 246, waitid: 247,
  add_key: 248, request_key: 249, keyctl: 250, ioprio_set: 251, ioprio_get: 252, inotify_init: 253,
  inotify_add_watch: 254, inotify_rm_watch: 255, migrate_pages: 256, openat: 257, mkdirat: 258,
  mknodat: 259, fchownat: 260, futimesat: 261, newfstatat: 262, unlinkat: 263, renameat: 264,
  linkat: 265, symlinkat: 266, readlinkat: 267, fchmodat: 268, faccessat: 269, pselect6: 270,
  ppoll: 271, unshare: 272, set_robust_list: 273, get_robust_list: 274, splice: 275, tee: 276,
  sync_file_range: 277, vmsplice: 278, move_pages: 279, utimensat: 280, epoll_pwait: 281,
  signalfd: 282, timerfd_create: 283, eventfd: 284, fallocate: 285, timerfd_settime: 286,
  timerfd_gettime: 287, accept4: 288, signalfd4: 289, eventfd2: 290, epoll_create1: 291, dup3: 292,
  pipe2: 293, inotify_init1: 294, preadv: 295, pwritev: 296, rt_tgsigqueueinfo: 297,
  perf_event_open: 298, recvmmsg: 299, fanotify_init: 300, fanotify_mark: 301, prlimit64: 302,
  name_to_handle_at: 303, open_by_handle_at: 304, clock_adjtime: 305, syncfs: 306, sendmmsg: 307,
  setns: 308, getcpu: 309, process_vm_readv: 310, process_vm_writev: 311, kcmp: 312,
  finit_module: 313, sched_setattr: 314, sched_getattr: 315, renameat2: 316, seccomp: 317,
  getrandom: 318, memfd_create: 319, kexec_file_load: 320, bpf: 321, execveat: 322, userfaultfd: 323,
  membarrier: 324, mlock2: 325, copy_file_range: 326, preadv2: 327, pwritev2: 328, pkey_mprotect: 329,
  pkey_alloc: 330, pkey_free: 331, statx: 332, io_pgetevents: 333, rseq: 334, pidfd_send_signal: 424,
  io_uring_setup: 425, io_uring_enter: 426, io_uring_register: 427, open_tree: 428, move_mount: 429,
  fsopen: 430, fsconfig: 431, fsmount: 432, fspick: 433, pidfd_open: 434, clone3: 435,
  close_range: 436, openat2: 437, pidfd_getfd: 438, faccessat2: 439, process_madvise: 440,
  epoll_pwait2: 441, mount_setattr: 442, quotactl_fd: 443, landlock_create_ruleset: 444,
  landlock_add_rule: 445, landlock_restrict_self: 446, memfd_secret: 447, process_mrelease: 448,
  futex_waitv: 449, set_mempolicy_home_node: 450,
} as const;
export type SyscallName = keyof typeof SYSCALLS;

// linux/seccomp.h
export const SECCOMP_SET_MODE_FILTER = 1;
export const SECCOMP_FILTER_FLAG_TSYNC = 1;
export const SECCOMP_RET_KILL_PROCESS = 0x80000000;
export const SECCOMP_RET_ERRNO = 0x00050000;
export const SECCOMP_RET_ALLOW = 0x7fff0000;
export const SECCOMP_RET_ACTION_FULL = 0xffff0000;
export const SECCOMP_RET_DATA = 0x0000ffff;
// struct seccomp_data: nr@0 (int), arch@4 (u32), instruction_pointer@8, args[6]@16 (u64 each).
export const SECCOMP_DATA_NR = 0;
export const SECCOMP_DATA_ARCH = 4;
export const SECCOMP_DATA_ARGS = 16;
// linux/audit.h: EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE.
export const AUDIT_ARCH_X86_64 = 0xc000003e;
// asm/unistd.h: x32 system calls are x86_64's numbers with this bit set, same arch value.
export const X32_SYSCALL_BIT = 0x40000000;
// linux/bpf_common.h: the classic-BPF opcodes the filter uses.
export const BPF_LD = 0x00;
export const BPF_ALU = 0x04;
export const BPF_JMP = 0x05;
export const BPF_RET = 0x06;
export const BPF_W = 0x00;
export const BPF_ABS = 0x20;
export const BPF_K = 0x00;
export const BPF_AND = 0x50;
export const BPF_JA = 0x00;
export const BPF_JEQ = 0x10;
export const BPF_JGE = 0x30;
export const BPF_JSET = 0x40;
// linux/filter.h: BPF_MAXINSNS.
const BPF_MAXINSNS = 4096;

/** One struct sock_filter: opcode, jump-if-true and jump-if-false offsets, constant. */
export interface BpfInsn {
  code: number;
  jt: number;
  jf: number;
  k: number;
}

/**
 * A test on one argument. System-call arguments are 64-bit slots; for an `int` or
 * `unsigned int` parameter the kernel ignores the upper half, so the 32-bit tests look at
 * the lower half only (what the kernel will use), and `eq64` compares both (pointers).
 */
export type ArgCheck =
  | { arg: number; eq32: number }
  | { arg: number; eq64: number }
  | { arg: number; in32: readonly number[] }
  /** (lower half & mask) === value */
  | { arg: number; mask32: number; value: number }
  /** lower half < limit, unsigned */
  | { arg: number; below32: number };

/** An allowed call, outright or when every check of one of the `when` lists holds. */
export type AllowRule = SyscallName | { name: SyscallName; when: readonly (readonly ArgCheck[])[] };

export interface SeccompPolicy {
  allow: readonly AllowRule[];
  /** Refused with their own errno (ENOSYS for clone3, so glibc falls back to clone). */
  refuse: readonly { name: SyscallName; errno: number }[];
  /** The process dies of SIGSYS. */
  kill: readonly SyscallName[];
  /** What every other call, and an allowed one whose checks fail, returns. */
  defaultErrno: number;
}

const stmt = (code: number, k: number): BpfInsn => ({ code, jt: 0, jf: 0, k: k >>> 0 });
const jump = (op: number, k: number, jt: number, jf: number): BpfInsn => ({ code: BPF_JMP | op | BPF_K, jt, jf, k: k >>> 0 });
const ret = (k: number): BpfInsn => stmt(BPF_RET | BPF_K, k);
const load = (offset: number): BpfInsn => stmt(BPF_LD | BPF_W | BPF_ABS, offset);
/** A policy that cannot be compiled (with the filter assembled at bundle time, the build fails). */
export class SeccompPolicyError extends Error {
  override name = "SeccompPolicyError";
}

const argLow = (arg: number): number => {
  if (!Number.isInteger(arg) || arg < 0 || arg > 5) throw new SeccompPolicyError(`seccomp policy: argument ${arg} out of range`);
  return SECCOMP_DATA_ARGS + 8 * arg; // little-endian: the lower half comes first
};

/** Instructions that fall through when `c` holds and jump `fail` instructions past their end when not. */
function argCheck(c: ArgCheck, fail: number): BpfInsn[] {
  const lo = argLow(c.arg);
  if ("eq32" in c) return [load(lo), jump(BPF_JEQ, c.eq32, 0, fail)];
  if ("eq64" in c) {
    const v = BigInt(c.eq64);
    return [load(lo), jump(BPF_JEQ, Number(v & 0xffffffffn), 0, fail + 2), load(lo + 4), jump(BPF_JEQ, Number(v >> 32n), 0, fail)];
  }
  if ("below32" in c) return [load(lo), jump(BPF_JGE, c.below32, fail, 0)];
  if ("mask32" in c) return [load(lo), stmt(BPF_ALU | BPF_AND | BPF_K, c.mask32), jump(BPF_JEQ, c.value, 0, fail)];
  const n = c.in32.length;
  if (n === 0) return [stmt(BPF_JMP | BPF_JA, fail)];
  return [load(lo), ...c.in32.map((v, i) => (i < n - 1 ? jump(BPF_JEQ, v, n - 1 - i, 0) : jump(BPF_JEQ, v, 0, fail)))];
}

/** The body for one allowed call with checks: each alternative ends in ALLOW; all failing, the default. */
function conditional(when: readonly (readonly ArgCheck[])[], otherwise: number): BpfInsn[] {
  const out: BpfInsn[] = [];
  for (const alt of when) {
    // Built back to front: each check's failure skips what follows it in this alternative.
    let block: BpfInsn[] = [ret(SECCOMP_RET_ALLOW)];
    for (let i = alt.length - 1; i >= 0; i--) block = [...argCheck(alt[i]!, block.length), ...block];
    out.push(...block);
  }
  out.push(ret(otherwise));
  return out;
}

interface Entry {
  nr: number;
  name: string;
  body: BpfInsn[];
}

/** A conditional jump whose target may be more than 255 instructions on: a JA carries it. */
function branch(op: number, k: number, skipIfTrue: number): BpfInsn[] {
  return skipIfTrue <= 255 ? [jump(op, k, skipIfTrue, 0)] : [jump(op, k, 0, 1), stmt(BPF_JMP | BPF_JA, skipIfTrue)];
}

/** Binary search on the syscall number (in A): log2(n) comparisons, then a short linear run. */
function tree(entries: Entry[], otherwise: number): BpfInsn[] {
  if (entries.length <= 4) {
    const out: BpfInsn[] = [];
    for (const e of entries) {
      // Equal: fall into the body; not equal: skip it.
      out.push(...(e.body.length <= 255 ? [jump(BPF_JEQ, e.nr, 0, e.body.length)] : [jump(BPF_JEQ, e.nr, 1, 0), stmt(BPF_JMP | BPF_JA, e.body.length)]));
      out.push(...e.body);
    }
    out.push(ret(otherwise));
    return out;
  }
  const mid = entries.length >> 1;
  const left = tree(entries.slice(0, mid), otherwise);
  const right = tree(entries.slice(mid), otherwise);
  // nr >= the right half's first number: over the left half.
  return [...branch(BPF_JGE, entries[mid]!.nr, left.length), ...left, ...right];
}

export const retErrno = (errno: number): number => (SECCOMP_RET_ERRNO | (errno & SECCOMP_RET_DATA)) >>> 0;

/**
 * The filter for `policy`: a foreign architecture or an x32 number is killed, then the
 * number is looked up. Calls allowed without argument checks end in a RET that depends on
 * the number alone, which the kernel caches per number (no filter run for them at all).
 */
export function compileSeccomp(policy: SeccompPolicy): BpfInsn[] {
  const deny = retErrno(policy.defaultErrno);
  const entries = new Map<number, Entry>();
  const add = (name: SyscallName, body: BpfInsn[]) => {
    const nr = SYSCALLS[name];
    if (nr === undefined) throw new SeccompPolicyError(`seccomp policy: unknown system call ${name}`);
    if (entries.has(nr)) throw new SeccompPolicyError(`seccomp policy: ${name} is listed twice`);
    entries.set(nr, { nr, name, body });
  };
  for (const r of policy.allow) {
    if (typeof r === "string") add(r, [ret(SECCOMP_RET_ALLOW)]);
    else add(r.name, conditional(r.when, deny));
  }
  for (const r of policy.refuse) add(r.name, [ret(retErrno(r.errno))]);
  for (const name of policy.kill) add(name, [ret(SECCOMP_RET_KILL_PROCESS)]);
  const sorted = [...entries.values()].sort((a, b) => a.nr - b.nr);
  const prog = [
    load(SECCOMP_DATA_ARCH),
    jump(BPF_JEQ, AUDIT_ARCH_X86_64, 1, 0),
    ret(SECCOMP_RET_KILL_PROCESS),
    load(SECCOMP_DATA_NR),
    jump(BPF_JSET, X32_SYSCALL_BIT, 0, 1),
    ret(SECCOMP_RET_KILL_PROCESS),
    ...tree(sorted, deny),
  ];
  if (prog.length > BPF_MAXINSNS) throw new SeccompPolicyError(`seccomp policy: ${prog.length} instructions, more than ${BPF_MAXINSNS}`);
  return prog;
}

/** struct sock_filter[], 8 bytes each: u16 code, u8 jt, u8 jf, u32 k. */
export function encodeBpf(prog: readonly BpfInsn[]): Uint8Array {
  const out = new Uint8Array(prog.length * 8);
  const v = new DataView(out.buffer);
  prog.forEach((p, i) => {
    v.setUint16(i * 8, p.code, true);
    v.setUint8(i * 8 + 2, p.jt);
    v.setUint8(i * 8 + 3, p.jf);
    v.setUint32(i * 8 + 4, p.k, true);
  });
  return out;
}

export function decodeBpf(bytes: Uint8Array): BpfInsn[] {
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out: BpfInsn[] = [];
  for (let o = 0; o + 8 <= bytes.byteLength; o += 8) out.push({ code: v.getUint16(o, true), jt: v.getUint8(o + 2), jf: v.getUint8(o + 3), k: v.getUint32(o + 4, true) });
  return out;
}

