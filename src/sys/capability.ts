// Capabilities: dropping what vmemd no longer needs once it serves.
//
// Linux keeps every capability set per thread, and capset(2) and PR_CAPBSET_DROP change
// the calling thread only (glibc broadcasts setuid/setgid changes to all threads, never
// capability changes). So this empties the sets of the thread that calls it, and of the
// threads it starts afterwards; threads that already exist keep theirs (docs/security.md).
import { libc } from "./libc";
import { check, lastErrno, SysError } from "./error";

// linux/prctl.h
const PR_CAPBSET_READ = 23;
const PR_CAPBSET_DROP = 24;
const PR_CAP_AMBIENT = 47;
const PR_CAP_AMBIENT_CLEAR_ALL = 4;
// linux/capability.h: 64-bit sets, as two 32-bit halves of struct __user_cap_data_struct.
const LINUX_CAPABILITY_VERSION_3 = 0x20080522;
const EPERM = 1;
const EINVAL = 22;

export interface CapabilityDrop {
  /** Capabilities removed from the bounding set. */
  boundingDropped: number;
  /** Left in it: dropping needs CAP_SETPCAP, which an unprivileged process lacks. */
  boundingKept: number;
}

/**
 * Empties the calling thread's bounding set (where CAP_SETPCAP allows), its ambient set,
 * and its effective, permitted and inheritable sets. In that order: the bounding-set drop
 * needs CAP_SETPCAP, which the last step removes.
 */
export function dropCapabilities(): CapabilityDrop {
  let boundingDropped = 0;
  let boundingKept = 0;
  for (let cap = 0; cap < 64; cap++) {
    const r = libc.prctl(PR_CAPBSET_READ, cap, 0, 0, 0);
    if (r === -1) break; // EINVAL: past the last capability this kernel knows
    if (r === 0) continue;
    if (libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) === 0) {
      boundingDropped++;
      continue;
    }
    const errno = lastErrno();
    if (errno !== EPERM) throw new SysError(`prctl(PR_CAPBSET_DROP, ${cap})`, errno);
    boundingKept++;
  }
  // EINVAL: a kernel before ambient capabilities (4.3), which has none to clear.
  if (libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) === -1) {
    const errno = lastErrno();
    if (errno !== EINVAL) throw new SysError("prctl(PR_CAP_AMBIENT_CLEAR_ALL)", errno);
  }
  // struct __user_cap_header_struct { u32 version; int pid (0: this thread) }, then two
  // zeroed { effective, permitted, inheritable } halves.
  const header = new Uint32Array([LINUX_CAPABILITY_VERSION_3, 0]);
  const data = new Uint32Array(6);
  check("capset", libc.capset(header, data));
  return { boundingDropped, boundingKept };
}
