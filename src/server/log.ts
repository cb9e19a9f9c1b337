// Logs: one line per event on stderr, written with write(2) so a line is never
// held back while the main thread sits in epoll_wait (BUN_NOTES.md).
import * as sys from "../sys";

export type LogLevel = "debug" | "info" | "warn" | "error";
export type LogFormat = "text" | "json";
const RANK: Record<LogLevel, number> = { debug: 0, info: 1, warn: 2, error: 3 };

export class Logger {
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
    const bytes = Buffer.from(line + "\n");
    try {
      sys.write(this.fd, bytes);
    } catch {
      // A closed stderr must not take the server down.
    }
  }
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
