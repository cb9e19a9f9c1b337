// The sandbox's seccomp filter, assembled from the policy (sandbox_policy.ts) when the
// bundle is built: src/cli/sandbox.ts imports precompiledFilter as a Bun macro, so the
// build runs it and inlines what it returns. Assembling the program in JavaScript at start
// took 2.0 ms of a fresh server's time before its first request (cold code, allocations);
// patching the pid into the inlined words takes microseconds.
//
// The program depends on the pid only through constants: tgkill, kill and prlimit64 compare
// argument 0 with it. So it is assembled for two different pids, and the words that differ
// are where the pid goes; everything else must be identical, and patching the first with the
// second pid must give the second program exactly, or the build fails.
import { compileSeccomp, encodeBpf } from "../sys/seccomp_compile";
import { KILLED, vmemdPolicy } from "./sandbox_policy";

export interface PrecompiledFilter {
  /** struct sock_filter[] as little-endian u32 pairs (code | jt << 16 | jf << 24, then k), for pid 0. */
  words: number[];
  /** Indices into `words` of every k that is the policy's pid. */
  pidWords: number[];
  /** For the log line: calls the policy allows and kills. */
  allowed: number;
  killed: number;
}

/** Any two pids: real ones are at most 2^22 (PID_MAX_LIMIT), these are beyond it. */
const PID_A = 0x4000_0001;
const PID_B = 0x4000_0002;

function words(pid: number): Uint32Array {
  const bytes = encodeBpf(compileSeccomp(vmemdPolicy(pid)));
  return new Uint32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
}

/**
 * Called by the bundler (a macro): everything it returns must be JSON. A policy that does
 * not compile fails the build; Bun reports a macro's exception only as "cannot coerce
 * Exception", so the reason is printed first.
 */
export function precompiledFilter(): PrecompiledFilter {
  try {
    return assemble();
  } catch (e) {
    console.error(`src/cli/sandbox_policy.ts: ${e instanceof Error ? e.message : String(e)}`);
    throw e;
  }
}

function assemble(): PrecompiledFilter {
  const a = words(PID_A);
  const b = words(PID_B);
  if (a.length !== b.length) throw new Error("seccomp policy: the program's length depends on the pid");
  const pidWords: number[] = [];
  for (let i = 0; i < a.length; i++) {
    if (a[i] === b[i]) continue;
    // A k word (odd index) that is exactly the pid in both: anything else means the pid
    // changed the program's shape, and patching could not reproduce it.
    if (i % 2 !== 1 || a[i] !== PID_A || b[i] !== PID_B) throw new Error(`seccomp policy: word ${i} depends on the pid other than as a constant`);
    pidWords.push(i);
  }
  if (pidWords.length === 0) throw new Error("seccomp policy: no rule names the pid (tgkill, kill)");
  const patched = patchPid([...a], pidWords, PID_B);
  if (patched.some((w, i) => w !== b[i])) throw new Error("seccomp policy: patching the pid does not reproduce the program");
  const policy = vmemdPolicy(0);
  return { words: patchPid([...a], pidWords, 0), pidWords, allowed: policy.allow.length, killed: KILLED.length };
}

function patchPid(w: number[], at: readonly number[], pid: number): number[] {
  for (const i of at) w[i] = pid >>> 0;
  return w;
}
