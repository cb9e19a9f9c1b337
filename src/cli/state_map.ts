// GetState drawn as a guest physical map a person reads at a glance.
import { highMmioStart, LOW_MMIO_END, PCI_HOLE_START } from "../kvm/layout";
import { describeAlloc } from "../memory/allocator";
import type { VmState } from "../protocol";
import { formatSize } from "./args";

interface Row {
  start: number;
  end: number;
  label: string;
  detail: string;
  container: boolean;
  /** For regions: what a run of them shares, and the slot to show its range. */
  size?: string;
  slot?: number;
}

function addr(n: number): string {
  const h = n.toString(16).padStart(12, "0");
  return `0x${h.slice(0, 4)}_${h.slice(4, 8)}_${h.slice(8)}`;
}

/** Leaf rows in a run at least this long, alike and evenly spaced, are drawn as one line. */
const RUN = 3;

/**
 * The map as text. Tens of thousands of regions stay readable: a run of regions of the same
 * kind and size at a constant stride is one line, unless `all` asks for every one.
 */
export function drawState(s: VmState, all = false): string {
  const num = (v: number | bigint) => Number(v);
  const ramSize = s.ram.reduce((a, [, size]) => a + num(size), 0);
  const rows: Row[] = [];
  for (const [g, size] of s.ram) {
    rows.push({ start: num(g), end: num(g) + num(size), label: "RAM", detail: formatSize(size), container: false });
  }
  rows.push({ start: PCI_HOLE_START, end: LOW_MMIO_END, label: "low MMIO pool", detail: formatSize(LOW_MMIO_END - PCI_HOLE_START), container: true });
  const high = highMmioStart(ramSize);
  rows.push({ start: high, end: Number.MAX_SAFE_INTEGER, label: "high MMIO pool", detail: "to the physical limit", container: true });
  for (const a of s.allocations) {
    rows.push({ start: num(a.start), end: num(a.start) + num(a.size), label: describeAlloc(a.alloc), detail: formatSize(a.size), container: true });
  }
  for (const r of s.regions) {
    const access = r.read_only ? "ro" : "rw";
    const label = r.kind === "prepared" ? "prepared arena" : `${r.kind} region ${access}`;
    rows.push({
      start: num(r.region_id),
      end: num(r.region_id) + num(r.size),
      label,
      detail: `${formatSize(r.size)}  slot ${r.slot}`,
      size: formatSize(r.size),
      slot: r.slot,
      container: r.kind === "prepared",
    });
  }
  // Containers first at equal starts, bigger first, so children follow their parent.
  rows.sort((a, b) => a.start - b.start || b.end - a.end || Number(b.container) - Number(a.container));
  const stack: Row[] = [];
  const lines: string[] = [];
  const vcpu = s.vcpu
    ? `vCPU ${s.vcpu.state}: ${s.vcpu.exits} exits, ${s.vcpu.mmio_reads} MMIO reads, ${s.vcpu.mmio_writes} MMIO writes`
    : "no guest running";
  lines.push(
    `vmemd guest physical map: slots ${s.slots_used}/${s.slots_max}, freed ${formatSize(s.freed_bytes)}, balloon target ${s.balloon_target === null ? "none" : formatSize(s.balloon_target)}`,
    vcpu,
    "",
  );
  for (let i = 0; i < rows.length; i++) {
    const row = rows[i]!;
    while (stack.length > 0 && !(row.start >= stack.at(-1)!.start && row.end <= stack.at(-1)!.end)) stack.pop();
    const indent = "│ ".repeat(stack.length);
    const name = `${indent}${row.container ? "┌ " : "■ "}${row.label}`;
    const run = all ? 1 : runLength(rows, i, stack.at(-1));
    if (run >= RUN) {
      const last = rows[i + run - 1]!;
      const stride = rows[i + 1]!.start - row.start;
      const slots = `slots ${row.slot}-${last.slot}`;
      lines.push(`  ${addr(row.start)}  ${`${name} ×${run}`.padEnd(44)} ${row.size} each, every ${formatSize(stride)}, to ${addr(last.end)}  ${slots}`);
      i += run - 1;
      continue;
    }
    lines.push(`  ${addr(row.start)}  ${name.padEnd(44)} ${row.detail}`);
    if (row.container) stack.push(row);
  }
  lines.push("");
  return lines.join("\n");
}

/** How many leaf rows from `i` on are alike (label, size), evenly spaced and inside `parent`. */
function runLength(rows: Row[], i: number, parent: Row | undefined): number {
  const first = rows[i]!;
  if (first.container || first.size === undefined || i + 1 >= rows.length) return 1;
  const stride = rows[i + 1]!.start - first.start;
  let n = 1;
  while (i + n < rows.length) {
    const r = rows[i + n]!;
    const inside = parent === undefined || (r.start >= parent.start && r.end <= parent.end);
    if (r.container || r.label !== first.label || r.size !== first.size || !inside || r.start - rows[i + n - 1]!.start !== stride) break;
    n++;
  }
  return n;
}
