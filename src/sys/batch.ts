// recvmmsg/sendmmsg: the server reads every ready packet of a connection and sends
// every response of a wake-up in one system call each (issue 5: batch what can be batched).
import { ptr, type Pointer } from "bun:ffi";
import { libc } from "./libc";
import { lastErrno, SysError } from "./error";
import { CONTROL_SIZE, EAGAIN, EINTR, MSG_CMSG_CLOEXEC, MSG_DONTWAIT, MSG_NOSIGNAL, parseRights } from "./socket";

// struct mmsghdr { struct msghdr msg_hdr (56 B); unsigned int msg_len; } padded to 64 B.
const MMSG = 64;

/** Receives up to `capacity` packets per call into preallocated buffers. */
export class BatchReceiver {
  private readonly bodies: Uint8Array;
  private readonly control: Uint8Array;
  private readonly controlView: DataView;
  private readonly hdrs: DataView;
  private readonly hdrsPtr: Pointer;
  private readonly iovs: BigUint64Array;
  private readonly slot: number;
  private readonly controlLen = BigInt(CONTROL_SIZE);

  constructor(
    readonly capacity: number,
    maxBody: number,
  ) {
    // One spare byte per packet so an oversized one shows as MSG_TRUNC rather than fitting.
    this.slot = maxBody + 1;
    this.bodies = new Uint8Array(this.slot * capacity);
    this.control = new Uint8Array(CONTROL_SIZE * capacity);
    this.controlView = new DataView(this.control.buffer);
    this.iovs = new BigUint64Array(2 * capacity);
    const hdrs = new Uint8Array(MMSG * capacity);
    this.hdrs = new DataView(hdrs.buffer);
    const bodies = BigInt(ptr(this.bodies));
    const control = BigInt(ptr(this.control));
    const iovs = BigInt(ptr(this.iovs));
    for (let i = 0; i < capacity; i++) {
      this.iovs[2 * i] = bodies + BigInt(i * this.slot);
      this.iovs[2 * i + 1] = BigInt(this.slot);
      this.hdrs.setBigUint64(i * MMSG + 16, iovs + BigInt(16 * i), true);
      this.hdrs.setBigUint64(i * MMSG + 24, 1n, true);
      this.hdrs.setBigUint64(i * MMSG + 32, control + BigInt(i * CONTROL_SIZE), true);
    }
    this.hdrsPtr = ptr(hdrs);
  }

  /** Packets received (0 .. max), or -1 when none is pending. Each one's descriptors belong to the caller. */
  recv(fd: number, max = this.capacity): number {
    const n = Math.min(max, this.capacity);
    for (let i = 0; i < n; i++) {
      this.hdrs.setBigUint64(i * MMSG + 40, this.controlLen, true);
      this.hdrs.setInt32(i * MMSG + 48, 0, true);
    }
    const got = libc.recvmmsg(fd, this.hdrsPtr, n, MSG_CMSG_CLOEXEC | MSG_DONTWAIT, null);
    if (got === -1) {
      const errno = lastErrno();
      if (errno === EAGAIN || errno === EINTR) return -1;
      throw new SysError("recvmmsg", errno);
    }
    return got;
  }

  length(i: number): number {
    return this.hdrs.getUint32(i * MMSG + 56, true);
  }
  flags(i: number): number {
    return this.hdrs.getInt32(i * MMSG + 48, true);
  }
  fds(i: number): number[] {
    return parseRights(this.controlView, i * CONTROL_SIZE, Number(this.hdrs.getBigUint64(i * MMSG + 40, true)));
  }
  body(i: number): Uint8Array {
    const start = i * this.slot;
    return this.bodies.subarray(start, start + Math.min(this.length(i), this.slot));
  }
}

/**
 * Collects packets (copied into one arena, so encoders may reuse their buffers) and sends
 * them with one sendmmsg. No descriptors: the server never sends any.
 */
export class BatchSender {
  private readonly arena: Uint8Array;
  private readonly arenaAddr: bigint;
  private readonly hdrs: DataView;
  private readonly hdrsPtr: Pointer;
  private readonly iovs: BigUint64Array;
  private readonly iovsAddr: bigint;
  private used = 0;
  /** Packets queued and not yet sent. */
  count = 0;
  private readonly starts: number[] = [];
  private readonly lengths: number[] = [];

  constructor(
    readonly capacity: number,
    arenaBytes: number,
  ) {
    this.arena = new Uint8Array(arenaBytes);
    this.arenaAddr = BigInt(ptr(this.arena));
    this.iovs = new BigUint64Array(2 * capacity);
    this.iovsAddr = BigInt(ptr(this.iovs));
    const hdrs = new Uint8Array(MMSG * capacity);
    this.hdrs = new DataView(hdrs.buffer);
    this.hdrsPtr = ptr(hdrs);
  }

  /** Queues a copy of `body`; false when the batch is full (send it first). */
  add(body: Uint8Array): boolean {
    if (this.count === this.capacity || this.used + body.byteLength > this.arena.byteLength) return false;
    this.arena.set(body, this.used);
    this.starts.push(this.used);
    this.lengths.push(body.byteLength);
    this.used += body.byteLength;
    this.count++;
    return true;
  }

  /** The queued packet `i` (a view into the arena, valid until the next clear). */
  packet(i: number): Uint8Array {
    return this.arena.subarray(this.starts[i]!, this.starts[i]! + this.lengths[i]!);
  }

  /** Sends the queued packets in order: how many went (possibly 0 when the socket is full). */
  send(fd: number): number {
    const n = this.count;
    if (n === 0) return 0;
    for (let i = 0; i < n; i++) {
      const h = i * MMSG;
      this.iovs[2 * i] = this.arenaAddr + BigInt(this.starts[i]!);
      this.iovs[2 * i + 1] = BigInt(this.lengths[i]!);
      this.hdrs.setBigUint64(h + 16, this.iovsAddr + BigInt(16 * i), true);
      this.hdrs.setBigUint64(h + 24, 1n, true);
      this.hdrs.setBigUint64(h + 32, 0n, true);
      this.hdrs.setBigUint64(h + 40, 0n, true);
    }
    const sent = libc.sendmmsg(fd, this.hdrsPtr, n, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (sent === -1) {
      const errno = lastErrno();
      if (errno === EAGAIN) return 0;
      throw new SysError("sendmmsg", errno);
    }
    return sent;
  }

  clear(): void {
    this.used = 0;
    this.count = 0;
    this.starts.length = 0;
    this.lengths.length = 0;
  }
}
