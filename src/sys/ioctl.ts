// ioctl(2), and the KVM ABI: ioctl numbers, capabilities and struct layouts.
// All numbers are from include/uapi/linux/kvm.h (KVMIO = 0xAE) for x86_64.
import type { Pointer } from "bun:ffi";
import { libc } from "./libc";
import { checkFault, lastErrno, SysError } from "./error";
import { setU64 } from "./u64";

const EINTR = 4;

/**
 * ioctl with a struct argument (a typed array) or an integer argument, retried when a
 * signal interrupts it (KVM_CREATE_VM and slot updates can return EINTR). KVM_RUN is
 * not issued through here: its EINTR means "look at the stop flag".
 */
export function ioctl(fd: number, request: number, arg: ArrayBufferView | number, name: string): number {
  checkFault(name);
  for (;;) {
    const rc = libc.ioctl(fd, request, arg as unknown as Pointer);
    if (rc !== -1) return rc;
    const errno = lastErrno();
    if (errno !== EINTR) throw new SysError(name, errno);
  }
}

/** ioctl whose failure is an answer a client drives (a duplicate ioeventfd): rc, or -errno. */
export function tryIoctl(fd: number, request: number, arg: ArrayBufferView | number, name: string): number {
  try {
    checkFault(name);
  } catch (e) {
    return -(e as SysError).errno;
  }
  for (;;) {
    const rc = libc.ioctl(fd, request, arg as unknown as Pointer);
    if (rc !== -1) return rc;
    const errno = lastErrno();
    if (errno !== EINTR) return -errno;
  }
}

// _IO(KVMIO, n)
export const KVM_GET_API_VERSION = 0xae00;
export const KVM_CREATE_VM = 0xae01;
export const KVM_CHECK_EXTENSION = 0xae03;
export const KVM_GET_VCPU_MMAP_SIZE = 0xae04;
export const KVM_CREATE_VCPU = 0xae41;
export const KVM_SET_TSS_ADDR = 0xae47;
export const KVM_RUN = 0xae80;
// _IOWR(KVMIO, 0x05, struct kvm_cpuid2)
export const KVM_GET_SUPPORTED_CPUID = 0xc008ae05;
// _IOW(KVMIO, 0x46, struct kvm_userspace_memory_region)
export const KVM_SET_USER_MEMORY_REGION = 0x4020ae46;
// _IOW(KVMIO, 0x79, struct kvm_ioeventfd)
export const KVM_IOEVENTFD = 0x4040ae79;
// _IOR/_IOW(KVMIO, 0x81..0x84, struct kvm_regs / kvm_sregs)
// _IOR/_IOW(KVMIO, 0x9f/0xa0, struct kvm_vcpu_events): pending exceptions, interrupts, NMIs.
export const KVM_GET_VCPU_EVENTS = 0x8040ae9f;
export const KVM_SET_VCPU_EVENTS = 0x4040aea0;
export const VCPU_EVENTS_SIZE = 64;
// struct kvm_vcpu_events: exception { u8 injected, nr, has_error_code, pending; u32 error_code } at 0, flags at 20.
export const VCPU_EVENTS = { exceptionInjected: 0, exceptionNr: 1, exceptionHasErrorCode: 2, exceptionPending: 3, flags: 20 } as const;
// KVM_INTERNAL_ERROR_EMULATION and its instruction bytes (struct kvm_run's emulation_failure).
export const KVM_INTERNAL_ERROR_EMULATION = 1;
export const KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1;
export const KVM_GET_REGS = 0x8090ae81;
export const KVM_SET_REGS = 0x4090ae82;
export const KVM_GET_SREGS = 0x8138ae83;
export const KVM_SET_SREGS = 0x4138ae84;
// _IOW(KVMIO, 0x90, struct kvm_cpuid2)
export const KVM_SET_CPUID2 = 0x4008ae90;
// _IO(KVMIO, 0x60): the in-kernel PIC pair, IOAPIC and a LAPIC per vCPU created after it.
export const KVM_CREATE_IRQCHIP = 0xae60;
// _IOW(KVMIO, 0x77, struct kvm_pit_config): the in-kernel 8254 timer.
export const KVM_CREATE_PIT2 = 0x4040ae77;
// _IOW(KVMIO, 0x61, struct kvm_irq_level { u32 irq; u32 level; }): a line of the in-kernel irqchip.
export const KVM_IRQ_LINE = 0x4008ae61;
// _IOW(KVMIO, 0x76, struct kvm_irqfd)
export const KVM_IRQFD = 0x4020ae76;

export const KVM_API_VERSION = 12;

// Capabilities (KVM_CAP_*).
export const KVM_CAP_USER_MEMORY = 3;
export const KVM_CAP_NR_MEMSLOTS = 10;
export const KVM_CAP_IOEVENTFD = 36;
export const KVM_CAP_READONLY_MEM = 81;
export const KVM_CAP_IRQCHIP = 0;
export const KVM_CAP_IRQFD = 32;
export const KVM_CAP_PIT2 = 33;
export const KVM_CAP_IRQFD_RESAMPLE = 82;

// struct kvm_pit_config { u32 flags; u32 pad[15]; } (64 bytes).
export const KVM_PIT_CONFIG_SIZE = 64;
/** Port 0x61 (the PC speaker) handled in the kernel too, reading as a speaker that is off. */
export const KVM_PIT_SPEAKER_DUMMY = 1;

// struct kvm_irqfd { u32 fd; u32 gsi; u32 flags; u32 resamplefd; u8 pad[16]; } (32 bytes).
export const KVM_IRQFD_FLAG_DEASSIGN = 1 << 0;
export const KVM_IRQFD_FLAG_RESAMPLE = 1 << 1;
export const IRQFD_SIZE = 32;
export function encodeIrqfd(buf: DataView, fd: number, gsi: number, flags: number, resampleFd: number): void {
  buf.setInt32(0, fd, true);
  buf.setUint32(4, gsi, true);
  buf.setUint32(8, flags, true);
  buf.setInt32(12, resampleFd, true);
  for (let i = 16; i < 32; i++) buf.setUint8(i, 0);
}

// struct kvm_userspace_memory_region (32 bytes).
export const KVM_MEM_READONLY = 1 << 1;
export const MEMORY_REGION_SIZE = 32;
export function encodeMemoryRegion(
  buf: DataView,
  slot: number,
  flags: number,
  guestPhysAddr: number,
  memorySize: number,
  userspaceAddr: number,
): void {
  buf.setUint32(0, slot, true);
  buf.setUint32(4, flags, true);
  setU64(buf, 8, guestPhysAddr);
  setU64(buf, 16, memorySize);
  setU64(buf, 24, userspaceAddr);
}


// struct kvm_ioeventfd (64 bytes): datamatch@0, addr@8, len@16, fd@20, flags@24.
export const KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0;
export const KVM_IOEVENTFD_FLAG_PIO = 1 << 1;
export const KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2;
export const IOEVENTFD_SIZE = 64;
export function encodeIoeventfd(
  buf: DataView,
  datamatch: bigint,
  addr: number,
  len: number,
  fd: number,
  flags: number,
): void {
  buf.setBigUint64(0, datamatch, true);
  buf.setBigUint64(8, BigInt(addr), true);
  buf.setUint32(16, len, true);
  buf.setInt32(20, fd, true);
  buf.setUint32(24, flags, true);
  for (let i = 28; i < 64; i++) buf.setUint8(i, 0);
}

// struct kvm_cpuid2 { u32 nent; u32 padding; struct kvm_cpuid_entry2 entries[]; }
// struct kvm_cpuid_entry2 (40 bytes): function, index, flags, eax, ebx, ecx, edx, padding[3].
export const CPUID_ENTRY_SIZE = 40;
export const CPUID_MAX_ENTRIES = 256;

// struct kvm_run (include/uapi/linux/kvm.h): the fields vmemd reads.
export const KVM_RUN_IMMEDIATE_EXIT = 1; // u8
export const KVM_RUN_EXIT_REASON = 8; // u32
export const KVM_RUN_IO_DIRECTION = 32; // u8: KVM_EXIT_IO_IN 0, OUT 1
export const KVM_RUN_IO_SIZE = 33; // u8
export const KVM_RUN_IO_PORT = 34; // u16
export const KVM_RUN_IO_COUNT = 36; // u32
export const KVM_RUN_IO_DATA_OFFSET = 40; // u64
export const KVM_RUN_MMIO_PHYS_ADDR = 32; // u64
export const KVM_RUN_MMIO_DATA = 40; // u8[8]
export const KVM_RUN_MMIO_LEN = 48; // u32
export const KVM_RUN_MMIO_IS_WRITE = 52; // u8
export const KVM_RUN_INTERNAL_SUBERROR = 32; // u32
export const KVM_RUN_FAIL_ENTRY_REASON = 32; // u64

export const KVM_EXIT_IO = 2;
export const KVM_EXIT_HLT = 5;
export const KVM_EXIT_MMIO = 6;
export const KVM_EXIT_SHUTDOWN = 8;
export const KVM_EXIT_FAIL_ENTRY = 9;
export const KVM_EXIT_INTR = 10;
export const KVM_EXIT_INTERNAL_ERROR = 17;

// struct kvm_regs (144 bytes): rax rbx rcx rdx rsi rdi rsp rbp r8..r15 (u64 each), rip, rflags.
export const KVM_REGS_SIZE = 144;
export const KVM_REGS = { rsi: 32, rsp: 48, rip: 128, rflags: 136 } as const;
// struct kvm_sregs (312 bytes): eight kvm_segment (24 B each), gdt and idt (kvm_dtable,
// 16 B: base u64, limit u16), then the control registers.
export const KVM_SREGS_SIZE = 312;
export const KVM_SREGS = {
  cs: 0, ds: 24, es: 48, fs: 72, gs: 96, ss: 120, tr: 144, ldt: 168,
  gdt: 192, idt: 208, cr0: 224, cr2: 232, cr3: 240, cr4: 248, cr8: 256, efer: 264,
} as const;
export const KVM_DTABLE = { base: 0, limit: 8 } as const;
// struct kvm_segment (24 bytes).
export const KVM_SEGMENT = {
  base: 0, limit: 8, selector: 12, type: 14, present: 15, dpl: 16, db: 17, s: 18, l: 19, g: 20, avl: 21, unusable: 22,
} as const;
