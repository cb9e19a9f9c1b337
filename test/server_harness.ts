// Spawns the compiled binary (dist/vmemd) and talks to it over its real socket.
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Subprocess } from "bun";
import * as sys from "../src/sys";
import { VmemClient } from "../src/client";
import { fdCount, requireKvm } from "./helpers";

export const BINARY = join(import.meta.dir, "..", "dist", "vmemd");

export function requireBinary(): void {
  if (!existsSync(BINARY)) throw new Error(`END-TO-END TESTS CANNOT RUN: ${BINARY} is missing; run "bun run build" first (bun run test does)`);
}

export class VmemdProcess {
  readonly dir: string;
  readonly socket: string;
  proc!: Subprocess<"ignore", "pipe", "pipe">;
  private stderrText = "";
  private stdoutText = "";

  constructor(readonly args: string[] = []) {
    this.dir = mkdtempSync(join(tmpdir(), "vmemd-test-"));
    this.socket = join(this.dir, "vmemd.sock");
  }

  get pid(): number {
    return this.proc.pid;
  }

  static async start(args: string[] = []): Promise<VmemdProcess> {
    requireKvm();
    requireBinary();
    const p = new VmemdProcess(args);
    // --die-with-parent: a test process that crashes must not leave servers (and guests
    // spinning on the CPU) behind to skew whatever runs next.
    p.proc = Bun.spawn([BINARY, "serve", "--socket", p.socket, "--die-with-parent", ...args], { stdin: "ignore", stdout: "pipe", stderr: "pipe" });
    p.collect();
    const deadline = Date.now() + 10_000;
    for (;;) {
      try {
        sys.close(sys.connectSeqpacket(p.socket));
        break;
      } catch {}
      if (p.proc.exitCode !== null || Date.now() > deadline) {
        p.proc.kill("SIGKILL");
        throw new Error(`vmemd did not come up (exit ${p.proc.exitCode}): ${p.stderrText}`);
      }
      await Bun.sleep(10);
    }
    // Let the probe connection's disconnect be processed before anyone counts descriptors.
    await p.settle();
    return p;
  }

  private collect(): void {
    const pump = async (stream: ReadableStream<Uint8Array>, into: "stdoutText" | "stderrText") => {
      const dec = new TextDecoder();
      for await (const chunk of stream) this[into] += dec.decode(chunk, { stream: true });
    };
    void pump(this.proc.stdout, "stdoutText");
    void pump(this.proc.stderr, "stderrText");
  }

  get stderr(): string {
    return this.stderrText;
  }
  get stdout(): string {
    return this.stdoutText;
  }

  connect(): VmemClient {
    return VmemClient.connect(this.socket);
  }

  fdCount(): number {
    return fdCount(this.pid);
  }

  /** Waits until the server's descriptor count is `n` (it processes disconnects asynchronously). */
  async expectFdCount(n: number, timeoutMs = 3000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (this.fdCount() !== n) {
      if (Date.now() > deadline) throw new Error(`server holds ${this.fdCount()} descriptors, expected ${n}`);
      await Bun.sleep(10);
    }
  }

  /** A GetState round trip on a fresh connection: everything sent before has been processed. */
  async settle(): Promise<void> {
    try {
      const c = this.connect();
      try {
        c.request("GetState");
      } finally {
        c.close();
      }
    } catch {
      // A server that refuses us (--allow-uid) still came up.
    }
    await Bun.sleep(20);
  }

  async stop(signal: NodeJS.Signals = "SIGTERM"): Promise<number> {
    if (this.proc.exitCode === null) this.proc.kill(signal);
    const code = await this.proc.exited;
    rmSync(this.dir, { recursive: true, force: true });
    return code;
  }
}
