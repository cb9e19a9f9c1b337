#!/usr/bin/env bun
// vmemd: a KVM memory plane served over a Unix socket. Entry point of the binary.
import pkg from "../package.json" with { type: "json" };
import { ExitError, UsageError } from "./cli/args";

const HELP = `vmemd ${pkg.version}: a KVM VM's memory plane, served over a Unix socket

usage:
  vmemd serve --socket PATH [--memory 256M] [--pci-bar BB:DD.F/BAR=SIZE]... [options]
  vmemd ctl --socket PATH <request> [options]
  vmemd --version | -h | --help

Run "vmemd serve -h" or "vmemd ctl -h" for each command's options and exit statuses.
The wire protocol is in docs/protocol.md.
`;

async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  switch (cmd) {
    // Each command loads only its own modules: serve's time to a ready socket is benchmarked.
    case "serve":
      return (await import("./cli/serve")).serve(rest);
    case "ctl":
      return (await import("./cli/ctl")).ctl(rest);
    case "--version":
    case "version":
      process.stdout.write(`vmemd ${pkg.version}\n`);
      return 0;
    case "--help":
    case "-h":
    case "help":
      process.stdout.write(
        rest[0] === "serve" ? (await import("./cli/serve")).SERVE_HELP : rest[0] === "ctl" ? (await import("./cli/ctl")).CTL_HELP : HELP,
      );
      return 0;
    case undefined:
      process.stderr.write(HELP);
      return 2;
    default:
      throw new UsageError(`vmemd: unknown command "${cmd}" (try vmemd --help)`);
  }
}

/** Every error as one line, "vmemd serve: ..." or "vmemd ctl: ...", whoever threw it. */
function errorLine(cmd: string | undefined, e: unknown): string {
  const text = (e instanceof Error ? e.message : String(e)).replace(/\s*\n\s*/g, " ");
  if (text.startsWith("vmemd")) return text;
  return `${cmd === "serve" || cmd === "ctl" ? `vmemd ${cmd}` : "vmemd"}: ${text}`;
}

const argv = process.argv.slice(2);
try {
  process.exitCode = await main(argv);
} catch (e) {
  process.stderr.write(errorLine(argv[0], e) + "\n");
  process.exitCode = e instanceof UsageError ? 2 : e instanceof ExitError ? e.status : 1;
}
process.exit(process.exitCode);
