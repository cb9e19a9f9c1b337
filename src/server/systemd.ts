// systemd's two interfaces for a service, without libsystemd: socket activation
// (sd_listen_fds(3): LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES) and readiness, status and
// watchdog notifications (sd_notify(3): NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID).
import * as sys from "../sys";
import type { Logger } from "./log";

/** systemd/sd-daemon.h: SD_LISTEN_FDS_START, the first descriptor passed. */
export const SD_LISTEN_FDS_START = 3;

export interface ListenFd {
  fd: number;
  /** Its name from LISTEN_FDNAMES (FileDescriptorName=, or the socket unit's name); null if none. */
  name: string | null;
}

/**
 * sd_listen_fds(3) with unset_environment: the descriptors the service manager passed,
 * from 3 on, or null when none were passed to this process (no LISTEN_FDS, or a
 * LISTEN_PID that is another process's: the variables were inherited, not meant for us).
 * The three variables are unset either way, as sd_listen_fds(1) does, so nothing vmemd
 * starts could take them for its own. A malformed value is an error, not "none".
 */
export function takeListenFds(env: Record<string, string | undefined> = process.env): ListenFd[] | null {
  const pidText = env.LISTEN_PID;
  const fdsText = env.LISTEN_FDS;
  const namesText = env.LISTEN_FDNAMES;
  for (const name of ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"]) {
    if (env[name] !== undefined) sys.unsetEnv(name);
  }
  if (pidText === undefined || fdsText === undefined) return null;
  if (!/^\d{1,10}$/.test(pidText)) throw new Error(`LISTEN_PID="${pidText}" is not a process id`);
  if (Number(pidText) !== sys.getpid()) return null;
  if (!/^\d{1,9}$/.test(fdsText)) throw new Error(`LISTEN_FDS="${fdsText}" is not a count of descriptors`);
  const n = Number(fdsText);
  if (n === 0) return null; // sd_listen_fds' 0: nothing passed
  const names = namesText === undefined ? [] : namesText.split(":");
  const out: ListenFd[] = [];
  for (let i = 0; i < n; i++) out.push({ fd: SD_LISTEN_FDS_START + i, name: names[i] || null });
  return out;
}

/** What STATUS= reports: live counts, read on the notifier's cadence. */
export type StatusSource = () => string;

/** How often STATUS= is refreshed (when its text changed). */
const STATUS_INTERVAL_MS = 1000;

/**
 * sd_notify(3) over NOTIFY_SOCKET: a non-blocking SOCK_DGRAM socket, made and connected at
 * start (the sandbox refuses socket() and connect() later; connected, it can reach nothing
 * but the manager), and one send per notification. A path or an abstract "@name" is
 * accepted. A notification that cannot be sent (a full queue, the receiver gone) is dropped
 * and logged: the manager's absence never stops serving.
 */
export class Notifier {
  private lastStatus = "";
  private nextStatusAt = 0;
  private nextWatchdogAt = Infinity;
  private readonly encoder = new TextEncoder();

  private constructor(
    private readonly fd: number,
    readonly socket: string,
    /** Half of WATCHDOG_USEC, in ms; null when the manager wants no watchdog pings. */
    readonly watchdogIntervalMs: number | null,
    private readonly log: Logger,
  ) {}

  /** The notifier NOTIFY_SOCKET asks for, or null when it is unset (or unusable: logged). */
  static fromEnv(log: Logger, env: Record<string, string | undefined> = process.env): Notifier | null {
    const socket = env.NOTIFY_SOCKET;
    if (socket === undefined || socket === "") return null;
    if (!socket.startsWith("/") && !socket.startsWith("@")) {
      log.warn("NOTIFY_SOCKET is neither a path nor an abstract @name; not notifying", { notify_socket: socket });
      return null;
    }
    let fd = -1;
    try {
      fd = sys.unixSocket(sys.SOCK_DGRAM, true);
      sys.connectUnixName(fd, socket);
    } catch (e) {
      log.warn("cannot notify the service manager", { notify_socket: socket, error: String(e) });
      if (fd !== -1) sys.close(fd);
      return null;
    }
    return new Notifier(fd, socket, watchdogInterval(env, log), log);
  }

  /** READY=1 with the first STATUS=, and the first watchdog ping. */
  ready(status: string): void {
    this.lastStatus = status;
    const now = performance.now();
    this.nextStatusAt = now + STATUS_INTERVAL_MS;
    const lines = ["READY=1", `STATUS=${status}`];
    if (this.watchdogIntervalMs !== null) {
      lines.push("WATCHDOG=1");
      this.nextWatchdogAt = now + this.watchdogIntervalMs;
    }
    this.send(lines.join("\n"));
  }

  /**
   * Called on every turn of the server loop (at least every tick, 100 ms): a watchdog
   * ping when one is due, and STATUS= once a second when the counts changed. Cheap when
   * nothing is due: one clock read.
   */
  turn(status: StatusSource): void {
    const now = performance.now();
    if (now < this.nextStatusAt && now < this.nextWatchdogAt) return;
    const lines: string[] = [];
    if (now >= this.nextWatchdogAt) {
      lines.push("WATCHDOG=1");
      this.nextWatchdogAt = now + this.watchdogIntervalMs!;
    }
    if (now >= this.nextStatusAt) {
      this.nextStatusAt = now + STATUS_INTERVAL_MS;
      const text = status();
      if (text !== this.lastStatus) {
        this.lastStatus = text;
        lines.push(`STATUS=${text}`);
      }
    }
    if (lines.length > 0) this.send(lines.join("\n"));
  }

  /** STOPPING=1, once shutdown begins; no pings after it. */
  stopping(reason: string): void {
    this.nextWatchdogAt = Infinity;
    this.nextStatusAt = Infinity;
    this.send(`STOPPING=1\nSTATUS=shutting down (${reason})`);
  }

  close(): void {
    try {
      sys.close(this.fd);
    } catch {}
  }

  private send(text: string): void {
    try {
      if (!sys.sendDatagram(this.fd, this.encoder.encode(text))) {
        this.log.limited.warn("the service manager's notification queue is full; dropped a notification", { notify_socket: this.socket });
      }
    } catch (e) {
      this.log.limited.warn("could not notify the service manager", { notify_socket: this.socket, error: String(e) });
    }
  }
}

/**
 * sd_watchdog_enabled(3): half of WATCHDOG_USEC in ms, when it is set to a positive
 * number and WATCHDOG_PID (if set) is this process; null otherwise.
 */
function watchdogInterval(env: Record<string, string | undefined>, log: Logger): number | null {
  const usecText = env.WATCHDOG_USEC;
  if (usecText === undefined) return null;
  const pidText = env.WATCHDOG_PID;
  if (pidText !== undefined && Number(pidText) !== sys.getpid()) return null;
  if (!/^\d{1,19}$/.test(usecText) || Number(usecText) === 0) {
    log.warn("WATCHDOG_USEC is not a positive number of microseconds; no watchdog pings", { watchdog_usec: usecText });
    return null;
  }
  return Number(usecText) / 2000;
}
