// From a received packet to its answer: decode in the packet's encoding, check the peer's
// budget, execute, record what the connection now holds. An MmapAndRegisterMemory takes
// its follow-up chunks here too, and is answered exactly once, after the last of them,
// whatever goes wrong, so a client that sends what it said it would stays in step.
import {
  errResponse,
  execute,
  FreeRanges,
  MmapRegistration,
  pageUp,
  Refusal,
  type ExecContext,
} from "../memory";
import { isArena, regionIdOf } from "../memory/region_state";
import {
  decodeFileMappings,
  decodeRequest,
  decodeRequestShape,
  encodingOf,
  MAX_FDS_PER_PACKET,
  type Datamatch,
  type Encoding,
  type Request,
  type VmMemoryRequest,
  type VmMemoryResponse,
} from "../protocol";
import * as sys from "../sys";
import type { Connection } from "./connection";
import { MAPPINGS_PER_FIXED, MAPPINGS_PER_REGION, type BindingKind, type Ledger } from "./ledger";
import type { Logger } from "./log";

export interface RequestLimits {
  /** Peers (by uid) that may have guest RAM (GetGuestMemory); empty: nobody. */
  shareGuestMemoryWith: number[];
  /** Largest request body accepted (at most the protocol's 65536). */
  maxPacket: number;
  /** Descriptors accepted in one packet (at most the kernel's SCM_MAX_FD, 253). */
  maxFdsPerPacket: number;
  /** MmapAndRegisterMemory's num_file_mappings above this is refused at once. */
  maxFileMappings: number;
}

export type Respond = (conn: Connection, resp: VmMemoryResponse, enc: Encoding) => void;

const REFUSED = "refused a request";

/** A packet whose descriptors the kernel cut short (see Requests.tooLarge). */
const FDS_CUT_SHORT = Refusal.kept(sys.Errno.EINVAL, [
  `the packet's descriptors were cut short (more than ${sys.SCM_MAX_FD}, or vmemd's descriptor table is full)`,
  "malformed packet",
]);

/** How long one slice of a long request runs before other peers get their turn. */
const JOB_SLICE_MS = 0.5;

type Mmap = Request<"MmapAndRegisterMemory">;

export class Requests {
  constructor(
    private readonly ctx: ExecContext,
    private readonly ledger: Ledger,
    private readonly limits: RequestLimits,
    private readonly log: Logger,
    private readonly respond: Respond,
  ) {
    this.tooLarge = Refusal.kept(sys.Errno.EINVAL, [`packet larger than ${limits.maxPacket} bytes`, "malformed packet"]);
  }

  /**
   * One packet, bytes [start, end) of `buf`. Its descriptors are this call's to close, on
   * every path: mappings and KVM keep their own references to what they use.
   */
  packet(conn: Connection, buf: Uint8Array, start: number, end: number, len: number, flags: number, fds: number[], mayDefer = false): void {
    conn.requests++;
    try {
      const enc = encodingOf(buf, start, end);
      if (conn.pending !== null) return this.chunk(conn, buf, start, end, len, flags, fds, enc);
      const bad = this.checkPacket(len, flags, fds);
      if (bad !== null) {
        // Refused for its descriptors (cut short, or more than allowed), it may still be an
        // MmapAndRegisterMemory whose chunks follow: learn its shape, so the one answer comes
        // after them. (A body cut short or too large cannot be read at all.)
        const whole = !(flags & sys.MSG_TRUNC) && len <= this.limits.maxPacket;
        const shape = whole ? decodeRequestShape(buf, start, end, enc) : null;
        if (shape !== null && typeof shape === "object" && "MmapAndRegisterMemory" in shape) return this.startMmap(conn, shape, enc, bad);
        return this.answer(conn, errResponse(bad), enc, null);
      }
      const req = decodeRequest(buf, start, end, fds, enc);
      if (req instanceof Refusal) return this.answer(conn, errResponse(req), enc, null);
      if (typeof req === "object" && "MmapAndRegisterMemory" in req) return this.startMmap(conn, req, enc, null);
      if (mayDefer && typeof req === "object" && "DynamicallyFreeMemoryRanges" in req && req.DynamicallyFreeMemoryRanges.ranges.length >= FreeRanges.SLICED_FROM) {
        return this.startFree(conn, req, enc);
      }
      this.answer(conn, this.execute(conn, req), enc, req);
    } finally {
      for (const fd of fds) closeQuietly(fd);
    }
  }

  /**
   * Sends the answer; a refusal is logged at info with the peer, the request's kind and the
   * errno (rate limited: one line per second, with a count of the rest).
   */
  private answer(conn: Connection, resp: VmMemoryResponse, enc: Encoding, req: VmMemoryRequest | string | null): void {
    // The line's fields are built only when it is written (due): building them for every
    // refusal, to be dropped by the rate limit, was an object and a key walk per Err (2 of
    // the 13 heap cells an Err round trip made at info, serve's default level).
    if (typeof resp === "object" && "Err" in resp && this.log.limited.due("info", REFUSED)) {
      let kind = typeof req === "string" ? req : "malformed";
      if (req !== null && typeof req === "object") for (const k in req) kind = k;
      const e = resp.Err;
      this.log.limited.emit("info", REFUSED, { conn: conn.id, pid: conn.peer.pid, uid: conn.peer.uid, request: kind, errno: e.errno === null ? "none" : sys.errnoName(e.errno), cause: e.chain[0] });
    }
    this.respond(conn, resp, enc);
  }

  /** A large DynamicallyFreeMemoryRanges: its first slice now, the rest on later turns (stepJob). */
  private startFree(conn: Connection, req: Request<"DynamicallyFreeMemoryRanges">, enc: Encoding): void {
    const work = FreeRanges.start(this.ctx, req.DynamicallyFreeMemoryRanges.ranges);
    if (work instanceof Refusal) return this.answer(conn, errResponse(work), enc, req);
    conn.job = { work, encoding: enc };
    this.stepJob(conn);
  }

  /** One slice of the connection's job; answers it when it is done. True while work remains. */
  stepJob(conn: Connection): boolean {
    const job = conn.job!;
    if (!job.work.step(performance.now() + JOB_SLICE_MS)) return true;
    conn.job = null;
    this.answer(conn, job.work.result(), job.encoding, "DynamicallyFreeMemoryRanges");
    return false;
  }

  /** Limits every packet must meet before it is decoded (a request or a follow-up chunk). */
  private checkPacket(len: number, flags: number, fds: readonly number[]): Refusal | null {
    if (flags & sys.MSG_TRUNC || len > this.limits.maxPacket) return this.tooLarge;
    if (fds.length > this.limits.maxFdsPerPacket) {
      return Refusal.of("EINVAL", `${fds.length} descriptors in one packet; the limit is ${this.limits.maxFdsPerPacket}`).context("malformed packet");
    }
    if (flags & sys.MSG_CTRUNC) return FDS_CUT_SHORT;
    return null;
  }

  /** A packet too large: a refusal a hostile peer can have at packet rate, made once (Refusal.kept). */
  private readonly tooLarge: Refusal;

  /** Runs a request, after the connection's budget allows it; records what it now holds. */
  private execute(conn: Connection, req: Exclude<VmMemoryRequest, Mmap>): VmMemoryResponse {
    const h = conn.holdings;
    if (req === "GetGuestMemory" && !this.limits.shareGuestMemoryWith.includes(conn.peer.uid)) {
      return errResponse(
        Refusal.of("EPERM", `guest memory is shared only with the users --share-guest-memory-with names, not uid ${conn.peer.uid}`).context("failed to get guest memory"),
      );
    }
    if (typeof req === "string") return execute(req, this.ctx);
    let fixed = false;
    const binding = bindingOf(req);
    let refused: Refusal | null = null;
    if ("RegisterMemory" in req) {
      fixed = this.landsInArena(req.RegisterMemory.dest);
      refused = this.ledger.checkRegion(h, registeredSize(req.RegisterMemory.source), fixed ? MAPPINGS_PER_FIXED : MAPPINGS_PER_REGION);
      if (refused !== null) refused = refused.context("failed to register memory");
    } else if (binding !== null && binding.register) {
      refused = this.ledger.checkBinding(h, binding.kind);
      if (refused !== null) refused = refused.context(`failed to register ${binding.key}`);
    }
    if (refused !== null) return errResponse(refused);
    // --release-on-disconnect keeps its own copy of a binding's eventfd, taken before KVM has
    // it: if the copy cannot be made, nothing gets registered that could not be removed.
    const keep = this.ledger.keepsBindings && binding !== null && binding.register ? sys.dupCloexec(binding.event) : -1;
    const resp = execute(req, this.ctx);
    const h2 = conn.holdings;
    if (typeof resp === "object" && "RegisterMemory" in resp) {
      const id = regionIdOf(resp.RegisterMemory.region_id);
      const size = this.ctx.state.regions.get(id)?.size ?? 0;
      this.ledger.recordRegion(h2, id, size, fixed ? MAPPINGS_PER_FIXED : MAPPINGS_PER_REGION);
    } else if (resp === "Ok" && "UnregisterMemory" in req) {
      this.ledger.recordUnregister(regionIdOf(req.UnregisterMemory));
    } else if (resp === "Ok" && binding !== null) {
      this.ledger.recordBinding(h2, binding.kind, binding.register, binding.key, keep === -1 ? null : { key: binding.key, event: keep, unregister: binding.unregister(keep) });
      return resp;
    }
    if (keep !== -1) closeQuietly(keep);
    return resp;
  }

  /** Whether a RegisterMemory lands in a prepared arena (a fixed mapping, two host mappings). */
  private landsInArena(dest: Request<"RegisterMemory">["RegisterMemory"]["dest"]): boolean {
    if ("ExistingAllocation" in dest) return true;
    const g = regionIdOf(dest.GuestPhysicalAddress);
    const hit = g >= 0 ? this.ctx.state.top.find(g) : undefined;
    return hit !== undefined && isArena(hit.value);
  }

  /**
   * MmapAndRegisterMemory: checked and its shm mapped now; its chunks map their files as they
   * come. A request refused at once allocates nothing, but its chunks are still read (their
   * descriptors closed) and the one answer comes after the last.
   */
  private startMmap(conn: Connection, req: Mmap, enc: Encoding, refused: Refusal | null): void {
    const m = req.MmapAndRegisterMemory;
    const count = m.num_file_mappings;
    const h = conn.holdings;
    const shmSize = typeof m.shm.size === "number" ? pageUp(m.shm.size) : Infinity;
    if (refused === null && (count > this.limits.maxFileMappings || Number(count) > shmSize / sys.PAGE_SIZE)) {
      refused = Refusal.of("EINVAL", `num_file_mappings ${count} is more than the shm's pages or the limit ${this.limits.maxFileMappings} (--max-file-mappings)`);
    }
    refused ??= this.ledger.checkRegion(h, shmSize, MAPPINGS_PER_REGION);
    let registration: MmapRegistration | null = null;
    if (refused === null) {
      const started = MmapRegistration.start(this.ctx, m.shm, m.dest);
      if (started instanceof Refusal) refused = started;
      else registration = started;
    } else refused = refused.context("failed to mmap and register memory");
    if (registration !== null) this.ledger.chargeMappings(h, MAPPINGS_PER_REGION);
    conn.pending = { encoding: enc, remaining: Number(count), registration, charged: registration === null ? 0 : MAPPINGS_PER_REGION, failure: refused };
    if (count === 0) this.finishMmap(conn);
  }

  /**
   * A follow-up packet of the pending MmapAndRegisterMemory. A malformed one fails the
   * request and counts as the min(remaining, 253) mappings a sender chunking as crosvm
   * does would have put in it, so the one answer still comes after the last chunk.
   */
  private chunk(conn: Connection, buf: Uint8Array, start: number, end: number, len: number, flags: number, fds: number[], enc: Encoding): void {
    const p = conn.pending!;
    let taken = Math.min(p.remaining, MAX_FDS_PER_PACKET);
    let bad = this.checkPacket(len, flags, fds);
    if (bad === null) {
      const chunk = decodeFileMappings(buf, start, end, fds, enc);
      if (chunk instanceof Refusal) bad = chunk;
      else if (chunk.length > p.remaining) {
        bad = Refusal.of("EINVAL", `chunk of ${chunk.length} file mappings exceeds the ${p.remaining} still expected`).context("malformed file mapping chunk");
      } else {
        taken = chunk.length;
        if (p.registration !== null) {
          const mappings = 2 * chunk.length;
          bad = this.ledger.checkMappings(conn.holdings, mappings) ?? p.registration.add(chunk);
          if (bad === null) {
            this.ledger.chargeMappings(conn.holdings, mappings);
            p.charged += mappings;
          }
        }
      }
    }
    if (bad !== null && p.failure === null) {
      p.failure = bad.chain.at(-1) === "failed to mmap and register memory" ? bad : bad.context("failed to mmap and register memory");
      this.abandon(conn);
    }
    p.remaining -= taken;
    if (p.remaining <= 0) this.finishMmap(conn);
  }

  private finishMmap(conn: Connection): void {
    const p = conn.pending!;
    conn.pending = null;
    if (p.failure !== null || p.registration === null) {
      this.abandonPending(conn, p);
      return this.answer(conn, errResponse(p.failure ?? Refusal.of("EINVAL", "no registration")), p.encoding, "MmapAndRegisterMemory");
    }
    const resp = p.registration.finish();
    p.registration = null;
    if (typeof resp === "object" && "RegisterMemory" in resp) {
      const id = regionIdOf(resp.RegisterMemory.region_id);
      const size = this.ctx.state.regions.get(id)?.size ?? 0;
      this.ledger.recordRegion(conn.holdings, id, size, p.charged, p.charged);
    } else this.ledger.chargeMappings(conn.holdings, -p.charged);
    this.answer(conn, resp, p.encoding, "MmapAndRegisterMemory");
  }

  /** Releases what a failed or abandoned MmapAndRegisterMemory mapped so far. */
  private abandonPending(conn: Connection, p: NonNullable<Connection["pending"]>): void {
    p.registration?.abort();
    p.registration = null;
    this.ledger.chargeMappings(conn.holdings, -p.charged);
    p.charged = 0;
  }

  /** The pending request failed (its chunks are still read) or its connection is going. */
  abandon(conn: Connection): void {
    if (conn.pending !== null) this.abandonPending(conn, conn.pending);
  }
}

/** An eventfd binding a request makes or removes, and how to remove it with another descriptor. */
interface Binding {
  kind: BindingKind;
  register: boolean;
  event: number;
  /** What it is, for messages and to match an unregister with what was kept. */
  key: string;
  unregister(event: number): VmMemoryRequest;
}

function bindingOf(req: Exclude<VmMemoryRequest, string>): Binding | null {
  if ("IoEventRaw" in req) {
    const r = req.IoEventRaw;
    return { kind: "ioevent", register: r.register, event: r.event, key: `ioevent at 0x${r.addr.toString(16)} ${datamatchText(r.datamatch)}`, unregister: (event) => ({ IoEventRaw: { ...r, event, register: false } }) };
  }
  if ("IoEventPio" in req) {
    const r = req.IoEventPio;
    return { kind: "ioevent", register: r.register, event: r.event, key: `ioevent at port 0x${r.port.toString(16)} ${datamatchText(r.datamatch)}`, unregister: (event) => ({ IoEventPio: { ...r, event, register: false } }) };
  }
  if ("IrqFd" in req) {
    const r = req.IrqFd;
    return { kind: "irqfd", register: r.register, event: r.event, key: `irqfd on GSI ${r.gsi}`, unregister: (event) => ({ IrqFd: { event, gsi: r.gsi, resample: null, register: false } }) };
  }
  return null;
}

function datamatchText(dm: Datamatch): string {
  if (typeof dm === "string") return dm;
  for (const k in dm) return `${k}=${(dm as Record<string, unknown>)[k] ?? "any"}`;
  return "";
}

/** The bytes a RegisterMemory source covers once rounded to pages (0 when it will be refused anyway). */
function registeredSize(source: Request<"RegisterMemory">["RegisterMemory"]["source"]): number {
  const size = "SharedMemory" in source ? source.SharedMemory.size : "Descriptor" in source ? source.Descriptor.size : 0;
  return typeof size === "number" ? pageUp(size) : 0;
}

function closeQuietly(fd: number): void {
  try {
    sys.close(fd);
  } catch {}
}
