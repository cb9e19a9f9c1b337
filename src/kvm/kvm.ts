// /dev/kvm: API version, capabilities, supported CPUID.
import * as sys from "../sys";

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

  /** KVM_GET_SUPPORTED_CPUID: the kvm_cpuid2 buffer, as long as its entries. */
  supportedCpuid(): Uint8Array {
    const raw = new Uint8Array(8 + sys.CPUID_MAX_ENTRIES * sys.CPUID_ENTRY_SIZE);
    const v = new DataView(raw.buffer);
    v.setUint32(0, sys.CPUID_MAX_ENTRIES, true);
    sys.ioctl(this.fd, sys.KVM_GET_SUPPORTED_CPUID, raw, "KVM_GET_SUPPORTED_CPUID");
    return raw.subarray(0, 8 + v.getUint32(0, true) * sys.CPUID_ENTRY_SIZE);
  }

  /**
   * Guest physical address width: CPUID 0x8000_0008 EAX[7:0], 36 when absent (the
   * architectural default). Read in place (struct kvm_cpuid_entry2: function@0, eax@12):
   * an object per entry made this 0.4 ms of start-up.
   */
  physAddrBits(): number {
    const raw = this.supportedCpuid();
    const v = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
    for (let o = 8; o + sys.CPUID_ENTRY_SIZE <= raw.byteLength; o += sys.CPUID_ENTRY_SIZE) {
      if (v.getUint32(o, true) === 0x8000_0008) return v.getUint32(o + 12, true) & 0xff;
    }
    return 36;
  }

  createVmFd(): number {
    return sys.ioctl(this.fd, sys.KVM_CREATE_VM, 0, "KVM_CREATE_VM");
  }

  close(): void {
    sys.close(this.fd);
  }
}
