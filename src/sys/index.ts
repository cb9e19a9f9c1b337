// src/sys: the only layer that touches bun:ffi.
export * from "./error";
export * from "./fd";
export * from "./mman";
export * from "./ioctl";
export * from "./socket";
export * from "./epoll";
export * from "./timerfd";
export * from "./thread";
export * from "./batch";
export * from "./seccomp";
export * from "./capability";
export * from "./u64";
