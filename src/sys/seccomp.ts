// seccomp: installing a classic-BPF filter (src/sys/seccomp_compile.ts assembles one) on every
// thread, and PR_SET_NO_NEW_PRIVS, which an unprivileged process needs first.
import { ptr } from "bun:ffi";
import { libc } from "./libc";
import { check, lastErrno, SysError } from "./error";
import { encodeBpf, SECCOMP_FILTER_FLAG_TSYNC, SECCOMP_SET_MODE_FILTER, type BpfInsn } from "./seccomp_compile";

export * from "./seccomp_compile";

// linux/prctl.h
const PR_SET_NO_NEW_PRIVS = 38;
// asm/unistd_64.h: SYSCALLS.seccomp. A constant of its own, so the bundle leaves out the
// 380-entry SYSCALLS table (only the build-time compiler needs it), whose object literal
// took 0.29 ms to evaluate at start.
export const NR_SECCOMP = 317;

/** prctl(PR_SET_NO_NEW_PRIVS, 1): execve can no longer gain privileges; seccomp needs it without CAP_SYS_ADMIN. */
export function setNoNewPrivs(): void {
  check("prctl(PR_SET_NO_NEW_PRIVS)", libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0));
}

/**
 * seccomp(SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &prog): the filter applies to
 * every thread of the process at once (the runtime's own threads too) and to every thread
 * started later. glibc 2.36 has no seccomp() wrapper, hence syscall(2). `prog` is the
 * program, or already encoded as struct sock_filter[] (encodeBpf).
 */
export function installSeccompFilter(prog: readonly BpfInsn[] | Uint8Array): void {
  const filter = prog instanceof Uint8Array ? prog : encodeBpf(prog);
  // struct sock_fprog: u16 len@0, struct sock_filter *filter@8.
  const fprog = new BigUint64Array(2);
  fprog[0] = BigInt(filter.byteLength / 8);
  fprog[1] = BigInt(ptr(filter));
  const rc = libc.syscall(NR_SECCOMP, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, fprog) as number;
  if (rc === -1) throw new SysError("seccomp(SECCOMP_SET_MODE_FILTER, TSYNC)", lastErrno());
  // TSYNC's other failure: the id of a thread that could not take the filter (one with a filter of its own).
  if (rc !== 0) throw new SysError(`seccomp(SECCOMP_SET_MODE_FILTER, TSYNC): thread ${rc} could not be synchronised`, 16 /* EBUSY */);
  void filter.byteLength; // a pointer taken with ptr() is valid only while its array is referenced
}
