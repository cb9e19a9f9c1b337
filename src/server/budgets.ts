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
 * Read in 32 bytes (sys.readSmallFile says why not more).
 */
export function mappingBudget(): number {
  try {
    const text = sys.readSmallFile("/proc/sys/vm/max_map_count", 32).trim();
    const max = /^\d+$/.test(text) ? Number(text) : NaN;
    if (Number.isSafeInteger(max) && max > 2 * MAPPING_HEADROOM) return max - MAPPING_HEADROOM;
  } catch {}
  return DEFAULT_BUDGETS.mappings;
}
