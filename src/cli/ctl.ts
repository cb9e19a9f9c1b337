// `vmemd ctl`: one request from a shell, printed as JSON.
import { openSync, closeSync, fstatSync, readlinkSync } from "node:fs";
import * as sys from "../sys";
import { VmemClient, VmemError } from "../client";
import type { Alloc, Datamatch, VmMemoryDestination, VmMemoryFileMapping, VmMemoryRequest, VmMemoryResponse, VmState } from "../protocol";
import { decodeRequest, isRefusal, JSON_ENCODING } from "../protocol";
import { ExitError, flag, parseFlags, parseNumber, parsePciBar, parseSize, UsageError, type Parsed } from "./args";
import { drawState } from "./state_map";

export const CTL_HELP = `usage: vmemd ctl --socket PATH [--timeout SECONDS] <request> [options]

Sends one request to a running vmemd and prints the response as JSON.

  --socket PATH                      the socket vmemd serves on
  --timeout SECONDS                  give up when vmemd has not answered within SECONDS (default 30;
                                     fractions allowed), covering every packet of the request
  -h, --help                         this text; "vmemd ctl REQUEST -h" for one request

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
  ioevent --addr ADDR [--match u8|u16|u32|u64[=VALUE]] [--unregister] [--eventfd-from FD]
                                     IoEventRaw with a new eventfd (any length when --match is absent),
                                     or with eventfd FD inherited from the caller, so that what one
                                     ctl registered another can unregister
  ioevent-pio --port PORT [--match ...] [--unregister] [--eventfd-from FD]
                                     IoEventPio: the same on an I/O port
  irqfd --gsi N [--resample-from FD] [--unregister] [--eventfd-from FD]
                                     IrqFd: a signal on the eventfd raises IOAPIC pin N (level-triggered,
                                     with a resample eventfd inherited as FD)
  guest-memory                       GetGuestMemory: where guest RAM is (the descriptors are closed)
  allocate BB:DD.F/BAR SIZE [--align N]   AllocateMmio
  release BB:DD.F/BAR                ReleaseMmio
  raw JSON                           any descriptor-free request as JSON, e.g. '{"BalloonTargetReached":{"size":1}}'

Numbers take 0x hex or K/M/G suffixes. A flag a request does not take is refused.

exit status:
  0  vmemd answered the request with success
  1  vmemd answered Err (printed as JSON: errno and the chain of causes)
  2  usage: a bad request, flag or value, or a file named that cannot be opened
  3  vmemd could not be reached or did not answer: no socket, connection refused or closed,
     no answer within --timeout, or an answer ctl cannot read
  4  ctl itself failed before sending (e.g. it could not create the memfd)
`;

/** Exit statuses, as CTL_HELP states them (main.ts turns a UsageError into 2). */
const EXIT_ERR = 1;
const EXIT_UNREACHABLE = 3;
const EXIT_LOCAL = 4;

/** The flags each request takes, besides --socket, --timeout and --help; any other is refused. */
const REQUEST_FLAGS: Record<string, readonly string[]> = {
  state: ["json", "all"],
  register: ["shm", "file", "offset", "size", "gpa", "bar", "bar-offset", "read-only"],
  unregister: [],
  prepare: [],
  "mmap-register": ["shm", "gpa", "bar", "bar-offset", "map"],
  free: [],
  reclaim: [],
  balloon: [],
  ioevent: ["addr", "match", "unregister", "eventfd-from"],
  "ioevent-pio": ["port", "match", "unregister", "eventfd-from"],
  irqfd: ["gsi", "resample-from", "unregister", "eventfd-from"],
  "guest-memory": [],
  allocate: ["align"],
  release: [],
  raw: [],
};
const COMMON_FLAGS = ["socket", "timeout", "help"];

function checkFlags(cmd: string, p: Parsed): void {
  const takes = REQUEST_FLAGS[cmd];
  if (takes === undefined) throw new UsageError(`vmemd ctl: unknown request "${cmd}" (see vmemd ctl --help)`);
  for (const name of p.flags.keys()) {
    if (COMMON_FLAGS.includes(name) || takes.includes(name)) continue;
    const list = takes.length === 0 ? "no flags" : takes.map((f) => `--${f}`).join(", ");
    throw new UsageError(`vmemd ctl ${cmd}: --${name} does not apply (${cmd} takes ${list})`);
  }
  const needs = (name: string, on: string) => {
    if (p.flags.has(name) && !p.flags.has(on)) throw new UsageError(`vmemd ctl ${cmd}: --${name} applies only with --${on}`);
  };
  needs("offset", "file");
  needs("size", "file");
  needs("bar-offset", "bar");
}

/** "vmemd ctl REQUEST -h": the request's lines of CTL_HELP, with the options every request takes. */
function requestHelp(cmd: string): string {
  if (REQUEST_FLAGS[cmd] === undefined) throw new UsageError(`vmemd ctl: unknown request "${cmd}" (see vmemd ctl --help)`);
  const lines = CTL_HELP.split("\n");
  const start = lines.findIndex((l) => l.startsWith(`  ${cmd} `) || l === `  ${cmd}`);
  let end = start + 1;
  while (end < lines.length && /^ {3,}\S/.test(lines[end]!)) end++;
  const optionsAt = lines.findIndex((l) => l.startsWith("  --socket"));
  const options = lines.slice(optionsAt, lines.indexOf("", optionsAt));
  const exits = lines.slice(lines.indexOf("exit status:"));
  return [`usage: vmemd ctl --socket PATH [--timeout SECONDS] ${cmd} ...`, "", ...lines.slice(start, end), "", ...options, "", ...exits].join("\n");
}

/** Seconds, as --timeout takes them, in ms. */
function parseTimeout(text: string | undefined): number {
  if (text === undefined) return 30_000;
  if (!/^(\d+(\.\d*)?|\.\d+)$/.test(text) || Number(text) <= 0 || Number(text) > 86_400) {
    throw new UsageError(`vmemd ctl: --timeout: "${text}" is not a number of seconds above 0 (at most 86400)`);
  }
  return Number(text) * 1000;
}


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
  "eventfd-from": { value: true },
  port: { value: true },
  gsi: { value: true },
  "resample-from": { value: true },
  timeout: { value: true },
  help: { value: false },
};

export function toJson(value: unknown): string {
  return JSON.stringify(value, (_k, v) => (typeof v === "bigint" ? (v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v.toString()) : v instanceof Uint8Array ? [...v] : v));
}

/** A file the command line names, opened; one that cannot be is a usage error (exit 2). */
function openArg(path: string, mode: "r" | "r+", what: string): number {
  try {
    return openSync(path, mode);
  } catch (e) {
    throw new UsageError(`vmemd ctl: ${what}: cannot open ${path}: ${(e as NodeJS.ErrnoException).code ?? String(e)}`);
  }
}

/** The eventfd a binding request sends: --eventfd-from's, or a new one (closed with `fds`). */
function eventfdFor(p: Parsed, fds: number[]): number {
  const from = flag(p, "eventfd-from");
  if (from !== undefined) return inheritedEventfd(from); // the caller's: not closed here
  const ev = sys.eventfd();
  fds.push(ev);
  return ev;
}

/** --eventfd-from FD: an eventfd this process inherited as descriptor FD. */
function inheritedEventfd(text: string): number {
  if (!/^\d{1,9}$/.test(text)) throw new UsageError(`vmemd ctl: --eventfd-from: "${text}" is not a descriptor number`);
  const fd = Number(text);
  let target: string;
  try {
    target = readlinkSync(`/proc/self/fd/${fd}`);
  } catch {
    throw new UsageError(`vmemd ctl: --eventfd-from: descriptor ${fd} is not open (pass it from the shell, e.g. 3<&N)`);
  }
  if (target !== "anon_inode:[eventfd]") throw new UsageError(`vmemd ctl: --eventfd-from: descriptor ${fd} is not an eventfd (${target})`);
  return fd;
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
        const fd = openArg(file!, prot.write ? "r+" : "r", "--file");
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
      return { IoEventRaw: { event: eventfdFor(p, fds), addr: parseNumber(addr, "--addr"), datamatch: datamatch(flag(p, "match")), register: !p.flags.has("unregister") } };
    }
    case "ioevent-pio": {
      need(0, "ioevent-pio --port PORT [--match u8=VALUE] [--unregister]");
      const port = flag(p, "port");
      if (port === undefined) throw new UsageError("vmemd ctl ioevent-pio: --port PORT is required");
      const n = parseNumber(port, "--port");
      if (n > 0xffff) throw new UsageError(`vmemd ctl ioevent-pio: --port ${port} is not a 16-bit port`);
      return { IoEventPio: { event: eventfdFor(p, fds), port: n, datamatch: datamatch(flag(p, "match")), register: !p.flags.has("unregister") } };
    }
    case "irqfd": {
      need(0, "irqfd --gsi N [--resample-from FD] [--unregister]");
      const gsi = flag(p, "gsi");
      if (gsi === undefined) throw new UsageError("vmemd ctl irqfd: --gsi N is required");
      const resample = flag(p, "resample-from");
      return {
        IrqFd: { event: eventfdFor(p, fds), gsi: parseNumber(gsi, "--gsi"), resample: resample === undefined ? null : inheritedEventfd(resample), register: !p.flags.has("unregister") },
      };
    }
    case "guest-memory":
      need(0, "guest-memory");
      return "GetGuestMemory";
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
  const [cmd, ...args] = p.positional;
  if (p.flags.has("help")) {
    process.stdout.write(cmd === undefined ? CTL_HELP : requestHelp(cmd));
    return 0;
  }
  const socket = flag(p, "socket");
  if (socket === undefined) throw new UsageError("vmemd ctl: --socket PATH is required");
  if (cmd === undefined) throw new UsageError("vmemd ctl: which request? (see vmemd ctl --help)");
  checkFlags(cmd, p);
  const timeoutMs = parseTimeout(flag(p, "timeout"));
  const fds: number[] = [];
  try {
    let resp: VmMemoryResponse;
    if (cmd === "mmap-register") {
      const m = mmapRequest(p, fds);
      resp = talk(socket, timeoutMs, (client, left) => {
        left();
        try {
          return { RegisterMemory: client.mmapAndRegisterMemory(m.shm, m.dest, m.maps) };
        } catch (e) {
          if (e instanceof VmemError) return { Err: { errno: e.errno, chain: e.chain } };
          throw e;
        }
      });
    } else {
      const req = buildRequest(cmd, args, p, fds);
      resp = talk(socket, timeoutMs, (client, left) => {
        left();
        const r = client.request(req);
        // GetState's lists are first pages: fetch the rest, so what is shown is everything.
        if (req === "GetState" && typeof r === "object" && "State" in r) return { State: completeState(client, r.State, left) };
        // The RAM's descriptors are no use to a shell: closed, and left out of what is printed.
        if (typeof r === "object" && "GuestMemory" in r) {
          for (const range of r.GuestMemory.ranges) closeSync(range.descriptor);
          return { GuestMemory: { ranges: r.GuestMemory.ranges.map(({ descriptor: _fd, ...rest }) => rest) } } as unknown as typeof r;
        }
        return r;
      });
    }
    if (cmd === "state" && !p.flags.has("json") && typeof resp === "object" && "State" in resp) {
      await print(drawState(resp.State as VmState, p.flags.has("all")));
    } else {
      await print(toJson(resp) + "\n");
    }
    return typeof resp === "object" && "Err" in resp ? EXIT_ERR : 0;
  } catch (e) {
    if (e instanceof UsageError || e instanceof ExitError) throw e;
    // Anything else failed here, before a request went out: never 1, which means vmemd said Err.
    throw new ExitError(`vmemd ctl: ${e instanceof Error ? e.message : String(e)}`, EXIT_LOCAL);
  } finally {
    for (const fd of fds) closeSync(fd);
  }
}

/**
 * Connects and runs `exchange`; every way of not getting an answer (no socket, refused,
 * closed, past the deadline, unreadable) is exit status 3. `left()`, called before each
 * request, gives the client what is left of the timeout.
 */
function talk(socket: string, timeoutMs: number, exchange: (client: VmemClient, left: () => void) => VmMemoryResponse): VmMemoryResponse {
  let client: VmemClient;
  try {
    client = VmemClient.connect(socket);
  } catch (e) {
    throw new ExitError(`vmemd ctl: ${e instanceof sys.SysError ? sys.sysMessage(`cannot connect to ${socket}`, e.errno) : String(e)}`, EXIT_UNREACHABLE);
  }
  const deadline = performance.now() + timeoutMs;
  const noAnswer = () => new ExitError(`vmemd ctl: no answer from vmemd at ${socket} within ${timeoutMs / 1000} s`, EXIT_UNREACHABLE);
  const left = () => {
    const ms = Math.ceil(deadline - performance.now());
    if (ms <= 0) throw noAnswer();
    client.timeoutMs = ms;
  };
  try {
    return exchange(client, left);
  } catch (e) {
    if (e instanceof ExitError || e instanceof UsageError) throw e;
    if (e instanceof sys.SysError && e.errno === sys.Errno.ETIMEDOUT) throw noAnswer();
    // A server that refuses the peer (--allow-uid, the connection limit) accepts and closes.
    if (e instanceof sys.SysError && (e.errno === sys.Errno.EPIPE || e.errno === sys.Errno.ECONNRESET)) {
      throw new ExitError(`vmemd ctl: vmemd at ${socket} closed the connection (${e.code})`, EXIT_UNREACHABLE);
    }
    if (e instanceof VmemError) throw new ExitError(`vmemd ctl: vmemd at ${socket} sent an answer ctl cannot read: ${e.message}`, EXIT_UNREACHABLE);
    throw new ExitError(`vmemd ctl: talking to vmemd at ${socket}: ${e instanceof Error ? e.message : String(e)}`, EXIT_UNREACHABLE);
  } finally {
    client.close();
  }
}

/** A State whose region and allocation lists are complete (every page fetched). */
function completeState(client: VmemClient, s: VmState, left: () => void): VmState {
  const regions = [...s.regions];
  for (let from = s.regions_next; from !== null; ) {
    left();
    const page = client.getRegions(from);
    regions.push(...page.regions);
    from = page.next;
  }
  const allocations = [...s.allocations];
  for (let from = s.allocations_next; from !== null; ) {
    left();
    const page = client.getAllocations(from);
    allocations.push(...page.allocations);
    from = page.next;
  }
  return { ...s, regions, regions_next: null, allocations, allocations_next: null };
}

/** MmapAndRegisterMemory's parts: the memfd, where it goes, the files mapped into it (descriptors in `fds`). */
function mmapRequest(p: Parsed, fds: number[]): { shm: { descriptor: number; size: number }; dest: VmMemoryDestination; maps: VmMemoryFileMapping[] } {
  const shm = flag(p, "shm");
  if (shm === undefined) throw new UsageError("vmemd ctl mmap-register: --shm SIZE is required");
  const size = parseSize(shm, "--shm");
  const dest = destination(p);
  const maps = (p.flags.get("map") ?? []).map((m) => {
    const at = /^(.+)@([^+]+)(?:\+(.+))?$/.exec(m);
    if (!at) throw new UsageError(`--map: "${m}" is not FILE@MEM_OFFSET[+FILE_OFFSET]`);
    const fd = openArg(at[1]!, "r", "--map");
    fds.push(fd);
    const fileOffset = at[3] === undefined ? 0 : parseNumber(at[3], "--map");
    const length = Math.ceil((fstatSync(fd).size - fileOffset) / 4096) * 4096;
    return { file: fd, length, mem_offset: parseNumber(at[2]!, "--map"), file_offset: fileOffset };
  });
  const fd = newMemfd(size);
  fds.push(fd);
  return { shm: { descriptor: fd, size }, dest, maps };
}
