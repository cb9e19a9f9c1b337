// The two requests a device's register/unregister traffic is made of, read straight from
// the packet's bytes when they come in their plainest encoding: the one this project's
// client and rmp-serde write (fields in declaration order, shortest integer forms).
// Anything else, a reordered map included, returns null and takes the general path
// (decodePlain, fastRequest, zod), which stays the definition: test/protocol.test.ts
// requires both to give the same request for every packet this path accepts.
import type { VmMemoryRequest } from "../memory/request";

/**
 * MessagePack bytes of a run of constants: a number is a byte, a string a fixstr (these
 * are ASCII and under 32 bytes). Plain loops: Uint8Array.from and spreading typed arrays
 * cost some 0.3 ms of start-up the first time a process uses them.
 */
function msgpack(...parts: (number | string)[]): Uint8Array {
  const out: number[] = [];
  for (const p of parts) {
    if (typeof p === "number") {
      out.push(p);
      continue;
    }
    out.push(0xa0 | p.length);
    for (let i = 0; i < p.length; i++) out.push(p.charCodeAt(i));
  }
  return new Uint8Array(out);
}

// {"RegisterMemory": {"source": {"SharedMemory": {"descriptor": ⟨0⟩, "size": ⟨uint⟩}},
//  "dest": {"GuestPhysicalAddress": ⟨uint⟩}, "prot": {"read": ⟨bool⟩, "write": ⟨bool⟩},
//  "cache": "CacheCoherent"}}: constant runs between the holes.
const REGISTER_HEAD = msgpack(0x81, "RegisterMemory", 0x84, "source", 0x81, "SharedMemory", 0x82, "descriptor", 0x00, "size");
const REGISTER_DEST = msgpack("dest", 0x81, "GuestPhysicalAddress");
const REGISTER_READ = msgpack("prot", 0x82, "read");
const REGISTER_WRITE = msgpack("write");
const REGISTER_TAIL = msgpack("cache", "CacheCoherent");
const UNREGISTER_HEAD = msgpack(0x81, "UnregisterMemory");

/**
 * A cursor over one packet, bytes [at, end) of `b`; `at` is -1 once anything failed to
 * match. One is reused for every packet: the hot path allocates only the request.
 */
class Reader {
  at = 0;
  end = 0;
  b: Uint8Array = new Uint8Array(0);

  reset(b: Uint8Array, start: number, end: number): this {
    this.b = b;
    this.at = start;
    this.end = end;
    return this;
  }

  run(bytes: Uint8Array): void {
    const b = this.b;
    let at = this.at;
    if (at < 0 || at + bytes.length > this.end) {
      this.at = -1;
      return;
    }
    for (let i = 0; i < bytes.length; i++) {
      if (b[at + i] !== bytes[i]) {
        this.at = -1;
        return;
      }
    }
    this.at = at + bytes.length;
  }

  /** An unsigned integer up to 2^53 - 1 in any of MessagePack's unsigned forms; -1 if not. */
  uint(): number {
    const b = this.b;
    const at = this.at;
    if (at < 0 || at >= this.end) return this.fail();
    const tag = b[at]!;
    if (tag < 0x80) {
      this.at = at + 1;
      return tag;
    }
    const width = tag === 0xcc ? 1 : tag === 0xcd ? 2 : tag === 0xce ? 4 : tag === 0xcf ? 8 : 0;
    if (width === 0 || at + 1 + width > this.end) return this.fail();
    let v = 0;
    for (let i = 1; i <= width; i++) v = v * 256 + b[at + i]!;
    // A uint 64 of 2^53 or more is not exact as a double: the general path keeps it a bigint.
    if (v > Number.MAX_SAFE_INTEGER) return this.fail();
    this.at = at + 1 + width;
    return v;
  }

  bool(): boolean {
    const at = this.at;
    const tag = at < 0 || at >= this.end ? 0 : this.b[at]!;
    if (tag !== 0xc2 && tag !== 0xc3) {
      this.fail();
      return false;
    }
    this.at = at + 1;
    return tag === 0xc3;
  }

  private fail(): number {
    this.at = -1;
    return -1;
  }

  /** True when everything matched and nothing is left over. */
  done(): boolean {
    return this.at === this.end;
  }
}

const reader = new Reader();

/**
 * The request, when bytes [start, end) of `buf` are one of the two in their plainest
 * encoding; else null. (A range rather than a subarray: no view object per packet.)
 */
export function hotRequest(buf: Uint8Array, fds: readonly number[], start = 0, end = buf.length): VmMemoryRequest | null {
  end = Math.min(end, buf.length); // never past the buffer, whatever the caller says
  if (end - start < 2 || buf[start] !== 0x81) return null;
  const r = reader.reset(buf, start, end);
  const second = buf[start + 1];
  if (second === UNREGISTER_HEAD[1]) {
    if (fds.length !== 0) return null;
    r.run(UNREGISTER_HEAD);
    const id = r.uint();
    return r.done() ? { UnregisterMemory: id } : null;
  }
  if (second !== REGISTER_HEAD[1] || fds.length !== 1) return null;
  r.run(REGISTER_HEAD);
  const size = r.uint();
  r.run(REGISTER_DEST);
  const guest = r.uint();
  r.run(REGISTER_READ);
  const read = r.bool();
  r.run(REGISTER_WRITE);
  const write = r.bool();
  r.run(REGISTER_TAIL);
  if (!r.done()) return null;
  return {
    RegisterMemory: {
      source: { SharedMemory: { descriptor: fds[0]!, size } },
      dest: { GuestPhysicalAddress: guest },
      prot: { read, write },
      cache: "CacheCoherent",
    },
  };
}
