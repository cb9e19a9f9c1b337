// The sandbox vmemd enters once it is set up and before it serves (docs/security.md):
// no new privileges, capabilities dropped, and a seccomp filter on every thread.
import * as sys from "../sys";
import type { Logger } from "../server";
import { KILLED, vmemdPolicy } from "./sandbox_policy";

export function enterSandbox(log: Logger): void {
  // Capabilities first: PR_CAPBSET_DROP and capset are not on the allow-list.
  const caps = sys.dropCapabilities();
  sys.setNoNewPrivs();
  const policy = vmemdPolicy(sys.getpid());
  const prog = sys.compileSeccomp(policy);
  sys.installSeccompFilter(prog);
  log.info("sandbox entered", {
    seccomp: "filter, all threads",
    allowed: policy.allow.length,
    killed: KILLED.length,
    otherwise: "EPERM",
    instructions: prog.length,
    bounding_dropped: caps.boundingDropped,
    bounding_kept: caps.boundingKept,
  });
}
