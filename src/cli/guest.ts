// `vmemd serve --guest FILE [--serial PATH]`: loads the guest, runs its one vCPU in a
// Worker, and ties it to the server's main-thread epoll loop (docs/boot.md).
import { openSync, readFileSync, statSync } from "node:fs";
import type { KvmVm } from "../kvm";
import { checkBootImage } from "../kvm/boot";
import { Vcpu, type VcpuMessage } from "../kvm/vcpu";
import type { VcpuSummary } from "../protocol";
import type { Logger, Server } from "../server";
import * as sys from "../sys";

export interface GuestHandle {
  summary(): VcpuSummary;
  /** Stops the vCPU (even inside KVM_RUN) and releases it. Call after the server loop has returned. */
  stop(): Promise<void>;
}

/** Writes all of `bytes` to `fd`; false when the descriptor is gone (EPIPE, EBADF...). */
function writeAll(fd: number, bytes: Uint8Array): boolean {
  let done = 0;
  while (done < bytes.byteLength) {
    try {
      done += sys.write(fd, bytes.subarray(done));
    } catch (e) {
      if (e instanceof sys.SysError && (e.errno === sys.Errno.EAGAIN || e.errno === sys.Errno.EINTR)) {
        Bun.sleepSync(1); // a non-blocking stdout that is full: wait a little, never spin
        continue;
      }
      return false;
    }
  }
  return true;
}

/**
 * vmemd's exit status for the byte a guest wrote to port 0xF4: 3 + value, capped at 125,
 * so it is never 0, 1 or 2 (vmemd's own: stopped, failed, usage) nor in the range shells
 * report for commands not run (126, 127) or killed by a signal (128 and up).
 */
export function guestExitStatus(value: number): number {
  return 3 + Math.min(value, 122);
}

export function attachGuest(
  vm: KvmVm,
  server: Server,
  opts: { guestPath: string; serialPath?: string; log: Logger },
): GuestHandle {
  const { log } = opts;
  let size: number;
  try {
    size = statSync(opts.guestPath).size;
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code ?? "";
    const errno = code in sys.Errno ? sys.Errno[code as sys.ErrnoName] : sys.Errno.EIO;
    throw new sys.SysError(`--guest ${opts.guestPath}`, errno);
  }
  checkBootImage(size, vm.ramSize, `--guest ${opts.guestPath}`);
  const image = readFileSync(opts.guestPath);

  const serialFd = opts.serialPath === undefined ? 1 : openSync(opts.serialPath, "w", 0o644);
  let serialBroken = false;
  const onSerial = (bytes: Uint8Array): void => {
    if (serialBroken) return;
    if (!writeAll(serialFd, bytes)) {
      serialBroken = true;
      log.warn("guest serial output cannot be written; dropping it from now on", { serial: opts.serialPath ?? "stdout" });
    }
  };
  const onMessage = (m: VcpuMessage): void => log.log(m.level, m.msg, m.fields ?? {});

  let vcpu: Vcpu;
  try {
    vcpu = Vcpu.start(vm, image, {
      onSerial,
      onMessage,
      onState: (state) => {
        if (state === "running") {
          log.info("vcpu running", { guest: opts.guestPath, boot_ms: Math.round(performance.now() - vcpu.startedAt) });
        }
      },
      onExitRequest: (value) => server.stop(`guest requested exit (port 0xf4, value ${value})`, guestExitStatus(value)),
    });
  } catch (e) {
    if (opts.serialPath !== undefined) sys.close(serialFd);
    throw e;
  }
  server.watch(vcpu.eventFd, () => vcpu.service());
  log.info("guest loaded", { guest: opts.guestPath, bytes: image.byteLength, serial: opts.serialPath ?? "stdout" });

  let stopped: Promise<void> | null = null;
  return {
    summary: () => vcpu.summary(),
    stop: () =>
      (stopped ??= (async () => {
        await vcpu.stop();
        const s = vcpu.summary();
        log.info("vcpu stopped", { state: s.state, exits: s.exits, mmio_reads: s.mmio_reads, mmio_writes: s.mmio_writes });
        if (opts.serialPath !== undefined) {
          try {
            sys.close(serialFd);
          } catch {}
        }
      })()),
  };
}
