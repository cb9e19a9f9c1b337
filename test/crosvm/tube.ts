// A client end that behaves like crosvm's base::Tube on a SOCK_SEQPACKET socket: one
// packet per message, descriptors in that packet's SCM_RIGHTS. Bodies are whatever the
// caller built (wire.ts for JSON, @msgpack/msgpack for MessagePack); nothing here knows
// vmemd's protocol code.
import { decode, encode } from "@msgpack/msgpack";
import * as sys from "../../src/sys";
import {
  isCanonical,
  jsonFileMappingChunk,
  jsonRequest,
  parseVmemdResponse,
  parseVmMemoryResponse,
  serRequest,
  toPlain,
  type Packet,
  type Request,
  type VmemdResponse,
  type VmMemoryFileMapping,
  type VmMemoryResponse,
} from "./wire";

const MAX_BODY = 65536;

export interface Received {
  body: Uint8Array;
  fds: number[];
}

export class TubeEnd {
  private readonly io = new sys.PacketIo(MAX_BODY);
  private constructor(readonly fd: number) {}

  static connect(path: string): TubeEnd {
    return new TubeEnd(sys.connectSeqpacket(path, true));
  }

  send(p: Packet, timeoutMs = 10_000): void {
    const deadline = Date.now() + timeoutMs;
    while (!this.io.send(this.fd, p.body, p.fds)) {
      if (Date.now() > deadline || sys.pollOne(this.fd, sys.POLLOUT, Math.max(1, deadline - Date.now())) === 0) throw new Error("send: no room within the timeout");
    }
  }

  /** The next packet (a copy), or undefined when none comes within `timeoutMs`. */
  tryRecv(timeoutMs: number): Received | undefined {
    const rev = sys.pollOne(this.fd, sys.POLLIN, timeoutMs);
    if (rev === 0) return undefined;
    const n = this.io.recv(this.fd, false);
    if (n === -1) return undefined;
    if (n === 0) throw new Error("the server closed the connection");
    if (this.io.flags & sys.MSG_TRUNC) throw new Error("response larger than 65536 bytes");
    return { body: this.io.body.slice(0, n), fds: this.io.fds };
  }

  recv(timeoutMs = 10_000): Received {
    const r = this.tryRecv(timeoutMs);
    if (r === undefined) throw new Error(`no response within ${timeoutMs} ms`);
    return r;
  }

  close(): void {
    sys.close(this.fd);
  }
}

/** What a body that is not JSON looks like, for a failure message that says why. */
export function describeBody(body: Uint8Array): string {
  const head = Array.from(body.subarray(0, 12), (b) => b.toString(16).padStart(2, "0")).join(" ");
  try {
    const v = decode(body, { useBigInt64: true });
    return `MessagePack ${JSON.stringify(v, (_k, x) => (typeof x === "bigint" ? `${x}n` : x))} (bytes ${head}…)`;
  } catch {
    return `bytes ${head}… ${JSON.stringify(new TextDecoder().decode(body.subarray(0, 200)))}`;
  }
}

/**
 * Parses a JSON answer as crosvm would (VmMemoryResponse, or vmemd's superset), and checks
 * that it is byte for byte what serde_json would have written. Throws with what came
 * instead when it is not JSON crosvm accepts.
 */
export function parseAnswer(r: Received, extensions = false): VmemdResponse {
  for (const f of r.fds) sys.close(f);
  let v: VmemdResponse;
  try {
    v = extensions ? parseVmemdResponse(r.body) : parseVmMemoryResponse(r.body);
  } catch (e) {
    throw new Error(`crosvm could not read this answer (${(e as Error).message}): ${describeBody(r.body)}`);
  }
  if (!isCanonical(r.body, v)) throw new Error(`the answer parses, but is not serde_json's compact form: ${new TextDecoder().decode(r.body)}`);
  return v;
}

/** One JSON request, one JSON answer, read as crosvm's VmMemoryClient reads it. */
export function jsonCall(t: TubeEnd, req: Request): VmMemoryResponse {
  t.send(jsonRequest(req));
  return parseAnswer(t.recv()) as VmMemoryResponse;
}

/** A vmemd extension request in JSON; the answer read with the extension variants. */
export function jsonCallExt(t: TubeEnd, req: Request): VmemdResponse {
  t.send(jsonRequest(req));
  return parseAnswer(t.recv(), true);
}

/** A raw body (hand-written JSON, possibly malformed) with descriptors; the answer parsed as crosvm would. */
export function rawCall(t: TubeEnd, body: string | Uint8Array, fds: number[] = []): VmMemoryResponse {
  t.send({ body: typeof body === "string" ? new TextEncoder().encode(body) : body, fds });
  return parseAnswer(t.recv()) as VmMemoryResponse;
}

/**
 * VmMemoryClient::mmap_and_register_memory: the request, then the mappings in chunks of
 * SCM_MAX_FD (253), each a JSON array with its own descriptors; then one answer.
 * `afterChunk(i)` runs after chunk i is sent (to look for a premature answer).
 */
export function jsonMmapAndRegister(t: TubeEnd, req: Request, mappings: VmMemoryFileMapping[], afterChunk?: (i: number) => void): VmMemoryResponse {
  t.send(jsonRequest(req));
  for (let i = 0, k = 0; i < mappings.length; i += sys.SCM_MAX_FD, k++) {
    t.send(jsonFileMappingChunk(mappings.slice(i, i + sys.SCM_MAX_FD)));
    afterChunk?.(k);
  }
  return parseAnswer(t.recv()) as VmMemoryResponse;
}

// ---- MessagePack (docs/protocol.md's own encoding), for mixing on one connection ----

export function msgpackPacket(req: Request): Packet {
  const fds: number[] = [];
  const value = toPlain(serRequest(req), fds);
  return { body: encode(value, { useBigInt64: true }), fds };
}

export type MsgpackAnswer = "Ok" | { Err: { errno: number | null; chain: string[] } } | Record<string, unknown>;

export function msgpackAnswer(r: Received): MsgpackAnswer {
  for (const f of r.fds) sys.close(f);
  const c = r.body[0]!;
  if (c === 0x7b || c === 0x5b || c === 0x22 || c === 0x20 || c === 0x0a || c === 0x09 || c === 0x0d) {
    throw new Error(`a MessagePack request was answered in JSON: ${new TextDecoder().decode(r.body)}`);
  }
  const v = decode(r.body, { useBigInt64: true }) as MsgpackAnswer;
  // Small integers decode as numbers, uint 64 as bigint: make errno a number either way.
  if (typeof v === "object" && v !== null && "Err" in v) {
    const e = (v as { Err: { errno: unknown; chain: string[] } }).Err;
    return { Err: { errno: e.errno === null ? null : Number(e.errno), chain: e.chain } };
  }
  return v;
}

export function msgpackCall(t: TubeEnd, req: Request): MsgpackAnswer {
  t.send(msgpackPacket(req));
  return msgpackAnswer(t.recv());
}

/** The number at the end of the root cause's " (os error N)", or null when there is none. */
export function osError(chain: string[]): number | null {
  const m = /\(os error (\d+)\)$/.exec(chain[0] ?? "");
  return m ? Number(m[1]) : null;
}

/** VmRSS of a process, in bytes. */
export function rssBytes(pid: number): number {
  const { readFileSync } = require("node:fs") as typeof import("node:fs");
  const m = /^VmRSS:\s+(\d+) kB$/m.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
  if (!m) throw new Error(`no VmRSS for ${pid}`);
  return Number(m[1]) * 1024;
}
