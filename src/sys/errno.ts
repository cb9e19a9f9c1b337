// errno values, in a module that needs no FFI (the seccomp policy is compiled at build time).
// asm-generic/errno-base.h and asm-generic/errno.h (x86_64).
export const Errno = {
  EPERM: 1, ENOENT: 2, ESRCH: 3, EINTR: 4, EIO: 5, ENXIO: 6, E2BIG: 7, EBADF: 9,
  EAGAIN: 11, ENOMEM: 12, EACCES: 13, EFAULT: 14, EBUSY: 16, EEXIST: 17, ENODEV: 19,
  ENOTDIR: 20, EISDIR: 21, EINVAL: 22, ENFILE: 23, EMFILE: 24, ENOTTY: 25, EFBIG: 27,
  ENOSPC: 28, ESPIPE: 29, EPIPE: 32, ERANGE: 34, ENOSYS: 38, ENOTSUP: 95,
  EOVERFLOW: 75, EMSGSIZE: 90, EPROTO: 71, ECONNREFUSED: 111, ECONNRESET: 104,
  EADDRINUSE: 98, ENOTCONN: 107, ENOTSOCK: 88, ETIMEDOUT: 110, EPROTOTYPE: 91,
  EINPROGRESS: 115, ENAMETOOLONG: 36,
} as const;
export type ErrnoName = keyof typeof Errno;
