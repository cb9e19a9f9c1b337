// `vmemd ctl`: one request from a shell, printed as JSON.
import { openSync, closeSync, fstatSync } from "node:fs";
import * as sys from "../sys";
import { VmemClient, VmemError } from "../client";
import type { Alloc, Datamatch, VmMemoryDestination, VmMemoryRequest, VmMemoryResponse, VmState } from "../protocol";
import { decodeRequest, isRefusal, JSON_ENCODING } from "../protocol";
import { flag, parseFlags, parseNumber, parsePciBar, parseSize, UsageError, type Parsed } from "./args";
import { drawState } from "./state_map";

export const CTL_HELP = `usage: vmemd ctl --socket PATH <request> [options]

Sends one request to a running vmemd and prints the response as JSON
(exit status 0 on success, 1 when vmemd answers Err).

requests:
  state [--json] [--all]             the guest physical map (GetState and every page of GetRegions and
                                     GetAllocations); runs of like regions are summarised unless --all;
                                     --json for the whole State as JSON
  register (--shm SIZE | --file PATH [--offset N] [--size N])
           (--gpa ADDR | --bar BB:DD.F/BAR [--bar-offset N]) [--read-only]
                                     RegisterMemory; --shm makes a memfd of SIZE
  unregister REGION_ID               UnregisterMemory
  prepare BB:DD.F/BAR                PrepareSharedMemoryRegion
  mmap-register --shm SIZE --gpa ADDR --map FILE@MEM_OFFSET[+FILE_OFFSET] ...
                                     MmapAndRegisterMemory (each file mapped whole, read-only)
  free ADDR:SIZE ...                 DynamicallyFreeMemoryRanges
  reclaim ADDR:SIZE ...              DynamicallyReclaimMemoryRanges
  balloon SIZE                       BalloonTargetReached
  ioevent --addr ADDR [--match u8|u16|u32|u64[=VALUE]] [--unregister]
                                     IoEventRaw with a new eventfd (any length when --match is absent)
  allocate BB:DD.F/BAR SIZE [--align N]   AllocateMmio
  release BB:DD.F/BAR                ReleaseMmio
  raw JSON                           any descriptor-free request as JSON, e.g. '{"BalloonTargetReached":{"size":1}}'

Numbers take 0x hex or K/M/G suffixes.
`;

const SPEC = {
  socket: { value: true },
  json: { value: false },
  all: { value: false },
  shm: { value: true },
  file: { value: true },
  offset: { value: true },
  size: { value: true },
  gpa: { value: true },
  bar: { value: true },
  "bar-offset": { value: true },
  "read-only": { value: false },
  map: { value: true, repeat: true },
  addr: { value: true },
  match: { value: true },
  unregister: { value: false },
  align: { value: true },
  help: { value: false },
};

export function toJson(value: unknown): string {
  return JSON.stringify(value, (_k, v) => (typeof v === "bigint" ? (v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v.toString()) : v instanceof Uint8Array ? [...v] : v));
}

function newMemfd(size: number): number {
  const fd = sys.memfdCreate("vmemd-ctl");
  sys.ftruncate(fd, size);
  return fd;
}

function destination(p: Parsed): VmMemoryDestination {
  const gpa = flag(p, "gpa");
  const bar = flag(p, "bar");
  if ((gpa === undefined) === (bar === undefined)) throw new UsageError("vmemd ctl: give exactly one of --gpa ADDR or --bar BB:DD.F/BAR");
  if (gpa !== undefined) return { GuestPhysicalAddress: parseNumber(gpa, "--gpa") };
  return { ExistingAllocation: { allocation: parsePciBar(bar!, "--bar"), offset: parseNumber(flag(p, "bar-offset") ?? "0", "--bar-offset") } };
}

function ranges(args: string[], what: string): [number, number][] {
  if (args.length === 0) throw new UsageError(`vmemd ctl ${what}: give at least one ADDR:SIZE`);
  return args.map((a) => {
    const [addr, size, extra] = a.split(":");
    if (size === undefined || extra !== undefined) throw new UsageError(`vmemd ctl ${what}: "${a}" is not ADDR:SIZE`);
    return [parseNumber(addr!, what), parseSize(size, what)];
  });
}

function datamatch(text: string | undefined): Datamatch {
  if (text === undefined) return "AnyLength";
  const m = /^(u8|u16|u32|u64)(?:=(.+))?$/i.exec(text);
  if (!m) throw new UsageError(`--match: "${text}" is not u8|u16|u32|u64[=VALUE]`);
  const kind = m[1]!.toUpperCase() as "U8" | "U16" | "U32" | "U64";
  const value = m[2] === undefined ? null : parseNumber(m[2], "--match");
  return { [kind]: value } as Datamatch;
}

/** Builds the request (and the descriptors it carries, which the caller closes). */
function buildRequest(cmd: string, args: string[], p: Parsed, fds: number[]): VmMemoryRequest {
  const need = (n: number, usage: string) => {
    if (args.length !== n) throw new UsageError(`vmemd ctl ${cmd}: usage: ${usage}`);
  };
  switch (cmd) {
    case "state":
      need(0, "state [--json]");
      return "GetState";
    case "register": {
      need(0, "register (--shm SIZE | --file PATH) (--gpa ADDR | --bar BAR)");
      const shm = flag(p, "shm");
      const file = flag(p, "file");
      if ((shm === undefined) === (file === undefined)) throw new UsageError("vmemd ctl register: give exactly one of --shm SIZE or --file PATH");
      const prot = { read: true, write: !p.flags.has("read-only") };
      let source;
      if (shm !== undefined) {
        const size = parseSize(shm, "--shm");
        const fd = newMemfd(size);
        fds.push(fd);
        source = { SharedMemory: { descriptor: fd, size } };
      } else {
        const fd = openSync(file!, prot.write ? "r+" : "r");
        fds.push(fd);
        const offset = parseNumber(flag(p, "offset") ?? "0", "--offset");
        const size = flag(p, "size") !== undefined ? parseSize(flag(p, "size")!, "--size") : fstatSync(fd).size - offset;
        source = { Descriptor: { descriptor: fd, offset, size } };
      }
      return { RegisterMemory: { source, dest: destination(p), prot, cache: "CacheCoherent" } };
    }
    case "unregister":
      need(1, "unregister REGION_ID");
      return { UnregisterMemory: parseNumber(args[0]!, "REGION_ID") };
    case "prepare":
      need(1, "prepare BB:DD.F/BAR");
      return { PrepareSharedMemoryRegion: { alloc: parsePciBar(args[0]!, "prepare"), cache: "CacheCoherent" } };
    case "free":
      return { DynamicallyFreeMemoryRanges: { ranges: ranges(args, "free") } };
    case "reclaim":
      return { DynamicallyReclaimMemoryRanges: { ranges: ranges(args, "reclaim") } };
    case "balloon":
      need(1, "balloon SIZE");
      return { BalloonTargetReached: { size: parseSize(args[0]!, "balloon") } };
    case "ioevent": {
      need(0, "ioevent --addr ADDR [--match u32=VALUE] [--unregister]");
      const addr = flag(p, "addr");
      if (addr === undefined) throw new UsageError("vmemd ctl ioevent: --addr ADDR is required");
      const ev = sys.eventfd();
      fds.push(ev);
      return { IoEventRaw: { event: ev, addr: parseNumber(addr, "--addr"), datamatch: datamatch(flag(p, "match")), register: !p.flags.has("unregister") } };
    }
    case "allocate": {
      need(2, "allocate BB:DD.F/BAR SIZE [--align N]");
      const align = flag(p, "align");
      return { AllocateMmio: { alloc: parsePciBar(args[0]!, "allocate"), size: parseSize(args[1]!, "allocate"), align: align === undefined ? null : parseSize(align, "--align") } };
    }
    case "release":
      need(1, "release BB:DD.F/BAR");
      return { ReleaseMmio: parsePciBar(args[0]!, "release") as Alloc };
    case "raw": {
      need(1, "raw JSON");
      // The server's own decoder, on the JSON as given: what it refuses is refused here.
      const text = new TextEncoder().encode(args[0]!);
      const req = decodeRequest(text, 0, text.length, [], JSON_ENCODING);
      if (isRefusal(req)) throw new UsageError(`vmemd ctl raw: ${req.chain.slice().reverse().join(": ")}`);
      if (typeof req === "object" && "MmapAndRegisterMemory" in req) {
        throw new UsageError("vmemd ctl raw: requests with descriptors need their own subcommand");
      }
      return req;
    }
    default:
      throw new UsageError(`vmemd ctl: unknown request "${cmd}" (see vmemd ctl --help)`);
  }
}

/**
 * Writes all of `text` to stdout before returning: the process exits right after, and a
 * pipe's reader (a script, `less`) must still get every line of a 30,000-region map.
 */
async function print(text: string): Promise<void> {
  await Bun.write(Bun.stdout, text);
}

export async function ctl(argv: string[]): Promise<number> {
  const p = parseFlags(argv, SPEC, "vmemd ctl");
  if (p.flags.has("help")) {
    process.stdout.write(CTL_HELP);
    return 0;
  }
  const socket = flag(p, "socket");
  if (socket === undefined) throw new UsageError("vmemd ctl: --socket PATH is required");
  const [cmd, ...args] = p.positional;
  if (cmd === undefined) throw new UsageError("vmemd ctl: which request? (see vmemd ctl --help)");
  const fds: number[] = [];
  try {
    let resp: VmMemoryResponse;
    if (cmd === "mmap-register") {
      resp = mmapRegister(socket, p, fds);
    } else {
      const req = buildRequest(cmd, args, p, fds);
      const client = VmemClient.connect(socket);
      try {
        resp = client.request(req);
        // GetState's lists are first pages: fetch the rest, so what is shown is everything.
        if (req === "GetState" && typeof resp === "object" && "State" in resp) resp = { State: completeState(client, resp.State) };
      } finally {
        client.close();
      }
    }
    if (cmd === "state" && !p.flags.has("json") && typeof resp === "object" && "State" in resp) {
      await print(drawState(resp.State as VmState, p.flags.has("all")));
    } else {
      await print(toJson(resp) + "\n");
    }
    return typeof resp === "object" && "Err" in resp ? 1 : 0;
  } finally {
    for (const fd of fds) closeSync(fd);
  }
}

/** A State whose region and allocation lists are complete (every page fetched). */
function completeState(client: VmemClient, s: VmState): VmState {
  const regions = [...s.regions];
  for (let from = s.regions_next; from !== null; ) {
    const page = client.getRegions(from);
    regions.push(...page.regions);
    from = page.next;
  }
  const allocations = [...s.allocations];
  for (let from = s.allocations_next; from !== null; ) {
    const page = client.getAllocations(from);
    allocations.push(...page.allocations);
    from = page.next;
  }
  return { ...s, regions, regions_next: null, allocations, allocations_next: null };
}

function mmapRegister(socket: string, p: Parsed, fds: number[]): VmMemoryResponse {
  const shm = flag(p, "shm");
  if (shm === undefined) throw new UsageError("vmemd ctl mmap-register: --shm SIZE is required");
  const size = parseSize(shm, "--shm");
  const maps = (p.flags.get("map") ?? []).map((m) => {
    const at = /^(.+)@([^+]+)(?:\+(.+))?$/.exec(m);
    if (!at) throw new UsageError(`--map: "${m}" is not FILE@MEM_OFFSET[+FILE_OFFSET]`);
    const fd = openSync(at[1]!, "r");
    fds.push(fd);
    const fileOffset = at[3] === undefined ? 0 : parseNumber(at[3], "--map");
    const length = Math.ceil((fstatSync(fd).size - fileOffset) / 4096) * 4096;
    return { file: fd, length, mem_offset: parseNumber(at[2]!, "--map"), file_offset: fileOffset };
  });
  const fd = newMemfd(size);
  fds.push(fd);
  const client = VmemClient.connect(socket);
  try {
    return { RegisterMemory: client.mmapAndRegisterMemory({ descriptor: fd, size }, destination(p), maps) };
  } catch (e) {
    if (e instanceof VmemError) return { Err: { errno: e.errno, chain: e.chain } };
    throw e;
  } finally {
    client.close();
  }
}
