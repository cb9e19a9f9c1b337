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

  /** Anonymous memory that reads as zeros and takes no host memory until written. */
  static anonymous(size: number, prot: number): MemoryMapping {
    return new MemoryMapping(sys.mmap(0, size, prot, ANON_RESERVED, -1, 0), size);
  }

  /** Maps `size` bytes of `fd` over [offset, offset+size) of this mapping (MAP_FIXED). */
  mapFixed(offset: number, size: number, fd: number, fdOffset: number, prot: number, private_ = false): void {
    this.checkRange(offset, size);
    try {
      sys.mmap(this.addr + offset, size, prot, (private_ ? sys.MAP_PRIVATE : sys.MAP_SHARED) | sys.MAP_FIXED, fd, fdOffset);
    } catch (e) {
      // Some kernels unmap the old range before a MAP_FIXED mmap fails: put the arena's
      // memory back, so no hole is left for an unrelated mapping to land in.
      try {
        this.unmapFixed(offset, size);
      } catch {}
      throw e;
    }
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
