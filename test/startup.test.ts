// Start-up as serve orders it: the socket is bound and "ready" written before the request
// path's modules load and the server is built (src/cli/serve.ts), so a client that connects
// at once waits in the backlog, and a signal that comes before the server exists still
// stops it cleanly.
import { describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { VmemClient } from "../src/client";
import { MAX_PACKET } from "../src/protocol";
import { DEFAULT_SERVER_OPTIONS } from "../src/server";
import { requireKvm } from "./helpers";
import { BINARY, requireBinary } from "./server_harness";

test("the server's default packet size is the protocol's MAX_PACKET (written out in server/options.ts)", () => {
  expect(DEFAULT_SERVER_OPTIONS.maxPacket).toBe(MAX_PACKET);
});

async function startReady(extra: string[] = []) {
  requireKvm();
  requireBinary();
  const dir = mkdtempSync(join(tmpdir(), "vmemd-startup-"));
  const socket = join(dir, "s.sock");
  const proc = Bun.spawn([BINARY, "serve", "--socket", socket, "--memory", "16M", "--log-level", "warn", "--ready-fd", "1", "--die-with-parent", ...extra], {
    stdout: "pipe",
    stderr: "pipe",
  });
  const first = await proc.stdout.getReader().read();
  expect(new TextDecoder().decode(first.value)).toBe("ready\n");
  return { dir, socket, proc };
}

describe("dist/vmemd serve at ready", () => {
  test("a client that connects the moment ready is written is served", async () => {
    for (let round = 0; round < 5; round++) {
      const { dir, socket, proc } = await startReady();
      try {
        const c = VmemClient.connect(socket);
        expect(c.getState().regions).toEqual([]);
        c.close();
      } finally {
        proc.kill("SIGTERM");
        expect(await proc.exited).toBe(0);
        rmSync(dir, { recursive: true, force: true });
      }
    }
  });

  test("SIGTERM the moment ready is written: exit 0, the socket file removed", async () => {
    for (let round = 0; round < 10; round++) {
      const { dir, socket, proc } = await startReady();
      proc.kill("SIGTERM");
      expect(await proc.exited).toBe(0);
      expect(await new Response(proc.stderr).text()).toBe("");
      expect(existsSync(socket)).toBe(false);
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
