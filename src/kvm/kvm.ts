// /dev/kvm: API version, capabilities, supported CPUID.
import * as sys from "../sys";

export interface CpuidEntry {
  function: number;
  index: number;
  flags: number;
  eax: number;
  ebx: number;
  ecx: number;
  edx: number;
}

export class Kvm {
  readonly fd: number;

  constructor(path = "/dev/kvm") {
    this.fd = sys.open(path, sys.O_RDWR);
    try {
      const version = sys.ioctl(this.fd, sys.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION");
      if (version !== sys.KVM_API_VERSION) {
        throw new sys.SysError(`KVM_GET_API_VERSION: ${version}, vmemd needs ${sys.KVM_API_VERSION}`, sys.Errno.ENOTSUP);
      }
    } catch (e) {
      sys.close(this.fd);
      throw e;
    }
  }

  checkExtension(cap: number): number {
    return sys.ioctl(this.fd, sys.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION");
  }

  /** KVM_CAP_NR_MEMSLOTS: slots per address space (the kernel's KVM_USER_MEM_SLOTS). */
  maxMemSlots(): number {
    return this.checkExtension(sys.KVM_CAP_NR_MEMSLOTS);
  }

  vcpuMmapSize(): number {
    return sys.ioctl(this.fd, sys.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE");
  }

  /** KVM_GET_SUPPORTED_CPUID, as the raw kvm_cpuid2 buffer and as entries. */
  supportedCpuid(): { raw: Uint8Array; entries: CpuidEntry[] } {
    const raw = new Uint8Array(8 + sys.CPUID_MAX_ENTRIES * sys.CPUID_ENTRY_SIZE);
    const v = new DataView(raw.buffer);
    v.setUint32(0, sys.CPUID_MAX_ENTRIES, true);
    sys.ioctl(this.fd, sys.KVM_GET_SUPPORTED_CPUID, raw, "KVM_GET_SUPPORTED_CPUID");
    const n = v.getUint32(0, true);
    const entries: CpuidEntry[] = [];
    for (let i = 0; i < n; i++) {
      const o = 8 + i * sys.CPUID_ENTRY_SIZE;
      entries.push({
        function: v.getUint32(o, true),
        index: v.getUint32(o + 4, true),
        flags: v.getUint32(o + 8, true),
        eax: v.getUint32(o + 12, true),
        ebx: v.getUint32(o + 16, true),
        ecx: v.getUint32(o + 20, true),
        edx: v.getUint32(o + 24, true),
      });
    }
    return { raw: raw.subarray(0, 8 + n * sys.CPUID_ENTRY_SIZE), entries };
  }

  /** Guest physical address width: CPUID 0x8000_0008 EAX[7:0], 36 when absent (the architectural default). */
  physAddrBits(): number {
    const leaf = this.supportedCpuid().entries.find((e) => e.function === 0x8000_0008);
    return leaf ? leaf.eax & 0xff : 36;
  }

  createVmFd(): number {
    return sys.ioctl(this.fd, sys.KVM_CREATE_VM, 0, "KVM_CREATE_VM");
  }

  close(): void {
    sys.close(this.fd);
  }
}
