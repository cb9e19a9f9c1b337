// VmemClient: a typed client for vmemd's socket (PROTOCOL.md). Requests carry real
// descriptors in their descriptor fields; the client sends them as SCM_RIGHTS and
// writes their indices on the wire. Used by `vmemd ctl`, the tests and the benches.
import * as sys from "../sys";
import {
  descriptorSlots,
  type Alloc,
  type Datamatch,
  type U64,
  type VmMemoryDestination,
  type VmMemoryFileMapping,
  type VmMemoryRequest,
  type VmMemoryResponse,
  type VmMemorySource,
  type VmState,
} from "../memory/request";
import { decodeResponse, encodeValue, MAX_PACKET } from "../protocol";

/** An Err response, as an exception: errno, its name, and the chain (root cause first). */
export class VmemError extends Error {
  readonly errno: number | null;
  readonly code: string | null;
  readonly chain: string[];
  constructor(errno: number | null, chain: string[]) {
    const code = errno === null ? null : sys.errnoName(errno);
    super(`${chain.slice().reverse().join(": ")}${code ? ` (${code})` : ""}`);
    this.name = "VmemError";
    this.errno = errno;
    this.code = code;
    this.chain = chain;
  }
}

/** A request ready for the wire: its body and the descriptors to attach, in index order. */
export interface Packet {
  body: Uint8Array;
  fds: number[];
}

/** Encodes a request whose descriptor fields hold real descriptors. The request is not modified. */
export function encodeRequest(req: VmMemoryRequest | VmMemoryFileMapping[]): Packet {
  const copy = structuredClone(req);
  const slots = Array.isArray(copy)
    ? copy.map((m) => ({ holder: m as unknown as Record<string, unknown>, key: "file" }))
    : descriptorSlots(copy);
  const fds: number[] = [];
  for (const s of slots) {
    fds.push(s.holder[s.key] as number);
    s.holder[s.key] = fds.length - 1;
  }
  return { body: encodeValue(copy).slice(), fds };
}

export function unwrap(resp: VmMemoryResponse): VmMemoryResponse {
  if (typeof resp === "object" && "Err" in resp) throw new VmemError(resp.Err.errno, resp.Err.chain);
  return resp;
}

export class VmemClient {
  private readonly io = new sys.PacketIo(MAX_PACKET);
  private closed = false;
  /** Requests sent whose responses have not been read yet. */
  inFlight = 0;

  /** The SO_RCVTIMEO in force, in ms (0: none, the kernel's default: wait for ever). */
  private recvTimeoutMs = 0;

  private constructor(readonly fd: number) {}

  /**
   * Connects without blocking (a full listen backlog is an error, not a wait), then makes
   * the socket blocking so that `recv` sleeps in recvmsg itself. Sends and `tryRecv` pass
   * MSG_DONTWAIT and never block.
   */
  static connect(path: string): VmemClient {
    const fd = sys.connectSeqpacket(path, true);
    try {
      sys.setNonblocking(fd, false);
    } catch (e) {
      sys.close(fd);
      throw e;
    }
    return new VmemClient(fd);
  }

  /** Sends one packet, waiting while the socket is full. */
  sendPacket(p: Packet, timeoutMs = 30_000): void {
    while (!this.io.send(this.fd, p.body, p.fds)) this.wait(sys.POLLOUT, timeoutMs);
    this.inFlight++;
  }

  /** Sends without waiting: false when the socket is full. */
  trySendPacket(p: Packet): boolean {
    if (!this.io.send(this.fd, p.body, p.fds)) return false;
    this.inFlight++;
    return true;
  }

  send(req: VmMemoryRequest): void {
    this.sendPacket(encodeRequest(req));
  }

  /**
   * Reads one response, waiting for it in recvmsg (SO_RCVTIMEO bounds the wait). A timeout
   * of 0 only looks; a negative or infinite one waits for ever.
   */
  recv(timeoutMs = 30_000): VmMemoryResponse {
    if (Number.isNaN(timeoutMs)) throw new RangeError("recv: the timeout is NaN");
    if (timeoutMs === 0) {
      const r = this.tryRecv();
      if (r === undefined) throw new sys.SysError("recvmsg: no response ready", sys.Errno.ETIMEDOUT);
      return r;
    }
    const forever = timeoutMs < 0 || timeoutMs === Infinity;
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      // What is left of the timeout (a signal may have cut a wait short); 0 is for ever.
      const left = forever ? 0 : Math.max(1, Math.ceil(deadline - performance.now()));
      if (left !== this.recvTimeoutMs) {
        sys.setRecvTimeout(this.fd, left);
        this.recvTimeoutMs = left;
      }
      const r = this.receive(true);
      if (r !== undefined) return r;
      if (!forever && performance.now() >= deadline) {
        throw new sys.SysError(`recvmsg: no response within ${timeoutMs} ms`, sys.Errno.ETIMEDOUT);
      }
    }
  }

  /** One response if one is ready. */
  tryRecv(): VmMemoryResponse | undefined {
    return this.receive(false);
  }

  private receive(wait: boolean): VmMemoryResponse | undefined {
    const n = this.io.recv(this.fd, wait);
    if (n === -1) return undefined;
    for (const fd of this.io.fds) sys.close(fd); // the server never sends descriptors
    if (n === 0) throw new sys.SysError("recvmsg: the server closed the connection", sys.Errno.ECONNRESET);
    this.inFlight--;
    return decodeResponse(this.io.body.subarray(0, n));
  }

  private wait(events: number, timeoutMs: number): void {
    const rev = sys.pollOne(this.fd, events, timeoutMs);
    if (rev === 0) throw new sys.SysError(`poll: no ${events === sys.POLLIN ? "response" : "room to send"} within ${timeoutMs} ms`, sys.Errno.ETIMEDOUT);
    if (rev & sys.POLLERR) throw new sys.SysError("poll: socket error", sys.Errno.ECONNRESET);
  }

  /** Sends a request and waits for its response (Err is a response here, not an exception). */
  request(req: VmMemoryRequest): VmMemoryResponse {
    this.send(req);
    return this.recv();
  }

  /**
   * Sends every packet with at most `window` unanswered, reading responses as they come
   * (a SEQPACKET receiver queues only a few packets, so sending blindly would deadlock).
   */
  pipeline(packets: Packet[], window = 64): VmMemoryResponse[] {
    const out: VmMemoryResponse[] = [];
    let next = 0;
    const base = this.inFlight;
    while (out.length < packets.length) {
      while (next < packets.length && this.inFlight - base < window && this.trySendPacket(packets[next]!)) next++;
      let r = this.tryRecv();
      if (r === undefined) {
        const want = next < packets.length && this.inFlight - base < window ? sys.POLLIN | sys.POLLOUT : sys.POLLIN;
        const rev = sys.pollOne(this.fd, want, 30_000);
        if (rev === 0) throw new sys.SysError("pipeline: no progress within 30 s", sys.Errno.ETIMEDOUT);
        continue;
      }
      for (; r !== undefined; r = this.tryRecv()) out.push(r);
    }
    return out;
  }

  // ---- typed helpers: Err becomes a VmemError ----------------------------

  registerMemory(
    source: VmMemorySource,
    dest: VmMemoryDestination,
    prot = { read: true, write: true },
    cache: "CacheCoherent" | "CacheNonCoherent" = "CacheCoherent",
  ): { region_id: U64; slot: number } {
    const r = unwrap(this.request({ RegisterMemory: { source, dest, prot, cache } }));
    return (r as { RegisterMemory: { region_id: U64; slot: number } }).RegisterMemory;
  }

  unregisterMemory(regionId: U64): void {
    unwrap(this.request({ UnregisterMemory: regionId }));
  }

  prepareSharedMemoryRegion(alloc: Alloc, cache: "CacheCoherent" | "CacheNonCoherent" = "CacheCoherent"): void {
    unwrap(this.request({ PrepareSharedMemoryRegion: { alloc, cache } }));
  }

  /** MmapAndRegisterMemory: the request, then the mappings in chunks of at most 253, then one response. */
  mmapAndRegisterMemory(
    shm: { descriptor: number; size: U64 },
    dest: VmMemoryDestination,
    files: VmMemoryFileMapping[],
  ): { region_id: U64; slot: number } {
    this.sendPacket(encodeRequest({ MmapAndRegisterMemory: { shm, dest, num_file_mappings: files.length } }));
    this.inFlight--; // one response for the request and all its chunks
    for (let i = 0; i < files.length; i += sys.SCM_MAX_FD) {
      this.sendPacket(encodeRequest(files.slice(i, i + sys.SCM_MAX_FD)));
      this.inFlight--;
    }
    this.inFlight++;
    const r = unwrap(this.recv());
    return (r as { RegisterMemory: { region_id: U64; slot: number } }).RegisterMemory;
  }

  ioEvent(event: number, addr: U64, datamatch: Datamatch, register: boolean): void {
    unwrap(this.request({ IoEventRaw: { event, addr, datamatch, register } }));
  }

  freeMemoryRanges(ranges: [U64, U64][]): void {
    unwrap(this.request({ DynamicallyFreeMemoryRanges: { ranges } }));
  }

  reclaimMemoryRanges(ranges: [U64, U64][]): void {
    unwrap(this.request({ DynamicallyReclaimMemoryRanges: { ranges } }));
  }

  balloonTargetReached(size: U64): void {
    unwrap(this.request({ BalloonTargetReached: { size } }));
  }

  getState(): VmState {
    return (unwrap(this.request("GetState")) as { State: VmState }).State;
  }

  allocateMmio(alloc: Alloc, size: U64, align: U64 | null = null): { start: U64; size: U64 } {
    return (unwrap(this.request({ AllocateMmio: { alloc, size, align } })) as { Allocated: { start: U64; size: U64 } }).Allocated;
  }

  releaseMmio(alloc: Alloc): void {
    unwrap(this.request({ ReleaseMmio: alloc }));
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    sys.close(this.fd);
  }
}
