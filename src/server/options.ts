// The server's option defaults and the descriptor count they imply: what serve needs before
// its socket is ready, in a module that loads neither the server nor the wire description
// (server.ts re-exports them).
import { MAX_PACKET } from "../protocol/limits";
import * as sys from "../sys";
import { DEFAULT_BUDGETS } from "./budgets";
import type { ServerOptions } from "./server";

/** Packets per recvmmsg, for a peer whose requests are cheap enough that a batch fits a turn. */
export const RECV_BATCH = 16;

export const DEFAULT_SERVER_OPTIONS = {
  socketMode: 0o600,
  maxConnections: 256,
  maxFileMappings: 65536,
  allowUids: [] as number[],
  maxPacket: MAX_PACKET,
  maxFdsPerPacket: sys.SCM_MAX_FD,
  budgets: DEFAULT_BUDGETS,
  releaseOnDisconnect: false,
  shareGuestMemoryWith: [] as number[],
};

/**
 * Descriptors the server may hold at once with `opts`: every connection, a receive batch's
 * worth of attached descriptors in hand, the eventfd copies --release-on-disconnect keeps,
 * and room for the runtime and the VM. With a table this large, a full table never keeps
 * vmemd from reading a packet.
 */
export function descriptorsNeeded(opts: Pick<ServerOptions, "maxConnections" | "maxFdsPerPacket" | "budgets" | "releaseOnDisconnect">): number {
  return 256 + opts.maxConnections + RECV_BATCH * opts.maxFdsPerPacket + (opts.releaseOnDisconnect ? opts.budgets.ioevents : 0);
}
