// The socket server: an AF_UNIX SOCK_SEQPACKET listener and an epoll loop on the main
// thread. It knows sockets, connections, turns and throttling; what a packet means is
// requests.ts's concern, what a peer holds is ledger.ts's.
import * as sys from "../sys";
import { errResponse, Refusal, type ExecContext } from "../memory";
import { encodeResponseInPlace, encodeResponsePacket, MAX_PACKET, type Encoding, type VmMemoryResponse } from "../protocol";
import { Connection } from "./connection";
import { Ledger, type Budgets } from "./ledger";
import { RECV_BATCH } from "./options";
import type { Logger } from "./log";
import { Requests, type RequestLimits } from "./requests";
import { SocketFile } from "./socket_file";

export { DEFAULT_SERVER_OPTIONS, descriptorsNeeded } from "./options";

export interface ServerOptions extends RequestLimits {
  socketPath: string;
  /** Mode of the socket file (0600 unless told otherwise). */
  socketMode: number;
  maxConnections: number;
  /** Users allowed to connect; empty means any user who can open the socket file. */
  allowUids: number[];
  budgets: Budgets;
  /** Remove a connection's regions and ioevents when it disconnects (crosvm does not). */
  releaseOnDisconnect: boolean;
  log: Logger;
  /** A listener passed in by the service manager (SocketFile.adopt), used instead of binding socketPath. */
  adopted?: SocketFile;
  /** Runs each time the loop lets Bun's event loop turn: every tick (100 ms) at least. */
  onTurn?: () => void;
  /** Runs once as shutdown begins, before the clients are closed. */
  onShutdown?: (reason: string) => void;
}


/**
 * How often the loop lets Bun's event loop turn (signals), idle or busy: the tick is a
 * level-triggered timerfd in the epoll set, and epoll reports ready descriptors round robin,
 * so a loop kept busy by clients still sees it within a wake-up or two.
 */
const TICK_MS = 100;
/**
 * A connection's turn: how long it is read from before the others get theirs. Bounded in
 * time, not packets, so a peer pipelining expensive requests delays another peer's round
 * trip by about this much (plus the one request in hand).
 */
const TURN_MS = 1;
const READ_EVENTS = sys.EPOLLIN | sys.EPOLLRDHUP;
// No EPOLLRDHUP here: a peer that has half-closed while responses wait would otherwise
// wake the (level-triggered) loop over and over.
const WRITE_EVENTS = sys.EPOLLOUT;


/** Extra descriptors in the epoll set (e.g. the vCPU's eventfd), with their handlers. */
export type FdHandler = (events: number) => void;

export class Server {
  private readonly epoll = new sys.Epoll(256);
  /** Single sends, for draining an outbox. */
  private readonly io = new sys.PacketIo(16);
  private readonly rx = new sys.BatchReceiver(RECV_BATCH, MAX_PACKET);
  private readonly tx = new sys.BatchSender(RECV_BATCH * 4, 256 * 1024);
  /** The connection whose responses are in `tx`. */
  private txConn: Connection | null = null;
  private readonly conns = new Map<number, Connection>();
  /** Ready events put off to the end of a wake-up (see serveUntilTurn). */
  private readonly deferred: number[] = [];
  /** Connections with a long request under way, a slice per round. */
  private readonly jobs = new Set<Connection>();
  private readonly handlers = new Map<number, FdHandler>();
  readonly ledger: Ledger;
  private readonly requests: Requests;
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
  ) {
    this.ledger = new Ledger(opts.budgets, opts.releaseOnDisconnect);
    this.requests = new Requests(ctx, this.ledger, opts, opts.log, (conn, resp, enc) => this.respond(conn, resp, enc));
  }

  get connectionCount(): number {
    return this.conns.size;
  }

  /**
   * Binds the socket: a stale socket file is replaced; anything else at the path is an error
   * (socket_file.ts). An adopted listener is used as it is.
   */
  listen(): void {
    this.socketFile = this.opts.adopted ?? SocketFile.bind(this.opts.socketPath, this.opts.socketMode, this.opts.log);
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
        this.opts.onTurn?.();
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
   * load. Our guess at why: the closure each await makes is a cell that code refers to
   * weakly, and it dies at the next GC.
   */
  private serveUntilTurn(tick: sys.IntervalTimer): void {
    while (!this.stopping) {
      // With long requests under way, look for events without sleeping, then run a slice of each.
      const n = this.epoll.wait(this.jobs.size > 0 ? 0 : -1);
      let turn = n <= 0;
      // Connections whose last turn ran out of time go last, so a peer that just sent one
      // request is not queued behind another peer's backlog twice (epoll lists a descriptor
      // that stayed readable before one that became readable while it was being served).
      let deferred = 0;
      for (let i = 0; i < n; i++) {
        const fd = this.epoll.readyFd(i);
        if (fd === tick.fd) {
          tick.ack();
          turn = true;
        } else if (n > 1 && this.conns.get(fd)?.busy === true) this.deferred[deferred++] = i;
        else this.dispatch(fd, this.epoll.readyEvents(i));
      }
      for (let j = 0; j < deferred; j++) {
        const i = this.deferred[j]!;
        this.dispatch(this.epoll.readyFd(i), this.epoll.readyEvents(i));
      }
      if (this.jobs.size > 0) this.stepJobs();
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
      if (!peerGone(e)) this.opts.log.limited.warn("connection failed", { conn: conn.id, error: String(e) });
      this.disconnect(conn);
    }
  }

  private acceptAll(): void {
    for (;;) {
      let fd: number;
      try {
        fd = sys.accept(this.listener);
      } catch (e) {
        this.opts.log.limited.warn("accept failed", { error: String(e) });
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
        this.opts.log.limited.warn("could not take a connection", { error: String(e) });
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
   * Reads and answers what the connection has ready, for one turn (TURN_MS): packets come
   * in batches (one recvmmsg) while they are cheap, their responses leave in one send per
   * batch. epoll is level-triggered, so what is left is read on the next turn.
   */
  private readAll(conn: Connection, events: number): void {
    const turnStart = performance.now();
    // One packet per read until a second one has come in this wake-up: a client waiting on
    // each answer sends one at a time, and a read for more tries the empty queue once
    // more before it returns (about 1 µs of a 50 µs register cycle). Two in a row mean a
    // client that pipelines: from then on, batches, while a batch fits in a turn.
    let batch = 1;
    let reads = 0;
    while (conn.outbox.length === 0 && !conn.closing && conn.job === null) {
      const roundStart = reads === 0 ? turnStart : performance.now();
      const n = this.rx.recv(conn.fd, batch);
      if (n === -1) {
        conn.busy = false;
        if (events & (sys.EPOLLHUP | sys.EPOLLERR)) this.disconnect(conn);
        return;
      }
      reads++;
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
          // Only the batch's last packet may become a long request run in slices: one read
          // after it would have to wait for it, and its answer with it.
          this.requests.packet(conn, this.rx.bodies, this.rx.bodyStart(i), this.rx.bodyEnd(i), len, flags, fds, i === n - 1);
          if (conn.job !== null) this.jobs.add(conn);
        }
        this.flushBatch(conn);
      } finally {
        // Descriptors of packets this batch did not get to (a failure or a hang-up midway).
        for (let j = i + 1; j < n; j++) for (const fd of this.rx.fds(j)) closeQuietly(fd);
      }
      const now = performance.now();
      conn.busy = now - turnStart >= TURN_MS;
      if (conn.busy) return;
      // Batches only while a whole one would fit in what is left of the turn.
      batch = reads >= 2 && ((now - roundStart) / n) * RECV_BATCH < TURN_MS ? RECV_BATCH : 1;
      // Loop until EAGAIN even after a short batch: a client woken by our responses often
      // has its next request queued by the time the send returns (one CPU, or pipelining).
    }
  }

  /** A slice of every long request under way; a finished one is answered, and its connection read again. */
  private stepJobs(): void {
    for (const conn of this.jobs) {
      if (conn.job === null) {
        this.jobs.delete(conn);
        continue;
      }
      try {
        if (this.requests.stepJob(conn)) continue;
        this.jobs.delete(conn);
        this.flushBatch(conn);
        if (this.conns.has(conn.fd)) this.readAll(conn, 0); // what it sent meanwhile
      } catch (e) {
        this.jobs.delete(conn);
        if (!peerGone(e)) this.opts.log.limited.warn("connection failed", { conn: conn.id, error: String(e) });
        this.disconnect(conn);
      }
    }
  }

  /** Queues a response in the send batch; flushBatch sends it. */
  private respond(conn: Connection, resp: VmMemoryResponse, enc: Encoding): void {
    if (typeof resp === "object" && "GuestMemory" in resp) return this.respondWithDescriptors(conn, resp, enc);
    let out = encodeResponseInPlace(resp, enc);
    if (out.pos > MAX_PACKET) {
      const what = typeof resp === "object" ? Object.keys(resp)[0] : resp;
      out = encodeResponseInPlace(errResponse(Refusal.of("EMSGSIZE", `the ${what} response is ${out.pos} bytes, more than a packet holds (${MAX_PACKET})`)), enc);
    }
    if (conn.outbox.length > 0) {
      conn.outbox.push(out.buf.slice(0, out.pos));
      return;
    }
    if (this.txConn !== conn && this.tx.count > 0) this.flushBatch(this.txConn!);
    this.txConn = conn;
    if (!this.tx.add(out.buf, out.pos)) {
      this.flushBatch(conn);
      if (conn.outbox.length > 0 || !this.tx.add(out.buf, out.pos)) conn.outbox.push(out.buf.slice(0, out.pos));
      this.txConn = conn;
    }
  }

  /**
   * A response that carries descriptors goes alone, after everything queued before it, with
   * its own SCM_RIGHTS; if the socket cannot take it yet, it waits in the outbox with them.
   */
  private respondWithDescriptors(conn: Connection, resp: VmMemoryResponse, enc: Encoding): void {
    const p = encodeResponsePacket(resp, enc);
    if (this.txConn !== null) this.flushBatch(this.txConn);
    if (conn.outbox.length > 0) {
      conn.outbox.push(p);
      return;
    }
    if (!this.io.send(conn.fd, p.body, p.fds)) {
      conn.outbox.push(p);
      this.epoll.modify(conn.fd, WRITE_EVENTS);
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
    for (; sent < conn.outbox.length; sent++) {
      const p = conn.outbox[sent]!;
      if (!(p instanceof Uint8Array ? this.io.send(conn.fd, p) : this.io.send(conn.fd, p.body, p.fds))) break;
    }
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
    this.requests.abandon(conn);
    conn.pending = null;
    conn.job = null; // what it freed so far stays freed
    this.jobs.delete(conn);
    const released = this.ledger.release(conn.holdings, this.ctx, (msg, fields) => this.opts.log.warn(msg, fields));
    if (this.opts.releaseOnDisconnect && released.regions + released.ioevents > 0) {
      this.opts.log.info("released on disconnect", { conn: conn.id, ...released });
    }
    closeQuietly(conn.fd);
    this.opts.log.info("client disconnected", { conn: conn.id, requests: conn.requests });
  }

  /**
   * Ends a server that listened but never ran (start-up failed after listen()): its socket
   * file is removed and its descriptors closed, as at shutdown.
   */
  discard(): void {
    if (this.stopReason === "") this.stopReason = "start-up failed";
    this.shutdown();
  }

  private shutdown(): void {
    this.opts.log.info("shutting down", { reason: this.stopReason, clients: this.conns.size });
    this.opts.onShutdown?.(this.stopReason);
    for (const conn of [...this.conns.values()]) this.disconnect(conn);
    // Removes the path only if it is still our socket's file (never an adopted one's), then closes the listener.
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

/** The peer is gone: the connection ends, instead of an Err nobody would read. */
function peerGone(e: unknown): boolean {
  return e instanceof sys.SysError && (e.errno === sys.Errno.EPIPE || e.errno === sys.Errno.ECONNRESET);
}

function closeQuietly(fd: number): void {
  try {
    sys.close(fd);
  } catch {}
}
