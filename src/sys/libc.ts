// The one dlopen of libc. Every other file in src/sys calls through `libc`;
// nothing outside src/sys imports bun:ffi (README.md, Layout).
import { dlopen, FFIType } from "bun:ffi";

const { i32, u32, u64, i64_fast, ptr } = FFIType;

export const libc = dlopen("libc.so.6", {
  __errno_location: { args: [], returns: ptr },
  open: { args: [ptr, i32, u32], returns: i32 },
  close: { args: [i32], returns: i32 },
  read: { args: [i32, ptr, u64], returns: i64_fast },
  write: { args: [i32, ptr, u64], returns: i64_fast },
  pwrite: { args: [i32, ptr, u64, u64], returns: i64_fast },
  // Variadic in C; declaring the third argument as a pointer-sized value lets
  // the same symbol take a struct pointer or a plain integer (a number passes as the raw value).
  ioctl: { args: [i32, u64, ptr], returns: i32 },
  fcntl: { args: [i32, i32, u64], returns: i32 },
  // i64_fast: MAP_FAILED comes back as the number -1 and addresses (below 2^47) as numbers,
  // so reading errno after a failure allocates nothing first.
  mmap: { args: [ptr, u64, i32, i32, i32, u64], returns: i64_fast },
  munmap: { args: [ptr, u64], returns: i32 },
  madvise: { args: [ptr, u64, i32], returns: i32 },
  memfd_create: { args: [ptr, u32], returns: i32 },
  ftruncate: { args: [i32, u64], returns: i32 },
  fstat: { args: [i32, ptr], returns: i32 },
  lstat: { args: [ptr, ptr], returns: i32 },
  unlink: { args: [ptr], returns: i32 },
  fchmod: { args: [i32, u32], returns: i32 },
  eventfd: { args: [u32, i32], returns: i32 },
  timerfd_create: { args: [i32, i32], returns: i32 },
  timerfd_settime: { args: [i32, i32, ptr, ptr], returns: i32 },
  getrlimit: { args: [i32, ptr], returns: i32 },
  setrlimit: { args: [i32, ptr], returns: i32 },
  socket: { args: [i32, i32, i32], returns: i32 },
  socketpair: { args: [i32, i32, i32, ptr], returns: i32 },
  bind: { args: [i32, ptr, u32], returns: i32 },
  listen: { args: [i32, i32], returns: i32 },
  accept4: { args: [i32, ptr, ptr, i32], returns: i32 },
  connect: { args: [i32, ptr, u32], returns: i32 },
  recvmsg: { args: [i32, ptr, i32], returns: i64_fast },
  sendmsg: { args: [i32, ptr, i32], returns: i64_fast },
  sendto: { args: [i32, ptr, u64, i32, ptr, u32], returns: i64_fast },
  getsockname: { args: [i32, ptr, ptr], returns: i32 },
  recvmmsg: { args: [i32, ptr, u32, i32, ptr], returns: i32 },
  sendmmsg: { args: [i32, ptr, u32, i32], returns: i32 },
  getsockopt: { args: [i32, i32, i32, ptr, ptr], returns: i32 },
  setsockopt: { args: [i32, i32, i32, ptr, u32], returns: i32 },
  shutdown: { args: [i32, i32], returns: i32 },
  pipe2: { args: [ptr, i32], returns: i32 },
  poll: { args: [ptr, u64, i32], returns: i32 },
  epoll_create1: { args: [i32], returns: i32 },
  epoll_ctl: { args: [i32, i32, i32, ptr], returns: i32 },
  epoll_wait: { args: [i32, ptr, i32, i32], returns: i32 },
  getpid: { args: [], returns: i32 },
  getppid: { args: [], returns: i32 },
  unsetenv: { args: [ptr], returns: i32 },
  prctl: { args: [i32, u64, u64, u64, u64], returns: i32 },
  capset: { args: [ptr, ptr], returns: i32 },
  // Variadic; for seccomp(2), which glibc 2.36 does not wrap.
  syscall: { args: [u64, u64, u64, ptr], returns: i64_fast },
  gettid: { args: [], returns: i32 },
  tgkill: { args: [i32, i32, i32], returns: i32 },
  pthread_sigmask: { args: [i32, ptr, ptr], returns: i32 },
  sigaction: { args: [i32, ptr, ptr], returns: i32 },
  strerror: { args: [i32], returns: FFIType.cstring },
  // src/sys/thread.ts: a no-op signal handler is the address of a libc function.
  dlsym: { args: [ptr, ptr], returns: ptr },
  __libc_current_sigrtmin: { args: [], returns: i32 },
}).symbols;
