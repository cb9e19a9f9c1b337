// What each connection has made vmemd hold (regions, their guest bytes and host mappings,
// ioeventfds), against a budget per connection and one for the whole server, so no one peer
// can use up what the others need: KVM slots, the kernel's per-slot metadata, the process's
// mappings (vm.max_map_count), the VM's I/O bus. A refusal names the limit and its flag.
import { execute, NumberMap, Refusal, type ExecContext } from "../memory";
import type { VmMemoryRequest } from "../protocol";
import * as sys from "../sys";

export { DEFAULT_BUDGETS, MAPPING_HEADROOM, mappingBudget, type Budgets } from "./budgets";
import type { Budgets } from "./budgets";

/** Host mappings a region makes: a slot of its own is one; a MAP_FIXED mapping splits its container's into up to three. */
export const MAPPINGS_PER_REGION = 1;
export const MAPPINGS_PER_FIXED = 2;

/** An eventfd a peer bound to the VM: an ioeventfd (MMIO or port) or an irqfd. */
export type BindingKind = "ioevent" | "irqfd";

/**
 * A binding kept with --release-on-disconnect: a copy of its eventfd, and the request that
 * removes it (which names that copy).
 */
interface OwnedBinding {
  key: string;
  event: number;
  unregister: VmMemoryRequest;
}

/** One connection's holdings. */
export class Holdings {
  /** Live regions it registered, with what each counts for. */
  readonly regions = new NumberMap<{ bytes: number; mappings: number }>();
  bytes = 0;
  mappings = 0;
  ioevents = 0;
  irqfds = 0;
  /** Only kept with --release-on-disconnect. */
  readonly owned: OwnedBinding[] = [];
  constructor(readonly id: number) {}
}

export class Ledger {
  bytes = 0;
  mappings = 0;
  ioevents = 0;
  irqfds = 0;
  /** Which connection registered each live region (unregistering may come from another). */
  private readonly owner = new NumberMap<Holdings>();
  /** Regions whose connection has gone (crosvm keeps them): they still count in the totals. */
  private readonly orphans = new Holdings(0);

  constructor(
    readonly budgets: Budgets,
    private readonly releaseOnDisconnect: boolean,
  ) {}

  /** Whether `h` may register a region of `bytes` that makes `mappings` host mappings. */
  checkRegion(h: Holdings, bytes: number, mappings: number): Refusal | null {
    const b = this.budgets;
    if (h.regions.size >= b.regionsPerConnection) return limit(`this connection has ${h.regions.size} live regions`, "--max-regions-per-connection", b.regionsPerConnection);
    if (h.bytes + bytes > b.guestBytesPerConnection) {
      return limit(`this connection's regions would cover ${h.bytes + bytes} bytes`, "--max-guest-bytes-per-connection", b.guestBytesPerConnection);
    }
    if (this.bytes + bytes > b.guestBytes) return limit(`regions would cover ${this.bytes + bytes} bytes in all`, "--max-guest-bytes", b.guestBytes);
    return this.checkMappings(h, mappings);
  }

  checkMappings(h: Holdings, mappings: number): Refusal | null {
    const b = this.budgets;
    if (h.mappings + mappings > b.mappingsPerConnection) {
      return limit(`this connection's regions would take ${h.mappings + mappings} host mappings`, "--max-mappings-per-connection", b.mappingsPerConnection);
    }
    if (this.mappings + mappings > b.mappings) {
      return limit(`regions would take ${this.mappings + mappings} host mappings in all`, "--max-mappings (vm.max_map_count less headroom)", b.mappings);
    }
    return null;
  }

  checkBinding(h: Holdings, kind: BindingKind): Refusal | null {
    const b = this.budgets;
    if (kind === "irqfd") {
      if (h.irqfds >= b.irqfdsPerConnection) return limit(`this connection has ${h.irqfds} irqfds`, "--max-irqfds-per-connection", b.irqfdsPerConnection);
      if (this.irqfds >= b.irqfds) return limit(`${this.irqfds} irqfds are registered`, "vmemd's total", b.irqfds);
      return null;
    }
    if (h.ioevents >= b.ioeventsPerConnection) return limit(`this connection has ${h.ioevents} ioevents`, "--max-ioevents-per-connection", b.ioeventsPerConnection);
    if (this.ioevents >= b.ioevents) return limit(`${this.ioevents} ioevents are registered`, "the VM's I/O bus", b.ioevents);
    return null;
  }

  /** Mappings a pending request has made so far (charged as they are made). */
  chargeMappings(h: Holdings, n: number): void {
    h.mappings += n;
    this.mappings += n;
  }

  /** A region `h` registered; `mappings` were charged while it was built, or are charged now. */
  recordRegion(h: Holdings, id: number, bytes: number, mappings: number, charged = 0): void {
    h.regions.set(id, { bytes, mappings });
    h.bytes += bytes;
    this.bytes += bytes;
    this.chargeMappings(h, mappings - charged);
    this.owner.set(id, h);
  }

  recordUnregister(id: number): void {
    const h = this.owner.get(id);
    const r = h?.regions.get(id);
    if (h === undefined || r === undefined) return;
    this.owner.delete(id);
    h.regions.delete(id);
    h.bytes -= r.bytes;
    this.bytes -= r.bytes;
    this.chargeMappings(h, -r.mappings);
  }

  /** Moves a region to the orphans: off its connection's budget, still in the totals. */
  private adopt(h: Holdings, id: number): void {
    const r = h.regions.get(id)!;
    h.regions.delete(id);
    h.bytes -= r.bytes;
    h.mappings -= r.mappings;
    const o = this.orphans;
    o.regions.set(id, r);
    o.bytes += r.bytes;
    o.mappings += r.mappings;
    this.owner.set(id, o);
  }

  private count(h: Holdings, kind: BindingKind, d: number): void {
    if (kind === "irqfd") {
      h.irqfds += d;
      this.irqfds += d;
    } else {
      h.ioevents += d;
      this.ioevents += d;
    }
  }

  /**
   * A binding KVM accepted (`register`) or removed. `keep` (or null) is what
   * --release-on-disconnect keeps to remove it later; `key` names it for an unregister.
   */
  recordBinding(h: Holdings, kind: BindingKind, register: boolean, key: string, keep: OwnedBinding | null): void {
    if (register) {
      this.count(h, kind, 1);
      if (keep !== null) h.owned.push(keep);
      return;
    }
    // Another connection's (or an orphan's) binding: KVM matched it, so it was counted somewhere.
    const from = (kind === "irqfd" ? h.irqfds : h.ioevents) > 0 ? h : this.orphans;
    if ((kind === "irqfd" ? from.irqfds : from.ioevents) === 0) return;
    this.count(from, kind, -1);
    const i = h.owned.findIndex((e) => e.key === key);
    if (i !== -1) {
      try {
        sys.close(h.owned.splice(i, 1)[0]!.event);
      } catch {}
    }
  }

  /** Forgets (or, with --release-on-disconnect, removes) what `h` holds; its connection has gone. */
  release(h: Holdings, ctx: ExecContext, warn: (msg: string, fields: Record<string, unknown>) => void): { regions: number; ioevents: number; irqfds: number } {
    const counts = { regions: h.regions.size, ioevents: h.ioevents, irqfds: h.irqfds };
    for (const id of h.regions.keyList()) {
      if (!this.releaseOnDisconnect) {
        this.adopt(h, id);
        continue;
      }
      const resp = execute({ UnregisterMemory: id }, ctx);
      if (resp === "Ok") this.recordUnregister(id);
      else {
        this.adopt(h, id);
        warn("could not release a region on disconnect", { conn: h.id, region: id, resp: JSON.stringify(resp) });
      }
    }
    for (const e of h.owned) {
      execute(e.unregister as Exclude<VmMemoryRequest, { MmapAndRegisterMemory: unknown }>, ctx);
      try {
        sys.close(e.event);
      } catch {}
    }
    // Without --release-on-disconnect the bindings stay registered, like the regions.
    if (this.releaseOnDisconnect) {
      this.ioevents -= h.ioevents;
      this.irqfds -= h.irqfds;
    } else {
      this.orphans.ioevents += h.ioevents;
      this.orphans.irqfds += h.irqfds;
    }
    h.ioevents = 0;
    h.irqfds = 0;
    h.owned.length = 0;
    // Mappings a pending request charged and never turned into a region.
    this.mappings -= h.mappings;
    h.mappings = 0;
    return counts;
  }

  /** Whether bindings are kept (with a copy of their eventfd) to be removed at disconnect. */
  get keepsBindings(): boolean {
    return this.releaseOnDisconnect;
  }
}

function limit(what: string, flag: string, max: number): Refusal {
  return Refusal.of("ENOSPC", `${what}; the limit is ${max} (${flag})`);
}
