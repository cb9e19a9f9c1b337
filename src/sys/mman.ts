// Mappings: mmap/munmap/madvise and views of mapped memory.
import { toArrayBuffer } from "bun:ffi";
import { libc } from "./libc";
import { checkFault, lastErrno, SysError, check } from "./error";

// asm-generic/mman-common.h, asm-generic/mman.h
export const PROT_NONE = 0;
export const PROT_READ = 1;
export const PROT_WRITE = 2;
export const MAP_SHARED = 0x01;
export const MAP_PRIVATE = 0x02;
export const MAP_FIXED = 0x10;
export const MAP_ANONYMOUS = 0x20;
export const MAP_NORESERVE = 0x4000;
export const MAP_POPULATE = 0x8000;
export const MADV_DONTNEED = 4;
export const MADV_REMOVE = 9;
// Linux 5.14+: fault every page in writable, as a write to each would (include/uapi/asm-generic/mman-common.h).
export const MADV_POPULATE_WRITE = 23;

export const PAGE_SIZE = 4096;

/** A host virtual address, as returned by mmap. */
export type HostAddress = number;


export function mmap(
  addr: HostAddress,
  length: number,
  prot: number,
  flags: number,
  fd: number,
  offset: number,
): HostAddress {
  checkFault("mmap");
  const p = libc.mmap(addr, length, prot, flags, fd, offset) as number;
  if (p === -1) throw new SysError("mmap", lastErrno());
  return p;
}

/**
 * mmap for a mapping a client's descriptor decides (it may not be mappable at all): the
 * address, or -errno. Nothing is thrown: a client can make this fail at request rate.
 */
export function tryMmap(addr: HostAddress, length: number, prot: number, flags: number, fd: number, offset: number): number {
  try {
    checkFault("mmap");
  } catch (e) {
    return -(e as SysError).errno;
  }
  const p = libc.mmap(addr, length, prot, flags, fd, offset) as number;
  return p === -1 ? -lastErrno() : p;
}

export function munmap(addr: HostAddress, length: number): void {
  check("munmap", libc.munmap(addr, length));
}

export function madvise(addr: HostAddress, length: number, advice: number): void {
  checkFault("madvise");
  check("madvise", libc.madvise(addr, length, advice));
}

/** madvise whose failure is an answer (an older kernel's EINVAL): 0, or the errno. */
export function tryMadvise(addr: HostAddress, length: number, advice: number): number {
  return libc.madvise(addr, length, advice) === -1 ? lastErrno() : 0;
}

/** A byte view of mapped memory, without a copy. Valid only while the mapping lives. */
export function memoryView(addr: HostAddress, length: number): Uint8Array {
  return new Uint8Array(toArrayBuffer(addr, 0, length));
}
