// A host memory mapping with one owner, as crosvm's base::MemoryMapping and
// MemoryMappingArena: released exactly once, by whoever owns it last.
import * as sys from "../sys";

const ANON_RESERVED = sys.MAP_PRIVATE | sys.MAP_ANONYMOUS | sys.MAP_NORESERVE;

export class MemoryMapping {
  private released = false;
  private constructor(
    readonly addr: sys.HostAddress,
    readonly size: number,
  ) {}

  /**
   * `size` bytes of `fd` at `offset`, shared with every other mapper of the object, or, with
   * `private_`, a copy-on-write view of it (how a write-sealed memfd can be mapped at all).
   */
  static fromDescriptor(fd: number, offset: number, size: number, prot: number, private_ = false): MemoryMapping {
    return new MemoryMapping(sys.mmap(0, size, prot, private_ ? sys.MAP_PRIVATE : sys.MAP_SHARED, fd, offset), size);
  }

  /** fromDescriptor, for a descriptor a client chose: the mapping, or the errno mmap gave. */
  static tryFromDescriptor(fd: number, offset: number, size: number, prot: number, private_ = false): MemoryMapping | number {
    const p = sys.tryMmap(0, size, prot, private_ ? sys.MAP_PRIVATE : sys.MAP_SHARED, fd, offset);
    return p < 0 ? -p : new MemoryMapping(p, size);
  }

  /** Anonymous memory that reads as zeros and takes no host memory until written. */
  static anonymous(size: number, prot: number): MemoryMapping {
    return new MemoryMapping(sys.mmap(0, size, prot, ANON_RESERVED, -1, 0), size);
  }

  /** Maps `size` bytes of `fd` over [offset, offset+size) of this mapping (MAP_FIXED). */
  mapFixed(offset: number, size: number, fd: number, fdOffset: number, prot: number, private_ = false): void {
    const errno = this.tryMapFixed(offset, size, fd, fdOffset, prot, private_);
    if (errno !== 0) throw new sys.SysError("mmap", errno);
  }

  /** mapFixed for a descriptor a client chose: 0, or the errno mmap gave (nothing thrown). */
  tryMapFixed(offset: number, size: number, fd: number, fdOffset: number, prot: number, private_ = false): number {
    this.checkRange(offset, size);
    const p = sys.tryMmap(this.addr + offset, size, prot, (private_ ? sys.MAP_PRIVATE : sys.MAP_SHARED) | sys.MAP_FIXED, fd, fdOffset);
    if (p >= 0) return 0;
    // Some kernels unmap the old range before a MAP_FIXED mmap fails: put the arena's
    // memory back, so no hole is left for an unrelated mapping to land in.
    try {
      this.unmapFixed(offset, size);
    } catch {}
    return -p;
  }

  /** Puts read-only anonymous memory back over [offset, offset+size) (an arena's empty state). */
  unmapFixed(offset: number, size: number): void {
    this.checkRange(offset, size);
    sys.mmap(this.addr + offset, size, sys.PROT_READ, ANON_RESERVED | sys.MAP_FIXED, -1, 0);
  }

  private checkRange(offset: number, size: number): void {
    if (this.released) throw new sys.SysError("mapping already released", sys.Errno.EBADF);
    if (offset < 0 || size <= 0 || offset + size > this.size) {
      throw new sys.SysError(`range ${offset}+${size} outside a mapping of ${this.size} bytes`, sys.Errno.EINVAL);
    }
  }

  view(offset = 0, size = this.size - offset): Uint8Array {
    return sys.memoryView(this.addr + offset, size);
  }

  release(): void {
    if (this.released) return;
    this.released = true;
    sys.munmap(this.addr, this.size);
  }
}
