// The listening socket's file, for a server that runs as root in directories others may
// write to: it is created with its final mode, it replaces nothing but a dead socket, and
// at the end it is removed only if the path still names the file vmemd created. A
// listener handed over by a service manager (socket activation) is adopted instead: its
// file belongs to the manager, so vmemd neither creates nor removes it.
import * as sys from "../sys";
import type { Logger } from "./log";

const BACKLOG = 128;
/** How long a probe waits on a connect still in progress (AF_UNIX answers at once; the bound is for safety). */
const PROBE_TIMEOUT_MS = 1000;
/** Every type is tried: a listener of another program answers to its own type only. */
const PROBE_TYPES = [
  [sys.SOCK_SEQPACKET, "SOCK_SEQPACKET"],
  [sys.SOCK_STREAM, "SOCK_STREAM"],
  [sys.SOCK_DGRAM, "SOCK_DGRAM"],
] as const;

/** "stale": nobody holds the socket; "gone": the path vanished; otherwise why it counts as alive. */
type Probe = "stale" | "gone" | { alive: string };

export class SocketFile {
  private removed = false;

  private constructor(
    readonly path: string,
    /** The listening SOCK_SEQPACKET socket, non-blocking. */
    readonly fd: number,
    /** The file vmemd created at bind; null for an adopted listener (not vmemd's to remove). */
    private readonly id: sys.FileId | null,
    private readonly log: Logger,
  ) {}

  /**
   * Takes over an inherited listener (socket activation). Only an AF_UNIX SOCK_SEQPACKET
   * socket that is listening is taken: anything else is refused with why. It is made
   * non-blocking and close-on-exec; its path is what it is bound to.
   */
  static adopt(fd: number, log: Logger): SocketFile {
    const what = `descriptor ${fd} passed by the service manager`;
    let domain: number;
    try {
      domain = sys.socketOption(fd, sys.SO_DOMAIN, "SO_DOMAIN");
    } catch (e) {
      if (e instanceof sys.SysError && (e.errno === sys.Errno.ENOTSOCK || e.errno === sys.Errno.EBADF)) {
        throw new sys.SysError(`${what} is not a socket`, e.errno);
      }
      throw e;
    }
    if (domain !== sys.AF_UNIX) throw new sys.SysError(`${what} is not an AF_UNIX socket (domain ${domain})`, sys.Errno.EINVAL);
    const type = sys.socketOption(fd, sys.SO_TYPE, "SO_TYPE");
    if (type !== sys.SOCK_SEQPACKET) {
      throw new sys.SysError(`${what} is not SOCK_SEQPACKET (type ${type}; ListenSequentialPacket= makes one)`, sys.Errno.EPROTOTYPE);
    }
    if (sys.socketOption(fd, sys.SO_ACCEPTCONN, "SO_ACCEPTCONN") !== 1) {
      throw new sys.SysError(`${what} is not listening (a socket unit with Accept=yes passes connections, not the listener)`, sys.Errno.EINVAL);
    }
    sys.fcntl(fd, sys.F_SETFD, sys.FD_CLOEXEC);
    sys.setNonblocking(fd, true);
    return new SocketFile(sys.unixSocketName(fd), fd, null, log);
  }

  /**
   * Binds and listens at `path`, creating the file with `mode`. An existing non-socket is
   * refused and left alone; an existing socket is replaced only when no connect of any
   * type reaches a listener (ECONNREFUSED for all).
   */
  static bind(path: string, mode: number, log: Logger): SocketFile {
    const existing = sys.lstatId(path);
    if (existing !== null) {
      if ((existing.mode & sys.S_IFMT) !== sys.S_IFSOCK) {
        throw new sys.SysError(`${path} exists and is not a socket; refusing to replace it`, sys.Errno.EEXIST);
      }
      const p = probe(path);
      if (typeof p === "object") {
        throw new sys.SysError(`another server is answering on ${path} (${p.alive}); refusing to replace it`, sys.Errno.EADDRINUSE);
      }
      // Unlinked only if the path still names the socket that was probed. (A swap after
      // this check is a name in a directory the swapper can write: theirs to lose.)
      const now = p === "stale" ? sys.lstatId(path) : null;
      if (now !== null && sameFile(now, existing)) {
        sys.unlink(path);
        log.info("replaced a stale socket file", { path });
      }
    }
    const fd = sys.unixSocket(sys.SOCK_SEQPACKET, true);
    try {
      // bind(2) creates the file with the socket's own mode less the umask: both are set so
      // the file has exactly `mode` from its first moment (a chmod after bind leaves a window).
      sys.fchmod(fd, mode);
      const oldMask = process.umask(0o777 & ~mode);
      try {
        sys.bindUnix(fd, path);
      } finally {
        process.umask(oldMask);
      }
      sys.listen(fd, BACKLOG);
      const id = sys.lstatId(path);
      if (id === null || (id.mode & sys.S_IFMT) !== sys.S_IFSOCK) {
        throw new sys.SysError(`${path} was removed or replaced right after bind`, sys.Errno.ENOENT);
      }
      return new SocketFile(path, fd, id, log);
    } catch (e) {
      sys.close(fd);
      throw e;
    }
  }

  /**
   * Removes the path if it is still this socket's file (never an adopted listener's), then
   * closes the socket. In that order: while the socket is bound its file's inode cannot be
   * freed and reused, so a matching (st_dev, st_ino) really is this file.
   */
  remove(): void {
    if (this.removed) return;
    this.removed = true;
    try {
      if (this.id === null) return; // adopted: the file stays for the manager's next start
      const now = sys.lstatId(this.path);
      if (now === null) this.log.warn("the socket file was already removed", { path: this.path });
      else if (!sameFile(now, this.id)) this.log.warn("the socket path now names another file; leaving it", { path: this.path });
      else sys.unlink(this.path);
    } catch (e) {
      this.log.warn("could not remove the socket file", { path: this.path, error: String(e) });
    } finally {
      try {
        sys.close(this.fd);
      } catch {}
    }
  }
}

function sameFile(a: sys.FileId, b: sys.FileId): boolean {
  return a.dev === b.dev && a.ino === b.ino && (a.mode & sys.S_IFMT) === sys.S_IFSOCK && (b.mode & sys.S_IFMT) === sys.S_IFSOCK;
}

/**
 * Who holds the socket at `path`, by non-blocking connects of each type: a listener that
 * accepts, a full backlog (EAGAIN), a socket of another type (EPROTOTYPE) or any other
 * answer counts as alive; only ECONNREFUSED from every type means nobody is there.
 */
function probe(path: string): Probe {
  let otherType = false;
  for (const [type, name] of PROBE_TYPES) {
    const fd = sys.unixSocket(type, true);
    try {
      const errno = connectErrno(fd, path);
      if (errno === 0) return { alive: `a ${name} socket accepted a connection` };
      if (errno === sys.Errno.ECONNREFUSED) continue;
      if (errno === sys.Errno.EPROTOTYPE) {
        otherType = true; // the next type may name it
        continue;
      }
      if (errno === sys.Errno.ENOENT) return "gone";
      if (errno === sys.Errno.EAGAIN) return { alive: `a ${name} listener whose backlog is full` };
      if (errno === sys.Errno.ETIMEDOUT) return { alive: `a ${name} connect had no answer within ${PROBE_TIMEOUT_MS} ms` };
      return { alive: `a ${name} connect failed with ${sys.errnoName(errno)}` };
    } finally {
      sys.close(fd);
    }
  }
  return otherType ? { alive: "a socket is bound there, though it takes no connection now" } : "stale";
}

/** A non-blocking connect's outcome as an errno (0: connected), waiting at most PROBE_TIMEOUT_MS. */
function connectErrno(fd: number, path: string): number {
  try {
    sys.connectUnix(fd, path);
    return 0;
  } catch (e) {
    if (!(e instanceof sys.SysError)) throw e;
    if (e.errno !== sys.Errno.EINPROGRESS) return e.errno;
  }
  if (sys.pollOne(fd, sys.POLLOUT, PROBE_TIMEOUT_MS) === 0) return sys.Errno.ETIMEDOUT;
  return sys.socketError(fd);
}
