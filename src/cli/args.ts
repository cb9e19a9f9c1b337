// Command-line parsing: flags, sizes with K/M/G, PCI BAR specs. A bad flag is a
// UsageError: one clear line and exit status 2. "-h" is "--help" wherever --help is.
import type { Alloc } from "../protocol";

export class UsageError extends Error {
  override name = "UsageError";
}

/** A failure that ends the command with its own exit status (ctl: 3, vmemd could not be reached). */
export class ExitError extends Error {
  override name = "ExitError";
  constructor(
    message: string,
    readonly status: number,
  ) {
    super(message);
  }
}

export interface FlagSpec {
  /** Takes a value (`--flag VALUE` or `--flag=VALUE`); otherwise a boolean switch. */
  value: boolean;
  repeat?: boolean;
}

export interface Parsed {
  flags: Map<string, string[]>;
  positional: string[];
}

export function parseFlags(argv: string[], spec: Record<string, FlagSpec>, command: string): Parsed {
  const flags = new Map<string, string[]>();
  const positional: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === "--") {
      positional.push(...argv.slice(i + 1));
      break;
    }
    if (arg === "-h" && spec.help !== undefined) {
      flags.set("help", ["true"]);
      continue;
    }
    if (!arg.startsWith("--")) {
      positional.push(arg);
      continue;
    }
    const eq = arg.indexOf("=");
    const name = arg.slice(2, eq === -1 ? undefined : eq);
    const s = spec[name];
    if (s === undefined) throw new UsageError(`${command}: unknown flag --${name} (see ${command} --help)`);
    let value = "true";
    if (s.value) {
      if (eq !== -1) value = arg.slice(eq + 1);
      else if (i + 1 < argv.length) value = argv[++i]!;
      else throw new UsageError(`${command}: --${name} needs a value`);
    } else if (eq !== -1) throw new UsageError(`${command}: --${name} takes no value`);
    const list = flags.get(name) ?? [];
    if (list.length > 0 && !s.repeat) throw new UsageError(`${command}: --${name} given more than once`);
    list.push(value);
    flags.set(name, list);
  }
  return { flags, positional };
}

export function flag(p: Parsed, name: string): string | undefined {
  return p.flags.get(name)?.[0];
}

const UNITS: Record<string, number> = { "": 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 };

/** "4096", "2M", "1G", "64KiB", "0x1000": bytes. Binary units. */
export function parseSize(text: string, what: string): number {
  const hexm = /^0x([0-9a-f]+)$/i.exec(text);
  if (hexm) return checkedSize(parseInt(hexm[1]!, 16), text, what);
  const m = /^(\d+)\s*([KMGT]?)(i?B)?$/i.exec(text);
  if (!m) throw new UsageError(`${what}: "${text}" is not a size (examples: 4096, 64K, 2M, 1G)`);
  return checkedSize(Number(m[1]) * UNITS[m[2]!.toUpperCase()]!, text, what);
}

function checkedSize(n: number, text: string, what: string): number {
  if (!Number.isSafeInteger(n)) throw new UsageError(`${what}: "${text}" is too large`);
  return n;
}

/** An address or number: decimal, 0x hex, or a size with a unit. */
export function parseNumber(text: string, what: string): number {
  return parseSize(text.replace(/_/g, ""), what);
}

/** "BB:DD.F/BAR" (hex bus and device, as lspci prints them). */
export function parsePciBar(text: string, what: string): Alloc {
  const m = /^([0-9a-f]{1,2}):([0-9a-f]{1,2})\.([0-7])\/([0-5])$/i.exec(text);
  if (!m) throw new UsageError(`${what}: "${text}" is not a PCI BAR (BB:DD.F/BAR, e.g. 00:05.0/2)`);
  const dev = parseInt(m[2]!, 16);
  if (dev > 31) throw new UsageError(`${what}: device ${dev} is above 31`);
  return { PciBar: { bus: parseInt(m[1]!, 16), dev, func: Number(m[3]), bar: Number(m[4]) } };
}

/** "BB:DD.F/BAR=SIZE" (serve --pci-bar). */
export function parsePciBarSize(text: string, what: string): { alloc: Alloc; size: number } {
  const eq = text.indexOf("=");
  if (eq === -1) throw new UsageError(`${what}: "${text}" needs =SIZE (e.g. 00:05.0/2=16M)`);
  return { alloc: parsePciBar(text.slice(0, eq), what), size: parseSize(text.slice(eq + 1), what) };
}

export function formatSize(n: number | bigint): string {
  const v = Number(n);
  for (const [unit, scale] of [["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 2 ** 10]] as const) {
    if (v >= scale && v % scale === 0) return `${v / scale} ${unit}`;
  }
  if (v >= 2 ** 20) return `${(v / 2 ** 20).toFixed(1)} MiB`;
  return `${v} B`;
}
