// Threads and signals: per-thread signal masks, signals to one thread, and the
// no-op handler that lets a signal interrupt a vCPU thread's KVM_RUN.
//
// Why a libc function as the handler: a signal interrupts a blocking KVM_RUN (EINTR,
// KVM_EXIT_INTR) only if it is caught; an ignored signal is discarded when sent and a
// default-action one kills the process. A handler here must not call into JavaScript
// (it would run on whatever thread the signal hits), and bun:ffi's `cc` does not work
// in a compiled binary, so the handler is the address of `abs`, a pure libc function:
// called as handler(signo), it reads its argument and returns. Nothing else happens;
// the point is only the EINTR.
import { libc } from "./libc";
import { check, lastErrno, SysError } from "./error";
import { cstr, readSmallFile } from "./fd";
import { KVM_RUN } from "./ioctl";

// asm-generic/signal.h (x86_64)
export const SIGHUP = 1;
export const SIGINT = 2;
export const SIGQUIT = 3;
export const SIGUSR1 = 10;
export const SIGUSR2 = 12;
export const SIGTERM = 15;
const SIG_BLOCK = 0;
// bits/sigaction.h (glibc, x86_64): struct sigaction is 152 bytes:
// sa_handler@0 (8), sa_mask@8 (sigset_t, 128), sa_flags@136 (int), sa_restorer@144.
// glibc's sigaction() fills sa_restorer itself.
const SIGSET_SIZE = 128;
const SIGACTION_SIZE = 152;
const SA_FLAGS = 136;
const SA_RESTART = 0x10000000;
const SIG_DFL = 0;

/** The first real-time signal as glibc counts it (glibc keeps 32 and 33 for itself). */
export function sigrtmin(): number {
  return libc.__libc_current_sigrtmin();
}

/**
 * The signal vmemd sends to a vCPU thread to interrupt KVM_RUN: SIGRTMIN+4. Bun catches
 * 4-8, 11, 30, 31 and 33 for itself (measured), and SIGUSR1/SIGUSR2 have meanings
 * other programs (and Bun's `process.on`) give them; a real-time signal nobody uses
 * keeps vmemd's handler out of everyone's way.
 */
export function vcpuKickSignal(): number {
  return sigrtmin() + 4;
}

function sigset(signals: readonly number[]): Uint8Array {
  const set = new Uint8Array(SIGSET_SIZE);
  for (const s of signals) {
    if (s < 1 || s > 64) throw new SysError(`signal ${s} out of range`, 22 /* EINVAL */);
    set[(s - 1) >> 3]! |= 1 << ((s - 1) & 7);
  }
  return set;
}

function sigmask(how: number, signals: readonly number[], call: string): void {
  // pthread_sigmask returns the error number instead of setting errno.
  const rc = libc.pthread_sigmask(how, sigset(signals), null);
  if (rc !== 0) throw new SysError(call, rc);
}

/** Blocks `signals` on the calling thread only (pthread_sigmask SIG_BLOCK). */
export function blockSignals(signals: readonly number[]): void {
  sigmask(SIG_BLOCK, signals, "pthread_sigmask(SIG_BLOCK)");
}

/** Signals blocked on thread `tid` of this process, from /proc (tests, diagnostics). */
export function blockedSignals(tid: number): number[] {
  const status = readSmallFile(`/proc/self/task/${tid}/status`, 16384);
  const m = /^SigBlk:\s*([0-9a-f]+)$/m.exec(status);
  if (m === null) throw new SysError(`/proc/self/task/${tid}/status: no SigBlk line`, 5 /* EIO */);
  const bits = BigInt("0x" + m[1]);
  const out: number[] = [];
  for (let s = 1; s <= 64; s++) if ((bits >> BigInt(s - 1)) & 1n) out.push(s);
  return out;
}

/** Sends `signal` to thread `tid` of this process. Returns false when the thread is gone (ESRCH). */
export function tgkill(tid: number, signal: number): boolean {
  if (libc.tgkill(libc.getpid(), tid, signal) === 0) return true;
  const errno = lastErrno();
  if (errno === 3 /* ESRCH */) return false;
  throw new SysError(`tgkill(${tid}, ${signal})`, errno);
}

let noopHandler: number | null = null;
function noopHandlerAddress(): number {
  if (noopHandler !== null) return noopHandler;
  // dlsym(RTLD_DEFAULT, "abs"): RTLD_DEFAULT is the null handle.
  const p = libc.dlsym(null, cstr("abs"));
  if (p === null) throw new SysError("dlsym(abs)", 2 /* ENOENT */);
  noopHandler = Number(p);
  return noopHandler;
}

/**
 * Installs a handler that does nothing for `signal`, process-wide, so that sending it to
 * a thread interrupts that thread's blocking system call (KVM_RUN returns EINTR) without
 * other effect. SA_RESTART: system calls that can be restarted are; KVM_RUN's EINTR is
 * never restarted. Idempotent; refuses to replace a handler someone else installed.
 */
export function installNoopSignalHandler(signal: number): void {
  const handler = noopHandlerAddress();
  const old = new Uint8Array(SIGACTION_SIZE);
  check(`sigaction(${signal})`, libc.sigaction(signal, null, old));
  const oldHandler = Number(new DataView(old.buffer).getBigUint64(0, true));
  if (oldHandler === handler) return;
  if (oldHandler !== SIG_DFL) {
    throw new SysError(`sigaction(${signal}): the signal already has another handler`, 16 /* EBUSY */);
  }
  const act = new Uint8Array(SIGACTION_SIZE);
  const v = new DataView(act.buffer);
  v.setBigUint64(0, BigInt(handler), true);
  v.setInt32(SA_FLAGS, SA_RESTART, true);
  check(`sigaction(${signal})`, libc.sigaction(signal, act, null));
}

/**
 * KVM_RUN on the calling (vCPU) thread, without exceptions: returns 0, or the errno
 * (EINTR when kicked). Hot path: one call per guest exit.
 *
 * Its own bun:ffi call site on purpose. Measured (Bun 1.4.5): with KVM_RUN going through
 * the shared `ioctl()` wrapper (one call site for number and typed-array arguments,
 * throwing SysError on -1), the first EINTR after the loop had been JIT-compiled never
 * came back to JavaScript: strace showed the same ioctl(KVM_RUN) re-issued in a tight
 * loop from the FFI thunk (returning EINTR each time, immediate_exit being set), and
 * the Worker hung until the process died. A dedicated call site that returns errno
 * instead of throwing did not show it in any run.
 */
export function kvmRun(vcpuFd: number): number {
  const rc = libc.ioctl(vcpuFd, KVM_RUN, null);
  return rc === 0 ? 0 : lastErrno();
}

/**
 * sched_yield(2): lets another runnable task on this CPU run now. serve calls it right after
 * writing "ready", so a supervisor sharing the CPU reads the line before vmemd finishes its
 * own set-up rather than after.
 */
export function schedYield(): void {
  libc.syscall(24 /* SYS_sched_yield */, 0, 0, null);
}
