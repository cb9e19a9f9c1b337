// The sandbox vmemd enters once it is set up and before it serves (docs/security.md):
// no new privileges, capabilities dropped, and a seccomp filter on every thread.
import * as sys from "../sys";
import type { Logger } from "../server";
// Runs at build time (and when Bun transpiles this file from source): the program as words.
import { precompiledFilter } from "./sandbox_filter" with { type: "macro" };

const FILTER = precompiledFilter();

/**
 * The filter for process `pid`, encoded (struct sock_filter[]): the policy's program
 * (sandbox_policy.ts), assembled when the bundle was built, with the pid patched in.
 * test/sandbox.test.ts checks it against compileSeccomp(vmemdPolicy(pid)).
 */
export function sandboxFilter(pid: number): Uint8Array {
  const words = new Uint32Array(FILTER.words);
  for (const i of FILTER.pidWords) words[i] = pid >>> 0;
  return new Uint8Array(words.buffer);
}

export function enterSandbox(log: Logger): void {
  // Capabilities first: PR_CAPBSET_DROP and capset are not on the allow-list.
  const caps = sys.dropCapabilities();
  sys.setNoNewPrivs();
  const filter = sandboxFilter(sys.getpid());
  sys.installSeccompFilter(filter);
  log.info("sandbox entered", {
    seccomp: "filter, all threads",
    allowed: FILTER.allowed,
    killed: FILTER.killed,
    otherwise: "EPERM",
    instructions: filter.byteLength / 8,
    bounding_dropped: caps.boundingDropped,
    bounding_kept: caps.boundingKept,
  });
}
