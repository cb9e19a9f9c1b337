// VmemClient's waiting, against a raw SEQPACKET peer that answers late or never.
import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { VmemClient } from "../src/client";

// The peers' socket files (a killed peer leaves its own behind).
const dir = mkdtempSync(join(tmpdir(), "vmemd-client-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** A listener that accepts one client; `answerAfterMs` < 0: it never answers. Runs in a child. */
function peer(path: string, answerAfterMs: number) {
  const script = `
    import * as sys from ${JSON.stringify(`${import.meta.dir}/../src/sys`)};
    const l = sys.listenSeqpacket(${JSON.stringify(path)});
    console.log("listening");
    sys.pollOne(l, sys.POLLIN, 10000);
    const c = sys.accept(l);
    const io = new sys.PacketIo(4096);
    sys.pollOne(c, sys.POLLIN, 10000);
    io.recv(c);
    if (${answerAfterMs} >= 0) {
      Bun.sleepSync(${answerAfterMs});
      io.send(c, new Uint8Array([0xa2, 0x4f, 0x6b]));
    }
    sys.pollOne(c, sys.POLLRDHUP, 10000); // until the client goes
  `;
  const proc = Bun.spawn([process.execPath, "-e", script], { stdout: "pipe", stderr: "inherit" });
  return proc;
}

async function listening(proc: ReturnType<typeof peer>): Promise<void> {
  const reader = proc.stdout.getReader();
  const { value } = await reader.read();
  reader.releaseLock();
  expect(new TextDecoder().decode(value)).toContain("listening");
}

describe("VmemClient.recv waits as it is told", () => {
  test("a silent server: recv(50) gives ETIMEDOUT after about 50 ms; recv(0) at once", async () => {
    const path = join(dir, "a.sock");
    const proc = peer(path, -1);
    try {
      await listening(proc);
      const client = VmemClient.connect(path);
      client.send("GetState");
      let t0 = performance.now();
      expect(() => client.recv(0)).toThrow(/ETIMEDOUT/);
      expect(performance.now() - t0).toBeLessThan(20);
      t0 = performance.now();
      expect(() => client.recv(50)).toThrow(/ETIMEDOUT/);
      const waited = performance.now() - t0;
      expect(waited).toBeGreaterThanOrEqual(45);
      expect(waited).toBeLessThan(1000);
      expect(() => client.recv(NaN)).toThrow(RangeError);
      client.close();
    } finally {
      proc.kill();
      await proc.exited;
    }
  });

  test("an answer 150 ms late: recv(-1) and the default wait for it, with no false timeout", async () => {
    for (const timeout of [-1, undefined]) {
      const path = join(dir, `b${timeout ?? "d"}.sock`);
      const proc = peer(path, 150);
      try {
        await listening(proc);
        const client = VmemClient.connect(path);
        client.send("GetState");
        const t0 = performance.now();
        expect(client.recv(timeout)).toBe("Ok");
        expect(performance.now() - t0).toBeGreaterThanOrEqual(140);
        client.close();
      } finally {
        proc.kill();
        await proc.exited;
      }
    }
  });
});
