// The budgets' defaults and the mapping budget's source (vm.max_map_count): what serve
// needs before its socket is ready, in a module of their own so that it does not load the
// ledger (and through it the request executor and the wire description) to get them.
import * as sys from "../sys";

export interface Budgets {
  regionsPerConnection: number;
  guestBytesPerConnection: number;
  guestBytes: number;
  mappingsPerConnection: number;
  mappings: number;
  ioeventsPerConnection: number;
  ioevents: number;
  irqfdsPerConnection: number;
  irqfds: number;
}

/** A vm.max_map_count share kept for the runtime itself (its heap, JIT, threads' stacks). */
export const MAPPING_HEADROOM = 8192;

export const DEFAULT_BUDGETS: Budgets = {
  regionsPerConnection: 16384,
  guestBytesPerConnection: 64 * 2 ** 30,
  guestBytes: 256 * 2 ** 30,
  mappingsPerConnection: 16384,
  // Set from vm.max_map_count at start (see mappingBudget).
  mappings: 65530 - MAPPING_HEADROOM,
  ioeventsPerConnection: 256,
  // KVM's I/O bus takes at most 1000 devices (NR_IOBUS_DEVS, include/linux/kvm_host.h).
  ioevents: 1000,
  irqfdsPerConnection: 64,
  // Each holds an eventfd reference and a routing entry in the kernel; 24 pins, many devices.
  irqfds: 1024,
};

/**
 * The process-wide mapping budget: vm.max_map_count less the runtime's headroom.
 *
 * Read with one small read(2), not readFileSync: a sysctl read makes the kernel allocate
 * and zero a buffer the size of the request (proc_sys_call_handler), and readFileSync asks
 * for 256 KiB twice; that took 1.8-3 ms of start-up (strace -T: 1.78 ms and 1.06 ms for the
 * two reads), where a 32-byte read takes about 10 µs. It also kept node:fs (about 1 ms to
 * load) on the way to a ready socket.
 */
export function mappingBudget(): number {
  try {
    const fd = sys.open("/proc/sys/vm/max_map_count", sys.O_RDONLY);
    const buf = new Uint8Array(32);
    let n: number;
    try {
      n = sys.read(fd, buf);
    } finally {
      sys.close(fd);
    }
    const text = new TextDecoder().decode(buf.subarray(0, n)).trim();
    const max = /^\d+$/.test(text) ? Number(text) : NaN;
    if (Number.isSafeInteger(max) && max > 2 * MAPPING_HEADROOM) return max - MAPPING_HEADROOM;
  } catch {}
  return DEFAULT_BUDGETS.mappings;
}
