#!/usr/bin/env bun
// vmemd: a KVM memory plane served over a Unix socket. Entry point of the binary.
import pkg from "../package.json" with { type: "json" };
import { UsageError } from "./cli/args";

const HELP = `vmemd ${pkg.version}: a KVM VM's memory plane, served over a Unix socket

usage:
  vmemd serve --socket PATH [--memory 256M] [--pci-bar BB:DD.F/BAR=SIZE]... [options]
  vmemd ctl --socket PATH <request> [options]
  vmemd --version | --help

Run "vmemd serve --help" or "vmemd ctl --help" for each command's options.
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

try {
  process.exitCode = await main(process.argv.slice(2));
} catch (e) {
  if (e instanceof UsageError) {
    process.stderr.write(`${e.message}\n`);
    process.exitCode = 2;
  } else {
    process.stderr.write(`vmemd: ${e instanceof Error ? e.message : String(e)}\n`);
    process.exitCode = 1;
  }
}
process.exit(process.exitCode);
