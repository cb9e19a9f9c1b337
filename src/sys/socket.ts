// AF_UNIX SOCK_SEQPACKET sockets with SCM_RIGHTS, and poll(2).
import { ptr, type Pointer } from "bun:ffi";
import { libc } from "./libc";
import { check, checkFault, lastErrno, SysError } from "./error";
import { close } from "./fd";
import { getU64, setU64 } from "./u64";

// bits/socket.h, bits/socket_type.h, sys/socket.h, asm-generic/socket.h, sys/poll.h
export const AF_UNIX = 1;
export const SOCK_STREAM = 1;
export const SOCK_DGRAM = 2;
export const SOCK_SEQPACKET = 5;
export const SOCK_NONBLOCK = 0o4000;
export const SOCK_CLOEXEC = 0o2000000;
export const SOL_SOCKET = 1;
export const SO_TYPE = 3;
export const SO_ERROR = 4;
export const SO_ACCEPTCONN = 30;
export const SO_DOMAIN = 39;
export const SO_PEERCRED = 17;
export const SO_SNDBUF = 7;
export const SO_RCVBUF = 8;
// asm-generic/socket.h: SO_RCVTIMEO_OLD, a struct timeval on 64-bit x86.
export const SO_RCVTIMEO = 20;
export const SCM_RIGHTS = 1;
export const MSG_CTRUNC = 0x08;
export const MSG_TRUNC = 0x20;
export const MSG_DONTWAIT = 0x40;
export const MSG_NOSIGNAL = 0x4000;
export const MSG_CMSG_CLOEXEC = 0x40000000;
export const POLLIN = 0x001;
export const POLLOUT = 0x004;
export const POLLERR = 0x008;
export const POLLHUP = 0x010;
export const POLLRDHUP = 0x2000;
export const SHUT_RDWR = 2;

/** The kernel's SCM_MAX_FD: descriptors one packet can carry. */
export const SCM_MAX_FD = 253;
export const EAGAIN = 11;
export const EINTR = 4;

const utf8 = new TextEncoder();
const utf8Decoder = new TextDecoder();
// struct sockaddr_un: sa_family_t (u16) + char sun_path[108]
const SUN_PATH = 108;
const SOCKADDR_UN_SIZE = 2 + SUN_PATH;

/**
 * A sockaddr_un and its length for a path, or for an abstract name written "@name" (as
 * systemd writes NOTIFY_SOCKET): a leading NUL, and the length covers the name only.
 * Without `abstract`, a leading "@" is part of a path. (TextEncoder and a plain array, not
 * Buffer: the first use of Buffer sets it up, about 0.3 ms of start-up.)
 */
export function unixAddress(name: string, abstract = name.startsWith("@")): { addr: Uint8Array; len: number } {
  const bytes = utf8.encode(abstract ? name.slice(1) : name);
  // A path needs its terminating NUL inside sun_path; an abstract name, its leading one.
  if (bytes.length + 1 > SUN_PATH) throw new SysError(`socket address too long (${name})`, 36 /* ENAMETOOLONG */);
  const addr = new Uint8Array(SOCKADDR_UN_SIZE);
  new DataView(addr.buffer).setUint16(0, AF_UNIX, true);
  addr.set(bytes, abstract ? 3 : 2);
  return { addr, len: abstract ? 2 + 1 + bytes.length : 2 + bytes.length + 1 };
}

/** getsockopt(2) of an int option at SOL_SOCKET (SO_TYPE, SO_DOMAIN, SO_ACCEPTCONN...). */
export function socketOption(fd: number, option: number, name: string): number {
  const v = new Int32Array(1);
  const len = new Uint32Array([4]);
  check(`getsockopt(${name})`, libc.getsockopt(fd, SOL_SOCKET, option, v, len));
  return v[0]!;
}

/**
 * The address an AF_UNIX socket is bound to (getsockname): its path, "@name" for an
 * abstract name, "" when unbound.
 */
export function unixSocketName(fd: number): string {
  const sa = new Uint8Array(SOCKADDR_UN_SIZE);
  const len = new Uint32Array([SOCKADDR_UN_SIZE]);
  check("getsockname", libc.getsockname(fd, sa, len));
  const n = Math.min(len[0]!, SOCKADDR_UN_SIZE);
  if (n <= 2) return "";
  if (sa[2] === 0) return "@" + utf8Decoder.decode(sa.subarray(3, n));
  const end = sa.indexOf(0, 2);
  return utf8Decoder.decode(sa.subarray(2, end === -1 || end > n ? n : end));
}

/**
 * One datagram on a connected datagram socket without waiting: true when sent, false when
 * the receiver's queue is full (EAGAIN). Other failures (the receiver gone: ECONNREFUSED) throw.
 */
export function sendDatagram(fd: number, body: Uint8Array): boolean {
  const n = libc.sendto(fd, body, body.byteLength, MSG_DONTWAIT | MSG_NOSIGNAL, null, 0) as number;
  if (n === -1) {
    const errno = lastErrno();
    if (errno === EAGAIN) return false;
    throw new SysError("sendto", errno);
  }
  return true;
}

/** An AF_UNIX socket of `type` (SOCK_SEQPACKET, SOCK_STREAM, SOCK_DGRAM), close-on-exec. */
export function unixSocket(type: number, nonblocking: boolean): number {
  checkFault("socket");
  return check("socket", libc.socket(AF_UNIX, type | SOCK_CLOEXEC | (nonblocking ? SOCK_NONBLOCK : 0), 0));
}

/** bind(2) to a path: creates the socket file (mode: the socket's, less the umask). */
export function bindUnix(fd: number, path: string): void {
  const { addr, len } = unixAddress(path, false);
  check(`bind(${path})`, libc.bind(fd, addr, len));
}

/** bind(2) to a path or an abstract "@name" (unixAddress). */
export function bindUnixName(fd: number, name: string): void {
  const { addr, len } = unixAddress(name);
  check(`bind(${name})`, libc.bind(fd, addr, len));
}

/** connect(2) to a path or an abstract "@name" (unixAddress). */
export function connectUnixName(fd: number, name: string): void {
  const { addr, len } = unixAddress(name);
  check(`connect(${name})`, libc.connect(fd, addr, len));
}

export function listen(fd: number, backlog: number): void {
  check("listen", libc.listen(fd, backlog));
}

/** connect(2) to a path; on a non-blocking socket a full backlog is EAGAIN (a SysError). */
export function connectUnix(fd: number, path: string): void {
  const { addr, len } = unixAddress(path, false);
  check(`connect(${path})`, libc.connect(fd, addr, len));
}

/** SO_ERROR: the pending error of a socket (a non-blocking connect's outcome), 0 if none. */
export function socketError(fd: number): number {
  const err = new Int32Array(1);
  const len = new Uint32Array([4]);
  check("getsockopt(SO_ERROR)", libc.getsockopt(fd, SOL_SOCKET, SO_ERROR, err, len));
  return err[0]!;
}

/** A non-blocking listening SEQPACKET socket bound at `path`. */
export function listenSeqpacket(path: string, backlog = 128): number {
  const fd = unixSocket(SOCK_SEQPACKET, true);
  try {
    bindUnix(fd, path);
    listen(fd, backlog);
    return fd;
  } catch (e) {
    close(fd);
    throw e;
  }
}

export function connectSeqpacket(path: string, nonblocking = false): number {
  const fd = unixSocket(SOCK_SEQPACKET, nonblocking);
  try {
    connectUnix(fd, path);
    return fd;
  } catch (e) {
    close(fd);
    throw e;
  }
}

/** SO_RCVTIMEO: how long a blocking receive on `fd` may sleep (0: for ever). */
export function setRecvTimeout(fd: number, ms: number): void {
  const tv = new BigInt64Array([BigInt(Math.floor(ms / 1000)), BigInt((ms % 1000) * 1000)]);
  check("setsockopt(SO_RCVTIMEO)", libc.setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, tv, 16));
}

export function socketpairSeqpacket(): [number, number] {
  const fds = new Int32Array(2);
  check("socketpair", libc.socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, fds));
  return [fds[0]!, fds[1]!];
}

/** accept4 on a non-blocking listener: the new descriptor, or -1 when none is pending. */
export function accept(listener: number): number {
  checkFault("accept4");
  const fd = libc.accept4(listener, null, null, SOCK_NONBLOCK | SOCK_CLOEXEC);
  if (fd === -1) {
    const errno = lastErrno();
    if (errno === EAGAIN || errno === EINTR) return -1;
    throw new SysError("accept4", errno);
  }
  return fd;
}

export interface PeerCred {
  pid: number;
  uid: number;
  gid: number;
}
export function peerCred(fd: number): PeerCred {
  const cred = new Uint32Array(3); // struct ucred { pid_t pid; uid_t uid; gid_t gid; }
  const len = new Uint32Array([12]);
  check("getsockopt(SO_PEERCRED)", libc.getsockopt(fd, SOL_SOCKET, SO_PEERCRED, cred, len));
  return { pid: cred[0]! | 0, uid: cred[1]!, gid: cred[2]! };
}

/** shutdown(SHUT_WR): this end sends no more; the peer reads end of stream. */
export function shutdownWrite(fd: number): void {
  check("shutdown", libc.shutdown(fd, 1 /* SHUT_WR */));
}

export function shutdown(fd: number): void {
  libc.shutdown(fd, SHUT_RDWR);
}

/**
 * The descriptors of a packet that carried none. Not frozen: a frozen array has another
 * indexing type (ArrayStorage) than the int32 arrays parseRights fills, and every reader of
 * a packet's descriptors then saw two shapes and was recompiled (OSR exits, BadIndexingType).
 * Emptied from [0] so it starts with the int32 shape. Nothing writes a received list.
 * Measured on a fresh server's first 2000 register cycles: OSR exits 1,056 to 0, the JIT
 * threads' CPU 172 to 145 ms (five alternating runs each).
 */
const NO_FDS: readonly number[] = [0];
(NO_FDS as number[]).pop();

/** The descriptors of every SCM_RIGHTS message in a received control buffer. */
export function parseRights(v: DataView, base: number, controlLen: number): number[] {
  if (controlLen === 0) return NO_FDS as number[];
  const fds: number[] = [];
  let off = 0;
  while (off + CMSG_HDR <= controlLen) {
    // cmsg_len is a size_t; within a control buffer this small only its low half can be set.
    const len = v.getUint32(base + off + 4, true) === 0 ? v.getUint32(base + off, true) : 0;
    if (len < CMSG_HDR) break;
    if (v.getInt32(base + off + 8, true) === SOL_SOCKET && v.getInt32(base + off + 12, true) === SCM_RIGHTS) {
      for (let p = off + CMSG_HDR; p + 4 <= off + len; p += 4) fds.push(v.getInt32(base + p, true));
    }
    off += (len + 7) & ~7;
  }
  return fds;
}

// struct msghdr (56 B): name@0, namelen@8, iov@16, iovlen@24, control@32, controllen@40, flags@48.
// struct cmsghdr: len u64@0, level i32@8, type i32@12, data@16; each padded to 8.
export const CMSG_HDR = 16;
export const CONTROL_SIZE = CMSG_HDR + ((SCM_MAX_FD * 4 + 7) & ~7);

/**
 * Reusable buffers for one socket endpoint's recvmsg/sendmsg. The pointers stored
 * inside msghdr/iovec stay valid because the buffers live as long as this object.
 */
export class PacketIo {
  /** Received body bytes; valid until the next recv. */
  readonly body: Uint8Array;
  /** Descriptors received with the last packet, in SCM_RIGHTS order. */
  fds: number[] = [];
  /** msg_flags of the last recv (MSG_TRUNC, MSG_CTRUNC). */
  flags = 0;

  private readonly recvIov = new BigUint64Array(2);
  private readonly recvHdr = new DataView(new ArrayBuffer(56));
  private readonly recvControl = new Uint8Array(CONTROL_SIZE);
  private readonly recvControlView = new DataView(this.recvControl.buffer);
  /** struct iovec, written per send as 32-bit halves (no BigInt per packet). */
  private readonly sendIov = new DataView(new ArrayBuffer(16));
  private readonly sendHdr = new DataView(new ArrayBuffer(56));
  private readonly sendControl = new Uint8Array(CONTROL_SIZE);
  private readonly sendControlView = new DataView(this.sendControl.buffer);
  private readonly recvHdrPtr: Pointer;
  private readonly sendHdrPtr: Pointer;
  private readonly sendControlAddr: number;

  constructor(maxBody: number) {
    // One spare byte so an oversized packet shows as MSG_TRUNC rather than fitting exactly.
    this.body = new Uint8Array(maxBody + 1);
    this.recvIov[0] = BigInt(ptr(this.body));
    this.recvIov[1] = BigInt(this.body.byteLength);
    this.recvHdr.setBigUint64(16, BigInt(ptr(this.recvIov)), true);
    this.recvHdr.setBigUint64(24, 1n, true);
    this.recvHdr.setBigUint64(32, BigInt(ptr(this.recvControl)), true);
    this.recvHdrPtr = ptr(this.recvHdr);
    this.sendHdr.setBigUint64(16, BigInt(ptr(this.sendIov)), true);
    this.sendHdr.setBigUint64(24, 1n, true);
    this.sendHdrPtr = ptr(this.sendHdr);
    this.sendControlAddr = ptr(this.sendControl);
  }

  /**
   * One packet: its length, 0 at end of stream, -1 when nothing is pending.
   * Received descriptors land in `fds` (close-on-exec) and belong to the caller,
   * even when the packet is reported truncated. With `wait` on a blocking socket the
   * call sleeps in the kernel until a packet comes (one syscall, where try-then-poll
   * takes three when the peer has not answered yet); -1 then means the socket's
   * SO_RCVTIMEO ran out, or a signal came.
   */
  recv(fd: number, wait = false): number {
    setU64(this.recvHdr, 40, CONTROL_SIZE);
    this.recvHdr.setInt32(48, 0, true);
    const n = libc.recvmsg(fd, this.recvHdrPtr, wait ? MSG_CMSG_CLOEXEC : MSG_CMSG_CLOEXEC | MSG_DONTWAIT) as number;
    if (n === -1) {
      const errno = lastErrno(); // first: an allocation could run the collector, which may reset errno
      this.fds = [];
      if (errno === EAGAIN || errno === EINTR) return -1;
      throw new SysError("recvmsg", errno);
    }
    this.flags = this.recvHdr.getInt32(48, true);
    this.fds = parseRights(this.recvControlView, 0, getU64(this.recvHdr, 40));
    return n;
  }

  /** Sends one packet: true when sent, false when the socket would block. */
  send(fd: number, body: Uint8Array, fds: readonly number[] = []): boolean {
    if (fds.length > SCM_MAX_FD) throw new SysError(`sendmsg: ${fds.length} descriptors, more than SCM_MAX_FD (${SCM_MAX_FD})`, 22);
    setU64(this.sendIov, 0, body.byteLength === 0 ? 0 : ptr(body));
    setU64(this.sendIov, 8, body.byteLength);
    if (fds.length > 0) {
      const len = CMSG_HDR + fds.length * 4;
      const v = this.sendControlView;
      setU64(v, 0, len);
      v.setInt32(8, SOL_SOCKET, true);
      v.setInt32(12, SCM_RIGHTS, true);
      for (let i = 0; i < fds.length; i++) v.setInt32(CMSG_HDR + i * 4, fds[i]!, true);
      setU64(this.sendHdr, 32, this.sendControlAddr);
      setU64(this.sendHdr, 40, (len + 7) & ~7);
    } else {
      setU64(this.sendHdr, 32, 0);
      setU64(this.sendHdr, 40, 0);
    }
    const n = libc.sendmsg(fd, this.sendHdrPtr, MSG_DONTWAIT | MSG_NOSIGNAL) as number;
    if (n === -1) {
      const errno = lastErrno();
      if (errno === EAGAIN) return false;
      throw new SysError("sendmsg", errno);
    }
    return true;
  }
}

/** poll(2) on one descriptor; returns revents (0 on timeout). */
export function pollOne(fd: number, events: number, timeoutMs: number): number {
  const pfd = new Int32Array(2); // struct pollfd { int fd; short events, revents; }
  pfd[0] = fd;
  pfd[1] = events & 0xffff;
  for (;;) {
    const rc = libc.poll(pfd, 1, timeoutMs);
    if (rc === -1) {
      const errno = lastErrno();
      if (errno === EINTR) continue;
      throw new SysError("poll", errno);
    }
    return rc === 0 ? 0 : (pfd[1]! >>> 16) & 0xffff;
  }
}
