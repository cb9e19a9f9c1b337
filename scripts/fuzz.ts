// The long fuzz run (protocol version 2, both encodings):
//   bun scripts/fuzz.ts [--packets N] [--connections C] [--seed S] [--binary dist/vmemd]
//                       [--window W] [--checkpoints K] [--json]
// Spawns the compiled server on its own temporary socket, sends N packets over C pipelined
// connections (test/fuzz_lib.ts says what and checks what), prints a summary and exits
// nonzero on any violation. Only the local socket is stressed; the run stops by itself.
import { existsSync } from "node:fs";
import { join, resolve } from "node:path";
import { runFuzz } from "../test/fuzz_lib";

const USAGE = "usage: bun scripts/fuzz.ts [--packets N] [--connections C] [--seed S] [--binary PATH] [--window W] [--checkpoints K] [--json]";

function parse(argv: string[]) {
  const o = { packets: 1_000_000, connections: 8, seed: 1, binary: join(import.meta.dir, "..", "dist", "vmemd"), window: 64, checkpoints: undefined as number | undefined, json: false };
  for (let i = 0; i < argv.length; i++) {
    const [flag, inline] = argv[i]!.split("=", 2) as [string, string | undefined];
    const value = () => {
      const v = inline ?? argv[++i];
      if (v === undefined) throw new Error(`${flag} needs a value\n${USAGE}`);
      return v;
    };
    const int = (min: number) => {
      const v = value().replace(/_/g, "");
      const n = /^\d+[kKmM]?$/.test(v) ? Number(v.replace(/[kKmM]$/, "")) * ({ k: 1e3, m: 1e6 }[v.slice(-1).toLowerCase()] ?? 1) : NaN;
      if (!Number.isSafeInteger(n) || n < min) throw new Error(`${flag}: "${v}" is not an integer of at least ${min}\n${USAGE}`);
      return n;
    };
    switch (flag) {
      case "--packets": o.packets = int(1); break;
      case "--connections": o.connections = int(1); break;
      case "--seed": o.seed = int(0); break;
      case "--binary": o.binary = resolve(value()); break;
      case "--window": o.window = int(1); break;
      case "--checkpoints": o.checkpoints = int(0); break;
      case "--json": o.json = true; break;
      case "-h":
      case "--help": console.log(USAGE); process.exit(0);
      default: throw new Error(`unknown argument ${argv[i]}\n${USAGE}`);
    }
  }
  return o;
}

let o: ReturnType<typeof parse>;
try {
  o = parse(process.argv.slice(2));
} catch (e) {
  console.error((e as Error).message);
  process.exit(2);
}
if (!existsSync(o.binary)) {
  console.error(`${o.binary} is missing; run "bun run build" first`);
  process.exit(2);
}
console.log(`fuzzing ${o.binary}: ${o.packets} packets, ${o.connections} connections, seed ${o.seed}`);
const report = await runFuzz({
  packets: o.packets,
  connections: o.connections,
  seed: o.seed,
  binary: o.binary,
  window: o.window,
  checkpoints: o.checkpoints,
  progress: (line) => console.log(`  ${new Date().toISOString().slice(11, 19)} ${line}`),
});
console.log(report.text);
if (o.json) {
  const s = report.stats;
  console.log(JSON.stringify({ ok: report.ok, violations: report.violationsByKind, packets: s.fuzzPackets, sync: s.syncPackets, connections: s.connectionsOpened, durationMs: Math.round(s.durationMs), responses: Object.fromEntries(s.responses), errnos: Object.fromEntries(s.errnos), final: s.final }));
}
process.exit(report.ok ? 0 : 1);
