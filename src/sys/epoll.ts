// epoll(7): the main thread's event loop runs on this.
import { libc } from "./libc";
import { check, lastErrno, SysError } from "./error";

// sys/epoll.h
export const EPOLLIN = 0x001;
export const EPOLLOUT = 0x004;
export const EPOLLERR = 0x008;
export const EPOLLHUP = 0x010;
export const EPOLLRDHUP = 0x2000;
const EPOLL_CTL_ADD = 1;
const EPOLL_CTL_DEL = 2;
const EPOLL_CTL_MOD = 3;
const EPOLL_CLOEXEC = 0o2000000;
// struct epoll_event is packed on x86_64: u32 events@0, u64 data@4 (12 bytes).
const EVENT_SIZE = 12;

export class Epoll {
  readonly fd: number;
  private readonly one = new DataView(new ArrayBuffer(EVENT_SIZE));
  private readonly events: DataView;
  private readonly eventsBuf: Uint8Array;
  private readonly capacity: number;

  constructor(capacity = 256) {
    this.fd = check("epoll_create1", libc.epoll_create1(EPOLL_CLOEXEC));
    this.capacity = capacity;
    this.eventsBuf = new Uint8Array(capacity * EVENT_SIZE);
    this.events = new DataView(this.eventsBuf.buffer);
  }

  private ctl(op: number, fd: number, events: number, name: string): void {
    this.one.setUint32(0, events, true);
    this.one.setUint32(4, fd, true);
    this.one.setUint32(8, 0, true);
    check(name, libc.epoll_ctl(this.fd, op, fd, this.one as unknown as Uint8Array));
  }
  add(fd: number, events: number): void {
    this.ctl(EPOLL_CTL_ADD, fd, events, "epoll_ctl(ADD)");
  }
  modify(fd: number, events: number): void {
    this.ctl(EPOLL_CTL_MOD, fd, events, "epoll_ctl(MOD)");
  }
  remove(fd: number): void {
    this.ctl(EPOLL_CTL_DEL, fd, 0, "epoll_ctl(DEL)");
  }

  /** Waits for events; returns how many are ready, or -1 when a signal interrupted. */
  wait(timeoutMs: number): number {
    const n = libc.epoll_wait(this.fd, this.eventsBuf, this.capacity, timeoutMs);
    if (n === -1) {
      const errno = lastErrno();
      if (errno === 4 /* EINTR */) return -1;
      throw new SysError("epoll_wait", errno);
    }
    return n;
  }
  readyFd(i: number): number {
    return this.events.getUint32(i * EVENT_SIZE + 4, true);
  }
  readyEvents(i: number): number {
    return this.events.getUint32(i * EVENT_SIZE, true);
  }
  close(): void {
    libc.close(this.fd);
  }
}
