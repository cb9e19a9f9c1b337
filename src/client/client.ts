// VmemClient: a typed client for vmemd's socket (docs/protocol.md). Requests carry real
// descriptors in their descriptor fields; the client sends them as SCM_RIGHTS and
// writes their indices on the wire. Used by `vmemd ctl`, the tests and the benches.
import * as sys from "../sys";
import {
  decodeResponse,
  encodeFileMappings,
  encodeRequest as encodeRequestOnly,
  isRefusal,
  MAX_FDS_PER_PACKET,
  MAX_PACKET,
  MSGPACK,
  type Alloc,
  type AllocationSummary,
  type Encoding,
  type Packet,
  type RegionSummary,
  type Datamatch,
  type U64,
  type VmMemoryDestination,
  type VmMemoryFileMapping,
  type VmMemoryRequest,
  type VmMemoryResponse,
  type VmMemorySource,
  type VmState,
} from "../protocol";

export { JSON_ENCODING, MSGPACK, type Encoding, type Packet } from "../protocol";

export interface GuestMemoryRange {
  guest_address: U64;
  size: U64;
  descriptor: number;
  offset: U64;
}

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

/** Encodes a request (or a file-mapping chunk) whose descriptor fields hold real descriptors. */
export function encodeRequest(req: VmMemoryRequest | VmMemoryFileMapping[], enc: Encoding = MSGPACK): Packet {
  return Array.isArray(req) ? encodeFileMappings(req, enc) : encodeRequestOnly(req, enc);
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
  /** How long a send or receive waits when the call names no timeout, in ms (vmemd ctl --timeout). */
  timeoutMs = 30_000;

  /** The SO_RCVTIMEO in force, in ms (0: none, the kernel's default: wait for ever). */
  private recvTimeoutMs = 0;

  private constructor(
    readonly fd: number,
    /** The encoding this client writes (the server answers in kind). */
    readonly encoding: Encoding,
  ) {}

  /**
   * Connects without blocking (a full listen backlog is an error, not a wait), then makes
   * the socket blocking so that `recv` sleeps in recvmsg itself. Sends and `tryRecv` pass
   * MSG_DONTWAIT and never block.
   */
  static connect(path: string, encoding: Encoding = MSGPACK): VmemClient {
    const fd = sys.connectSeqpacket(path, true);
    try {
      sys.setNonblocking(fd, false);
    } catch (e) {
      sys.close(fd);
      throw e;
    }
    return new VmemClient(fd, encoding);
  }

  /** Sends one packet, waiting while the socket is full. */
  sendPacket(p: Packet, timeoutMs = this.timeoutMs): void {
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
    this.sendPacket(encodeRequest(req, this.encoding));
  }

  /** A request as a packet in this client's encoding (for pipeline()). */
  packet(req: VmMemoryRequest | VmMemoryFileMapping[]): Packet {
    return encodeRequest(req, this.encoding);
  }

  /**
   * Reads one response, waiting for it in recvmsg (SO_RCVTIMEO bounds the wait). A timeout
   * of 0 only looks; a negative or infinite one waits for ever.
   */
  recv(timeoutMs = this.timeoutMs): VmMemoryResponse {
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
    const fds = this.io.fds.slice();
    if (n === 0) {
      for (const fd of fds) sys.close(fd);
      throw new sys.SysError("recvmsg: the server closed the connection", sys.Errno.ECONNRESET);
    }
    this.inFlight--;
    const resp = decodeResponse(this.io.body.subarray(0, n), fds);
    if (isRefusal(resp)) {
      for (const fd of fds) sys.close(fd);
      throw new VmemError(resp.errno, resp.chain);
    }
    // Only GuestMemory carries descriptors, and they are the caller's now; any others close.
    if (!(typeof resp === "object" && "GuestMemory" in resp)) for (const fd of fds) sys.close(fd);
    return resp;
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
    this.sendPacket(this.packet({ MmapAndRegisterMemory: { shm, dest, num_file_mappings: files.length } }));
    this.inFlight--; // one response for the request and all its chunks
    for (let i = 0; i < files.length; i += MAX_FDS_PER_PACKET) {
      this.sendPacket(this.packet(files.slice(i, i + MAX_FDS_PER_PACKET)));
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

  /** One page of regions from `from` on (GetRegions). */
  getRegions(from: U64 = 0, max: number | null = null): { regions: RegionSummary[]; next: U64 | null } {
    return (unwrap(this.request({ GetRegions: { from, max } })) as { Regions: { regions: RegionSummary[]; next: U64 | null } }).Regions;
  }

  /** Every region, page by page. */
  *allRegions(): IterableIterator<RegionSummary> {
    for (let from: U64 | null = 0; from !== null; ) {
      const page = this.getRegions(from);
      yield* page.regions;
      from = page.next;
    }
  }

  getAllocations(from: U64 = 0, max: number | null = null): { allocations: AllocationSummary[]; next: U64 | null } {
    const r = unwrap(this.request({ GetAllocations: { from, max } })) as { Allocations: { allocations: AllocationSummary[]; next: U64 | null } };
    return r.Allocations;
  }

  *allAllocations(): IterableIterator<AllocationSummary> {
    for (let from: U64 | null = 0; from !== null; ) {
      const page = this.getAllocations(from);
      yield* page.allocations;
      from = page.next;
    }
  }

  allocateMmio(alloc: Alloc, size: U64, align: U64 | null = null): { start: U64; size: U64 } {
    return (unwrap(this.request({ AllocateMmio: { alloc, size, align } })) as { Allocated: { start: U64; size: U64 } }).Allocated;
  }

  releaseMmio(alloc: Alloc): void {
    unwrap(this.request({ ReleaseMmio: alloc }));
  }

  /**
   * Guest RAM for this device: each range's `descriptor` is an open descriptor the caller
   * now owns (map it MAP_SHARED at `offset` to see `size` bytes from `guest_address`).
   */
  getGuestMemory(): GuestMemoryRange[] {
    return (unwrap(this.request("GetGuestMemory")) as { GuestMemory: { ranges: GuestMemoryRange[] } }).GuestMemory.ranges;
  }

  /** IrqFd: a signal on `event` raises `gsi` (an IOAPIC pin); with `resample`, level-triggered. */
  irqFd(event: number, gsi: number, resample: number | null, register: boolean): void {
    unwrap(this.request({ IrqFd: { event, gsi, resample, register } }));
  }

  /** IoEventPio: a guest `out` to `port` (matching `datamatch`) signals `event` in the kernel. */
  ioEventPio(event: number, port: number, datamatch: Datamatch, register: boolean): void {
    unwrap(this.request({ IoEventPio: { event, port, datamatch, register } }));
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    sys.close(this.fd);
  }
}
