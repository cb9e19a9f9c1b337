// The memory layer's error: errno plus a context chain, root cause first, the way
// crosvm's anyhow contexts flatten into FlatVmMemoryResponseError.
import { Errno, SysError } from "../sys";

export class VmMemoryError extends Error {
  readonly errno: number | null;
  /** Root cause first, outermost context last. */
  readonly chain: string[];

  constructor(errno: number | null, root: string) {
    super(root);
    this.name = "VmMemoryError";
    this.errno = errno;
    this.chain = [root];
  }

  /** Adds an outer context, as anyhow's `.context()`. */
  context(message: string): this {
    this.chain.push(message);
    this.message = this.chain.slice().reverse().join(": ");
    return this;
  }

  static from(e: unknown): VmMemoryError {
    if (e instanceof VmMemoryError) return e;
    if (e instanceof SysError) return new VmMemoryError(e.errno, e.message);
    return new VmMemoryError(null, e instanceof Error ? e.message : String(e));
  }
}

/** A new error with its root cause; errno is one of sys's Errno names. */
export function failure(errno: keyof typeof Errno, message: string): VmMemoryError {
  return new VmMemoryError(Errno[errno], message);
}

/** Runs `f`, adding `message` as context to whatever it throws. */
export function withContext<T>(message: string | (() => string), f: () => T): T {
  try {
    return f();
  } catch (e) {
    throw VmMemoryError.from(e).context(typeof message === "string" ? message : message());
  }
}

/**
 * A refused request as a value: what an Err response carries. Not an Error (no stack is
 * captured), so the paths a client can drive at request rate return it instead of throwing.
 */
export class Refusal {
  constructor(
    readonly errno: number | null,
    /** Root cause first, outermost context last. */
    readonly chain: string[],
  ) {}

  static of(errno: keyof typeof Errno, root: string): Refusal {
    return new Refusal(Errno[errno], [root]);
  }

  /** Adds an outer context, as anyhow's `.context()`. */
  context(message: string): this {
    this.chain.push(message);
    return this;
  }
}
