// Logs: one line per event on stderr, written with write(2) so a line is never
// held back while the main thread sits in epoll_wait (Bun's own stream writes wait for its
// event loop, which does not turn then).
import * as sys from "../sys";

/** TextEncoder, not Buffer: the first use of Buffer sets it up (about 0.3 ms), and a line logged before ready would pay it. */
const utf8 = new TextEncoder();

export type LogLevel = "debug" | "info" | "warn" | "error";
export type LogFormat = "text" | "json";
const RANK: Record<LogLevel, number> = { debug: 0, info: 1, warn: 2, error: 3 };

export class Logger {
  /** For events a peer can cause as often as it likes: at most one line per second each. */
  readonly limited: RateLimitedLog = new RateLimitedLog(this);

  constructor(
    public level: LogLevel = "info",
    public format: LogFormat = "text",
    private readonly fd = 2,
  ) {}

  enabled(level: LogLevel): boolean {
    return RANK[level] >= RANK[this.level];
  }

  log(level: LogLevel, msg: string, fields: Record<string, unknown> = {}): void {
    if (!this.enabled(level)) return;
    const time = new Date().toISOString();
    let line: string;
    if (this.format === "json") {
      line = JSON.stringify({ time, level, msg, ...fields }, (_k, v) => (typeof v === "bigint" ? v.toString() : v));
    } else {
      const kv = Object.entries(fields)
        .map(([k, v]) => `${k}=${typeof v === "string" && /\s/.test(v) ? JSON.stringify(v) : String(v)}`)
        .join(" ");
      line = `${time} ${level.toUpperCase().padEnd(5)} ${msg}${kv ? " " + kv : ""}`;
    }
    if (this.dropped > 0) line = `${line} (${this.dropped} earlier log lines dropped: the log was full)`;
    const bytes = utf8.encode(line + "\n");
    // Never wait for the log: a reader that stops reading (a full pipe) must not stall the
    // server. A pipe that polls writable takes a line this short whole.
    try {
      if (sys.pollOne(this.fd, sys.POLLOUT, 0) & sys.POLLOUT) {
        sys.write(this.fd, bytes);
        this.dropped = 0;
      } else this.dropped++;
    } catch {
      // A closed stderr must not take the server down.
    }
  }

  /** Lines not written because the log could take no more at the time. */
  private dropped = 0;
  debug(msg: string, fields?: Record<string, unknown>): void {
    this.log("debug", msg, fields);
  }
  info(msg: string, fields?: Record<string, unknown>): void {
    this.log("info", msg, fields);
  }
  warn(msg: string, fields?: Record<string, unknown>): void {
    this.log("warn", msg, fields);
  }
  error(msg: string, fields?: Record<string, unknown>): void {
    this.log("error", msg, fields);
  }
}

/**
 * One line per interval for each kind of event (its message): the first event of an
 * interval is logged, later ones are counted, and the count rides on the next line logged
 * once the interval has passed. No timer: the clock is read when an event comes; flush()
 * writes counts still owed (at shutdown).
 */
export class RateLimitedLog {
  private readonly kinds = new Map<string, { level: LogLevel; last: number; suppressed: number }>();

  constructor(
    private readonly log: Logger,
    private readonly intervalMs = 1000,
    private readonly now: () => number = () => performance.now(),
  ) {}

  warn(msg: string, fields?: Record<string, unknown>): void {
    this.event("warn", msg, fields);
  }
  info(msg: string, fields?: Record<string, unknown>): void {
    this.event("info", msg, fields);
  }

  event(level: LogLevel, msg: string, fields: Record<string, unknown> = {}): void {
    if (this.due(level, msg)) this.emit(level, msg, fields);
  }

  /**
   * Whether an event of `msg` is to be logged now; if not, it is counted, as event() counts
   * it. When true, emit() logs it. For a caller whose fields cost something to build (a
   * peer's refused requests): they are built only for the line that is written.
   */
  due(level: LogLevel, msg: string): boolean {
    if (!this.log.enabled(level)) return false;
    const k = this.kinds.get(msg);
    if (k === undefined) return true;
    if (this.now() - k.last < this.intervalMs) {
      k.suppressed++;
      return false;
    }
    return true;
  }

  /** Logs an event due() said is due, with the count of those held back before it. */
  emit(level: LogLevel, msg: string, fields: Record<string, unknown> = {}): void {
    const t = this.now();
    const k = this.kinds.get(msg);
    if (k === undefined) {
      this.kinds.set(msg, { level, last: t, suppressed: 0 });
      return this.log.log(level, msg, fields);
    }
    this.log.log(level, k.suppressed > 0 ? `${msg} (and ${k.suppressed} more in the last ${seconds(t - k.last)})` : msg, fields);
    k.last = t;
    k.suppressed = 0;
  }

  /** Logs the counts not yet reported. */
  flush(): void {
    const t = this.now();
    for (const [msg, k] of this.kinds) {
      if (k.suppressed > 0) this.log.log(k.level, `${msg}: ${k.suppressed} more in the last ${seconds(t - k.last)}`);
      k.suppressed = 0;
      k.last = t;
    }
  }
}

function seconds(ms: number): string {
  return ms < 10_000 ? `${(ms / 1000).toFixed(1)}s` : `${Math.round(ms / 1000)}s`;
}
