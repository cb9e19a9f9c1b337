// A stock Linux kernel for the boot tests: Debian's cloud kernel package, fetched once with
// apt-get (Debian's registry) and cached, its vmlinuz kept as the bzImage and its ELF
// vmlinux unpacked from the bzImage's payload (LZ4, legacy frames, as Debian builds it).
// A kernel that cannot be fetched fails the test, loudly: these tests never skip.
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";

const CACHE = join(process.env.XDG_CACHE_HOME ?? join(homedir(), ".cache"), "vmemd-test-kernel");
const META = "linux-image-cloud-amd64";

export interface TestKernel {
  version: string;
  bzImage: string;
  vmlinux: string;
}

function run(cmd: string[], cwd: string): string {
  const r = Bun.spawnSync(cmd, { cwd, stdout: "pipe", stderr: "pipe" });
  if (r.exitCode !== 0) throw new Error(`${cmd.join(" ")} failed (exit ${r.exitCode}): ${r.stderr.toString().trim()}`);
  return r.stdout.toString();
}

function download(pkg: string, dir: string): string {
  const fetch = () => run(["apt-get", "download", pkg], dir);
  try {
    fetch();
  } catch {
    run(["apt-get", "update"], dir); // a fresh machine's package lists may be missing
    fetch();
  }
  const deb = readdirSync(dir).find((f) => f.startsWith(`${pkg}_`) && f.endsWith(".deb"));
  if (deb === undefined) throw new Error(`apt-get download ${pkg} left no .deb in ${dir}`);
  return join(dir, deb);
}

/** The cached kernel, fetched and unpacked on first use. */
export function testKernel(): TestKernel {
  mkdirSync(CACHE, { recursive: true });
  const done = join(CACHE, "kernel.json");
  if (existsSync(done)) {
    const k = JSON.parse(readFileSync(done, "utf8")) as TestKernel;
    if (existsSync(k.bzImage) && existsSync(k.vmlinux)) return k;
  }
  const work = join(CACHE, `work-${process.pid}`);
  rmSync(work, { recursive: true, force: true });
  mkdirSync(work);
  try {
    const meta = download(META, work);
    // The meta package names the versioned image package it stands for.
    const depends = run(["dpkg-deb", "-f", meta, "Depends"], work).trim();
    const image = /linux-image-[0-9][^ ,|]*-cloud-amd64/.exec(depends)?.[0];
    if (image === undefined) throw new Error(`${META} depends on "${depends}": no linux-image package named`);
    const deb = download(image, work);
    run(["dpkg-deb", "-x", deb, join(work, "root")], work);
    const boot = join(work, "root", "boot");
    const vmlinuz = readdirSync(boot).find((f) => f.startsWith("vmlinuz-"));
    if (vmlinuz === undefined) throw new Error(`${image} holds no /boot/vmlinuz-*`);
    const version = vmlinuz.slice("vmlinuz-".length);
    const bz = readFileSync(join(boot, vmlinuz));
    const k: TestKernel = { version, bzImage: join(CACHE, `bzImage-${version}`), vmlinux: join(CACHE, `vmlinux-${version}`) };
    writeFileSync(k.bzImage, bz);
    writeFileSync(k.vmlinux, vmlinuxOf(bz));
    writeFileSync(done, JSON.stringify(k));
    return k;
  } catch (e) {
    throw new Error(`LINUX BOOT TEST CANNOT RUN: fetching a Debian cloud kernel failed: ${e instanceof Error ? e.message : e}`);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

/** The ELF vmlinux inside a bzImage: its payload (the setup header says where), decompressed. */
export function vmlinuxOf(bz: Uint8Array): Uint8Array {
  const v = new DataView(bz.buffer, bz.byteOffset, bz.byteLength);
  const setupSects = bz[0x1f1] === 0 ? 4 : bz[0x1f1]!;
  const start = (setupSects + 1) * 512 + v.getUint32(0x248, true);
  const payload = bz.subarray(start, start + v.getUint32(0x24c, true));
  if (payload[0] !== 0x02 || payload[1] !== 0x21 || payload[2] !== 0x4c || payload[3] !== 0x18) {
    throw new Error(`the kernel's payload is not LZ4 legacy frames (starts ${Buffer.from(payload.subarray(0, 4)).toString("hex")})`);
  }
  const elf = lz4Legacy(payload);
  if (elf[0] !== 0x7f || elf[1] !== 0x45) throw new Error("the decompressed payload is not an ELF file");
  return elf;
}

/** LZ4 legacy frame format: the magic, then blocks of (u32 compressed size, LZ4 block). */
function lz4Legacy(src: Uint8Array): Uint8Array {
  const v = new DataView(src.buffer, src.byteOffset, src.byteLength);
  const chunks: Uint8Array[] = [];
  let total = 0;
  let pos = 4;
  const block = new Uint8Array(8 << 20); // the legacy format's block size
  while (pos + 4 <= src.length) {
    const size = v.getUint32(pos, true);
    // The kernel appends the uncompressed size after the last block; a new magic ends a frame.
    if (size === 0x184c2102 || pos + 4 + size > src.length) break;
    const n = lz4Block(src.subarray(pos + 4, pos + 4 + size), block);
    chunks.push(block.slice(0, n));
    total += n;
    pos += 4 + size;
  }
  const out = new Uint8Array(total);
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.length;
  }
  return out;
}

/** One LZ4 block into `out`; the bytes written. */
function lz4Block(src: Uint8Array, out: Uint8Array): number {
  let s = 0;
  let d = 0;
  while (s < src.length) {
    const token = src[s++]!;
    let lit = token >> 4;
    if (lit === 15) for (let b = 255; b === 255; lit += b) b = src[s++]!;
    out.set(src.subarray(s, s + lit), d);
    s += lit;
    d += lit;
    if (s >= src.length) break; // the last sequence has literals only
    const offset = src[s]! | (src[s + 1]! << 8);
    s += 2;
    let len = token & 15;
    if (len === 15) for (let b = 255; b === 255; len += b) b = src[s++]!;
    len += 4;
    for (let i = 0; i < len; i++, d++) out[d] = out[d - offset]!;
  }
  return d;
}

function hex16(n: number): string {
  return "0x" + n.toString(16).padStart(16, "0");
}

/** The e820 lines the kernel must print for `ram` (GetState's ranges): the hole and the low MMIO pool reserved. */
export function expectedE820(ram: [number, number][]): string[] {
  const lines: string[] = [];
  const usable = (a: number, end: number) => lines.push(`BIOS-e820: [mem ${hex16(a)}-${hex16(end - 1)}] usable`);
  const reserved = (a: number, end: number) => lines.push(`BIOS-e820: [mem ${hex16(a)}-${hex16(end - 1)}] reserved`);
  const entries: [number, number, boolean][] = [];
  for (const [g, size] of ram) {
    const end = g + size;
    if (g < 0x9fc00 && end > 0x100000) entries.push([g, 0x9fc00, true], [0x9fc00, 0x100000, false], [0x100000, end, true]);
    else entries.push([g, end, true]);
  }
  entries.push([0xd000_0000, 0xf400_0000, false]);
  entries.sort((a, b) => a[0] - b[0]);
  for (const [a, end, u] of entries) (u ? usable : reserved)(a, end);
  return lines;
}

