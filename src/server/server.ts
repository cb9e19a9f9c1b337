// The socket server: an AF_UNIX SOCK_SEQPACKET listener and an epoll loop on the
// main thread. It knows sockets, ordering and descriptor ownership, not memory
// semantics: every request goes to memory's execute().
import * as sys from "../sys";
import { execute, type ExecContext, VmMemoryError, failure, NumberMap } from "../memory";
import { regionIdOf } from "../memory/region_state";
import {
  requestDescriptors,
  type Datamatch,
  type U64,
  type VmMemoryFileMapping,
  type VmMemoryRequest,
  type VmMemoryResponse,
} from "../memory/request";
import { decodeFileMappings, decodeRequest, encodeResponse, MAX_PACKET } from "../protocol";
import type { Logger } from "./log";
import { SocketFile } from "./socket_file";

export interface ServerOptions {
  socketPath: string;
  /** Mode of the socket file (PROTOCOL.md: 0600 unless told otherwise). */
  socketMode: number;
  maxConnections: number;
  /** MmapAndRegisterMemory's num_file_mappings above this is refused at once. */
  maxFileMappings: number;
  /** Users allowed to connect; empty means any user who can open the socket file. */
  allowUids: number[];
  /** Largest request body accepted (at most the protocol's 65536). */
  maxPacket: number;
  /** Descriptors accepted in one packet (at most the kernel's SCM_MAX_FD, 253). */
  maxFdsPerPacket: number;
  /** Live regions one connection may have registered. */
  maxRegionsPerConnection: number;
  /** Remove a connection's regions and ioevents when it disconnects (crosvm does not). */
  releaseOnDisconnect: boolean;
  log: Logger;
}

export const DEFAULT_SERVER_OPTIONS = {
  socketMode: 0o600,
  maxConnections: 256,
  maxFileMappings: 65536,
  allowUids: [] as number[],
  maxPacket: MAX_PACKET,
  maxFdsPerPacket: sys.SCM_MAX_FD,
  maxRegionsPerConnection: 16384,
  releaseOnDisconnect: false,
};

/**
 * How often the loop lets Bun's event loop turn (signals), idle or busy: the tick is a
 * level-triggered timerfd in the epoll set, and epoll reports ready descriptors round robin,
 * so a loop kept busy by clients still sees it within a wake-up or two.
 */
const TICK_MS = 100;
/** Packets read from one connection per wake-up before others get a turn. */
const READ_BUDGET = 64;
/** Packets per recvmmsg. */
const RECV_BATCH = 16;
const READ_EVENTS = sys.EPOLLIN | sys.EPOLLRDHUP;
// No EPOLLRDHUP here: a peer that has half-closed while responses wait would otherwise
// wake the (level-triggered) loop over and over.
const WRITE_EVENTS = sys.EPOLLOUT;

/** An MmapAndRegisterMemory waiting for its follow-up packets; owns every descriptor received for it. */
interface PendingMmap {
  req: Extract<VmMemoryRequest, { MmapAndRegisterMemory: unknown }>;
  /** Mappings still expected (a count above 2^53 never completes: the peer can only hang up). */
  remaining: number;
  mappings: VmMemoryFileMapping[];
  /** Set when the request has already failed: its chunks are read and dropped, then this is the answer. */
  failure: VmMemoryError | null;
}

/** An ioeventfd a connection registered, kept (with a dup of its eventfd) to remove on disconnect. */
interface OwnedIoevent {
  event: number;
  addr: U64;
  datamatch: Datamatch;
}

class Connection {
  /** Responses that did not fit in the socket; while any wait, no request is read (throttle). */
  readonly outbox: Uint8Array[] = [];
  pending: PendingMmap | null = null;
  /** The peer has finished sending: answer what is owed, then close. */
  closing = false;
  requests = 0;
  /** Regions this connection registered and that are still live (a set: the values say nothing). */
  readonly regions = new NumberMap<true>();
  /** Only with --release-on-disconnect. */
  readonly ioevents: OwnedIoevent[] = [];
  constructor(
    readonly fd: number,
    readonly id: number,
    readonly peer: sys.PeerCred,
  ) {}
}

/** Extra descriptors in the epoll set (e.g. the vCPU's eventfd), with their handlers. */
export type FdHandler = (events: number) => void;

export class Server {
  private readonly epoll = new sys.Epoll(256);
  /** Single sends, for draining an outbox. */
  private readonly io = new sys.PacketIo(16);
  private readonly rx = new sys.BatchReceiver(RECV_BATCH, MAX_PACKET);
  private readonly tx = new sys.BatchSender(READ_BUDGET, 256 * 1024);
  /** The connection whose responses are in `tx`. */
  private txConn: Connection | null = null;
  private readonly conns = new Map<number, Connection>();
  private readonly handlers = new Map<number, FdHandler>();
  /** Which connection registered each live region (for per-connection limits and release). */
  private readonly regionOwner = new NumberMap<Connection>();
  /** A spare descriptor, given up to accept-and-close a connection when the table is full. */
  private reserveFd = -1;
  private socketFile: SocketFile | null = null;
  private listener = -1;
  private nextConnId = 1;
  private stopping = false;
  private stopReason = "";
  private exitCode = 0;

  constructor(
    private readonly ctx: ExecContext,
    private readonly opts: ServerOptions,
  ) {}

  get connectionCount(): number {
    return this.conns.size;
  }

  /** Binds the socket: a stale socket file is replaced; anything else at the path is an error (socket_file.ts). */
  listen(): void {
    this.socketFile = SocketFile.bind(this.opts.socketPath, this.opts.socketMode, this.opts.log);
    this.listener = this.socketFile.fd;
    this.epoll.add(this.listener, sys.EPOLLIN);
    this.reserveFd = openReserve();
  }

  /** Adds a descriptor of another component (the vCPU's eventfd) to the loop. */
  watch(fd: number, handler: FdHandler): void {
    this.handlers.set(fd, handler);
    this.epoll.add(fd, sys.EPOLLIN);
  }

  /** Asks the loop to finish the request in hand and return. */
  stop(reason: string, exitCode = 0): void {
    if (!this.stopping) {
      this.stopReason = reason;
      this.exitCode = exitCode;
    }
    this.stopping = true;
  }

  /** Runs until stop(); returns the exit code. */
  async run(): Promise<number> {
    // Bun runs signal handlers (and so stop()) only when its own event loop turns, which it
    // cannot while we sleep in epoll_wait: let it turn on every tick and on EINTR. The tick
    // is a timerfd in the set, so epoll_wait itself sleeps without a timeout (a timed one
    // arms an hrtimer on every sleep).
    let tick: sys.IntervalTimer | null = null;
    try {
      tick = new sys.IntervalTimer(TICK_MS);
      this.epoll.add(tick.fd, sys.EPOLLIN);
      while (!this.stopping) {
        this.serveUntilTurn(tick);
        await new Promise((r) => setImmediate(r));
      }
    } finally {
      tick?.close();
      this.shutdown(); // on every way out: clients closed, the socket file removed
    }
    return this.exitCode;
  }

  /**
   * The loop proper, synchronous: it returns when Bun's event loop is due a turn. Kept
   * out of the async run(): while it lived there, JSC threw run()'s optimised code away
   * and rebuilt it (an FTL compile of 8-19 ms on the serving CPU) every second or so under
   * load (BUN_JSC_reportCompileTimes). Our guess at why: the closure each await makes is
   * a cell that code refers to weakly, and it dies at the next GC.
   */
  private serveUntilTurn(tick: sys.IntervalTimer): void {
    while (!this.stopping) {
      const n = this.epoll.wait(-1);
      let turn = n <= 0;
      for (let i = 0; i < n; i++) {
        const fd = this.epoll.readyFd(i);
        if (fd === tick.fd) {
          tick.ack();
          turn = true;
        } else this.dispatch(fd, this.epoll.readyEvents(i));
      }
      if (turn) return;
    }
  }

  private dispatch(fd: number, events: number): void {
    if (fd === this.listener) return this.acceptAll();
    const handler = this.handlers.get(fd);
    if (handler !== undefined) return handler(events);
    const conn = this.conns.get(fd);
    if (conn === undefined) return;
    try {
      if (events & sys.EPOLLOUT) this.flush(conn);
      if (this.conns.has(fd) && events & (sys.EPOLLIN | sys.EPOLLRDHUP | sys.EPOLLHUP | sys.EPOLLERR)) this.readAll(conn, events);
    } catch (e) {
      if (this.txConn === conn) {
        this.tx.clear();
        this.txConn = null;
      }
      // A peer that hangs up with responses owed is a disconnect, not a failure.
      if (!peerGone(e)) this.opts.log.warn("connection failed", { conn: conn.id, error: String(e) });
      this.disconnect(conn);
    }
  }

  private acceptAll(): void {
    for (;;) {
      let fd: number;
      try {
        fd = sys.accept(this.listener);
      } catch (e) {
        this.opts.log.warn("accept failed", { error: String(e) });
        // EMFILE/ENFILE: the connection stays queued and the listener readable. Use the
        // reserve descriptor to take it and close it, so the loop does not spin on it.
        if (this.reserveFd !== -1) {
          closeQuietly(this.reserveFd);
          try {
            closeQuietly(sys.accept(this.listener));
          } catch {}
          this.reserveFd = openReserve();
        }
        return;
      }
      if (fd === -1) return;
      try {
        this.admit(fd);
      } catch (e) {
        this.opts.log.warn("could not take a connection", { error: String(e) });
        closeQuietly(fd);
      }
    }
  }

  /** Checks a new connection's peer and adds it to the loop (or closes it). */
  private admit(fd: number): void {
    const peer = sys.peerCred(fd);
    if (this.opts.allowUids.length > 0 && !this.opts.allowUids.includes(peer.uid)) {
      this.opts.log.limited.warn("refused a peer not in --allow-uid", { ...peer });
      sys.close(fd);
      return;
    }
    if (this.conns.size >= this.opts.maxConnections) {
      this.opts.log.limited.warn("refused a connection: limit reached", { limit: this.opts.maxConnections, ...peer });
      sys.close(fd);
      return;
    }
    this.epoll.add(fd, READ_EVENTS);
    const conn = new Connection(fd, this.nextConnId++, peer);
    this.conns.set(fd, conn);
    this.opts.log.info("client connected", { conn: conn.id, pid: peer.pid, uid: peer.uid, gid: peer.gid });
  }

  /**
   * Reads and answers what the connection has ready: packets come in batches (one
   * recvmmsg), their responses leave in one sendmmsg per batch.
   */
  private readAll(conn: Connection, events: number): void {
    let budget = READ_BUDGET;
    // Reads of one packet until a second one has come in this wake-up: a client waiting on
    // each answer sends one at a time, and recvmmsg for more tries the empty queue once
    // more before it returns (about 0.5 µs; 1 µs of a 50 µs register cycle). Two in a row
    // mean a client that pipelines: from then on, whole batches.
    let batch = 1;
    let reads = 0;
    while (budget > 0 && conn.outbox.length === 0 && !conn.closing) {
      const want = Math.min(batch, budget);
      const n = this.rx.recv(conn.fd, want);
      if (n === -1) {
        if (events & (sys.EPOLLHUP | sys.EPOLLERR)) this.disconnect(conn);
        return;
      }
      if (++reads === 2) batch = RECV_BATCH;
      budget -= n;
      let i = 0;
      try {
        for (; i < n; i++) {
          const len = this.rx.length(i);
          const fds = this.rx.fds(i);
          const flags = this.rx.flags(i);
          // End of stream reads as an empty record; so does an empty packet. Only a
          // hang-up tells them apart. (SEQPACKET records carry MSG_EOR: ignore it here.)
          const empty = len === 0 && fds.length === 0 && (flags & (sys.MSG_TRUNC | sys.MSG_CTRUNC)) === 0;
          if (empty && sys.pollOne(conn.fd, sys.POLLRDHUP, 0) & (sys.POLLRDHUP | sys.POLLHUP)) {
            this.flushBatch(conn);
            // Responses still owed go out first: a half-closed peer may still be reading.
            if (conn.outbox.length === 0) return this.disconnect(conn);
            conn.closing = true;
            return;
          }
          this.handlePacket(conn, this.rx.bodyStart(i), this.rx.bodyEnd(i), len, flags, fds);
        }
        this.flushBatch(conn);
      } finally {
        // Descriptors of packets this batch did not get to (a failure or a hang-up midway).
        for (let j = i + 1; j < n; j++) for (const fd of this.rx.fds(j)) closeQuietly(fd);
      }
      // Loop until EAGAIN even after a short batch: a client woken by our responses often
      // has its next request queued by the time sendmmsg returns (one CPU, or pipelining).
      // Measured against returning to epoll after a short batch: round trip 1.04× against
      // 1.10×, Register+Unregister the same.
    }
  }

  /**
   * One packet, bytes [start, end) of the receive buffer. Its descriptors belong to this
   * call until a request is decoded; from then on the request owns them and exactly one
   * path releases them: right after it executes, or, for an MmapAndRegisterMemory that
   * waits for chunks, when it completes or the connection goes.
   */
  private handlePacket(conn: Connection, start: number, end: number, len: number, flags: number, fds: number[]): void {
    conn.requests++;
    const bodies = this.rx.bodies;
    if (conn.pending !== null) return this.handleChunk(conn, bodies.subarray(start, end), len, flags, fds);
    let req: VmMemoryRequest;
    try {
      this.checkPacket(len, flags, fds);
      req = decodeRequest(bodies, fds, start, end);
    } catch (e) {
      for (const fd of fds) closeQuietly(fd); // no request was formed
      return this.respond(conn, errResponse(e));
    }
    if (typeof req === "object" && "MmapAndRegisterMemory" in req) return this.startMmap(conn, req);
    try {
      const refused = typeof req === "object" && "RegisterMemory" in req ? this.regionLimit(conn, "register memory") : null;
      this.respond(conn, refused !== null ? errResponse(refused) : this.execute(conn, req));
    } catch (e) {
      if (peerGone(e)) throw e;
      this.respond(conn, errResponse(e));
    } finally {
      // The request's descriptors are exactly the packet's: decodeRequest checked that each
      // one is referenced once.
      for (const fd of fds) closeQuietly(fd);
    }
  }

  private regionLimit(conn: Connection, what: string): VmMemoryError | null {
    if (conn.regions.size < this.opts.maxRegionsPerConnection) return null;
    return failure("ENOSPC", `this connection has ${conn.regions.size} live regions, the limit (--max-regions-per-connection)`).context(
      `failed to ${what}`,
    );
  }

  /**
   * MmapAndRegisterMemory: with chunks to come, it waits for them. A request refused at once
   * (too many mappings for the shm or the limit, or the region limit) allocates nothing, but
   * still reads its chunks, closing their descriptors, and answers once after the last:
   * the client sends them whatever we decide, and must not be knocked out of step.
   */
  private startMmap(conn: Connection, req: Extract<VmMemoryRequest, { MmapAndRegisterMemory: unknown }>): void {
    const m = req.MmapAndRegisterMemory;
    const count = m.num_file_mappings;
    let refused = this.regionLimit(conn, "mmap and register memory");
    if (refused === null && (count > this.opts.maxFileMappings || BigInt(count) > BigInt(m.shm.size) / 4096n)) {
      refused = failure("EINVAL", `num_file_mappings ${count} is more than the shm's pages or the limit ${this.opts.maxFileMappings}`).context(
        "failed to mmap and register memory",
      );
    }
    if (count === 0) {
      try {
        this.respond(conn, refused !== null ? errResponse(refused) : this.execute(conn, req));
      } finally {
        this.release(req);
      }
      return;
    }
    m.file_mappings = [];
    conn.pending = { req, remaining: Number(count), mappings: m.file_mappings, failure: refused };
  }

  /** Limits every packet must meet before it is decoded (a request or a follow-up chunk). */
  private checkPacket(len: number, flags: number, fds: readonly number[]): void {
    if (flags & sys.MSG_TRUNC || len > this.opts.maxPacket) {
      throw failure("EINVAL", `packet larger than ${this.opts.maxPacket} bytes`).context("malformed packet");
    }
    if (fds.length > this.opts.maxFdsPerPacket) {
      throw failure("EINVAL", `${fds.length} descriptors in one packet; the limit is ${this.opts.maxFdsPerPacket}`).context("malformed packet");
    }
    if (flags & sys.MSG_CTRUNC) {
      throw failure("EINVAL", `more than ${sys.SCM_MAX_FD} descriptors in one packet`).context("malformed packet");
    }
  }

  /**
   * A follow-up packet of the pending MmapAndRegisterMemory. A malformed one fails the
   * request and counts as the min(remaining, 253) mappings a sender chunking as crosvm
   * does would have put in it, so the one answer still comes after the last chunk.
   */
  private handleChunk(conn: Connection, body: Uint8Array, len: number, flags: number, fds: number[]): void {
    const p = conn.pending!;
    let taken: number;
    try {
      this.checkPacket(len, flags, fds);
      const chunk = decodeFileMappings(body, fds);
      if (chunk.length > p.remaining) {
        throw failure("EINVAL", `chunk of ${chunk.length} file mappings exceeds the ${p.remaining} still expected`).context(
          "malformed file mapping chunk",
        );
      }
      taken = chunk.length;
      if (p.failure === null) p.mappings.push(...chunk);
      else for (const fd of fds) closeQuietly(fd); // the request has failed: nothing to keep
    } catch (e) {
      for (const fd of fds) closeQuietly(fd); // never joined the request
      p.failure ??= VmMemoryError.from(e).context("failed to mmap and register memory");
      taken = Math.min(p.remaining, sys.SCM_MAX_FD);
    }
    p.remaining -= taken;
    if (p.remaining > 0) return;
    conn.pending = null;
    try {
      this.respond(conn, p.failure !== null ? errResponse(p.failure) : this.execute(conn, p.req));
    } catch (e) {
      if (peerGone(e)) throw e;
      this.respond(conn, errResponse(e));
    } finally {
      this.release(p.req);
    }
  }

  /** Runs a request; its descriptors stay with the caller (mappings and KVM keep their own references). */
  private execute(conn: Connection, req: VmMemoryRequest): VmMemoryResponse {
    // --release-on-disconnect keeps its own copy of an ioevent's eventfd, taken before KVM
    // has it: if the copy cannot be made, nothing gets registered that could not be removed.
    const keep =
      this.opts.releaseOnDisconnect && typeof req === "object" && "IoEventRaw" in req && req.IoEventRaw.register
        ? sys.dupCloexec(req.IoEventRaw.event)
        : -1;
    let resp: VmMemoryResponse;
    try {
      resp = execute(req, this.ctx);
    } catch (e) {
      if (keep !== -1) closeQuietly(keep);
      throw e;
    }
    if (typeof req === "object") this.account(conn, req, resp, keep);
    else if (keep !== -1) closeQuietly(keep);
    if (this.opts.log.enabled("debug")) {
      this.opts.log.debug("request", { conn: conn.id, resp: typeof resp === "string" ? resp : Object.keys(resp)[0] });
    }
    return resp;
  }

  /** Records what a successful request made a connection own. */
  private account(conn: Connection, req: Exclude<VmMemoryRequest, string>, resp: VmMemoryResponse, keep: number): void {
    if (typeof resp === "object" && "RegisterMemory" in resp) {
      const id = regionIdOf(resp.RegisterMemory.region_id);
      conn.regions.set(id, true);
      this.regionOwner.set(id, conn);
    } else if (resp === "Ok" && "UnregisterMemory" in req) {
      const id = regionIdOf(req.UnregisterMemory);
      this.regionOwner.get(id)?.regions.delete(id);
      this.regionOwner.delete(id);
    } else if (resp === "Ok" && "IoEventRaw" in req && this.opts.releaseOnDisconnect) {
      const r = req.IoEventRaw;
      if (r.register) {
        conn.ioevents.push({ event: keep, addr: r.addr, datamatch: r.datamatch });
        return;
      } else {
        const key = ioeventKey(r.addr, r.datamatch);
        const i = conn.ioevents.findIndex((e) => ioeventKey(e.addr, e.datamatch) === key);
        if (i !== -1) closeQuietly(conn.ioevents.splice(i, 1)[0]!.event);
      }
    }
    if (keep !== -1) closeQuietly(keep);
  }

  /** --release-on-disconnect: removes what the connection registered and still owns. */
  private releaseOwned(conn: Connection): void {
    for (const id of conn.regions.keyList()) {
      this.regionOwner.delete(id);
      const resp = execute({ UnregisterMemory: id }, this.ctx);
      if (resp !== "Ok") this.opts.log.warn("could not release a region on disconnect", { conn: conn.id, region: id, resp: JSON.stringify(resp) });
    }
    for (const e of conn.ioevents) {
      execute({ IoEventRaw: { event: e.event, addr: e.addr, datamatch: e.datamatch, register: false } }, this.ctx);
      closeQuietly(e.event);
    }
    if (conn.regions.size + conn.ioevents.length > 0) {
      this.opts.log.info("released on disconnect", { conn: conn.id, regions: conn.regions.size, ioevents: conn.ioevents.length });
    }
    conn.regions.clear();
    conn.ioevents.length = 0;
  }

  private release(req: VmMemoryRequest): void {
    for (const fd of requestDescriptors(req)) closeQuietly(fd);
  }

  /** Queues a response in the send batch; flushBatch sends it. */
  private respond(conn: Connection, resp: VmMemoryResponse): void {
    let bytes = encodeResponse(resp);
    if (bytes.byteLength > MAX_PACKET) {
      const what = typeof resp === "object" ? Object.keys(resp)[0] : resp;
      bytes = encodeResponse(errResponse(failure("EMSGSIZE", `the ${what} response is ${bytes.byteLength} bytes, more than a packet holds (${MAX_PACKET})`)));
    }
    if (conn.outbox.length > 0) {
      conn.outbox.push(bytes.slice());
      return;
    }
    if (this.txConn !== conn && this.tx.count > 0) this.flushBatch(this.txConn!);
    this.txConn = conn;
    if (!this.tx.add(bytes)) {
      this.flushBatch(conn);
      if (conn.outbox.length > 0 || !this.tx.add(bytes)) conn.outbox.push(bytes.slice());
      this.txConn = conn;
    }
  }

  /** Sends the batch; what the socket cannot take waits in the outbox, and reading stops (throttle). */
  private flushBatch(conn: Connection): void {
    if (this.tx.count === 0) return;
    const count = this.tx.count;
    let sent = 0;
    try {
      sent = this.tx.send(conn.fd);
      if (sent < count) {
        if (conn.outbox.length === 0) this.epoll.modify(conn.fd, WRITE_EVENTS);
        for (let i = sent; i < count; i++) conn.outbox.push(this.tx.packet(i).slice());
      }
    } finally {
      this.tx.clear();
      this.txConn = null;
    }
  }

  private flush(conn: Connection): void {
    let sent = 0;
    while (sent < conn.outbox.length && this.io.send(conn.fd, conn.outbox[sent]!)) sent++;
    conn.outbox.splice(0, sent);
    if (conn.outbox.length > 0) return;
    if (conn.closing) return this.disconnect(conn);
    this.epoll.modify(conn.fd, READ_EVENTS);
    this.readAll(conn, 0);
  }

  private disconnect(conn: Connection): void {
    if (!this.conns.delete(conn.fd)) return;
    try {
      this.epoll.remove(conn.fd);
    } catch {}
    if (conn.pending !== null) {
      this.release(conn.pending.req);
      conn.pending = null;
    }
    if (this.opts.releaseOnDisconnect) this.releaseOwned(conn);
    else for (const id of conn.regions.keyList()) this.regionOwner.delete(id);
    closeQuietly(conn.fd);
    this.opts.log.info("client disconnected", { conn: conn.id, requests: conn.requests });
  }

  private shutdown(): void {
    this.opts.log.info("shutting down", { reason: this.stopReason, clients: this.conns.size });
    for (const conn of [...this.conns.values()]) this.disconnect(conn);
    // Removes the path only if it is still our socket's file, then closes the listener.
    this.socketFile?.remove();
    this.socketFile = null;
    this.listener = -1;
    this.epoll.close();
    if (this.reserveFd !== -1) closeQuietly(this.reserveFd);
    this.opts.log.limited.flush();
  }
}

function openReserve(): number {
  try {
    return sys.open("/dev/null", sys.O_RDONLY);
  } catch {
    return -1;
  }
}

function ioeventKey(addr: U64, dm: Datamatch): string {
  return `${addr}/${typeof dm === "string" ? dm : JSON.stringify(dm, (_k, v) => (typeof v === "bigint" ? String(v) : v))}`;
}

function errResponse(e: unknown): VmMemoryResponse {
  const err = VmMemoryError.from(e);
  return { Err: { errno: err.errno, chain: err.chain } };
}

/** The peer is gone: the connection ends, instead of an Err nobody would read. */
function peerGone(e: unknown): boolean {
  return e instanceof sys.SysError && (e.errno === sys.Errno.EPIPE || e.errno === sys.Errno.ECONNRESET);
}

function closeQuietly(fd: number): void {
  try {
    sys.close(fd);
  } catch {}
}
