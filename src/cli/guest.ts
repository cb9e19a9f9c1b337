// Placeholder until the vCPU lands: --guest is refused clearly.
import type { KvmVm } from "../kvm";
import type { Logger, Server } from "../server";
import type { VcpuSummary } from "../memory/request";
import { UsageError } from "./args";

export interface GuestHandle {
  summary(): VcpuSummary;
  stop(): Promise<void>;
}

export function attachGuest(_vm: KvmVm, _server: Server, _opts: { guestPath: string; serialPath?: string; log: Logger }): GuestHandle {
  throw new UsageError("--guest: not supported by this build");
}
