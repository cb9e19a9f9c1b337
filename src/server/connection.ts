// One client connection's state: what it owes (responses waiting for room), what it is in
// the middle of (an MmapAndRegisterMemory waiting for chunks), and what it holds.
import type { FreeRanges, MmapRegistration, Refusal } from "../memory";
import type { Encoding } from "../protocol";
import type * as sys from "../sys";
import { Holdings } from "./ledger";

/** An MmapAndRegisterMemory waiting for its follow-up packets. */
export interface PendingMmap {
  /** The answer goes out in the request's encoding, after the last chunk. */
  encoding: Encoding;
  /** Mappings still expected (a count above 2^53 never completes: the peer can only hang up). */
  remaining: number;
  /** The registration under way; null once the request has failed (its chunks are then read and dropped). */
  registration: MmapRegistration | null;
  /** Host mappings charged to the connection so far. */
  charged: number;
  failure: Refusal | null;
}

/** A response waiting in the outbox: its bytes, with the descriptors it carries if any. */
export type OutPacket = Uint8Array | { body: Uint8Array; fds: readonly number[] };

export class Connection {
  /** Responses that did not fit in the socket; while any wait, no request is read (throttle). */
  readonly outbox: OutPacket[] = [];
  pending: PendingMmap | null = null;
  /** A long request applied a slice per turn (FreeRanges); none of its later packets is read meanwhile. */
  job: { work: FreeRanges; encoding: Encoding } | null = null;
  /** The peer has finished sending: answer what is owed, then close. */
  closing = false;
  requests = 0;
  /** Its last turn ended on the time limit with packets left: others go first next time. */
  busy = false;
  readonly holdings: Holdings;

  constructor(
    readonly fd: number,
    readonly id: number,
    readonly peer: sys.PeerCred,
  ) {
    this.holdings = new Holdings(id);
  }
}
