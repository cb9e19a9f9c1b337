// The seccomp policy vmemd serves under: which system calls it and the Bun runtime make
// once the VM, guest RAM, the listening socket and any vCPU thread exist (measured with
// strace -f over the test suite and the benchmark), which are killed, and that every
// other call is refused with EPERM. docs/security.md says how to extend it.
//
// The build compiles it (src/cli/sandbox_filter.ts, a macro), so this module imports
// nothing that needs FFI: errno values and the compiler's types.
import { Errno } from "../sys/errno";
import type { AllowRule, SeccompPolicy, SyscallName } from "../sys/seccomp_compile";

// linux/sched.h
const CLONE_THREAD = 0x00010000;
// asm-generic/fcntl.h: an open that could create, truncate or write.
const OPEN_WRITES = 0o3 /* O_ACCMODE */ | 0o100 /* O_CREAT */ | 0o1000 /* O_TRUNC */;
// asm-generic/mman-common.h: MADV_HWPOISON (100) and MADV_SOFT_OFFLINE (101) inject memory
// errors; the guard-page advice (Linux 6.13) comes after them.
const MADV_HWPOISON = 100;
const MADV_GUARD_INSTALL = 102;
const MADV_GUARD_REMOVE = 103;
// linux/prctl.h
const PR_SET_NAME = 15;
const PR_GET_NAME = 16;
const PR_SET_VMA = 0x53564d41;
// asm-generic/ioctls.h
const TCGETS = 0x5401;
const TIOCGWINSZ = 0x5413;
const FIONREAD = 0x541b;
const FIONBIO = 0x5421;
const FIONCLEX = 0x5450;
const FIOCLEX = 0x5451;
// linux/kvm.h: KVMIO, the type byte of every KVM ioctl.
const KVMIO_TYPE = 0xae00;

/** Calls made after start-up, allowed without looking at their arguments. */
const ALLOWED: readonly SyscallName[] = [
  // Descriptors vmemd already holds or is handed (requests, fstat of client memory).
  "read", "write", "readv", "writev", "pread64", "pwrite64", "lseek", "close", "close_range",
  "dup", "dup3", "fcntl", "fstat", "newfstatat", "statx", "getdents64",
  // The socket file is removed at exit.
  "unlink", "unlinkat",
  // Sockets that exist: accepting, reading and answering, SO_PEERCRED. No socket(), connect().
  "accept4", "recvmsg", "sendmsg", "recvmmsg", "sendmmsg", "recvfrom", "sendto",
  "getsockopt", "setsockopt", "getsockname", "getpeername", "shutdown",
  // The loop: epoll, the tick timer, eventfds, poll.
  "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "ppoll",
  "eventfd2", "timerfd_create", "timerfd_settime", "timerfd_gettime",
  // Memory: client mappings, the JS heap, the JIT, malloc.
  "mmap", "munmap", "mprotect", "mremap", "brk", "msync", "membarrier",
  // Threads the runtime starts later (JIT, GC helpers), and their synchronisation.
  "futex", "set_robust_list", "rseq", "set_tid_address", "gettid", "sched_yield",
  "sched_getaffinity", "nanosleep", "clock_nanosleep", "exit", "exit_group",
  // Signals: handlers, masks, the vCPU kick, the collector stopping threads.
  "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigsuspend", "sigaltstack", "restart_syscall",
  // Reading about itself.
  "getpid", "getppid", "getuid", "geteuid", "getgid", "getegid", "getresuid", "getresgid",
  "getrlimit", "getrusage", "sysinfo", "uname", "getrandom", "clock_gettime", "clock_getres",
  "gettimeofday", "time", "getcwd",
];

/** The dangerous set: never needed after start-up, each a way out of the sandbox or into the kernel. */
export const KILLED: readonly SyscallName[] = [
  "execve", "execveat",
  "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "pidfd_getfd",
  "mount", "umount2", "pivot_root", "chroot", "fsopen", "fsconfig", "fsmount", "fspick",
  "move_mount", "open_tree", "mount_setattr",
  "setns", "unshare",
  "bpf", "perf_event_open", "userfaultfd",
  "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
  "reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd",
  "keyctl", "add_key", "request_key",
  "open_by_handle_at", "name_to_handle_at",
  "iopl", "ioperm", "modify_ldt",
  "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname",
  "uselib", "vhangup", "lookup_dcookie", "create_module", "get_kernel_syms", "query_module", "nfsservctl",
];

/** The policy for process `pid` (signals may go to its own threads only). */
export function vmemdPolicy(pid: number): SeccompPolicy {
  const withChecks: AllowRule[] = [
    // New threads only: a fork (no CLONE_THREAD) would escape nothing but is never needed.
    { name: "clone", when: [[{ arg: 0, mask32: CLONE_THREAD, value: CLONE_THREAD }]] },
    // Reading /proc/self (the collector reads statm), /dev/null for the reserve descriptor.
    { name: "openat", when: [[{ arg: 2, mask32: OPEN_WRITES, value: 0 }]] },
    { name: "open", when: [[{ arg: 1, mask32: OPEN_WRITES, value: 0 }]] },
    { name: "madvise", when: [[{ arg: 2, below32: MADV_HWPOISON }], [{ arg: 2, in32: [MADV_GUARD_INSTALL, MADV_GUARD_REMOVE] }]] },
    { name: "prctl", when: [[{ arg: 0, in32: [PR_SET_NAME, PR_GET_NAME, PR_SET_VMA] }]] },
    // KVM on the VM, vCPU and /dev/kvm descriptors; terminal and descriptor queries.
    {
      name: "ioctl",
      when: [
        [{ arg: 1, mask32: 0xff00, value: KVMIO_TYPE }],
        [{ arg: 1, in32: [TCGETS, TIOCGWINSZ, FIONREAD, FIONBIO, FIONCLEX, FIOCLEX] }],
      ],
    },
    { name: "tgkill", when: [[{ arg: 0, eq32: pid }]] },
    { name: "kill", when: [[{ arg: 0, eq32: pid }]] },
    // getrlimit as glibc makes it: this process, no new limit.
    { name: "prlimit64", when: [[{ arg: 0, eq32: 0 }, { arg: 2, eq64: 0 }], [{ arg: 0, eq32: pid }, { arg: 2, eq64: 0 }]] },
  ];
  return {
    allow: [...ALLOWED, ...withChecks],
    // glibc's pthread_create tries clone3 first and falls back to clone on ENOSYS; clone3's
    // flags are behind a pointer the filter cannot read.
    refuse: [{ name: "clone3", errno: Errno.ENOSYS }],
    kill: KILLED,
    defaultErrno: Errno.EPERM,
  };
}
