// The memory layer's error: errno plus a context chain, root cause first, the way
// crosvm's anyhow contexts flatten into FlatVmMemoryResponseError.
import type { VmMemoryResponse } from "../protocol/messages";
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
 *
 * A refusal whose text never changes can be made once and kept (Refusal.kept): answering it
 * again allocates nothing, not even its response (answer()). A kept refusal is never
 * changed: context() on it returns a new one. So context()'s result is the refusal to use.
 */
export class Refusal {
  /** Its Err response, made on first use (answer()). */
  private response: VmMemoryResponse | null = null;

  constructor(
    readonly errno: number | null,
    /** Root cause first, outermost context last. */
    readonly chain: string[],
    /** Made once and answered many times: context() copies it instead. */
    private readonly kept = false,
  ) {}

  static of(errno: keyof typeof Errno, root: string): Refusal {
    return new Refusal(Errno[errno], [root]);
  }

  /**
   * A refusal to keep and answer with again and again (never changed once made: its chain
   * is frozen, so a push into it fails loudly instead of changing every later answer).
   */
  static kept(errno: number | null, chain: string[]): Refusal {
    return new Refusal(errno, Object.freeze(chain) as string[], true);
  }

  /** Adds an outer context, as anyhow's `.context()`; use what it returns. */
  context(message: string): Refusal {
    if (this.kept) return new Refusal(this.errno, [...this.chain, message]);
    this.chain.push(message);
    return this;
  }

  /** The Err response: one object pair per refusal, however often it is answered. */
  answer(): VmMemoryResponse {
    return (this.response ??= { Err: { errno: this.errno, chain: this.chain } });
  }
}
