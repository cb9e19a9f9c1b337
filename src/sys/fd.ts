// Descriptors: open/close/read/write, memfd, eventfd, fstat, fcntl, rlimits.
import { libc } from "./libc";
import { check, checkFault, faultsArmed, lastErrno, SysError } from "./error";
import { getU64 } from "./u64";

// asm-generic/fcntl.h, linux/memfd.h, sys/eventfd.h, asm-generic/resource.h
export const O_RDONLY = 0;
export const O_RDWR = 2;
export const O_ACCMODE = 3;
export const FD_CLOEXEC = 1;
export const O_NONBLOCK = 0o4000;
export const O_CLOEXEC = 0o2000000;
export const O_DIRECTORY = 0o200000;
export const MFD_CLOEXEC = 1;
export const MFD_ALLOW_SEALING = 2;
export const EFD_NONBLOCK = 0o4000;
export const EFD_CLOEXEC = 0o2000000;
export const F_GETFD = 1;
export const F_SETFD = 2;
export const F_GETFL = 3;
export const F_SETFL = 4;
export const F_ADD_SEALS = 1033;
export const F_GET_SEALS = 1034;
export const F_SEAL_SHRINK = 0x0002;
export const RLIMIT_NOFILE = 7;

// sys/stat.h: st_mode file types.
export const S_IFMT = 0o170000;
export const S_IFREG = 0o100000;
export const S_IFDIR = 0o040000;
export const S_IFCHR = 0o020000;
export const S_IFIFO = 0o010000;
export const S_IFSOCK = 0o140000;
export const S_IFBLK = 0o060000;

const utf8 = new TextEncoder();
const utf8Decoder = new TextDecoder();

/**
 * A C string. TextEncoder, not Buffer: the first use of Buffer in a process sets it up,
 * about 0.3 ms, and before ready nothing else needs it.
 */
export function cstr(s: string): Uint8Array {
  return utf8.encode(s + "\0");
}

export function open(path: string, flags: number, mode = 0): number {
  checkFault("open");
  return check(`open(${path})`, libc.open(cstr(path), flags | O_CLOEXEC, mode));
}

export function close(fd: number): void {
  check("close", libc.close(fd));
}

export const F_DUPFD_CLOEXEC = 1030;

/** A new descriptor for the same open file, close-on-exec like every descriptor vmemd holds. */
export function dupCloexec(fd: number): number {
  checkFault("dup");
  return check("fcntl(F_DUPFD_CLOEXEC)", libc.fcntl(fd, F_DUPFD_CLOEXEC, 0));
}

export function read(fd: number, buf: Uint8Array): number {
  return check("read", libc.read(fd, buf, buf.byteLength) as number);
}

/**
 * The text of a small file (/proc, /sys), read with read(2) into a buffer of `max` bytes;
 * what does not fit is not read. Not readFileSync: a sysctl read makes the kernel allocate
 * and zero a buffer the size of the request, and readFileSync asks for 256 KiB (1-1.8 ms
 * each under strace -T, where 32 bytes take 10 µs).
 */
export function readSmallFile(path: string, max: number): string {
  const fd = open(path, O_RDONLY);
  try {
    const buf = new Uint8Array(max);
    let n = 0;
    for (;;) {
      const got = read(fd, buf.subarray(n));
      if (got === 0 || (n += got) === max) break;
    }
    return utf8Decoder.decode(buf.subarray(0, n));
  } finally {
    close(fd);
  }
}

export function write(fd: number, buf: Uint8Array): number {
  return check("write", libc.write(fd, buf, buf.byteLength) as number);
}


export function pwriteAll(fd: number, buf: Uint8Array, offset: number): void {
  let done = 0;
  while (done < buf.byteLength) {
    const n = check("pwrite", libc.pwrite(fd, buf.subarray(done), buf.byteLength - done, offset + done) as number);
    done += n;
  }
}

export function memfdCreate(name: string, flags = MFD_CLOEXEC | MFD_ALLOW_SEALING): number {
  checkFault("memfd_create");
  return check("memfd_create", libc.memfd_create(cstr(name), flags));
}

export function ftruncate(fd: number, size: number): void {
  checkFault("ftruncate");
  check("ftruncate", libc.ftruncate(fd, size));
}

export function eventfd(initval = 0, flags = EFD_CLOEXEC | EFD_NONBLOCK): number {
  checkFault("eventfd");
  return check("eventfd", libc.eventfd(initval, flags));
}

export function fcntl(fd: number, cmd: number, arg = 0): number {
  return check("fcntl", libc.fcntl(fd, cmd, arg));
}

/**
 * Adds `seals` to a memfd, where it allows them: true if they are set now. A memfd made
 * without MFD_ALLOW_SEALING, or a file that is no memfd, answers EPERM or EINVAL, and that
 * is an answer, not an error: the caller does not look at errno, so it is not read (the
 * one call more a memfd without sealing cost on every RegisterMemory, against one that
 * allows it).
 */
export function addSeals(fd: number, seals: number): boolean {
  return libc.fcntl(fd, F_ADD_SEALS, seals) === 0;
}

/** Sets or clears O_NONBLOCK on the open file description. */
export function setNonblocking(fd: number, on: boolean): void {
  const flags = check("fcntl(F_GETFL)", libc.fcntl(fd, F_GETFL, 0));
  check("fcntl(F_SETFL)", libc.fcntl(fd, F_SETFL, on ? flags | O_NONBLOCK : flags & ~O_NONBLOCK));
}

/** The fields of struct stat (x86_64, asm/stat.h) that vmemd reads. */
export interface Stat {
  mode: number;
  size: number;
  blocks: number;
}

const statBuf = new BigInt64Array(18); // struct stat is 144 bytes on x86_64
const statView = new DataView(statBuf.buffer);


export function fstat(fd: number): Stat {
  checkFault("fstat");
  check("fstat", libc.fstat(fd, statBuf));
  return { mode: statView.getUint32(24, true), size: getU64(statView, 48), blocks: getU64(statView, 64) };
}

/**
 * fstat for a descriptor a client sent: 0, or -errno (nothing thrown); the result is read
 * with statMode() and statSize() until this module's next stat call. No object per call: fstat()'s
 * {mode, size, blocks} was one of the heap cells of every RegisterMemory.
 */
export function tryFstat(fd: number): number {
  if (faultsArmed()) {
    try {
      checkFault("fstat");
    } catch (e) {
      return -(e as SysError).errno;
    }
  }
  return libc.fstat(fd, statBuf) === -1 ? -lastErrno() : 0;
}

/** st_mode of the last tryFstat. */
export function statMode(): number {
  return statView.getUint32(24, true);
}

/** st_size of the last tryFstat. */
export function statSize(): number {
  return getU64(statView, 48);
}

/** What names one file: device and inode, with its st_mode (for "is it still ours?"). */
export interface FileId {
  dev: bigint;
  ino: bigint;
  mode: number;
}

/** dev, ino and st_mode of `path` itself (not a symlink's target), or null when nothing is there. */
export function lstatId(path: string): FileId | null {
  if (libc.lstat(cstr(path), statBuf) === -1) {
    const errno = lastErrno();
    if (errno === 2 /* ENOENT */) return null;
    throw new SysError(`lstat(${path})`, errno);
  }
  return { dev: statView.getBigUint64(0, true), ino: statView.getBigUint64(8, true), mode: statView.getUint32(24, true) };
}

export function unlink(path: string): void {
  check(`unlink(${path})`, libc.unlink(cstr(path)));
}

/** fchmod(2): on a socket before bind(2), the mode its file is created with (less the umask). */
export function fchmod(fd: number, mode: number): void {
  check("fchmod", libc.fchmod(fd, mode));
}

/** eventfd counters are 8-byte reads; returns 0 when nothing is pending (EAGAIN). */
const counterBuf = new BigUint64Array(1);
export function readCounter(fd: number): bigint {
  const n = libc.read(fd, counterBuf, 8);
  if (n === 8) return counterBuf[0]!;
  if (n === -1) {
    const errno = lastErrno();
    if (errno === 11 /* EAGAIN */) return 0n;
    throw new SysError("read(eventfd)", errno);
  }
  return 0n;
}

export function writeCounter(fd: number, value: bigint): void {
  counterBuf[0] = value;
  check("write(eventfd)", libc.write(fd, counterBuf, 8) as number);
}

export interface Rlimit {
  cur: bigint;
  max: bigint;
}
const rlimBuf = new BigUint64Array(2);
export function getrlimit(resource: number): Rlimit {
  check("getrlimit", libc.getrlimit(resource, rlimBuf));
  return { cur: rlimBuf[0]!, max: rlimBuf[1]! };
}
export function setrlimit(resource: number, lim: Rlimit): void {
  rlimBuf[0] = lim.cur;
  rlimBuf[1] = lim.max;
  check("setrlimit", libc.setrlimit(resource, rlimBuf));
}

export function pipe(): [number, number] {
  const fds = new Int32Array(2);
  check("pipe2", libc.pipe2(fds, O_CLOEXEC));
  return [fds[0]!, fds[1]!];
}

const PR_SET_PDEATHSIG = 1; // linux/prctl.h

/**
 * Asks the kernel to send `signal` to this process when the process that started it exits,
 * and sends it at once if that has already happened (the parent changed meanwhile).
 */
export function dieWithParent(signal: number, expectedParent: number): void {
  check("prctl(PR_SET_PDEATHSIG)", libc.prctl(PR_SET_PDEATHSIG, signal, 0, 0, 0));
  if (libc.getppid() !== expectedParent) process.kill(process.pid, signal);
}

/** unsetenv(3), and the runtime's copy (process.env) with it: children would see neither. */
export function unsetEnv(name: string): void {
  check(`unsetenv(${name})`, libc.unsetenv(cstr(name)));
  delete process.env[name];
}

export function getppid(): number {
  return libc.getppid();
}

export function getpid(): number {
  return libc.getpid();
}
export function gettid(): number {
  return libc.gettid();
}

/** Open descriptors of this process, by counting /proc/self/fd (tests and GetState). */
export function countOpenFds(pid: number | "self" = "self"): number {
  // node:fs is loaded only here (tests, diagnostics): it costs about a millisecond at start-up.
  return (require("node:fs") as typeof import("node:fs")).readdirSync(`/proc/${pid}/fd`).length;
}
