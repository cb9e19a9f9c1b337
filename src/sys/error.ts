// One error type for every failing system call: the call, errno and errno's name.
import { read, type Pointer } from "bun:ffi";
import { Errno } from "./errno";
import { libc } from "./libc";

export { Errno, type ErrnoName } from "./errno";

// Built on the first error, not at load: a start-up that fails nothing never needs it.
let names: Map<number, string> | null = null;

export function errnoName(errno: number): string {
  names ??= new Map<number, string>(Object.entries(Errno).map(([k, v]) => [v, k]));
  return names.get(errno) ?? `E#${errno}`;
}

/**
 * Where this thread's errno lives, asked for once: it stays put for the thread's life, and
 * each thread (a Worker) has its own copy of this module. One FFI call fewer per EAGAIN,
 * which the server meets about once a request.
 */
let errnoAt: Pointer | null = null;

/** Reads errno; must run right after the failing call, on the same thread. */
export function lastErrno(): number {
  if (errnoAt === null) errnoAt = libc.__errno_location() as Pointer;
  return read.i32(errnoAt, 0);
}

/** How a failed call reads in an error chain: "mmap: No such device (ENODEV)". */
export function sysMessage(call: string, errno: number): string {
  return `${call}: ${libc.strerror(errno)} (${errnoName(errno)})`;
}

/**
 * Messages already made, by call then errno, for sysRefusalMessage. A refusal a client can
 * repeat at request rate (an mmap of a descriptor that cannot be mapped, a KVM_IOEVENTFD
 * that is refused) names the same call and errno each time: strerror's C string copied into
 * a new JS string and a template string per refusal became one lookup (measured: about
 * 100 ns and 5 heap cells per message, to 6-12 ns and none).
 */
const messages = new Map<string, (string | undefined)[]>();

/**
 * sysMessage, made once per call and errno and kept. Only for a fixed `call` (one of
 * vmemd's names, never text with a path or a number in it): each call name is kept for good.
 */
export function sysRefusalMessage(call: string, errno: number): string {
  if (!(errno >= 0 && errno < 4096)) return sysMessage(call, errno);
  let byErrno = messages.get(call);
  if (byErrno === undefined) messages.set(call, (byErrno = []));
  return (byErrno[errno] ??= sysMessage(call, errno));
}

/** A failed system call: `call` says what was attempted, `errno` why it failed. */
export class SysError extends Error {
  readonly errno: number;
  readonly code: string;
  readonly call: string;
  constructor(call: string, errno: number) {
    const code = errnoName(errno);
    super(sysMessage(call, errno));
    this.name = "SysError";
    this.errno = errno;
    this.code = code;
    this.call = call;
  }
}

// Test-only fault injection: `injectFault("mmap", ENOMEM)` makes the
// next matching call fail without reaching the kernel. One boolean check when unused.
let faults: Map<string, { errno: number; remaining: number; skip: number }> | null = null;

/** Makes `call` fail with `errno` `times` times, after letting `after` calls through. */
export function injectFault(call: string, errno: number, times = 1, after = 0): void {
  faults ??= new Map();
  faults.set(call, { errno, remaining: times, skip: after });
}

export function clearFaults(): void {
  faults = null;
}

/** Whether any fault is armed (a test is injecting them). */
export function faultsArmed(): boolean {
  return faults !== null;
}

/** Throws the injected fault for `call`, if one is armed. */
export function checkFault(call: string): void {
  if (faults === null) return;
  const f = faults.get(call);
  if (f === undefined) return;
  if (f.skip > 0) {
    f.skip--;
    return;
  }
  if (--f.remaining <= 0) faults.delete(call);
  if (faults.size === 0) faults = null;
  throw new SysError(call, f.errno);
}

/** Throws SysError when a libc call returned -1. */
export function check(call: string, rc: number): number {
  if (rc === -1) throw new SysError(call, lastErrno());
  return rc;
}
