// timerfd(2): a periodic tick as a descriptor, so an epoll loop can sleep with no timeout
// (a timed epoll_wait arms an hrtimer on every sleep; this one is armed once).
import { libc } from "./libc";
import { check, lastErrno, SysError } from "./error";

// sys/timerfd.h, linux/time.h
const CLOCK_MONOTONIC = 1;
const TFD_NONBLOCK = 0o4000;
const TFD_CLOEXEC = 0o2000000;
const EAGAIN = 11;

export class IntervalTimer {
  readonly fd: number;
  private readonly count = new BigUint64Array(1);

  /** Fires every `ms` milliseconds, the first time `ms` from now. */
  constructor(ms: number) {
    this.fd = check("timerfd_create", libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC));
    // struct itimerspec { struct timespec it_interval, it_value; }
    const sec = BigInt(Math.floor(ms / 1000));
    const nsec = BigInt((ms % 1000) * 1_000_000);
    const spec = new BigInt64Array([sec, nsec, sec, nsec]);
    if (libc.timerfd_settime(this.fd, 0, spec, null) === -1) {
      const errno = lastErrno();
      libc.close(this.fd);
      throw new SysError("timerfd_settime", errno);
    }
  }

  /** Expirations since the last call (0 when none), which also makes the descriptor quiet again. */
  ack(): number {
    const n = libc.read(this.fd, this.count, 8) as number;
    if (n === -1) {
      const errno = lastErrno();
      if (errno === EAGAIN) return 0;
      throw new SysError("read(timerfd)", errno);
    }
    return Number(this.count[0]);
  }

  close(): void {
    libc.close(this.fd);
  }
}
