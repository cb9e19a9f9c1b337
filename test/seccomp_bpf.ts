// A classic-BPF interpreter for seccomp programs (the opcodes src/sys/seccomp_compile.ts emits), so
// a filter's decisions can be checked call by call without installing it.
import * as sys from "../src/sys";

export interface Call {
  nr: number;
  arch?: number;
  /** Up to six 64-bit arguments. */
  args?: (number | bigint)[];
}

function seccompData(c: Call): DataView {
  const v = new DataView(new ArrayBuffer(64));
  v.setInt32(sys.SECCOMP_DATA_NR, c.nr, true);
  v.setUint32(sys.SECCOMP_DATA_ARCH, c.arch ?? sys.AUDIT_ARCH_X86_64, true);
  (c.args ?? []).forEach((a, i) => v.setBigUint64(sys.SECCOMP_DATA_ARGS + 8 * i, BigInt.asUintN(64, BigInt(a)), true));
  return v;
}

/** What the filter returns for `call`; throws on an opcode it does not know or a jump out of the program. */
export function runFilter(prog: readonly sys.BpfInsn[], call: Call): number {
  const data = seccompData(call);
  let a = 0;
  for (let pc = 0; pc < prog.length; pc++) {
    const { code, jt, jf, k } = prog[pc]!;
    switch (code) {
      case sys.BPF_LD | sys.BPF_W | sys.BPF_ABS:
        if (k % 4 !== 0 || k + 4 > 64) throw new Error(`pc ${pc}: load at ${k}`);
        a = data.getUint32(k, true);
        break;
      case sys.BPF_ALU | sys.BPF_AND | sys.BPF_K:
        a = (a & k) >>> 0;
        break;
      case sys.BPF_JMP | sys.BPF_JA:
        pc += k;
        break;
      case sys.BPF_JMP | sys.BPF_JEQ | sys.BPF_K:
        pc += a === k ? jt : jf;
        break;
      case sys.BPF_JMP | sys.BPF_JGE | sys.BPF_K:
        pc += a >= k ? jt : jf;
        break;
      case sys.BPF_JMP | sys.BPF_JSET | sys.BPF_K:
        pc += (a & k) !== 0 ? jt : jf;
        break;
      case sys.BPF_RET | sys.BPF_K:
        return k;
      default:
        throw new Error(`pc ${pc}: opcode 0x${code.toString(16)}`);
    }
  }
  throw new Error("ran off the end of the program");
}

/** "allow", "kill", or the errno's name. */
export function decision(ret: number): string {
  if (ret === sys.SECCOMP_RET_ALLOW) return "allow";
  if (ret === sys.SECCOMP_RET_KILL_PROCESS) return "kill";
  if ((ret & sys.SECCOMP_RET_ACTION_FULL) >>> 0 === sys.SECCOMP_RET_ERRNO) return sys.errnoName(ret & sys.SECCOMP_RET_DATA);
  return `0x${ret.toString(16)}`;
}
