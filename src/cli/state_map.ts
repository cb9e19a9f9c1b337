// GetState drawn as a guest physical map a person reads at a glance.
import { highMmioStart, LOW_MMIO_END, PCI_HOLE_START } from "../kvm/layout";
import { describeAlloc } from "../memory/allocator";
import type { VmState } from "../memory/request";
import { formatSize } from "./args";

interface Row {
  start: number;
  end: number;
  label: string;
  detail: string;
  container: boolean;
}

function addr(n: number): string {
  const h = n.toString(16).padStart(12, "0");
  return `0x${h.slice(0, 4)}_${h.slice(4, 8)}_${h.slice(8)}`;
}

export function drawState(s: VmState): string {
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
  for (const row of rows) {
    while (stack.length > 0 && !(row.start >= stack.at(-1)!.start && row.end <= stack.at(-1)!.end)) stack.pop();
    const indent = "│ ".repeat(stack.length);
    const name = `${indent}${row.container ? "┌ " : "■ "}${row.label}`;
    lines.push(`  ${addr(row.start)}  ${name.padEnd(44)} ${row.detail}`);
    if (row.container) stack.push(row);
  }
  lines.push("");
  return lines.join("\n");
}
