// `vmemd serve`: create the VM, listen, serve until SIGTERM/SIGINT.
import pkg from "../../package.json" with { type: "json" };
import * as sys from "../sys";
import { KvmVm } from "../kvm";
// Modules, not the packages' indexes: until the socket is ready serve loads nothing of the
// request path (the server, the executor, the wire description); see serve() below.
import { describeAlloc, SystemAllocator } from "../memory/allocator";
import { Refusal } from "../memory/error";
import type { ExecContext } from "../memory/executor";
import { RegionState } from "../memory/region_state";
import { DEFAULT_BUDGETS, mappingBudget } from "../server/budgets";
import { Logger, type LogFormat, type LogLevel } from "../server/log";
import { DEFAULT_SERVER_OPTIONS, descriptorsNeeded } from "../server/options";
import type { Server, ServerOptions } from "../server/server";
import { SocketFile } from "../server/socket_file";
import { Notifier, takeListenFds, type ListenFd } from "../server/systemd";
import { flag, parseFlags, parseNumber, parsePciBarSize, parseSize, UsageError } from "./args";
import type { GuestHandle } from "./guest";
import type { CpuidBit } from "../kvm/vcpu";
import { enterSandbox } from "./sandbox";

/** A command line for the serial console vmemd emulates, with early output. */
const DEFAULT_CMDLINE = "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1";

export const SERVE_HELP = `usage: vmemd serve --socket PATH [options]

Creates a KVM virtual machine and serves its memory plane on PATH.

  --socket PATH             Unix socket to listen on (SOCK_SEQPACKET); a stale socket there is
                            replaced, anything else refused. Optional when a service manager
                            passes the listening socket in (LISTEN_FDS); if given, it must be
                            that socket's path
  --memory SIZE             guest RAM (default 256M); K/M/G suffixes
  --prefault                touch all guest RAM at start rather than on the guest's first touch
  --pci-bar BB:DD.F/BAR=SIZE
                            allocate a PCI BAR at start (repeatable), e.g. 00:05.0/2=16M
  --socket-mode MODE        socket file mode, octal (default 0600)
  --allow-uid UID           accept only these users (repeatable; default: anyone who can open the socket)
  --max-connections N       concurrent clients (default ${DEFAULT_SERVER_OPTIONS.maxConnections})
  --max-file-mappings N     cap on MmapAndRegisterMemory's num_file_mappings (default ${DEFAULT_SERVER_OPTIONS.maxFileMappings})
  --max-regions-per-connection N
                            live regions one connection may register (default ${DEFAULT_BUDGETS.regionsPerConnection})
  --max-guest-bytes-per-connection SIZE
                            guest bytes one connection's regions may cover (default 64G)
  --max-guest-bytes SIZE    guest bytes all regions together may cover (default 256G; KVM keeps
                            per-page metadata for every slot, see docs/security.md)
  --max-mappings-per-connection N
                            host mappings one connection's regions may take (default ${DEFAULT_BUDGETS.mappingsPerConnection})
  --max-ioevents-per-connection N
                            ioeventfds one connection may register (default ${DEFAULT_BUDGETS.ioeventsPerConnection})
  --max-irqfds-per-connection N
                            irqfds one connection may register (default ${DEFAULT_BUDGETS.irqfdsPerConnection})
  --share-guest-memory-with UID
                            let this user's device processes map guest RAM (GetGuestMemory;
                            repeatable; default: nobody)
  --max-packet SIZE         largest request packet (default 64K, the protocol's maximum)
  --max-fds-per-packet N    descriptors in one packet (default 253, the kernel's SCM_MAX_FD)
  --release-on-disconnect   remove a client's regions and ioevents when it disconnects
  --die-with-parent         stop (as on SIGTERM) when the process that started vmemd exits
  --ready-fd N              once the socket accepts connections, write "ready\n" to descriptor N
                            (inherited from the parent) and close it, so a supervisor need not poll
  --guest FILE              run FILE as the guest (docs/boot.md)
  --kernel FILE             boot a Linux kernel, an ELF vmlinux or a bzImage (docs/boot.md)
  --initrd FILE             with --kernel: the initial ramdisk
  --cmdline STRING          with --kernel: the kernel command line (default "${DEFAULT_CMDLINE}")
  --cpuid-clear LEAF:REG:BIT
                            hide a CPUID feature bit from the guest (repeatable), e.g. 1:ecx:13
                            (CX16) on a KVM that cannot emulate CMPXCHG16B (docs/boot.md)
  --serial PATH             write the guest's serial output to PATH (default: stdout)
  --log-level LEVEL         debug, info, warn, error (default info)
  --log-format FORMAT       text or json (default text)
  --no-sandbox              serve without the seccomp filter and capability drop (docs/security.md)
  -h, --help                this text

Under systemd (contrib/systemd): a listening socket passed in by socket activation
(LISTEN_FDS, LISTEN_PID) is served as it is, never unlinked; with NOTIFY_SOCKET set,
vmemd sends READY=1 once it serves, STATUS= with its live counts, WATCHDOG=1 at half of
WATCHDOG_USEC, and STOPPING=1 as it shuts down.

exit status:
  0      stopped cleanly (SIGTERM, SIGINT, or the parent gone with --die-with-parent)
  1      failed (at start, or while serving)
  2      usage error
  3 + V  the guest wrote V to port 0xF4 (V up to 122; any larger V gives 125), so a guest's
         status never reads as one of vmemd's own (docs/boot.md)
`;

const SPEC = {
  socket: { value: true },
  memory: { value: true },
  prefault: { value: false },
  "pci-bar": { value: true, repeat: true },
  "socket-mode": { value: true },
  "allow-uid": { value: true, repeat: true },
  "max-connections": { value: true },
  "max-file-mappings": { value: true },
  "max-regions-per-connection": { value: true },
  "max-guest-bytes-per-connection": { value: true },
  "max-guest-bytes": { value: true },
  "max-mappings-per-connection": { value: true },
  "max-ioevents-per-connection": { value: true },
  "max-irqfds-per-connection": { value: true },
  "share-guest-memory-with": { value: true, repeat: true },
  "max-packet": { value: true },
  "max-fds-per-packet": { value: true },
  "release-on-disconnect": { value: false },
  "die-with-parent": { value: false },
  "ready-fd": { value: true },
  guest: { value: true },
  kernel: { value: true },
  initrd: { value: true },
  cmdline: { value: true },
  "cpuid-clear": { value: true, repeat: true },
  serial: { value: true },
  "log-level": { value: true },
  "log-format": { value: true },
  "no-sandbox": { value: false },
  help: { value: false },
};

export async function serve(argv: string[]): Promise<number> {
  const parentAtStart = sys.getppid();
  // First, as sd_listen_fds does: the variables are unset whatever follows.
  const listenFds = takeListenFds();
  const p = parseFlags(argv, SPEC, "vmemd serve");
  if (p.flags.has("help")) {
    process.stdout.write(SERVE_HELP);
    return 0;
  }
  if (p.positional.length > 0) throw new UsageError(`vmemd serve: unexpected argument "${p.positional[0]}"`);
  if (p.flags.has("cpuid-clear") && flag(p, "guest") === undefined && flag(p, "kernel") === undefined) {
    throw new UsageError("vmemd serve: --cpuid-clear applies to a guest (--guest or --kernel)");
  }
  if (flag(p, "guest") !== undefined && flag(p, "kernel") !== undefined) throw new UsageError("vmemd serve: --guest and --kernel are two ways to run a guest; give one");
  for (const f of ["initrd", "cmdline"]) {
    if (flag(p, f) !== undefined && flag(p, "kernel") === undefined) throw new UsageError(`vmemd serve: --${f} applies to --kernel only`);
  }
  const socketFlag = flag(p, "socket");
  if (socketFlag === undefined && listenFds === null) throw new UsageError("vmemd serve: --socket PATH is required (unless a service manager passes the socket in)");
  const memory = parseSize(flag(p, "memory") ?? "256M", "--memory");
  if (memory < 1 << 20 || memory % 4096 !== 0) throw new UsageError(`--memory: ${memory} must be a multiple of 4K and at least 1M`);
  const modeText = flag(p, "socket-mode") ?? "0600";
  if (!/^0?[0-7]{3}$/.test(modeText)) throw new UsageError(`--socket-mode: "${modeText}" is not an octal mode like 0600`);
  const level = (flag(p, "log-level") ?? "info") as LogLevel;
  if (!["debug", "info", "warn", "error"].includes(level)) throw new UsageError(`--log-level: "${level}" is not debug, info, warn or error`);
  const format = (flag(p, "log-format") ?? "text") as LogFormat;
  if (!["text", "json"].includes(format)) throw new UsageError(`--log-format: "${format}" is not text or json`);
  // Loops, not .map(): the first Array.prototype.map in a process is compiled then, about
  // 0.2 ms of every start (measured in a compiled binary), and before ready nothing else uses it.
  const bars: ReturnType<typeof parsePciBarSize>[] = [];
  for (const t of p.flags.get("pci-bar") ?? []) bars.push(parsePciBarSize(t, "--pci-bar"));
  const uids = (name: string) => {
    const out: number[] = [];
    for (const t of p.flags.get(name) ?? []) {
      if (!/^\d+$/.test(t)) throw new UsageError(`--${name}: "${t}" is not a numeric uid`);
      out.push(Number(t));
    }
    return out;
  };
  const allowUids = uids("allow-uid");
  const shareGuestMemoryWith = uids("share-guest-memory-with");
  const count = (name: string, dflt: number) => {
    const t = flag(p, name);
    if (t === undefined) return dflt;
    const n = parseNumber(t, `--${name}`);
    if (n < 1) throw new UsageError(`--${name}: must be at least 1`);
    return n;
  };
  const size = (name: string, dflt: number) => {
    const t = flag(p, name);
    return t === undefined ? dflt : parseSize(t, `--${name}`);
  };
  const maxPacket = flag(p, "max-packet") === undefined ? DEFAULT_SERVER_OPTIONS.maxPacket : parseSize(flag(p, "max-packet")!, "--max-packet");
  if (maxPacket < 16 || maxPacket > DEFAULT_SERVER_OPTIONS.maxPacket) throw new UsageError(`--max-packet: must be between 16 and ${DEFAULT_SERVER_OPTIONS.maxPacket}`);
  const maxFds = count("max-fds-per-packet", DEFAULT_SERVER_OPTIONS.maxFdsPerPacket);
  if (maxFds > sys.SCM_MAX_FD) throw new UsageError(`--max-fds-per-packet: at most ${sys.SCM_MAX_FD} (the kernel's SCM_MAX_FD)`);
  const readyText = flag(p, "ready-fd");
  let readyFd = -1;
  if (readyText !== undefined) {
    if (!/^\d{1,9}$/.test(readyText)) throw new UsageError(`--ready-fd: "${readyText}" is not a descriptor number`);
    readyFd = Number(readyText);
    let type: number;
    try {
      type = sys.fstat(readyFd).mode & sys.S_IFMT;
    } catch {
      throw new UsageError(`--ready-fd: ${readyFd} is not an open descriptor`);
    }
    // Open for writing, and a pipe, socket, file or terminal: never the runtime's own epoll
    // or eventfd. Close-on-exec says nothing: the runtime sets it on every inherited
    // descriptor from 4 up before our code runs.
    const writable = (sys.fcntl(readyFd, sys.F_GETFL) & sys.O_ACCMODE) !== sys.O_RDONLY;
    if (!writable || (type !== sys.S_IFIFO && type !== sys.S_IFSOCK && type !== sys.S_IFREG && type !== sys.S_IFCHR)) {
      throw new UsageError(`--ready-fd: descriptor ${readyFd} is not a writable pipe, socket, file or terminal passed by the parent`);
    }
  }
  const log = new Logger(level, format);
  const adopted = listenFds === null ? undefined : adoptListener(listenFds, socketFlag, p.flags.has("socket-mode"), readyFd, log);
  const socketPath = adopted?.path ?? socketFlag!;
  // Before the sandbox, which refuses socket() and connect().
  const notifier = Notifier.fromEnv(log);

  // crosvm raises RLIMIT_NOFILE for MmapAndRegisterMemory; vmemd does it once, at start.
  const nofile = sys.getrlimit(sys.RLIMIT_NOFILE);
  if (nofile.cur < nofile.max) sys.setrlimit(sys.RLIMIT_NOFILE, { cur: nofile.max, max: nofile.max });

  // The in-kernel interrupt controller and timer when a guest runs: without one there is no
  // interrupt to deliver (IrqFd answers ENOTSUP), and KVM's first memory slot change after
  // creating it waits some 5-10 ms for a grace period, start-up's largest single cost.
  const runsGuest = flag(p, "guest") !== undefined || flag(p, "kernel") !== undefined;
  const vm = KvmVm.create({ memory, prefault: p.flags.has("prefault"), irqchip: runsGuest });
  let guest: GuestHandle | undefined;
  // The listener bound before the server exists, and whether the loop took it over (and
  // with it removing the socket file at the end).
  let bound: SocketFile | undefined;
  let listening: Server | null = null;
  let serving = false;
  try {
    const allocator = new SystemAllocator(memory, vm.physAddrLimit);
    for (const b of bars) {
      const a = allocator.allocate(b.alloc, b.size);
      if (a instanceof Refusal) throw new UsageError(`--pci-bar: ${a.chain[0]}`);
      log.info("allocated PCI BAR", { bar: describeAlloc(b.alloc), start: "0x" + a.start.toString(16), size: a.size });
    }
    const ctx: ExecContext = { vm, allocator, state: new RegionState(), vcpu: () => guest?.summary() ?? null };
    // Until the server exists (see below) it has no connections.
    let server: Server | null = null;
    const status = () =>
      `${plural(server?.connectionCount ?? 0, "connection")}, ${plural(ctx.state.regions.size, "region")}, ${vm.slotsUsed()}/${vm.slotsMax} slots`;
    const serverOpts: ServerOptions = {
      socketPath,
      adopted,
      onTurn: notifier === null ? undefined : () => notifier.turn(status),
      onShutdown: (reason: string) => notifier?.stopping(reason),
      socketMode: parseInt(modeText, 8),
      maxConnections: count("max-connections", DEFAULT_SERVER_OPTIONS.maxConnections),
      maxFileMappings: count("max-file-mappings", DEFAULT_SERVER_OPTIONS.maxFileMappings),
      allowUids,
      maxPacket,
      maxFdsPerPacket: maxFds,
      budgets: {
        regionsPerConnection: count("max-regions-per-connection", DEFAULT_BUDGETS.regionsPerConnection),
        guestBytesPerConnection: size("max-guest-bytes-per-connection", DEFAULT_BUDGETS.guestBytesPerConnection),
        guestBytes: size("max-guest-bytes", DEFAULT_BUDGETS.guestBytes),
        mappingsPerConnection: count("max-mappings-per-connection", DEFAULT_BUDGETS.mappingsPerConnection),
        mappings: mappingBudget(),
        ioeventsPerConnection: count("max-ioevents-per-connection", DEFAULT_BUDGETS.ioeventsPerConnection),
        ioevents: DEFAULT_BUDGETS.ioevents,
        irqfdsPerConnection: count("max-irqfds-per-connection", DEFAULT_BUDGETS.irqfdsPerConnection),
        irqfds: DEFAULT_BUDGETS.irqfds,
      },
      shareGuestMemoryWith,
      releaseOnDisconnect: p.flags.has("release-on-disconnect"),
      log,
    };
    const need = descriptorsNeeded(serverOpts);
    const have = sys.getrlimit(sys.RLIMIT_NOFILE).cur;
    if (have < need) {
      log.warn("the descriptor limit is below what the budgets can make vmemd hold; packets' descriptors may be cut short", { nofile: have, needed: need });
    }
    // A signal before the server exists is kept for it: it stops as soon as it runs.
    let stopSignal: string | null = null;
    const onSignal = (sig: string) => () => {
      if (server !== null) server.stop(sig, 0);
      else stopSignal ??= sig;
    };
    process.on("SIGTERM", onSignal("SIGTERM"));
    process.on("SIGINT", onSignal("SIGINT"));
    // A closed terminal (SIGHUP) or a stray SIGUSR1/SIGUSR2 would kill vmemd by default and
    // leave its socket file behind; there is nothing to reload, so they are logged and ignored.
    for (const sig of ["SIGHUP", "SIGUSR1", "SIGUSR2"] as const) process.on(sig, () => log.limited.info(`ignored ${sig}`));
    // For supervisors and test harnesses: a parent that dies must not leave vmemd behind.
    if (p.flags.has("die-with-parent")) sys.dieWithParent(15 /* SIGTERM */, parentAtStart);
    const newServer = async (opts: ServerOptions): Promise<Server> => {
      const { Server } = await import("../server/server");
      const s = new Server(ctx, opts);
      if (stopSignal !== null) s.stop(stopSignal, 0);
      return s;
    };
    // The guest first: a bad --guest fails before there is a socket file to leave behind.
    // Its modules load only when a guest runs, and it needs the server (its eventfd joins
    // the loop), which then binds the socket itself.
    const guestPath = flag(p, "guest");
    const kernelPath = flag(p, "kernel");
    if (guestPath !== undefined || kernelPath !== undefined) {
      server = await newServer(serverOpts);
      const { attachGuest } = await import("./guest");
      const serialPath = flag(p, "serial");
      const cpuidClear = (p.flags.get("cpuid-clear") ?? []).map(parseCpuidBit);
      guest =
        guestPath !== undefined
          ? attachGuest(vm, server, { guestPath, serialPath, log, cpuidClear })
          : attachGuest(vm, server, { kernelPath: kernelPath!, initrdPath: flag(p, "initrd"), cmdline: flag(p, "cmdline") ?? DEFAULT_CMDLINE, serialPath, log, cpuidClear });
      server.listen();
      listening = server;
    } else {
      // Without a guest the socket is bound and listening (SocketFile.bind, what
      // Server.listen does) before the server's modules are even loaded: a client that
      // connects waits in the backlog, and nothing is read until the loop runs. Loading
      // the request path (the wire description's tables, the executor) and building the
      // server's buffers come after ready, like the sandbox: 1.2 ms (marks from exec).
      bound = adopted ?? SocketFile.bind(socketPath, serverOpts.socketMode, log);
    }
    // Ready before the sandbox: nothing a peer sends is read until the loop runs, after it,
    // so a supervisor need not wait for it (about 0.4 ms, with the filter assembled at
    // build time: sandbox_filter.ts).
    if (readyFd !== -1) notifyReady(readyFd, log);
    notifier?.ready(status());
    // Whoever was told may share this CPU (the bench pins both to one): let it run now,
    // not once the rest of the set-up below is done. (sys.schedYield says more.)
    if (readyFd !== -1 || notifier !== null) sys.schedYield();
    if (server === null) {
      server = await newServer({ ...serverOpts, adopted: bound! });
      server.listen();
      listening = server;
    }
    if (!p.flags.has("no-sandbox")) enterSandbox(log);
    log.info("vmemd ready", {
      version: pkg.version,
      socket: socketPath,
      ...(adopted ? { activated: true } : {}),
      memory,
      phys_bits: vm.physAddrBits,
      slots_max: vm.slotsMax,
      nofile: String(sys.getrlimit(sys.RLIMIT_NOFILE).cur),
      pid: process.pid,
    });
    const running = server.run();
    serving = true;
    return await running;
  } finally {
    // Failed between binding and serving: the socket file is not left behind.
    if (!serving) {
      if (listening !== null) listening.discard();
      else bound?.remove();
    }
    // After the loop has returned: stop() closes the eventfd the loop was watching.
    await guest?.stop();
    vm.close();
    notifier?.close();
  }
}

/** "LEAF:REG:BIT" (--cpuid-clear), the leaf in decimal or 0x hex. */
function parseCpuidBit(text: string): CpuidBit {
  const m = /^(0x[0-9a-f]+|\d+):(eax|ebx|ecx|edx):(\d+)$/i.exec(text);
  if (!m || Number(m[3]) > 31) throw new UsageError(`--cpuid-clear: "${text}" is not LEAF:REG:BIT (e.g. 1:ecx:13)`);
  return { leaf: Number(m[1]), reg: m[2]!.toLowerCase() as CpuidBit["reg"], bit: Number(m[3]) };
}

function plural(n: number, word: string): string {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

/**
 * The one listener a service manager passed (socket activation), checked and adopted.
 * --socket, when given, must name it; --socket-mode has no say over a socket vmemd did not
 * create (the socket unit's SocketMode= does).
 */
function adoptListener(fds: ListenFd[], socketFlag: string | undefined, modeGiven: boolean, readyFd: number, log: Logger): SocketFile {
  if (fds.length !== 1) {
    const names = fds.map((f) => `${f.fd}${f.name ? ` (${f.name})` : ""}`).join(", ");
    throw new UsageError(`vmemd serve: the service manager passed ${fds.length} descriptors (${names}); vmemd serves exactly one listening socket`);
  }
  const fd = fds[0]!.fd;
  if (modeGiven) throw new UsageError("vmemd serve: --socket-mode does not apply to a socket the service manager passed in (set SocketMode= in its socket unit)");
  if (readyFd === fd) throw new UsageError(`vmemd serve: --ready-fd ${readyFd} is the listening socket the service manager passed in`);
  const adopted = SocketFile.adopt(fd, log);
  // Abstract names ("@name") compare as they are; paths after resolving a relative one.
  // node:path is loaded here only: importing it costs about 0.25 ms of every start.
  const { resolve } = require("node:path") as typeof import("node:path");
  const same = (a: string, b: string) => (a.startsWith("@") || b.startsWith("@") ? a === b : resolve(a) === resolve(b));
  if (socketFlag !== undefined && !same(socketFlag, adopted.path)) {
    adopted.remove(); // closes it; the file is the manager's
    throw new UsageError(`vmemd serve: --socket ${socketFlag} is not the socket the service manager passed in (${adopted.path || "unnamed"})`);
  }
  return adopted;
}

/**
 * --ready-fd: one line, then the descriptor is closed (standard streams stay open). A full
 * non-blocking pipe is waited on (up to a second), not given up on.
 */
function notifyReady(fd: number, log: Logger): void {
  try {
    const line = new TextEncoder().encode("ready\n");
    for (let done = 0; done < line.byteLength; ) {
      try {
        done += sys.write(fd, line.subarray(done));
      } catch (e) {
        if (e instanceof sys.SysError && e.errno === sys.Errno.EAGAIN && sys.pollOne(fd, sys.POLLOUT, 1000) > 0) continue;
        throw e;
      }
    }
  } catch (e) {
    // The reader may be gone; serving goes on regardless (it sees EOF without the line).
    log.warn("could not write to --ready-fd", { fd, error: String(e) });
  }
  if (fd > 2) {
    try {
      sys.close(fd);
    } catch {}
  }
}
